"""Every family's image side, looked up by the converter (by model_type) and the loader (by kind).

Native families (Chameleon, Emu3) turn images into VQ token ids (`models.native`); non-native
ones (LLaVA-1.5 / NeXT / OneVision, LLaVA with Pixtral, Janus) into input embeddings
(`models.nonnative`). Text-only checkpoints (Emu3ForCausalLM: "emu3_text_model") have none.
"""

from narrowgate_jax.models import native, nonnative

IMAGE_PARAMS_DIR = "image_params"

# model_type -> (transformers config, checkpoint keys or None) -> ImageSide
IMAGE_SIDES = {"chameleon": native.chameleon_side, "emu3": native.emu3_side,
               **{t: nonnative.nonnative_side for t in nonnative.NONNATIVE_MODEL_TYPES}}

# ImageSide.kind -> reader(hf_config, params, tokenizer, processor_config, dtype=...), whose
# `.spans(images)` gives each image's span in the prompt.
IMAGE_READERS = {"chameleon_vq": native.ChameleonImages, "emu3_vq": native.Emu3Images,
                 **nonnative.NONNATIVE_READERS}
