"""Chameleon's VQ-GAN image tokenizer (encoder + quantiser): pixels -> codebook indices -> BPE ids.

Reproduces transformers' `ChameleonVQVAE.encode` and `ChameleonModel.get_image_tokens`. Only the
encode path is here: the decoder and `post_quant_conv` turn codes back into pixels, which only
image generation needs, so their checkpoint tensors are left unconverted.

Input layout: `encode` / `encode_codes` take pixel_values [B, 3, H, W] float32, exactly what
transformers' ChameleonImageProcessor yields and `ChameleonVQVAE.encode` takes; they are
transposed once to NHWC, the layout every module below works in (flax convolutions are NHWC).

Everything runs in float32 at `Precision.HIGHEST`: codes are an argmin, so a reduced-precision
matmul (bf16 passes on TPU, TF32 on GPU) could flip a code against the float32 reference, and the
encoder runs once per image, so the cost does not matter.

Parameter tree (shapes; flax conv kernels are [kh, kw, in, out], each with a bias [out];
C_l = base_channels * channel_multiplier[l], C_in the channels entering a block):
  encoder/conv_in/{kernel,bias}                         [3, 3, in_channels, C_0]
  encoder/down_{l}/block_{i}/norm{1,2}/{scale,bias}     [C_in], [C_l]
  encoder/down_{l}/block_{i}/conv1/{kernel,bias}        [3, 3, C_in, C_l]
  encoder/down_{l}/block_{i}/conv2/{kernel,bias}        [3, 3, C_l, C_l]
  encoder/down_{l}/block_{i}/nin_shortcut/{kernel,bias} [1, 1, C_in, C_l]   only when C_in != C_l
  encoder/down_{l}/attn_{i}/norm/{scale,bias}           [C_l]               only on levels whose
  encoder/down_{l}/attn_{i}/{q,k,v,proj_out}/...        [1, 1, C_l, C_l]    resolution is listed
  encoder/down_{l}/downsample/{kernel,bias}             [3, 3, C_l, C_l]    all but the last level
  encoder/mid/block_{1,2}/...                           a block with C_in = C_l = C_last
  encoder/mid/attn_1/...                                an attn block (attn_type "vanilla")
  encoder/norm_out/{scale,bias}                         [C_last]
  encoder/conv_out/{kernel,bias}                        [3, 3, C_last, latent_channels (x2 if double_latent)]
  quant_conv/{kernel,bias}                              [1, 1, latent_channels, embed_dim]
  quantize/embedding                                    [num_embeddings, embed_dim]

Axis legend of the einsum strings:
  B batch · Y, X grid rows, columns · C channels · T query pixels · S key pixels (T = S = Y·X)
  M flattened latent positions (B·Y·X, row-major) · E code width (embed_dim) · N codebook entries
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.models import vq_common
from narrowgate_jax.models.families import SAME, Layout
from narrowgate_jax.models.vq_common import (GROUPS, PRECISION, Codebook, GroupNorm, ResnetBlock,
                                             block_sources, conv_sources, nearest_codes,
                                             norm_sources)

HF_PREFIX = "model.vqmodel."  # where ChameleonForConditionalGeneration keeps the VQ-VAE

# ---------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ChameleonVQConfig(vq_common.LevelsConfig):
  """The encoder's hyper-parameters (transformers' ChameleonVQVAEConfig, encode-path fields).

  Hashable, so it can be a static jit argument. `resolution` is not the input size: it is the
  nominal size from which transformers decides which levels get attention blocks (a level at
  resolution r has them when r is in `attn_resolutions`), and we follow it the same way.
  """

  embed_dim: int = 256
  num_embeddings: int = 8192
  latent_channels: int = 256
  double_latent: bool = False
  resolution: int = 512
  in_channels: int = 3
  base_channels: int = 128
  channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  attn_type: str | None = "vanilla"

  def __post_init__(self):
    for c in self.level_channels:
      if c % GROUPS:
        raise ValueError(f"channel count {c} (base_channels={self.base_channels} x "
                         f"channel_multiplier={self.channel_multiplier}) is not a multiple of "
                         f"{GROUPS}, as GroupNorm({GROUPS}) needs")

  def level_has_attention(self, level: int) -> bool:
    """Whether level `level`'s blocks are each followed by an attention block (transformers'
    rule: the nominal resolution, halved once per earlier level, is in attn_resolutions)."""
    return (self.attn_type == "vanilla"
            and self.resolution // 2**level in self.attn_resolutions)


# --------------------------------------------------------------------------------- modules


class AttnBlock(nn.Module):
  """Single-head self-attention over all pixels, x [B, Y, X, C] -> [B, Y, X, C].

  q, k, v and proj_out are 1x1 convs (kept as convs so their checkpoint layout is the conv one).
  Scores are scaled after the product, as transformers does, to keep round-off alike.
  """

  @nn.compact
  def __call__(self, x):
    b, y, w, c = x.shape
    h = GroupNorm(name="norm")(x)
    q, k, v = (vq_common.conv(c, (1, 1), name)(h).reshape(b, y * w, c) for name in ("q", "k", "v"))
    scores = jnp.einsum("BTC,BSC->BTS", q, k, precision=PRECISION) * (int(c) ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BTS,BSC->BTC", probs, v, precision=PRECISION).reshape(b, y, w, c)
    return x + vq_common.conv(c, (1, 1), "proj_out")(out)


class Middle(nn.Module):
  """block_1, attn_1 (when attn_type is "vanilla", else identity), block_2; channels unchanged."""

  config: ChameleonVQConfig

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, name="block_1")(x)
    if self.config.attn_type == "vanilla":
      x = AttnBlock(name="attn_1")(x)
    return ResnetBlock(channels, name="block_2")(x)


class Encoder(nn.Module):
  """pixels [B, H, W, in_channels] -> encoder output [B, H/2^(levels-1), W/2^(levels-1), latent]."""

  config: ChameleonVQConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    x = vq_common.conv(c.base_channels, (3, 3), "conv_in")(pixels)
    for level in range(c.num_levels):
      attention = AttnBlock if c.level_has_attention(level) else None
      x = vq_common.DownLevel(c.level_channels[level], c.num_res_blocks, attention,
                              downsample=level != c.num_levels - 1, name=f"down_{level}")(x)
    x = Middle(c, name="mid")(x)
    x = nn.silu(GroupNorm(name="norm_out")(x))
    out_channels = 2 * c.latent_channels if c.double_latent else c.latent_channels
    return vq_common.conv(out_channels, (3, 3), "conv_out")(x)


class ChameleonVQTokenizer(nn.Module):
  """pixels [B, H, W, in_channels] (NHWC) -> dict of named intermediates:

    hidden   [B, h, w, latent_channels]  the encoder's output (transformers' `last_hidden_state`)
    latents  [B, h, w, embed_dim]        after quant_conv: what is quantised
    codes    [B, h*w] int32              codebook indices, row-major over (h, w)
  """

  config: ChameleonVQConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    hidden = Encoder(c, name="encoder")(pixels)
    latents = vq_common.conv(c.embed_dim, (1, 1), "quant_conv")(hidden)
    codebook = Codebook(c.num_embeddings, c.embed_dim, name="quantize")()
    b, h, w, e = latents.shape
    codes = nearest_codes(latents.reshape(b * h * w, e), codebook).reshape(b, h * w)
    return {"hidden": hidden, "latents": latents, "codes": codes}


# ------------------------------------------------------------------------------ entry points


@functools.partial(jax.jit, static_argnames="config")
def encode(params: dict, config: ChameleonVQConfig, pixel_values: jax.Array) -> dict:
  """pixel_values [B, in_channels, H, W] (NCHW, as transformers) -> the dict of
  `ChameleonVQTokenizer` (hidden and latents NHWC, codes [B, h*w] int32)."""
  pixels = jnp.transpose(jnp.asarray(pixel_values, jnp.float32), (0, 2, 3, 1))
  return ChameleonVQTokenizer(config).apply({"params": params}, pixels)


def encode_codes(params: dict, config: ChameleonVQConfig, pixel_values: jax.Array) -> jax.Array:
  """pixel_values [B, in_channels, H, W] -> codes [B, h*w] int32 (transformers' image_tokens,
  reshaped per image)."""
  return encode(params, config, pixel_values)["codes"]


def vq_param_shapes(config: ChameleonVQConfig) -> dict:
  """The parameter tree of `config` as jax.ShapeDtypeStruct leaves, without allocating it."""
  pixels = jnp.zeros((1, config.resolution, config.resolution, config.in_channels), jnp.float32)
  init = lambda: ChameleonVQTokenizer(config).init(jax.random.key(0), pixels)
  return jax.eval_shape(init)["params"]


# --------------------------------------------------------------------------- checkpoint map

def _attn_sources(ours: str, theirs: str) -> list[tuple[str, str, Layout]]:
  out = norm_sources(f"{ours}/norm", f"{theirs}.norm")
  for name in ("q", "k", "v", "proj_out"):
    out += conv_sources(f"{ours}/{name}", f"{theirs}.{name}")
  return out


def vq_tensor_sources(config: ChameleonVQConfig,
                      prefix: str = HF_PREFIX) -> list[tuple[str, str, Layout]]:
  """(our "/"-joined parameter path, checkpoint key, layout) for every encode-path parameter.

  `prefix` is where the VQ-VAE sits in the checkpoint ("model.vqmodel." in
  ChameleonForConditionalGeneration; "" for a bare ChameleonVQVAE state dict). Each entry can
  be converted on its own (`layout.to_ours(tensor, our_shape)`), so a streaming converter can use
  the table one tensor at a time.
  """
  enc = prefix + "encoder"
  out = conv_sources("encoder/conv_in", f"{enc}.conv_in")
  channels_in = config.base_channels
  for level, channels in enumerate(config.level_channels):
    for i in range(config.num_res_blocks):
      out += block_sources(f"encoder/down_{level}/block_{i}", f"{enc}.down.{level}.block.{i}",
                            has_shortcut=channels_in != channels)
      channels_in = channels
      if config.level_has_attention(level):
        out += _attn_sources(f"encoder/down_{level}/attn_{i}", f"{enc}.down.{level}.attn.{i}")
    if level != config.num_levels - 1:
      out += conv_sources(f"encoder/down_{level}/downsample", f"{enc}.down.{level}.downsample.conv")
  out += block_sources("encoder/mid/block_1", f"{enc}.mid.block_1", has_shortcut=False)
  if config.attn_type == "vanilla":
    out += _attn_sources("encoder/mid/attn_1", f"{enc}.mid.attn_1")
  out += block_sources("encoder/mid/block_2", f"{enc}.mid.block_2", has_shortcut=False)
  out += norm_sources("encoder/norm_out", f"{enc}.norm_out")
  out += conv_sources("encoder/conv_out", f"{enc}.conv_out")
  out += conv_sources("quant_conv", prefix + "quant_conv")
  out.append(("quantize/embedding", prefix + "quantize.embedding.weight", SAME))
  return out


def params_from_state(config: ChameleonVQConfig, state: Mapping[str, Any],
                      prefix: str = HF_PREFIX) -> dict:
  """A full-array torch state (key -> array) -> our params tree of float32 numpy arrays; keys
  outside the encode path (decoder, post_quant_conv, the LM) are ignored. See
  `vq_common.params_from_state` for the errors."""
  return vq_common.params_from_state(vq_tensor_sources(config, prefix), vq_param_shapes(config),
                                     state)


# ------------------------------------------------------------------------------ BPE mapping


def img2bpe_table(vocabulary_map: Mapping[str, int]) -> np.ndarray:
  """int32 [max code + 1] with table[code] = the BPE id of image code `code`.

  transformers' ChameleonImageVocabularyMapping, literally: a token named "IMGIMG<letters><any>"
  carries the code whose decimal digits are the letters A..J (0..9), the last character dropped;
  where several ids share a name (or several names a code) the later dict entry wins as there;
  codes no token names map to 0.
  """
  val2name = {v: k for k, v in vocabulary_map.items()}
  image_tokens = sorted(v for k, v in vocabulary_map.items() if k.startswith("IMGIMG"))
  digit = {chr(ord("A") + i): str(i) for i in range(10)}
  bpe2img = {tok: int("".join(digit.get(ch, ch) for ch in val2name[tok][len("IMGIMG"):-1]))
             for tok in image_tokens}
  img2bpe = {code: tok for tok, code in bpe2img.items()}
  table = np.zeros(max(img2bpe) + 1, np.int32)
  for code, tok in img2bpe.items():
    table[code] = tok
  return table


def codes_to_token_ids(vocabulary_map: Mapping[str, int] | np.ndarray,
                       codes: Sequence | np.ndarray | jax.Array) -> np.ndarray:
  """codes [...] int -> BPE ids [...] int32 (transformers' `convert_img2bpe`).

  `vocabulary_map` is the config's map, or the table `img2bpe_table` built from it: pass the
  table when converting many batches, so it is built once.
  """
  table = (vocabulary_map if isinstance(vocabulary_map, np.ndarray)
           else img2bpe_table(vocabulary_map))
  return table[np.asarray(codes)]
