"""Emu3's VQ image tokenizer (encoder + quantiser): pixels -> codebook indices -> BPE token ids.

Reproduces transformers' `Emu3VQVAE.encode` and `Emu3Model.get_image_tokens`. Only the encode
path is here: the VQ decoder and `post_quant_conv` turn codes back into pixels, which only image
generation needs, so their checkpoint tensors are left unconverted.

Emu3's tokenizer is a video tokenizer; an image is a still video. The encoder is
  1. a per-frame 2-D stack: conv_in, one level per `channel_multiplier` entry (num_res_blocks
     resnet blocks, each followed by self-attention on the levels listed in `attn_resolutions`
     (level indices, not resolutions as in Chameleon), a stride-2 downsample between levels), a
     middle block (resnet, attention, resnet), group norm, SiLU, conv_out -> [B, F, Y, X, Z];
  2. a temporal stack on [B, T, Y, X, Z]: log2(temporal_downsample_factor) causal 3-D convs of
     stride 2 in time (each followed by SiLU), then num_res_blocks 3-D resnet blocks whose norms
     are BatchNorm3d (running statistics, the model being frozen);
  3. quant_conv, a causal 3-D conv with kernel 3x1x1 -> latents [B, T', Y, X, E];
  4. the nearest codebook entry per position -> codes [B, T', Y, X] int32.
An image [B, C, H, W] is repeated over T = temporal_downsample_factor frames, as transformers
does, so T' = 1. Its frames are identical, so the 2-D stack (nearly all the work) runs once per
image and its output is repeated over T, instead of once per frame.

"Causal" 3-D convs: transformers' `Emu3VQVAEConv3d` pads 2 frames before and none after, whatever
the kernel, and each spatial axis by (k - s) split with the odd one before.

Input layout: pixel_values [B, C, H, W] (images) or [B, T, C, H, W] (videos), exactly what
transformers' Emu3ImageProcessor yields and `Emu3VQVAE.encode` takes; transposed once to
channels-last, the layout every module below works in (flax convolutions are channels-last).

Everything runs in float32 at `Precision.HIGHEST`: codes are an argmin, so a reduced-precision
matmul (bf16 passes on TPU, TF32 on GPU) could flip a code against the float32 reference; the
encoder runs once per image, so the cost does not matter.

Parameter tree (shapes; flax kernels are [kh, kw, in, out] and [kt, kh, kw, in, out];
C_l = base_channels * channel_multiplier[l]; Z = latent_channels; D = hidden_size = N·H):
  encoder/conv_in/{kernel,bias}                          [3, 3, in_channels, C_0]   [C_0]
  encoder/down_{l}/block_{i}/norm{1,2}/{scale,bias}      [C_in], [C_l]
  encoder/down_{l}/block_{i}/conv1/{kernel,bias}         [3, 3, C_in, C_l]          [C_l]
  encoder/down_{l}/block_{i}/conv2/{kernel,bias}         [3, 3, C_l, C_l]           [C_l]
  encoder/down_{l}/block_{i}/nin_shortcut/{kernel,bias}  [1, 1, C_in, C_l]          (C_in != C_l)
  encoder/down_{l}/attn_{i}/norm/{scale,bias}            [C_l]             (l in attn_resolutions;
  encoder/down_{l}/attn_{i}/{q,k,v}/kernel               [C_l, N, H]        C_l must equal D)
  encoder/down_{l}/attn_{i}/{q,k,v}/bias                 [N, H]
  encoder/down_{l}/attn_{i}/o/{kernel,bias}              [N, H, C_l]                [C_l]
  encoder/down_{l}/downsample/{kernel,bias}              [3, 3, C_l, C_l]   (all but the last level)
  encoder/middle/block_{1,2}/...                         as a block, C_in = C_l = C_last
  encoder/middle/attn/...                                as an attention block (C_last must equal D)
  encoder/norm_out/{scale,bias}                          [C_last]
  encoder/conv_out/{kernel,bias}                         [3, 3, C_last, Z]          [Z]
  encoder/time_conv_{j}/{kernel,bias}                    [4, 3, 3, Z, Z]            [Z]
  encoder/time_res_{i}/norm{1,2}/{scale,bias,mean,var}   [Z]   (mean, var: BatchNorm running stats)
  encoder/time_res_{i}/conv{1,2}/{kernel,bias}           [3, 3, 3, Z, Z]            [Z]
  quant_conv/{kernel,bias}                               [3, 1, 1, Z, E]            [E]
  quantize/embedding                                     [codebook_size, E]

Axis legend of the einsum strings:
  B batch · T frames · Y, X grid rows, columns · C channels · Q query pixels · S key pixels
  (Q = S = Y·X) · N heads · H head width · M flattened latent positions (B·T·Y·X, row-major) ·
  E code width (embed_dim) · K codebook entries
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.models import vq_common
from narrowgate_jax.models.families import HEAD_BIAS, HEADS_IN, HEADS_OUT, SAME, Layout
from narrowgate_jax.models.vq_common import (CONV3D, GROUPS, PRECISION, Codebook, GroupNorm,
                                             ResnetBlock, block_sources, conv_sources,
                                             nearest_codes, norm_sources)

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm3d's default, used by the temporal resnet blocks
# Where the VQ-VAE sits: transformers' conversion mapping for "emu3" renames the files' "vqmodel.*"
# to "model.vqmodel.*" on load and back on save_pretrained, so files (ours from save_pretrained,
# and so presumably the Hub's Emu3-*-hf) have the former and a loaded model's state_dict() the
# latter. `params_from_state` accepts both.
CHECKPOINT_PREFIX = "vqmodel."
STATE_DICT_PREFIX = "model.vqmodel."
VISUAL_TOKEN_PREFIX = "<|visual token"  # vocabulary names "<|visual token 000123|>" carry code 123
EOL_TOKEN = "<|extra_200|>"  # appended after every row of image tokens

# ---------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Emu3VQConfig(vq_common.LevelsConfig):
  """The encoder's hyper-parameters (transformers' Emu3VQVAEConfig, encode-path fields).

  Hashable, so it can be a static jit argument. `attn_resolutions` lists level indices.
  `hidden_size` / `num_attention_heads` are the attention blocks' width and heads: transformers
  builds them as Linear(hidden_size, hidden_size) applied to the level's channels, so every
  level with attention (and the last, for the middle block) must have hidden_size channels.
  """

  codebook_size: int = 32768
  embed_dim: int = 4
  latent_channels: int = 4
  double_latent: bool = False
  in_channels: int = 3
  temporal_downsample_factor: int = 4
  base_channels: int = 256
  channel_multiplier: tuple[int, ...] = (1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (3,)
  hidden_size: int = 1024
  num_attention_heads: int = 1

  def __post_init__(self):
    for c in self.level_channels:
      if c % GROUPS:
        raise ValueError(f"channel count {c} (base_channels={self.base_channels} x "
                         f"channel_multiplier={self.channel_multiplier}) is not a multiple of "
                         f"{GROUPS}, as GroupNorm({GROUPS}) needs")
    attended = {self.num_levels - 1} | {l for l in self.attn_resolutions if l < self.num_levels}
    for level in sorted(attended):
      if self.level_channels[level] != self.hidden_size:
        raise ValueError(f"level {level} has attention over {self.level_channels[level]} channels "
                         f"but hidden_size={self.hidden_size}: transformers' attention blocks "
                         f"are hidden_size wide")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.double_latent:
      # the encoder would output 2 * latent_channels, but quant_conv takes latent_channels:
      # transformers' own encode cannot run such a config either.
      raise ValueError("double_latent=True is not supported (quant_conv takes latent_channels)")

  @property
  def spatial_factor(self) -> int:
    """Pixels per code along each spatial axis (transformers' `vision_spatial_factor`)."""
    return 2 ** (self.num_levels - 1)

  @property
  def num_temporal_downsamples(self) -> int:
    """Stride-2 temporal convs (transformers: int(log2(temporal_downsample_factor)))."""
    return int(math.log2(self.temporal_downsample_factor))

  def level_has_attention(self, level: int) -> bool:
    return level in self.attn_resolutions


# --------------------------------------------------------------------------------- modules


def causal_padding(kernel: tuple[int, int, int], strides: tuple[int, int, int]) -> tuple:
  """`Emu3VQVAEConv3d`'s padding as ((t0, t1), (y0, y1), (x0, x1)): 2 frames before and none
  after whatever the temporal kernel, and k - s on each spatial axis, the odd one before."""
  pads = [(2, 0)]
  for k, s in zip(kernel[1:], strides[1:]):
    total = k - s
    pads.append((total - total // 2, total // 2))
  return tuple(pads)


def _conv3d(features: int, kernel: tuple[int, int, int], name: str,
            strides: tuple[int, int, int] = (1, 1, 1)) -> nn.Conv:
  """transformers' Emu3VQVAEConv3d on x [B, T, Y, X, C]."""
  return vq_common.conv(features, kernel, name, strides, causal_padding(kernel, strides))


class FrozenBatchNorm(nn.Module):
  """torch.nn.BatchNorm3d in eval mode on x [..., C]: (x - mean) / sqrt(var + eps) * scale + bias.

  The running statistics are ordinary parameters here (not flax's `batch_stats` collection): the
  tokenizer is frozen, so they are constants of the checkpoint like any weight, and the whole
  model stays one params tree.
  """

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    return (x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * scale + bias


class AttentionBlock(nn.Module):
  """x + o(attention(norm(x))) over all pixels, x [B, Y, X, C] -> [B, Y, X, C].

  transformers' Emu3VQVAEAttentionBlock (q, k, v, out_proj Linear layers with biases, no mask)
  with the group norm its caller applies first (`attn_norms[i]` / `attn_norm` there).
  Scores are scaled after the product, as transformers' eager attention does.
  """

  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, y, w, c = x.shape
    head_dim = c // self.num_heads
    h = GroupNorm(name="norm")(x).reshape(b, y * w, c)
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), precision=PRECISION, param_dtype=jnp.float32, name=name)
    q, k, v = proj("q")(h), proj("k")(h), proj("v")(h)  # [B, Q|S, N, H]
    scores = jnp.einsum("BQNH,BSNH->BNQS", q, k, precision=PRECISION) * head_dim**-0.5
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BNQS,BSNH->BQNH", probs, v, precision=PRECISION)
    out = nn.DenseGeneral(c, axis=(-2, -1), precision=PRECISION, param_dtype=jnp.float32,
                          name="o")(out)
    return x + out.reshape(b, y, w, c)


class Middle(nn.Module):
  """block_1, attention, block_2; channels unchanged. [B, Y, X, C] -> [B, Y, X, C]."""

  config: Emu3VQConfig

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, name="block_1")(x)
    x = AttentionBlock(self.config.num_attention_heads, name="attn")(x)
    return ResnetBlock(channels, name="block_2")(x)


class TemporalResnetBlock(nn.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))) with causal 3x3x3 convs and frozen batch
  norms, x [B, T, Y, X, Z] -> same. (In the encoder in and out channels are both Z, so
  transformers' 1x1x1 `nin_shortcut` never exists.)"""

  @nn.compact
  def __call__(self, x):
    z = x.shape[-1]
    h = nn.silu(FrozenBatchNorm(name="norm1")(x))
    h = _conv3d(z, (3, 3, 3), "conv1")(h)
    h = nn.silu(FrozenBatchNorm(name="norm2")(h))
    h = _conv3d(z, (3, 3, 3), "conv2")(h)
    return x + h


class Encoder(nn.Module):
  """frames [B, F, H, W, in_channels], each repeated `repeat` times in time ->
  [B, T', Y, X, latent_channels], T = F·repeat frames, T' = T // 2^num_temporal_downsamples,
  Y, X = H, W // spatial_factor.

  `repeat` lets an image (F = 1, repeat = temporal_downsample_factor) run the 2-D stack once.
  """

  config: Emu3VQConfig
  repeat: int = 1

  @nn.compact
  def __call__(self, frames):
    c = self.config
    b, f = frames.shape[:2]
    x = frames.reshape(b * f, *frames.shape[2:])
    x = vq_common.conv(c.base_channels, (3, 3), "conv_in")(x)
    for level in range(c.num_levels):
      attention = (functools.partial(AttentionBlock, c.num_attention_heads)
                   if c.level_has_attention(level) else None)
      x = vq_common.DownLevel(c.level_channels[level], c.num_res_blocks, attention,
                              downsample=level != c.num_levels - 1, name=f"down_{level}")(x)
    x = Middle(c, name="middle")(x)
    x = nn.silu(GroupNorm(name="norm_out")(x))
    x = vq_common.conv(c.latent_channels, (3, 3), "conv_out")(x)
    x = jnp.repeat(x.reshape(b, f, *x.shape[1:]), self.repeat, axis=1)  # [B, T, Y, X, Z]
    for j in range(c.num_temporal_downsamples):
      x = nn.silu(_conv3d(c.latent_channels, (4, 3, 3), f"time_conv_{j}", (2, 1, 1))(x))
    for i in range(c.num_res_blocks):
      x = TemporalResnetBlock(name=f"time_res_{i}")(x)
    return x


class Emu3VQTokenizer(nn.Module):
  """frames [B, F, H, W, in_channels] (channels-last), each repeated `repeat` times in time ->
  dict of named intermediates:

    hidden   [B, T', Y, X, latent_channels]  the encoder's output (transformers'
                                             `last_hidden_state`, there [B, T', Z, Y, X])
    latents  [B, T', Y, X, embed_dim]        after quant_conv: what is quantised
    codes    [B, T', Y, X] int32             codebook indices
  """

  config: Emu3VQConfig
  repeat: int = 1

  @nn.compact
  def __call__(self, frames):
    c = self.config
    hidden = Encoder(c, self.repeat, name="encoder")(frames)
    latents = _conv3d(c.embed_dim, (3, 1, 1), "quant_conv")(hidden)
    codebook = Codebook(c.codebook_size, c.embed_dim, name="quantize")()
    codes = nearest_codes(latents.reshape(-1, c.embed_dim), codebook)
    return {"hidden": hidden, "latents": latents, "codes": codes.reshape(latents.shape[:-1])}


# ------------------------------------------------------------------------------ entry points


@functools.partial(jax.jit, static_argnames="config")
def encode(params: dict, config: Emu3VQConfig, pixel_values: jax.Array) -> dict:
  """pixel_values [B, C, H, W] (images) or [B, T, C, H, W] (videos), channels-first as
  transformers -> the dict of `Emu3VQTokenizer` (hidden, latents channels-last; codes
  [B, T', Y, X] int32). Images are repeated over temporal_downsample_factor frames (T' = 1);
  Y = H // spatial_factor, X = W // spatial_factor (each downsample halves with floor).
  """
  pixel_values = jnp.asarray(pixel_values, jnp.float32)
  if pixel_values.ndim == 4:
    frames, repeat = pixel_values[:, None], config.temporal_downsample_factor
  elif pixel_values.ndim == 5:
    frames, repeat = pixel_values, 1
  else:
    raise ValueError(f"pixel_values must be [B, C, H, W] or [B, T, C, H, W], got "
                     f"{pixel_values.shape}")
  frames = jnp.moveaxis(frames, 2, -1)  # [B, F, H, W, C]
  return Emu3VQTokenizer(config, repeat).apply({"params": params}, frames)


def encode_codes(params: dict, config: Emu3VQConfig, pixel_values: jax.Array,
                 image_sizes: Any) -> list[np.ndarray]:
  """Images -> per image its grid of codes, as transformers' `Emu3VQVAE.encode(...).image_tokens`.

  pixel_values: [B, C, H, W], the batch padded (bottom and right, as Emu3ImageProcessor does) to
    a common size.
  image_sizes: [B, 2] (height, width) of each image before that padding.
  Returns a list of B int32 numpy arrays, image i of shape
    [int(height_i / spatial_factor), int(width_i / spatial_factor)] (row-major codes): the full
    grid of the padded batch cropped to the image. The padding is cropped only after encoding, so
    a padded image's codes near its edges (and, through attention, everywhere) depend on the
    padding, exactly as in transformers.
  """
  if np.ndim(pixel_values) != 4:
    raise ValueError(f"encode_codes takes images [B, C, H, W], got shape {np.shape(pixel_values)}")
  grid = np.asarray(encode(params, config, pixel_values)["codes"][:, 0])  # [B, Y, X]
  sizes = np.asarray(image_sizes).tolist()
  if len(sizes) != grid.shape[0]:
    raise ValueError(f"{len(sizes)} image_sizes for {grid.shape[0]} images")
  f = config.spatial_factor
  return [codes[: int(height / f), : int(width / f)] for codes, (height, width) in zip(grid, sizes)]


def vq_param_shapes(config: Emu3VQConfig) -> dict:
  """The parameter tree of `config` as jax.ShapeDtypeStruct leaves, without allocating it."""
  side = 2 * config.spatial_factor
  frames = jnp.zeros((1, 1, side, side, config.in_channels), jnp.float32)
  init = lambda: Emu3VQTokenizer(config, config.temporal_downsample_factor).init(  # noqa: E731
      jax.random.key(0), frames)
  return jax.eval_shape(init)["params"]


# --------------------------------------------------------------------------- checkpoint map

def _attn_sources(ours: str, theirs: str, norm: str) -> list[tuple[str, str, Layout]]:
  """`norm` is the group norm's key: transformers keeps it beside the attention module."""
  out = norm_sources(f"{ours}/norm", norm)
  for name in "qkv":
    out += [(f"{ours}/{name}/kernel", f"{theirs}.{name}_proj.weight", HEADS_OUT),
            (f"{ours}/{name}/bias", f"{theirs}.{name}_proj.bias", HEAD_BIAS)]
  return out + [(f"{ours}/o/kernel", f"{theirs}.out_proj.weight", HEADS_IN),
                (f"{ours}/o/bias", f"{theirs}.out_proj.bias", SAME)]


def _temporalblock_sources(ours: str, theirs: str) -> list[tuple[str, str, Layout]]:
  out = []
  for i in (1, 2):
    out += norm_sources(f"{ours}/norm{i}", f"{theirs}.norm{i}")
    out += [(f"{ours}/norm{i}/mean", f"{theirs}.norm{i}.running_mean", SAME),
            (f"{ours}/norm{i}/var", f"{theirs}.norm{i}.running_var", SAME)]
    out += conv_sources(f"{ours}/conv{i}", f"{theirs}.conv{i}.conv", CONV3D)
  return out


def vq_tensor_sources(config: Emu3VQConfig,
                      prefix: str = CHECKPOINT_PREFIX) -> list[tuple[str, str, Layout]]:
  """(our "/"-joined parameter path, checkpoint key, layout) for every encode-path parameter.

  `prefix` is where the VQ-VAE sits: "vqmodel." in files written by save_pretrained (and on the
  Hub), "model.vqmodel." in a loaded model's state_dict(), "" for a bare Emu3VQVAE. Each entry
  converts on its own (`layout.to_ours(tensor, our_shape)`; `layout.torch_shape(our_shape)` is
  the checkpoint shape), so a streaming converter can use the table one tensor at a time.
  BatchNorm's `num_batches_tracked` (training bookkeeping) has no counterpart.
  """
  enc = prefix + "encoder"
  down = f"{enc}.down_block.down"
  out = conv_sources("encoder/conv_in", f"{enc}.conv_in")
  channels_in = config.base_channels
  for level, channels in enumerate(config.level_channels):
    for i in range(config.num_res_blocks):
      out += block_sources(f"encoder/down_{level}/block_{i}", f"{down}.{level}.block.{i}",
                            has_shortcut=channels_in != channels)
      channels_in = channels
      if config.level_has_attention(level):
        out += _attn_sources(f"encoder/down_{level}/attn_{i}", f"{down}.{level}.attn.{i}",
                             norm=f"{down}.{level}.attn_norms.{i}")
    if level != config.num_levels - 1:
      out += conv_sources(f"encoder/down_{level}/downsample", f"{down}.{level}.downsample.conv")
  mid = f"{enc}.middle_block"
  out += block_sources("encoder/middle/block_1", f"{mid}.block_1", has_shortcut=False)
  out += _attn_sources("encoder/middle/attn", f"{mid}.attn_1", norm=f"{mid}.attn_norm")
  out += block_sources("encoder/middle/block_2", f"{mid}.block_2", has_shortcut=False)
  out += norm_sources("encoder/norm_out", f"{enc}.norm_out")
  out += conv_sources("encoder/conv_out", f"{enc}.conv_out")
  for j in range(config.num_temporal_downsamples):
    out += conv_sources(f"encoder/time_conv_{j}", f"{enc}.time_conv.{j}.conv.conv", CONV3D)
  for i in range(config.num_res_blocks):
    out += _temporalblock_sources(f"encoder/time_res_{i}", f"{enc}.time_res_stack.{i}")
  out += conv_sources("quant_conv", prefix + "quant_conv.conv", CONV3D)
  out.append(("quantize/embedding", prefix + "quantize.embedding.weight", SAME))
  return out


def find_prefix(state: Mapping[str, Any]) -> str:
  """Which of the known prefixes the VQ-VAE's tensors carry in `state`."""
  for prefix in (CHECKPOINT_PREFIX, STATE_DICT_PREFIX, ""):
    if prefix + "quantize.embedding.weight" in state:
      return prefix
  raise KeyError(f"no Emu3 VQ-VAE in this state: none of "
                 f"{CHECKPOINT_PREFIX!r}, {STATE_DICT_PREFIX!r}, '' + 'quantize.embedding.weight'")


def params_from_state(config: Emu3VQConfig, state: Mapping[str, Any],
                      prefix: str | None = None) -> dict:
  """A full-array torch state (key -> array) -> our params tree of float32 numpy arrays.
  `prefix` defaults to the one `state` has (see `vq_tensor_sources`); keys outside the encode path
  (decoder, post_quant_conv, the LM) are ignored. See `vq_common.params_from_state` for errors."""
  prefix = find_prefix(state) if prefix is None else prefix
  return vq_common.params_from_state(vq_tensor_sources(config, prefix), vq_param_shapes(config),
                                     state)


# ------------------------------------------------------------------------------ BPE mapping


def img2bpe_table(vocabulary_map: Mapping[str, int]) -> np.ndarray:
  """int32 [max code + 1] with table[code] = the BPE id of image code `code`.

  transformers' Emu3ImageVocabularyMapping, literally: a token named "<|visual token" + anything
  carries the code int(name[-8:-2]) (the six digits of "<|visual token 000123|>"); codes no token
  names map to 0.
  """
  names = sorted(name for name in vocabulary_map if name.startswith(VISUAL_TOKEN_PREFIX))
  if not names:
    raise ValueError(f"the vocabulary map has no {VISUAL_TOKEN_PREFIX!r}... tokens")
  img2bpe = {int(name[-8:-2]): vocabulary_map[name] for name in names}
  table = np.zeros(max(img2bpe) + 1, np.int32)
  for code, token in img2bpe.items():
    table[code] = token
  return table


def codes_to_token_ids(vocabulary_map: Mapping[str, int],
                       codes: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """Per-image code grids -> their BPE ids, flattened and concatenated: int32
  [Σ_i h_i·(w_i + 1)], as transformers' `Emu3Model.get_image_tokens`.

  codes: what `encode_codes` returns (a list of [h_i, w_i] grids), or an array [B, h, w].
  Each grid row is mapped through `img2bpe_table` and followed by the end-of-line token
  "<|extra_200|>"; rows then images follow one another. (No begin/end-of-image tokens: the
  prompt template adds those.)
  """
  eol = vocabulary_map.get(EOL_TOKEN)
  if eol is None:
    raise ValueError(f"the vocabulary map has no end-of-line token {EOL_TOKEN!r}")
  table = img2bpe_table(vocabulary_map)
  rows = []
  for grid in codes:
    grid = np.asarray(grid)
    if grid.ndim != 2:
      raise ValueError(f"each image's codes must be a [h, w] grid, got shape {grid.shape}")
    eol_column = np.full((grid.shape[0], 1), eol, np.int32)
    rows.append(np.concatenate([table[grid], eol_column], axis=1).reshape(-1))
  return np.concatenate(rows) if rows else np.zeros((0,), np.int32)
