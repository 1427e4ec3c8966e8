"""The image side of the native families: pixels -> VQ codes -> token ids -> the image's span.

Chameleon and Emu3 read an image as discrete tokens in the same sequence as text. `vlm.prepare`
runs the family's VQ tokenizer here (jitted, float32) and puts the code tokens straight into
`input_ids`, where transformers inserts placeholder tokens and swaps their embeddings later: the
decoder sees the same embeddings either way.

Only the encode path is converted (`chameleon_side`, `emu3_side`); the VQ decoders (image
generation) are skipped and listed as unconverted in narrowgate.json. VQ parameters are always
stored in float32: codes are an argmin, and bf16 weights could flip one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from narrowgate_jax.models import chameleon_vq, emu3_vq
from narrowgate_jax.models.families import ImageSide, TensorSource, first_present, flat_shapes
from narrowgate_jax.models.native_spans import ChameleonTokens, Emu3Tokens
from narrowgate_jax.processing import images as im
from narrowgate_jax.processing.prompts import ImageSpan

VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")  # in memory / as save_pretrained writes Emu3


def _side(kind: str, module, config, keys) -> ImageSide:
  prefix = first_present(VQ_PREFIXES, "quantize.embedding.weight", keys)
  sources = tuple(TensorSource(path, key, layout, per_layer=False)
                  for path, key, layout in module.vq_tensor_sources(config, prefix=prefix))
  return ImageSide(kind, config, sources, flat_shapes(module.vq_param_shapes(config)),
                   dtype="float32")


def chameleon_side(hf_config, keys=None) -> ImageSide:
  return _side("chameleon_vq", chameleon_vq,
               chameleon_vq.ChameleonVQConfig.from_hf(hf_config.vq_config), keys)


def emu3_side(hf_config, keys=None) -> ImageSide:
  return _side("emu3_vq", emu3_vq, emu3_vq.Emu3VQConfig.from_hf(hf_config.vq_config), keys)


class ChameleonImages:
  """Images -> spans of `<racm3:break> [codes] <eoss>` (center-cropped, e.g. 512 px -> 32 x 32)."""

  prefix = ""  # the tokenizer adds BOS itself

  def __init__(self, hf_config, params, tokenizer, processor_config: Optional[dict] = None,
               dtype=None):
    del dtype  # the VQ encoder always runs in float32 (see the module docstring)
    # Chat mode ends every prompt with the separator token, as ChameleonProcessor does by default;
    # the Narrow Gate study uses text-completion mode (no separator).
    self.chat_suffix = getattr(tokenizer, "sep_token", None)
    self.config = chameleon_vq.ChameleonVQConfig.from_hf(hf_config.vq_config)
    self.params = params
    self.spec = im.ChameleonImageSpec.from_processor_config(processor_config or {})
    self.tokens = ChameleonTokens.from_tokenizer(tokenizer)
    self.placeholder_id = tokenizer.convert_tokens_to_ids(self.tokens.placeholder)
    self.table = chameleon_vq.img2bpe_table(hf_config.vocabulary_map)

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    del counts  # images per prompt: only OneVision reads shared prompts differently
    pixels = np.stack([im.chameleon_pixels(image, self.spec) for image in images])
    codes = np.asarray(chameleon_vq.encode_codes(self.params, self.config, pixels))
    ids = chameleon_vq.codes_to_token_ids(self.table, codes)
    return [self.tokens.span(self.placeholder_id, row) for row in ids]


class Emu3Images:
  """Images -> spans of `<|image start|> h*w <|image token|> [rows of codes + EOL] EOF <|image end|>`.

  As in transformers, the images of one `prepare` call are padded to a common size and encoded
  together, so an image's codes can depend on the other images' sizes in that call.
  """

  def __init__(self, hf_config, params, tokenizer, processor_config: Optional[dict] = None,
               dtype=None):
    del dtype  # the VQ encoder always runs in float32 (see the module docstring)
    self.config = emu3_vq.Emu3VQConfig.from_hf(hf_config.vq_config)
    self.params = params
    self.spec = im.Emu3ImageSpec.from_processor_config(processor_config or {})
    self.tokens = Emu3Tokens.from_tokenizer(tokenizer)
    self.placeholder_id = tokenizer.convert_tokens_to_ids(self.tokens.placeholder)
    self.eol_id = hf_config.vocabulary_map["<|extra_200|>"]
    self.table = emu3_vq.img2bpe_table(hf_config.vocabulary_map)
    self.prefix = tokenizer.bos_token or ""  # Emu3's processor writes BOS into the text
    self.chat_suffix = None  # Emu3's chat format is its chat template: format prompts with it

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    del counts  # images per prompt: only OneVision reads shared prompts differently
    pixels, sizes = im.pad_to_batch([im.emu3_pixels(image, self.spec) for image in images])
    grids = emu3_vq.encode_codes(self.params, self.config, pixels, sizes)
    return [self.tokens.span(self.placeholder_id, self.table[grid], self.eol_id) for grid in grids]
