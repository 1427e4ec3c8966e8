"""VILA-U's understanding path: pixels -> RQ-VAE SigLIP encoder -> residual-quantised features ->
projector -> input embeddings of its LLaMA-2 language model, and the image's span in the prompt.

VILA-U (mit-han-lab/vila-u) is not in transformers; its reference is the authors' repository. What
it computes for an image (the names are theirs):

  RQVAESiglipModel.encode_image   SigLIP's vision embeddings and encoder layers, stopping after
      (rqvaesiglip/                layer L-2 (0-based): hidden state L-1 of the L+1, i.e. index -2
      modeling_rqvaesiglip.py)     (`vit.vit_features(layer=-2)`); no post_layernorm. Reshaped to
                                   the latent grid x [B, H, W, D] (H = W = image / patch).
  RQBottleneck.forward            `to_code_shape`: each r_h x r_w block of the grid becomes one
      (rqvaesiglip/                vector of E = r_h·r_w·D (r = latent_shape / code_shape; 1 x 1
      quantizations.py)            for the released models); then `depth` rounds of residual
                                   quantisation, r_0 = x:
                                     code_i = argmin_k |r_i|² + |e_k|² - 2 r_i·e_k  (k < K: the
                                              codebook's last row is nn.Embedding's padding row)
                                     r_{i+1} = r_i - e_{code_i}
                                   one codebook for every round when shared_codebook, else one per
                                   round; the features are the straight-through
                                   x + (Σ_i e_{code_i} - x) in the latent shape.
  RQVAESIGLIPTransformerVisionTower.forward   features [B, H·W, D] row-major; the codes + the
                                   LM's vocab size are the image's token ids (image generation).
  MultimodalProjector             "mlp{N}x_gelu": Linear(D -> hidden), then (GELU (exact erf),
      (multimodal_projector/)      Linear(hidden -> hidden)) N-1 times; "linear": one Linear. The
                                   same stack as Janus's aligner (`projectors.JanusAligner`).
  prepare_inputs_labels_for_multimodal   the projected features replace the "<image>" marker
                                   (token -200) of the prompt, one embedding per latent position.

The quantiser runs in float32 whatever the model dtype (the authors run the whole tower in the
checkpoint's bf16): codes are an argmin, and the codebook is stored in float32 for the same reason.

The prompt. Each "<image>" becomes `<im_start>` [H·W features] `<im_end>` when the config's
`wrap_image` is True (the default): the span PROTOCOLS.md §1 gives for the Narrow Gate study,
whose public code (a VILA-U processor left commented out in src/utils.py) replaces "<image>" with
"<im_start><image><im_end>" before VILA-U's `tokenizer_image_token`; `<im_end>` is the gate
("eoi"), `<im_start>` gets Role.IMAGE_START. With wrap_image=False the image is the bare
features, as the authors' own `generate_content` builds a question (the two tokens are in VILA-U's
tokenizer for image generation, whose prompt ends with " <im_start>").
chat=True uses CHAT_TEMPLATE, the repository's `conv_vicuna_v1` (conversation.py) as
`tokenize_conversation` renders one user turn with add_generation_prompt:
  "{system} USER: {message, stripped} ASSISTANT:"
The converter writes it as the checkpoint's chat_template.jinja. The image goes where the prompt
puts its "<image>" marker (the authors' `extract_media` writes "<image>\\n" before the text, which
is where configs.models.VQA_CHAT puts it). Not reproduced: `tokenizer_image_token` tokenizes the
text between images chunk by chunk (each chunk's BOS dropped), we tokenize the expanded prompt
at once; the ids agree for tokenizers without a start-of-text space, but a SentencePiece Llama
tokenizer may put a "▁" at the start of a chunk (e.g. before `<im_end>`) that we do not.

Image parameters (converted into image_params/, float32):
  tower/...                     the SigLIP trunk (`models.vit`, all L layers and post_norm, as the
                                checkpoint holds them; only the first L-1 run)
  quantizer/codebook_{c}        [K+1, E]  c < 1 (shared) or depth; row K is the padding row
  projector/fc1, hidden_{j}     `projectors.JanusAligner` (kernel [in, out], bias [out])

Axis legend of the einsum strings: N vectors (images x code positions) · E code width ·
K codebook entries.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from PIL import Image
from transformers.configuration_utils import SubConfigSpec

from narrowgate_jax.models import projectors, vit
from narrowgate_jax.models.families import (LINEAR, SAME, ImageSide, TensorSource, first_present,
                                            flat_shapes)
from narrowgate_jax.processing import anyres
from narrowgate_jax.processing.images import load_image
from narrowgate_jax.processing.prompts import IMAGE_MARKER, ImageSpan
from narrowgate_jax.processing.roles import Role

PRECISION = jax.lax.Precision.HIGHEST
# Where the parts sit, under the authors' in-memory names (VILAULlamaModel.state_dict()); the
# converter presents the released llm/, vision_tower/, mm_projector/ files under these names.
TOWER_PREFIX = "vision_tower.vision_tower.rqvaesiglip.siglip_model.vision_model."
QUANTIZER_PREFIX = "vision_tower.vision_tower.rqvaesiglip.quantizer."
PROJECTOR_PREFIX = "mm_projector.layers."
IM_START, IM_END = "<im_start>", "<im_end>"  # vila_u/constants.py
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"): system + sep, then "ROLE: message"
# + sep (user) or sep2 (assistant), then "ASSISTANT:" to prompt a reply. Messages are stripped
# (tokenize_conversation); image items are written where the prompt has them.
CHAT_TEMPLATE = (
    '{{- "' + SYSTEM + ' " -}}'
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + (text | trim) + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + (text | trim) + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")

# The SigLIP towers VILA-U builds (RQVAESiglipConfig.pretrained_model names one by its Hub id).
_SIGLIP = dict(model_type="siglip_vision_model", num_channels=3, hidden_act="gelu_pytorch_tanh",
               layer_norm_eps=1e-6)
KNOWN_SIGLIP = {
    "google/siglip-large-patch16-256": {**_SIGLIP, "hidden_size": 1024,
                                        "intermediate_size": 4096, "num_hidden_layers": 24,
                                        "num_attention_heads": 16, "image_size": 256,
                                        "patch_size": 16},
    "google/siglip-so400m-patch14-384": {**_SIGLIP, "hidden_size": 1152,
                                         "intermediate_size": 4304, "num_hidden_layers": 27,
                                         "num_attention_heads": 16, "image_size": 384,
                                         "patch_size": 14},
}


# ------------------------------------------------------------------------------ hf config


class VilaUConfig(transformers.PreTrainedConfig):
  """VILA-U as one transformers-style config: what the converter reads from the released
  checkpoint's four config.json files and stores as the converted checkpoint's hf_config.json.

  model_type "ng_vila_u", not the authors' "vila_u": their package registers that name for its
  own VILAUConfig (llm_cfg / vision_tower_cfg / mm_projector_cfg), and both may be imported in
  one process (a side-by-side benchmark).

  Attributes (beyond text_config, a LlamaConfig, and vision_config, the SigLIP tower's):
    latent_shape: [H, W, D] of RQVAESiglipConfig; code_shape: [h, w, depth].
    n_embed: codebook size K (an int, or one per codebook).
    shared_codebook: one codebook for every quantisation round.
    mm_projector_type: "linear" or "mlp{N}x_gelu" (MultimodalProjectorConfig).
    image_aspect_ratio: "resize" (the released models) or "pad" (mm_utils.process_image).
    vision_feature_layer: the tower's hidden state the quantiser reads (encode_image: -2).
    wrap_image: <im_start> / <im_end> around each image (the Narrow Gate study's prompt).
  """

  model_type = "ng_vila_u"
  sub_configs_defaults = {
      "text_config": SubConfigSpec(config_class=transformers.AutoConfig, model_type="llama"),
      "vision_config": SubConfigSpec(
          config_class=transformers.AutoConfig, model_type="siglip_vision_model",
          init_kwargs={k: v for k, v in KNOWN_SIGLIP["google/siglip-large-patch16-256"].items()
                       if k != "model_type"}),
  }

  text_config: dict | transformers.PreTrainedConfig | None = None
  vision_config: dict | transformers.PreTrainedConfig | None = None
  latent_shape: list | None = None
  code_shape: list | None = None
  n_embed: int | list = 16384
  shared_codebook: bool = True
  mm_projector_type: str = "mlp2x_gelu"
  image_aspect_ratio: str = "resize"
  vision_feature_layer: int = -2
  wrap_image: bool = True
  tie_word_embeddings: bool = False

  def __post_init__(self, **kwargs):
    super().__post_init__(**kwargs)
    grid = self.vision_config.image_size // self.vision_config.patch_size
    if self.latent_shape is None:
      self.latent_shape = [grid, grid, self.vision_config.hidden_size]
    if self.code_shape is None:
      self.code_shape = [grid, grid, 4]


transformers.AutoConfig.register(VilaUConfig.model_type, VilaUConfig, exist_ok=True)


# ------------------------------------------------------------------------------- encoder config


@dataclasses.dataclass(frozen=True)
class RQConfig:
  """RQBottleneck's shape; hashable, so it can be a static jit argument.

  Attributes:
    latent_shape: (H, W, D) of the tower's grid; code_shape: (h, w, depth).
    n_embed: K per codebook (one entry when shared_codebook, else `depth`).
  """

  latent_shape: tuple[int, int, int]
  code_shape: tuple[int, int, int]
  n_embed: tuple[int, ...]
  shared_codebook: bool = True

  def __post_init__(self):
    if len(self.latent_shape) != 3 or len(self.code_shape) != 3:
      raise ValueError(f"latent_shape {self.latent_shape} and code_shape {self.code_shape} must "
                       "be (height, width, channels|depth)")
    if any(y % x for x, y in zip(self.code_shape[:2], self.latent_shape[:2])):
      raise ValueError(f"code_shape {self.code_shape} does not tile latent_shape "
                       f"{self.latent_shape}")
    if len(self.n_embed) != self.num_codebooks:
      raise ValueError(f"{len(self.n_embed)} codebook sizes for {self.num_codebooks} codebooks")

  @classmethod
  def from_hf(cls, hf_config) -> "RQConfig":
    depth = int(hf_config.code_shape[2])
    shared = bool(hf_config.shared_codebook)
    sizes = hf_config.n_embed
    count = 1 if shared else depth
    if isinstance(sizes, (list, tuple)):
      if shared and len(set(sizes)) != 1:
        raise ValueError(f"a shared codebook has one size, got n_embed={sizes}")
      sizes = tuple(int(s) for s in sizes)[:count] if shared else tuple(int(s) for s in sizes)
    else:
      sizes = (int(sizes),) * count
    return cls(tuple(int(v) for v in hf_config.latent_shape),
               tuple(int(v) for v in hf_config.code_shape), sizes, shared)

  @property
  def block(self) -> tuple[int, int]:
    """(r_h, r_w): latent positions per code position along each axis."""
    return (self.latent_shape[0] // self.code_shape[0], self.latent_shape[1] // self.code_shape[1])

  @property
  def embed_dim(self) -> int:
    """E: the width of one code vector (RQBottleneck's embed_dim)."""
    return self.block[0] * self.block[1] * self.latent_shape[2]

  @property
  def depth(self) -> int:
    return self.code_shape[2]

  @property
  def num_codebooks(self) -> int:
    return 1 if self.shared_codebook else self.depth


@dataclasses.dataclass(frozen=True)
class VilaUEncoderConfig:
  """The whole image side: tower, quantiser, projector (hashable)."""

  tower: vit.ViTConfig
  quantizer: RQConfig
  projector: projectors.JanusAlignerConfig
  feature_layer: int = -2

  def __post_init__(self):
    side = self.tower.grid_side
    h, w, d = self.quantizer.latent_shape
    if (h, w, d) != (side, side, self.tower.hidden_size):
      raise ValueError(f"latent_shape {self.quantizer.latent_shape} does not match the tower's "
                       f"{side} x {side} grid of width {self.tower.hidden_size}")
    if self.projector.in_features != d:
      raise ValueError(f"the projector takes width {self.projector.in_features}, the quantised "
                       f"features have {d}")

  @classmethod
  def from_hf(cls, hf_config) -> "VilaUEncoderConfig":
    tower = vit.ViTConfig.from_hf(hf_config.vision_config)
    quantizer = RQConfig.from_hf(hf_config)
    depth = projector_depth(hf_config.mm_projector_type)
    projector = projectors.JanusAlignerConfig(
        in_features=quantizer.latent_shape[2], out_features=int(hf_config.text_config.hidden_size),
        depth=depth, hidden_act="gelu")
    return cls(tower, quantizer, projector, int(hf_config.vision_feature_layer))

  @property
  def num_tokens(self) -> int:
    """Image features per image: one per latent position (H·W)."""
    return self.quantizer.latent_shape[0] * self.quantizer.latent_shape[1]


def projector_depth(mm_projector_type: str) -> int:
  """MultimodalProjector's Linear layers: "linear" -> 1, "mlp{N}x_gelu" -> N."""
  if mm_projector_type == "linear":
    return 1
  match = re.fullmatch(r"mlp(\d+)x_gelu", mm_projector_type or "")
  if not match:
    raise ValueError(f"mm_projector_type {mm_projector_type!r} is not supported (VILA-U uses "
                     "'mlp2x_gelu'; 'linear' and 'mlp{N}x_gelu' also work)")
  return int(match.group(1))


# ------------------------------------------------------------------------------- quantiser


def to_code_shape(x: jax.Array, block: tuple[int, int]) -> jax.Array:
  """[B, H, W, D] -> [B, H/r_h, W/r_w, r_h·r_w·D], each block flattened in (r_h, r_w, D) order."""
  b, h, w, d = x.shape
  rh, rw = block
  x = x.reshape(b, h // rh, rh, w // rw, rw, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // rh, w // rw, rh * rw * d)


def to_latent_shape(x: jax.Array, block: tuple[int, int], width: int) -> jax.Array:
  """The inverse of `to_code_shape`: [B, h, w, r_h·r_w·D] -> [B, h·r_h, w·r_w, D]."""
  b, h, w, _ = x.shape
  rh, rw = block
  x = x.reshape(b, h, w, rh, rw, width).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * rh, w * rw, width)


def nearest_code(residual: jax.Array, codebook: jax.Array) -> jax.Array:
  """residual [N, E], codebook [K+1, E] (last row: padding, never chosen) -> codes [N] int32, by
  the squared distance |r|² + |e|² - 2 r·e as VQEmbedding.compute_distances writes it."""
  entries = codebook[:-1]
  distances = (jnp.sum(jnp.square(residual), -1, keepdims=True)
               + jnp.sum(jnp.square(entries), -1)[None]
               - 2.0 * jnp.einsum("NE,KE->NK", residual, entries, precision=PRECISION))
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def residual_quantize(codebooks: Sequence[jax.Array], x: jax.Array, depth: int) -> dict:
  """x [N, E] float32 -> {"codes" [N, depth] int32, "quant" [N, E] (Σ of the chosen entries),
  "residuals" [depth+1, N, E] (r_0 = x, ..., r_depth)}; codebooks: one [K+1, E] per round, or
  one shared by every round."""
  residual, quant = x, jnp.zeros_like(x)
  codes, residuals = [], [x]
  for i in range(depth):
    codebook = codebooks[i if len(codebooks) > 1 else 0]
    code = nearest_code(residual, codebook)
    entry = codebook[code]
    residual, quant = residual - entry, quant + entry
    codes.append(code)
    residuals.append(residual)
  return dict(codes=jnp.stack(codes, -1), quant=quant, residuals=jnp.stack(residuals))


def _codebooks(params: dict, config: RQConfig) -> list[jax.Array]:
  return [jnp.asarray(params["quantizer"][f"codebook_{c}"], jnp.float32)
          for c in range(config.num_codebooks)]


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def encode(params: dict, config: VilaUEncoderConfig, pixels: jax.Array,
           dtype: Any = jnp.float32) -> dict:
  """pixels [B, R, R, 3] (channels-last, normalised) -> the encoder's intermediates:

    hidden     [B, P, D]           the tower's hidden state `feature_layer` (P = H·W)
    codes      [B, h·w, depth]     int32 code indices (+ the LM vocab size = image token ids)
    residuals  [depth+1, B, h·w, E]  r_0 = x in code shape, then after each round
    quantized  [B, P, D]           the straight-through features x + (Σ e - x), latent order
    embeddings [B, P, hidden]      the projector's output: the LM's input embeddings
  The tower and projector run in `dtype`, the quantiser in float32; all outputs float32.
  """
  q = config.quantizer
  hidden = vit.vit_features(params["tower"], config.tower, pixels, config.feature_layer,
                            dtype=dtype)
  b = hidden.shape[0]
  h, w, d = q.latent_shape
  latent = hidden.reshape(b, h, w, d).astype(jnp.float32)
  x = to_code_shape(latent, q.block)
  hc, wc = x.shape[1:3]
  out = residual_quantize(_codebooks(params, q), x.reshape(b * hc * wc, q.embed_dim), q.depth)
  quant = to_latent_shape(out["quant"].reshape(b, hc, wc, q.embed_dim), q.block, d)
  # The reference's straight-through x + (z - x).detach(): z up to rounding, computed as it is.
  quantized = (latent + (quant - latent)).reshape(b, h * w, d)
  embeddings = projectors.project(params["projector"], config.projector, quantized, dtype)
  return dict(hidden=hidden, codes=out["codes"].reshape(b, hc * wc, q.depth),
              residuals=out["residuals"].reshape(q.depth + 1, b, hc * wc, q.embed_dim),
              quantized=quantized, embeddings=embeddings)


def param_shapes(config: VilaUEncoderConfig) -> dict:
  """The image-side parameter tree as jax.ShapeDtypeStruct leaves."""
  q = config.quantizer
  codebooks = {f"codebook_{c}": jax.ShapeDtypeStruct((q.n_embed[c] + 1, q.embed_dim), jnp.float32)
               for c in range(q.num_codebooks)}
  return dict(tower=vit.vit_param_shapes(config.tower), quantizer=codebooks,
              projector=projectors.param_shapes(config.projector))


# --------------------------------------------------------------------------- checkpoint map


def projector_tensor_sources(config: projectors.JanusAlignerConfig,
                             prefix: str = PROJECTOR_PREFIX) -> list[TensorSource]:
  """MultimodalProjector's `layers` -> our fc1 / hidden_{j}: an nn.Sequential whose even indices
  are the Linear layers ("layers.0", "layers.2", ...), or one nn.Linear ("layers") for
  "linear"."""
  names = {"fc1": "0"} | {f"hidden_{j}": str(2 * (j + 1)) for j in range(config.depth - 1)}
  if config.depth == 1:  # self.layers = nn.Linear(...): "mm_projector.layers.weight"
    names = {"fc1": None}
  out = []
  for ours, index in names.items():
    key = prefix[:-1] if index is None else prefix + index
    out += [TensorSource(f"{ours}/kernel", f"{key}.weight", LINEAR, False),
            TensorSource(f"{ours}/bias", f"{key}.bias", SAME, False)]
  return out


def codebook_sources(config: RQConfig, keys=None,
                     prefix: str = QUANTIZER_PREFIX) -> list[TensorSource]:
  """VQEmbedding weights "codebooks.{i}.weight" [K+1, E]. A shared codebook is one module listed
  `depth` times: its state_dict names it under every index, and a file may keep any of them."""
  if config.shared_codebook:
    candidates = tuple(f"{prefix}codebooks.{i}." for i in range(config.depth))
    return [TensorSource("codebook_0", first_present(candidates, "weight", keys) + "weight", SAME,
                         False)]
  return [TensorSource(f"codebook_{i}", f"{prefix}codebooks.{i}.weight", SAME, False)
          for i in range(config.depth)]


def _prefixed(sources, part: str) -> tuple[TensorSource, ...]:
  return tuple(dataclasses.replace(s, path=f"{part}/{s.path}") for s in sources)


def vila_u_side(hf_config, keys=None) -> ImageSide:
  """The converter's view of a VILA-U checkpoint's image side (keys: the in-memory names)."""
  config = VilaUEncoderConfig.from_hf(hf_config)
  sources = (_prefixed(vit.vit_tensor_sources(config.tower, TOWER_PREFIX), "tower")
             + _prefixed(codebook_sources(config.quantizer, keys), "quantizer")
             + _prefixed(projector_tensor_sources(config.projector), "projector"))
  return ImageSide("vila_u", config, sources, flat_shapes(param_shapes(config)),
                   num_layers=config.tower.num_layers, dtype="float32")


# ---------------------------------------------------------------------------------- reader


def image_spec(hf_config, processor_config: Optional[dict]) -> anyres.ClipImageSpec:
  """The tower's CLIPImageProcessor: vision_tower/preprocessor_config.json, by default the one
  RQVAESIGLIPTransformerVisionTower builds (image_size square, mean = std = 0.5); with
  image_aspect_ratio "pad", mm_utils.process_image first pads to a square with the mean colour."""
  size = int(hf_config.vision_config.image_size)
  default = dict(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3)
  spec = anyres.ClipImageSpec.from_processor_config(processor_config or default, "llava")
  aspect = hf_config.image_aspect_ratio
  if aspect not in ("resize", "pad"):
    raise ValueError(f"image_aspect_ratio {aspect!r} is not supported (VILA-U: 'resize' or 'pad')")
  return dataclasses.replace(spec, pad_to_square=aspect == "pad")


def process_image(image, spec: anyres.ClipImageSpec, aspect: str,
                  normalize: bool = True) -> np.ndarray:
  """mm_utils.process_image -> [S, S, 3] float32 (channels-last). "resize" first resizes with PIL
  to the processor's crop size, passed as PIL's (width, height) = (crop height, crop width) as
  the reference passes it, with PIL's default bicubic filter; the processor's own resize and crop
  then find the image at their size (the released models: square sizes, one resize in all)."""
  image = load_image(image)
  if aspect == "resize":
    crop_h, crop_w = spec.crop_hw or spec.base_hw
    image = image.resize((crop_h, crop_w), resample=Image.BICUBIC)
  return anyres.llava_pixels(image, spec, normalize=normalize)


def _grid_coords(side: int) -> np.ndarray:
  """[side², 3] (view 0, row, col) in row-major order."""
  r, c = np.divmod(np.arange(side * side), side)
  return np.stack([np.zeros_like(r), r, c], axis=1).astype(np.int32)


class VilaUImages:
  """Images -> spans of `<im_start>` [H·W features] `<im_end>` (or the bare features when
  wrap_image is False), each feature one latent position of the RQ-VAE SigLIP encoder.

  The features replace placeholder tokens "<image>" (added to the tokenizer when it lacks one:
  VILA-U itself splices the image in at token -200, so no embedding row is read for it).
  """

  prefix = ""  # the tokenizer adds BOS itself, as tokenizer_image_token does
  chat_suffix = None  # chat=True applies CHAT_TEMPLATE (the checkpoint's chat_template.jinja)
  wrappers = (None, None)

  def __init__(self, hf_config, params, tokenizer, processor_config: Optional[dict] = None,
               dtype=jnp.float32):
    self.hf_config = hf_config
    self.config = VilaUEncoderConfig.from_hf(hf_config)
    self.params = params
    self.dtype = jnp.dtype(dtype)
    self.spec = image_spec(hf_config, processor_config)
    self.aspect = hf_config.image_aspect_ratio
    vocab = tokenizer.get_vocab()
    if IMAGE_MARKER not in vocab:
      tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]},
                                   replace_extra_special_tokens=False)
    self.image_text = IMAGE_MARKER
    self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_MARKER))
    self.wrap = bool(getattr(hf_config, "wrap_image", True))
    if self.wrap:
      missing = [t for t in (IM_START, IM_END) if t not in vocab]
      if missing:
        raise ValueError(f"wrap_image=True but the tokenizer has no {missing}: VILA-U's "
                         "tokenizer adds <im_start> and <im_end>; set wrap_image=False in "
                         "hf_config.json to read images without them")

  def pixels(self, images: Sequence) -> np.ndarray:
    """[N, S, S, 3] float32, as process_images gives them (channels-last)."""
    return np.stack([process_image(image, self.spec, self.aspect) for image in images])

  def encode(self, images: Sequence) -> dict:
    """`encode`'s intermediates for these images (codes, residuals, features, embeddings)."""
    return encode(self.params, self.config, self.pixels(images), self.dtype)

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    del counts  # images per prompt: each image reads the same whatever its prompt
    embeddings = np.asarray(self.encode(images)["embeddings"], np.float32)
    n = self.config.num_tokens
    text = self.image_text * n
    if self.wrap:
      text = IM_START + text + IM_END
    coords = _grid_coords(self.config.tower.grid_side)
    return [ImageSpan(text=text, placeholder_id=self.image_token_id,
                      ids=np.full(n, self.image_token_id, np.int64),
                      roles=np.full(n, Role.IMAGE, np.int32), features=e, coords=coords)
            for e in embeddings]

  def region_patches(self, image, boxes) -> np.ndarray:
    """[1, side, side] bool: the latent positions whose patch shows part of a box."""
    canvas = anyres.box_canvas(image.width, image.height, boxes)
    raw = process_image(canvas, self.spec, self.aspect, normalize=False)[None]
    return anyres.related_patches(raw, self.config.tower.patch_size)
