"""Every family's image side, looked up by the converter (by model_type) and the loader (by kind).

Native families (Chameleon, Emu3) turn images into VQ token ids (`models.native`); non-native
ones (LLaVA-1.5 / NeXT / OneVision, LLaVA with Pixtral, Janus) into input embeddings
(`models.nonnative`), VILA-U into residual-quantised input embeddings (`models.vila_u`).
Text-only checkpoints (Emu3ForCausalLM: "emu3_text_model") have none.
"""

from narrowgate_jax.models import native, nonnative

IMAGE_PARAMS_DIR = "image_params"
VILA_U_MODEL_TYPE = "ng_vila_u"  # models.vila_u.VilaUConfig.model_type


def _vila_u_side(hf_config, keys=None):
  # models.vila_u defines a transformers config class: imported only when VILA-U is used, so
  # `import narrowgate_jax` does not import transformers.
  from narrowgate_jax.models import vila_u

  return vila_u.vila_u_side(hf_config, keys)


def _vila_u_images(*args, **kwargs):
  from narrowgate_jax.models import vila_u

  return vila_u.VilaUImages(*args, **kwargs)

# model_type -> (transformers config, checkpoint keys or None) -> ImageSide
IMAGE_SIDES = {"chameleon": native.chameleon_side, "emu3": native.emu3_side,
               **{t: nonnative.nonnative_side for t in nonnative.NONNATIVE_MODEL_TYPES},
               VILA_U_MODEL_TYPE: _vila_u_side}

# ImageSide.kind -> reader(hf_config, params, tokenizer, processor_config, dtype=...), whose
# `.spans(images)` gives each image's span in the prompt.
IMAGE_READERS = {"chameleon_vq": native.ChameleonImages, "emu3_vq": native.Emu3Images,
                 **nonnative.NONNATIVE_READERS, "vila_u": _vila_u_images}
