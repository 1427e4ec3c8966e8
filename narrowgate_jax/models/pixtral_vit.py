"""Pixtral's vision tower (transformers' `PixtralVisionModel`): images of any size -> one feature
per patch, as LLaVA-style Pixtral checkpoints feed them to the projector.

The tower, per image of rows x cols patches:
  1. a patch conv (kernel = stride = patch_size, no bias) -> [rows * cols, D], row-major;
  2. `ln_pre`, an RMSNorm;
  3. L pre-norm blocks: x + attn(attn_norm(x)), then x + mlp(ffn_norm(x)), with
     - attention without biases, restricted to patches of the same image (transformers packs
       the images of a batch into one sequence with a block-diagonal mask), queries and keys
       rotated by a 2-D RoPE: of each head's H/2 rotation frequencies (rotate-half layout), the
       first H/4 turn with the patch's row, the last H/4 with its column (see `rope_tables`);
     - a gated feed-forward down(act(gate(x)) * up(x)), act = `hidden_act` ("gelu", the exact
       erf GELU, by default in transformers; Pixtral-12B's config says "silu");
  4. no final norm: hidden state i is the output of block i (0 = after ln_pre).
LLaVA with a Pixtral tower (vision_feature_layer -1, select strategy "full") projects hidden
state -1, every patch (there is no CLS token), split per image by `image_sizes // patch_size`.

Packing: the patches of all images go into one sequence padded up to a multiple of `bucket`
patches, with each patch's (image id, row, col) passed as arrays (padding has image id -1 and
attends only to padding). So images of different sizes reuse one compiled shape, and the
attention mask and RoPE angles come from those arrays instead of from Python-side sizes.
Attention runs in blocks of gcd(bucket, QUERY_BLOCK) queries, so its memory is
[N, block, P] rather than [N, P, P] (packed images make P large).

Everything runs in float32 at `Precision.HIGHEST`: the tower runs once per image, and on GPUs
the default float32 matmul precision (TF32) would move features well past 1e-4 of the reference.

Parameter tree (shapes; p = patch_size, C = num_channels, D = N·H):
  patch_conv/kernel                  [p, p, C, D]
  ln_pre/scale                       [D]
  layers/attn_norm/scale             [L, D]
  layers/attn/{q,k,v}/kernel         [L, D, N, H]
  layers/attn/o/kernel               [L, N, H, D]
  layers/ffn_norm/scale              [L, D]
  layers/mlp/{gate,up}/kernel        [L, D, F]
  layers/mlp/down/kernel             [L, F, D]

Axis legend of the einsum strings:
  P query patches · S key patches · D model width · N heads · H head width · F MLP width ·
  Q query blocks
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.models.families import (HEADS_IN, HEADS_OUT, LINEAR, SAME, Layout,
                                            TensorSource, params_from_state)
from narrowgate_jax.models.layers import RMSNorm, activation
from narrowgate_jax.models.vq_common import CONV2D

PRECISION = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-5  # transformers hard-codes it for ln_pre and both block norms (not in the config)
SCORE_MIN = jnp.finfo(jnp.float32).min  # what transformers' block mask adds across images
BUCKET = 256  # packed sequences are padded up to a multiple of this many patches
QUERY_BLOCK = 256  # at most this many queries per attention block
PADDING_ID = -1  # the image id of padding patches
CHECKPOINT_PREFIX = "vision_tower."  # LlavaForConditionalGeneration files (save_pretrained)
STATE_DICT_PREFIX = "model.vision_tower."  # the same model's state_dict() in memory

# torch's names: "gelu" is the exact erf GELU, "gelu_pytorch_tanh" / "gelu_new" the tanh one.

# ----------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PixtralViTConfig:
  """The tower's hyper-parameters (transformers' PixtralVisionConfig, with its defaults).

  Hashable, so it can be a static jit argument.
  """

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  num_channels: int = 3
  patch_size: int = 16
  hidden_act: str = "gelu"
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
      raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                       f"of even width")
    activation(self.hidden_act)  # a clear error now for an activation we lack

  @property
  def head_dim(self) -> int:
    """H: transformers always derives it as hidden_size // num_attention_heads (a `head_dim`
    in the config is overwritten)."""
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, vision_config: Any) -> "PixtralViTConfig":
    """From a PixtralVisionConfig, or its dict form (config.json's vision_config)."""
    get = (vision_config.get if isinstance(vision_config, Mapping)
           else lambda name, default=None: getattr(vision_config, name, default))
    rope = dict(get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
      raise ValueError(f"Pixtral's vision RoPE is axial; the config asks for {rope['rope_type']!r}")
    d = cls.__dataclass_fields__
    patch = get("patch_size", d["patch_size"].default)
    if isinstance(patch, (list, tuple)):
      if len(set(patch)) != 1:
        raise ValueError(f"non-square patch_size {patch} is not supported")
      patch = patch[0]
    return cls(hidden_size=get("hidden_size", d["hidden_size"].default),
               intermediate_size=get("intermediate_size", d["intermediate_size"].default),
               num_layers=get("num_hidden_layers", d["num_layers"].default),
               num_heads=get("num_attention_heads", d["num_heads"].default),
               num_channels=get("num_channels", d["num_channels"].default),
               patch_size=int(patch),
               hidden_act=get("hidden_act", d["hidden_act"].default),
               # configs written before rope_parameters existed keep rope_theta at the top
               rope_theta=float(rope.get("rope_theta")
                                or get("rope_theta", d["rope_theta"].default)))


# --------------------------------------------------------------------------- packed patches


@flax.struct.dataclass
class PatchSequence:
  """The patches of several images packed into one padded sequence (arrays only, so its shape,
  not the images' sizes, is what a compiled function depends on).

  Attributes:
    patches: [P, p, p, C] float32, each image's patches row by row, then zero padding.
    image_ids: [P] int32, the image each patch belongs to (PADDING_ID for padding).
    rows, cols: [P] int32, each patch's row and column within its image (0 for padding).
  """

  patches: jax.Array
  image_ids: jax.Array
  rows: jax.Array
  cols: jax.Array


def patch_grid(image: np.ndarray, patch: int) -> tuple[int, int]:
  """(rows, cols) of whole patches in an image [h, w, C] (a partial last row or column of
  pixels is dropped, as transformers crops `image_sizes // patch_size`)."""
  rows, cols = image.shape[0] // patch, image.shape[1] // patch
  if rows < 1 or cols < 1:
    raise ValueError(f"image of {image.shape[0]} x {image.shape[1]} pixels is smaller than one "
                     f"{patch} x {patch} patch; preprocess it with pixtral_pixels")
  return rows, cols


def pack_patches(images: Sequence[np.ndarray], patch: int,
                 bucket: int = BUCKET) -> tuple[PatchSequence, list[tuple[int, int]]]:
  """Images [h_i, w_i, C] float32 -> (their patches packed and padded to a multiple of
  `bucket`, each image's (rows, cols))."""
  if not images:
    raise ValueError("no images to pack")
  if bucket < 1:
    raise ValueError(f"bucket must be positive, got {bucket}")
  grids = [patch_grid(np.asarray(image), patch) for image in images]
  total = sum(r * c for r, c in grids)
  padded = -(-total // bucket) * bucket
  channels = np.asarray(images[0]).shape[-1]
  patches = np.zeros((padded, patch, patch, channels), np.float32)
  image_ids = np.full((padded,), PADDING_ID, np.int32)
  rows = np.zeros((padded,), np.int32)
  cols = np.zeros((padded,), np.int32)
  start = 0
  for i, (image, (r, c)) in enumerate(zip(images, grids)):
    pixels = np.asarray(image, np.float32)[:r * patch, :c * patch]
    # [r, p, c, p, C] -> [r, c, p, p, C]: patch (row, col) at index row * c + col
    blocks = pixels.reshape(r, patch, c, patch, channels).transpose(0, 2, 1, 3, 4)
    stop = start + r * c
    patches[start:stop] = blocks.reshape(r * c, patch, patch, channels)
    image_ids[start:stop] = i
    rows[start:stop], cols[start:stop] = np.divmod(np.arange(r * c, dtype=np.int32), c)
    start = stop
  return PatchSequence(patches, image_ids, rows, cols), grids


# ------------------------------------------------------------------------------------ module


def rope_inverse_frequencies(config: PixtralViTConfig) -> np.ndarray:
  """[H/2] float32: theta^(-2j/H), j = 0..H/2-1 (computed in float32, as transformers does)."""
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  return (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)


def rope_tables(rows: jax.Array, cols: jax.Array,
                config: PixtralViTConfig) -> tuple[jax.Array, jax.Array]:
  """rows, cols [P] int -> (cos, sin), each [P, H] float32.

  transformers' axial RoPE: of the H/2 frequencies, the even-indexed ones (H/4 of them) turn
  with the row and the odd-indexed ones with the column; the angles are laid out
  [row angles, col angles], then repeated for the second half of the head (rotate-half).
  """
  inv_freq = rope_inverse_frequencies(config)
  angles = jnp.concatenate([rows.astype(jnp.float32)[:, None] * inv_freq[0::2],
                            cols.astype(jnp.float32)[:, None] * inv_freq[1::2]], axis=-1)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [P, N, H] rotated by (cos, sin) [P, H] in the rotate-half convention (the tables cast to
  x's dtype first, as transformers does)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, image_ids: jax.Array,
                    query_block: int = QUERY_BLOCK) -> jax.Array:
  """softmax(q·k / sqrt(H)) v over keys of the query's own image (softmax in float32).

  q, k, v [P, N, H], image_ids [P] -> [P, N, H]. Queries go `query_block` at a time (when P is a
  multiple of it), so only [N, query_block, P] scores are live at once.
  """
  p, n, h = q.shape
  scale = h**-0.5

  def attend(q_block, q_ids):  # [P', N, H], [P'] -> [P', N, H]
    # scaled after the product, as transformers does
    scores = jnp.einsum("PNH,SNH->NPS", q_block, k, precision=PRECISION) * scale
    same_image = q_ids[:, None] == image_ids[None, :]
    scores = jnp.where(same_image[None], scores.astype(jnp.float32), SCORE_MIN)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("NPS,SNH->PNH", probs, v, precision=PRECISION)

  if p <= query_block or p % query_block:
    return attend(q, image_ids)
  blocks = (q.reshape(p // query_block, query_block, n, h),
            image_ids.reshape(p // query_block, query_block))
  return jax.lax.map(lambda b: attend(*b), blocks).reshape(p, n, h)


class PixtralAttention(nn.Module):
  """Multi-head attention without biases, 2-D RoPE on q and k; x [P, D] -> [P, D]."""

  config: PixtralViTConfig
  dtype: Any = jnp.float32
  query_block: int = QUERY_BLOCK

  @nn.compact
  def __call__(self, x, cos, sin, image_ids):
    c = self.config
    heads = lambda name: nn.DenseGeneral(  # noqa: E731
        (c.num_heads, c.head_dim), use_bias=False, dtype=self.dtype, precision=PRECISION,
        param_dtype=jnp.float32, name=name)
    q = apply_rope(heads("q")(x), cos, sin)
    k = apply_rope(heads("k")(x), cos, sin)
    out = block_attention(q, k, heads("v")(x), image_ids, self.query_block)
    return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           precision=PRECISION, param_dtype=jnp.float32, name="o")(out)


class PixtralMLP(nn.Module):
  """down(act(gate(x)) * up(x)) without biases; x [P, D] -> [P, D]."""

  config: PixtralViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, use_bias=False, dtype=self.dtype, precision=PRECISION,
        param_dtype=jnp.float32, name=name)
    hidden = activation(c.hidden_act)(dense(c.intermediate_size, "gate")(x))
    return dense(c.hidden_size, "down")(hidden * dense(c.intermediate_size, "up")(x))


class PixtralBlock(nn.Module):
  """One pre-norm block, scanned: carry x [P, D] -> (x', x' if `emit` else None)."""

  config: PixtralViTConfig
  dtype: Any
  emit: bool
  query_block: int = QUERY_BLOCK

  @nn.compact
  def __call__(self, x, cos, sin, image_ids):
    c, dtype = self.config, self.dtype
    x = x + PixtralAttention(c, dtype, self.query_block, name="attn")(
        RMSNorm(NORM_EPS, name="attn_norm")(x), cos, sin, image_ids)
    x = x + PixtralMLP(c, dtype, name="mlp")(RMSNorm(NORM_EPS, name="ffn_norm")(x))
    return x, (x if self.emit else None)


class PixtralVisionTransformer(nn.Module):
  """Packed patches (a `PatchSequence` of P patches) -> hidden states.

  Attributes:
    config: the tower.
    depth: how many blocks to run (None: all). The parameters must then hold `depth` stacked
      layers (`slice_layers` cuts them); a depth of 0 runs no block.
    all_hidden: return every hidden state [depth + 1, P, D] instead of the last one [P, D].
    dtype: the compute dtype (parameters stay float32; norms and softmax run in float32).
    query_block: queries per attention block (see `block_attention`).
  """

  config: PixtralViTConfig
  depth: int | None = None
  all_hidden: bool = False
  dtype: Any = jnp.float32
  query_block: int = QUERY_BLOCK

  @nn.compact
  def __call__(self, seq: PatchSequence) -> jax.Array:
    c = self.config
    depth = c.num_layers if self.depth is None else self.depth
    # each patch is one batch entry of a p x p image, so the conv gives [P, 1, 1, D]
    x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size,) * 2,
                padding="VALID", use_bias=False, dtype=self.dtype, precision=PRECISION,
                param_dtype=jnp.float32, name="patch_conv")(seq.patches.astype(self.dtype))
    x = RMSNorm(NORM_EPS, name="ln_pre")(x.reshape(x.shape[0], c.hidden_size))
    if depth == 0:
      return x[None] if self.all_hidden else x
    cos, sin = rope_tables(seq.rows, seq.cols, c)
    blocks = nn.scan(PixtralBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=depth)
    layers = blocks(c, self.dtype, self.all_hidden, self.query_block, name="layers")
    last, emitted = layers(x, cos, sin, seq.image_ids)
    return jnp.concatenate([x[None], emitted]) if self.all_hidden else last


# ------------------------------------------------------------------------------ entry points


def hidden_state_index(config: PixtralViTConfig, layer: int) -> int:
  """A Python index into the L+1 hidden states (negative allowed) -> the non-negative one, i.e.
  the number of blocks that must run."""
  count = config.num_layers + 1
  if not -count <= layer < count:
    raise ValueError(f"layer {layer} is out of range for {count} hidden states "
                     f"(ln_pre output + {config.num_layers} layers)")
  return layer % count


def slice_layers(params: Mapping, depth: int) -> dict:
  """params with only the first `depth` stacked layers (no "layers" entry when depth is 0)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  if depth:
    out["layers"] = jax.tree_util.tree_map(lambda a: a[:depth], params["layers"])
  return out


@functools.partial(jax.jit, static_argnames=("config", "depth", "all_hidden", "dtype",
                                             "query_block"))
def run_packed(params, config: PixtralViTConfig, seq: PatchSequence, depth: int,
               all_hidden: bool = False, dtype: Any = jnp.float32,
               query_block: int = QUERY_BLOCK) -> jax.Array:
  """The tower on packed patches -> hidden state `depth` [P, D] (or hidden states 0..depth,
  [depth + 1, P, D], when `all_hidden`), float32, padding rows included. Only `depth` blocks
  run."""
  model = PixtralVisionTransformer(config, depth, all_hidden, dtype, query_block)
  return model.apply({"params": slice_layers(params, depth)}, seq).astype(jnp.float32)


def pixtral_features(params, config: PixtralViTConfig, images: Sequence[np.ndarray],
                     layer: int | Sequence[int] = -1, dtype: Any = jnp.float32,
                     bucket: int = BUCKET) -> list[jax.Array]:
  """Images [h_i, w_i, C] float32 (as `pixtral_pixels` returns) -> hidden state `layer` of each,
  [rows_i * cols_i, D] float32 (rows_i = h_i // patch_size; patch (r, c) at index
  r * cols_i + c).

  layer: a Python index into the L+1 hidden states (0 = ln_pre's output, -1 = the last block's,
    what LLaVA-Pixtral projects), running only the blocks it needs; or a sequence of indices,
    whose hidden states are concatenated on the last axis -> [rows_i * cols_i, D * len(layer)]
    (transformers' LLaVA with a list `vision_feature_layer`).
  dtype: the compute dtype (float32 to match the reference).
  bucket: the packed sequence is padded to a multiple of this many patches, so image sets with
    the same padded total share one compiled function.
  """
  seq, grids = pack_patches(images, config.patch_size, bucket)
  block = math.gcd(bucket, QUERY_BLOCK)
  dtype = jnp.dtype(dtype)
  if isinstance(layer, (int, np.integer)):
    out = run_packed(params, config, seq, hidden_state_index(config, int(layer)), dtype=dtype,
                     query_block=block)
  else:
    depths = [hidden_state_index(config, int(i)) for i in layer]
    hidden = run_packed(params, config, seq, max(depths), all_hidden=True, dtype=dtype,
                        query_block=block)
    out = jnp.concatenate([hidden[d] for d in depths], axis=-1)
  return _split(out, grids, axis=0)


def pixtral_hidden_states(params, config: PixtralViTConfig, images: Sequence[np.ndarray],
                          dtype: Any = jnp.float32, bucket: int = BUCKET) -> list[jax.Array]:
  """Every hidden state of each image: [L+1, rows_i * cols_i, D] float32 (index 0: ln_pre's
  output, index i: block i's; transformers' `hidden_states`, there being no final norm)."""
  seq, grids = pack_patches(images, config.patch_size, bucket)
  out = run_packed(params, config, seq, config.num_layers, all_hidden=True,
                   dtype=jnp.dtype(dtype), query_block=math.gcd(bucket, QUERY_BLOCK))
  return _split(out, grids, axis=1)


def _split(packed: jax.Array, grids: Sequence[tuple[int, int]], axis: int) -> list[jax.Array]:
  """The packed axis `axis` cut into each image's patches (padding dropped)."""
  starts = np.cumsum([0] + [r * c for r, c in grids])
  return [jax.lax.slice_in_dim(packed, int(a), int(b), axis=axis)
          for a, b in zip(starts[:-1], starts[1:])]


# --------------------------------------------------------------------------- checkpoint map


def pixtral_param_shapes(config: PixtralViTConfig) -> dict:
  """The parameter tree of `config` as jax.ShapeDtypeStruct leaves, without allocating it."""
  p = config.patch_size
  seq = PatchSequence(jnp.zeros((1, p, p, config.num_channels), jnp.float32),
                      jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1,), jnp.int32))
  init = lambda: PixtralVisionTransformer(config).init(jax.random.key(0), seq)  # noqa: E731
  return jax.eval_shape(init)["params"]


_LAYER_SOURCES: tuple[tuple[str, str, Layout], ...] = (
    ("attn_norm/scale", "attention_norm.weight", SAME),
    ("attn/q/kernel", "attention.q_proj.weight", HEADS_OUT),
    ("attn/k/kernel", "attention.k_proj.weight", HEADS_OUT),
    ("attn/v/kernel", "attention.v_proj.weight", HEADS_OUT),
    ("attn/o/kernel", "attention.o_proj.weight", HEADS_IN),
    ("ffn_norm/scale", "ffn_norm.weight", SAME),
    ("mlp/gate/kernel", "feed_forward.gate_proj.weight", LINEAR),
    ("mlp/up/kernel", "feed_forward.up_proj.weight", LINEAR),
    ("mlp/down/kernel", "feed_forward.down_proj.weight", LINEAR),
)


def pixtral_tensor_sources(config: PixtralViTConfig,
                           prefix: str = CHECKPOINT_PREFIX) -> list[TensorSource]:
  """Where every parameter comes from. `prefix` is where the tower sits: "vision_tower." in
  LlavaForConditionalGeneration files, "model.vision_tower." in its state_dict(), "" for a
  standalone PixtralVisionModel. Per-layer keys carry "{i}"."""
  del config  # every Pixtral tower has the same tensors
  return ([TensorSource("patch_conv/kernel", prefix + "patch_conv.weight", CONV2D, False),
           TensorSource("ln_pre/scale", prefix + "ln_pre.weight", SAME, False)]
          + [TensorSource("layers/" + ours, f"{prefix}transformer.layers.{{i}}.{theirs}", layout,
                          True) for ours, theirs, layout in _LAYER_SOURCES])


def pixtral_params_from_state(config: PixtralViTConfig, state: Mapping[str, Any],
                              prefix: str = CHECKPOINT_PREFIX) -> dict:
  """A full-array state (key -> array; torch CPU tensors also work) -> our params tree of float32
  numpy arrays, through `pixtral_tensor_sources` (per-layer tensors stacked on axis 0).

  Raises KeyError naming a missing tensor, ValueError naming one whose shape differs from what
  the config implies.
  """
  return params_from_state(pixtral_tensor_sources(config, prefix), pixtral_param_shapes(config),
                           state, config.num_layers)
