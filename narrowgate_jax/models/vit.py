"""The vision towers of the non-native VLMs: CLIP (LLaVA-1.5/NeXT), SigLIP (LLaVA-OneVision) and
Janus's SigLIP-like encoder, as one pre-norm ViT with per-family switches.

Reproduces the hidden states of transformers' `CLIPVisionModel`, `SiglipVisionModel` and
`JanusVisionModel` (`output_hidden_states=True`): index 0 is the embeddings (after CLIP's
`pre_layrnorm`), index i the output of encoder layer i. The VLMs read a hidden state from inside
the tower (LLaVA: layer -2), so only the layers up to the one asked for are computed.

What differs between the three (everything else is the same block:
x + attn(norm1(x)), then x + mlp(norm2(x)), LayerNorms with weight and bias, q/k/v/out biases):

                         CLIP                 SigLIP                 Janus
  class token            yes (P = patches+1)  no                     no
  patch conv bias        no                   yes                    yes
  pre_layrnorm           yes                  no                     no
  post_layernorm on      the pooled CLS only  last_hidden_state      last_hidden_state
  MLP activation         quick_gelu           gelu_pytorch_tanh      gelu (exact erf)
  MLP width              intermediate_size    intermediate_size      int(hidden_size·mlp_ratio)
  attention out key      out_proj             out_proj               projection_layer
  q/k/v bias             yes                  yes                    attention_bias
  LayerNorm eps          1e-5                 1e-6                   1e-6 (the defaults)
Janus's `use_qk_norm` is refused: transformers builds LayerNorm(hidden_size) but applies it to
[..., heads, head_dim], which only runs with one head; the released checkpoints leave it off.
Janus has no layer scale in transformers. In every family `hidden_states[-1]` is the last layer's
raw output (before post_layernorm); SigLIP's and Janus's `last_hidden_state` is post_layernorm of
it (`vit_features(..., layer=-1, post_norm=True)`), which is what Janus's aligner reads.

Input: pixels [B, R, R, C] float32, channels-last (flax convolutions are NHWC), R = image_size
exactly and C = num_channels: the VLMs feed image_size pixels, so position embeddings are never
interpolated.

Every matmul runs at `Precision.HIGHEST`: the tower runs once per image, a small part of a VLM's
forward pass, and its output becomes every image token's embedding; bf16 passes (TPU) or TF32
(GPU) would put ~1e-3 relative error there. LayerNorm statistics and the softmax are float32
whatever the compute dtype.

Parameter tree (shapes; T = num_positions = patches (+1 with a class token), p = patch_size):
  embed/patch/kernel                 [p, p, C, D]         bias [D] (patch_bias)
  embed/class_token                  [D]                  (class_token)
  embed/position                     [T, D]
  pre_norm/{scale,bias}              [D]                  (pre_norm)
  layers/norm1/{scale,bias}          [L, D]
  layers/attn/{q,k,v}/kernel         [L, D, N, H]         bias [L, N, H] (qkv_bias)
  layers/attn/o/{kernel,bias}        [L, N, H, D], [L, D]
  layers/norm2/{scale,bias}          [L, D]
  layers/mlp/fc1/{kernel,bias}       [L, D, F], [L, F]
  layers/mlp/fc2/{kernel,bias}       [L, F, D], [L, D]
  post_norm/{scale,bias}             [D]

Checkpoint prefixes (`vit_tensor_sources(config, prefix)`; the tower's own keys follow it:
"embeddings.patch_embedding.weight", "encoder.layers.{i}.self_attn.q_proj.weight", ...):
  LLaVA saved by transformers 5 (save_pretrained)       "vision_tower."
  LLaVA on the Hub (llava-hf/*, saved by transformers 4) "vision_tower.vision_model."
  LLaVA model in memory (state_dict())                  "model.vision_tower."
  Janus (files and memory alike, transformers 5)        "model.vision_model."
  a bare CLIPVisionModel / SiglipVisionModel            "" (transformers 5) or "vision_model." (4)
transformers 5 drops the "vision_model." level of CLIP/SigLIP towers on load and does not write it
back, so files of both generations exist; `find_prefix` picks the one a checkpoint has.

Axis legend of the einsum strings:
  B images · Q query tokens · S key tokens (Q = S = T) · D width · N heads · H head width ·
  F MLP width · L layers
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Container, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from narrowgate_jax.models.families import (HEAD_BIAS, HEADS_IN, HEADS_OUT, LINEAR, SAME,
                                            TensorSource, params_from_state)
from narrowgate_jax.models.layers import activation
from narrowgate_jax.models.vq_common import CONV2D

PRECISION = jax.lax.Precision.HIGHEST

# Candidate prefixes of a LLaVA-family tower, most specific first (see the module docstring).
LLAVA_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.")
JANUS_PREFIXES = ("model.vision_model.",)

# ---------------------------------------------------------------------------------- config

# Per model_type: the structural switches, the key of the attention output projection, and the
# transformers config defaults (a config.json sub-config may omit fields left at their default).
_FAMILIES = {
    "clip_vision_model": dict(
        switches=dict(class_token=True, pre_norm=True, patch_bias=False, normed_last_state=False),
        out_key="out_proj",
        defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    "siglip_vision_model": dict(
        switches=dict(class_token=False, pre_norm=False, patch_bias=True, normed_last_state=True),
        out_key="out_proj",
        defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)),
    "janus_vision_model": dict(
        switches=dict(class_token=False, pre_norm=False, patch_bias=True, normed_last_state=True),
        out_key="projection_layer",
        defaults=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      num_channels=3, image_size=384, patch_size=16, hidden_act="gelu",
                      layer_norm_eps=1e-6, mlp_ratio=4.0, attention_bias=True,
                      use_qk_norm=False)),
}


def _square(value, name: str) -> int:
  """An int, or a [side, side] pair (Janus allows lists) -> the side."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{name}={value}: only square images and patches are supported")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Hyper-parameters of a tower; hashable, so it can be a static jit argument.

  Attributes:
    model_type: transformers' vision model_type (names the checkpoint keys).
    class_token: a learned CLS token precedes the patches (CLIP).
    pre_norm: LayerNorm on the embeddings before the first layer (CLIP's `pre_layrnorm`).
    patch_bias: the patch convolution has a bias (SigLIP, Janus).
    qkv_bias: q/k/v projections have biases (the output projection always has one).
    normed_last_state: transformers' `last_hidden_state` is post_layernorm of the last layer's
      output (SigLIP, Janus); CLIP applies post_layernorm only to the pooled CLS token.
  """

  model_type: str
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  num_channels: int = 3
  norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  class_token: bool = True
  pre_norm: bool = True
  patch_bias: bool = False
  qkv_bias: bool = True
  normed_last_state: bool = False

  def __post_init__(self):
    if self.model_type not in _FAMILIES:
      raise ValueError(f"vision model_type {self.model_type!r} is not supported; supported: "
                       f"{sorted(_FAMILIES)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                       f"num_heads={self.num_heads}")
    activation(self.hidden_act)

  @classmethod
  def from_hf(cls, vision_config: Any) -> "ViTConfig":
    """From a transformers vision config object or its dict form (config.json's vision_config)
    of model_type "clip_vision_model", "siglip_vision_model" or "janus_vision_model"."""
    if isinstance(vision_config, Mapping):
      model_type = vision_config.get("model_type")
      raw = lambda name: vision_config.get(name)  # noqa: E731
    else:
      model_type = getattr(vision_config, "model_type", None)
      raw = lambda name: getattr(vision_config, name, None)  # noqa: E731
    if model_type not in _FAMILIES:
      raise ValueError(f"vision model_type {model_type!r} is not supported; supported: "
                       f"{sorted(_FAMILIES)}")
    family = _FAMILIES[model_type]
    get = lambda name: (raw(name) if raw(name) is not None  # noqa: E731
                        else family["defaults"].get(name))
    hidden = int(get("hidden_size"))
    if model_type == "janus_vision_model":
      if get("use_qk_norm"):
        raise ValueError("Janus use_qk_norm=True is not supported (transformers' q/k LayerNorm "
                         "over hidden_size cannot run on [heads, head_dim] with several heads)")
      intermediate = int(hidden * get("mlp_ratio"))  # JanusVisionMLP's width
      qkv_bias = bool(get("attention_bias"))
    else:
      intermediate, qkv_bias = int(get("intermediate_size")), True
    return cls(model_type=model_type, hidden_size=hidden, intermediate_size=intermediate,
               num_layers=int(get("num_hidden_layers")),
               num_heads=int(get("num_attention_heads")),
               patch_size=_square(get("patch_size"), "patch_size"),
               image_size=_square(get("image_size"), "image_size"),
               num_channels=int(get("num_channels")), norm_eps=float(get("layer_norm_eps")),
               hidden_act=str(get("hidden_act")), qkv_bias=qkv_bias, **family["switches"])

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid_side(self) -> int:
    """Patches along each side of the image. A side that is not a whole number of patches
    loses its last pixels to the stride-p convolution, as in torch (SigLIP-so400m/14 at 384 px,
    OneVision's tower: 27 x 27 patches)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_side**2

  @property
  def num_positions(self) -> int:
    """T: tokens per image (the patches, and the class token where there is one)."""
    return self.num_patches + int(self.class_token)


def hidden_state_index(config: ViTConfig, layer: int) -> int:
  """A Python index into the L+1 hidden states (negative allowed) -> the non-negative one, i.e.
  the number of layers that must run."""
  count = config.num_layers + 1
  if not -count <= layer < count:
    raise ValueError(f"layer {layer} is out of range for {count} hidden states "
                     f"(embeddings + {config.num_layers} layers)")
  return layer % count


# --------------------------------------------------------------------------------- modules


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """torch.nn.LayerNorm over the last axis: biased variance as the mean of squared deviations
  (flax's fast E[x²] - E[x]² loses digits on CLIP's large-mean embeddings), stats in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (normed * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
  """x [..., D] -> [..., D]; scale and bias [D] (torch's weight and bias)."""

  eps: float

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    return layer_norm(x, scale, bias, self.eps)


class Embeddings(nn.Module):
  """pixels [B, R, R, C] -> tokens [B, T, D]: patch conv (row-major patches, as torch's
  flatten(2)), the class token first where there is one, plus learned position embeddings."""

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID",
                      use_bias=c.patch_bias, dtype=self.dtype, precision=PRECISION,
                      param_dtype=jnp.float32, name="patch")(pixels.astype(self.dtype))
    b = patches.shape[0]
    x = patches.reshape(b, -1, c.hidden_size)  # [B, patches, D]
    if c.class_token:
      cls = self.param("class_token", nn.initializers.normal(0.02), (c.hidden_size,), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], 1)
    position = self.param("position", nn.initializers.normal(0.02),
                          (c.num_positions, c.hidden_size), jnp.float32)
    return x + position.astype(x.dtype)


class Attention(nn.Module):
  """Bidirectional multi-head self-attention, x [B, T, D] -> [B, T, D].

  Scores are scaled after the product and the softmax runs in float32, as transformers' eager
  attention does.
  """

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (c.num_heads, c.head_dim), use_bias=c.qkv_bias, dtype=self.dtype, precision=PRECISION,
        param_dtype=jnp.float32, name=name)
    q, k, v = proj("q")(x), proj("k")(x), proj("v")(x)  # [B, Q|S, N, H]
    scores = jnp.einsum("BQNH,BSNH->BNQS", q, k, precision=PRECISION) * c.head_dim**-0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("BNQS,BSNH->BQNH", probs, v, precision=PRECISION)
    return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=self.dtype, precision=PRECISION,
                           param_dtype=jnp.float32, name="o")(out)


class MLP(nn.Module):
  """fc2(act(fc1(x))), x [B, T, D] -> [B, T, D] through width F."""

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, precision=PRECISION, param_dtype=jnp.float32, name=name)
    return dense(c.hidden_size, "fc2")(activation(c.hidden_act)(dense(c.intermediate_size,
                                                                       "fc1")(x)))


class EncoderLayer(nn.Module):
  """One pre-norm block, scanned: carry x [B, T, D] -> (x, x if keep_all else None)."""

  config: ViTConfig
  dtype: Any = jnp.float32
  keep_all: bool = True

  @nn.compact
  def __call__(self, x, _):
    c = self.config
    x = x + Attention(c, self.dtype, name="attn")(LayerNorm(c.norm_eps, name="norm1")(x))
    x = x + MLP(c, self.dtype, name="mlp")(LayerNorm(c.norm_eps, name="norm2")(x))
    return x, (x if self.keep_all else None)


def _first_layers(depth: int, variables):
  """The stacked layer parameters [L, ...] -> those of the first `depth` layers [depth, ...]."""
  return jax.tree_util.tree_map(lambda v: v[:depth], variables)


class VisionTransformer(nn.Module):
  """pixels [B, R, R, C] -> hidden states, computing only the first `depth` layers.

  __call__(pixels, depth, keep_all=True, post_norm=False):
    keep_all: returns [depth+1, B, T, D], transformers' `hidden_states[:depth+1]` (index 0 the
      embeddings after pre_norm, index i layer i's output).
    otherwise: returns hidden state `depth` alone, [B, T, D] (the scan keeps no per-layer stack),
      passed through post_layernorm when `post_norm`.
  Initialisation always creates every layer (and post_norm), whatever `depth`.
  """

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels, depth: int, keep_all: bool = True, post_norm: bool = False):
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"pixels must be [B, {c.image_size}, {c.image_size}, {c.num_channels}] "
                       f"(channels-last, image_size square: position embeddings are not "
                       f"interpolated), got {tuple(pixels.shape)}")
    if not 0 <= depth <= c.num_layers:
      raise ValueError(f"depth {depth} is out of range for {c.num_layers} layers")
    if post_norm and keep_all:
      raise ValueError("post_norm applies to a single hidden state: pass keep_all=False")
    initializing = self.is_initializing()
    run = c.num_layers if initializing else depth  # init creates every layer's parameters
    keep = keep_all or initializing
    x = Embeddings(c, self.dtype, name="embed")(pixels)
    if c.pre_norm:
      x = LayerNorm(c.norm_eps, name="pre_norm")(x)
    if run == 0:
      out, hidden = x, x[None][:0]
    else:
      stack = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=run)
      if run < c.num_layers:  # read the first `run` layers of the stacked [L, ...] parameters
        stack = nn.map_variables(stack, "params",
                                 trans_in_fn=functools.partial(_first_layers, run))
      out, hidden = stack(c, self.dtype, keep, name="layers")(x, None)
    if initializing:  # every layer ran: keep what `depth` asks for
      hidden = hidden[:depth]
      out = hidden[depth - 1] if depth else x
    if post_norm or initializing:
      normed = LayerNorm(c.norm_eps, name="post_norm")(out)
    if keep_all:
      return jnp.concatenate([x[None], hidden], axis=0)
    return normed if post_norm else out


# ------------------------------------------------------------------------------ entry points


@functools.partial(jax.jit, static_argnames=("config", "layer", "post_norm", "dtype"))
def vit_features(params: dict, config: ViTConfig, pixels: jax.Array,
                 layer: int | tuple[int, ...], post_norm: bool = False,
                 dtype: Any = jnp.float32) -> jax.Array:
  """pixels [B, R, R, C] (channels-last) -> hidden state `layer` [B, T, D].

  layer: a Python index into the L+1 hidden states (0 = embeddings, -1 = the last layer's output,
    -2 = LLaVA's default), computing only the layers it needs; or a tuple of such indices, whose
    hidden states are concatenated on the last axis -> [B, T, D·len(layer)] (transformers' LLaVA
    with a list `vision_feature_layer`).
  post_norm: apply the tower's post_layernorm (single layer only). SigLIP's and Janus's
    `last_hidden_state` is vit_features(layer=-1, post_norm=True); CLIP's is layer=-1 without.
  Returns float32 whatever the compute dtype.
  """
  pixels = jnp.asarray(pixels)
  module = VisionTransformer(config, dtype)
  if isinstance(layer, tuple):
    if post_norm:
      raise ValueError("post_norm is for a single layer")
    depths = [hidden_state_index(config, index) for index in layer]
    hidden = module.apply({"params": params}, pixels, max(depths))
    return jnp.concatenate([hidden[d] for d in depths], axis=-1).astype(jnp.float32)
  depth = hidden_state_index(config, layer)
  out = module.apply({"params": params}, pixels, depth, keep_all=False, post_norm=post_norm)
  return out.astype(jnp.float32)


def vit_hidden_states(params: dict, config: ViTConfig, pixels: jax.Array,
                      depth: Optional[int] = None, dtype: Any = jnp.float32) -> jax.Array:
  """pixels [B, R, R, C] -> [depth+1, B, T, D] (every hidden state by default)."""
  depth = config.num_layers if depth is None else depth
  return _hidden_states(params, config, jnp.asarray(pixels), depth, dtype)


@functools.partial(jax.jit, static_argnames=("config", "depth", "dtype"))
def _hidden_states(params, config, pixels, depth, dtype):
  return VisionTransformer(config, dtype).apply({"params": params}, pixels, depth)


def vit_param_shapes(config: ViTConfig) -> dict:
  """The parameter tree of `config` as jax.ShapeDtypeStruct leaves, without allocating it."""
  pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  init = lambda: VisionTransformer(config).init(jax.random.key(0), pixels,  # noqa: E731
                                                config.num_layers)
  return jax.eval_shape(init)["params"]


# --------------------------------------------------------------------------- checkpoint map


def _norm(ours: str, theirs: str, per_layer: bool) -> list[TensorSource]:
  return [TensorSource(f"{ours}/scale", f"{theirs}.weight", SAME, per_layer),
          TensorSource(f"{ours}/bias", f"{theirs}.bias", SAME, per_layer)]


def vit_tensor_sources(config: ViTConfig, prefix: str) -> list[TensorSource]:
  """Where every parameter comes from: `prefix` is where the tower sits in the checkpoint (see
  the module docstring; e.g. "vision_tower." for LLaVA saved by transformers 5). Per-layer keys
  carry "{i}". post_layernorm is included even where the VLM never applies it (LLaVA), so the
  tree mirrors the tower; SigLIP's attention-pooling `head.*` is not (no VLM uses it)."""
  p = prefix
  out = [TensorSource("embed/patch/kernel", f"{p}embeddings.patch_embedding.weight", CONV2D,
                      False),
         TensorSource("embed/position", f"{p}embeddings.position_embedding.weight", SAME, False)]
  if config.patch_bias:
    out.append(TensorSource("embed/patch/bias", f"{p}embeddings.patch_embedding.bias", SAME,
                            False))
  if config.class_token:
    out.append(TensorSource("embed/class_token", f"{p}embeddings.class_embedding", SAME, False))
  if config.pre_norm:
    out += _norm("pre_norm", f"{p}pre_layrnorm", False)  # sic: CLIP's spelling
  out += _norm("post_norm", f"{p}post_layernorm", False)

  layer = f"{p}encoder.layers.{{i}}."
  attn_out = _FAMILIES[config.model_type]["out_key"]
  per_layer = [(f"attn/{n}/kernel", f"self_attn.{n}_proj.weight", HEADS_OUT) for n in "qkv"]
  if config.qkv_bias:
    per_layer += [(f"attn/{n}/bias", f"self_attn.{n}_proj.bias", HEAD_BIAS) for n in "qkv"]
  per_layer += [("attn/o/kernel", f"self_attn.{attn_out}.weight", HEADS_IN),
                ("attn/o/bias", f"self_attn.{attn_out}.bias", SAME)]
  for name in ("fc1", "fc2"):
    per_layer += [(f"mlp/{name}/kernel", f"mlp.{name}.weight", LINEAR),
                  (f"mlp/{name}/bias", f"mlp.{name}.bias", SAME)]
  for name in ("norm1", "norm2"):
    per_layer += [(f"{name}/scale", f"layer_{name}.weight", SAME),
                  (f"{name}/bias", f"layer_{name}.bias", SAME)]
  out += [TensorSource(f"layers/{ours}", layer + theirs, layout, True)
          for ours, theirs, layout in per_layer]
  return out


def find_prefix(keys: Container[str], candidates: Sequence[str] = LLAVA_PREFIXES + ("",)) -> str:
  """The first candidate prefix under which `keys` (a checkpoint's) hold a patch embedding."""
  suffix = "embeddings.patch_embedding.weight"
  for candidate in candidates:
    if candidate + suffix in keys:
      return candidate
  raise KeyError(f"no vision tower in this checkpoint: none of "
                 f"{[c + suffix for c in candidates]}")


def vit_params_from_state(config: ViTConfig, state: Mapping[str, Any],
                          prefix: Optional[str] = None) -> dict:
  """The tower's params from a full state; `prefix` defaults to the one `state` has among
  LLAVA_PREFIXES, JANUS_PREFIXES and ""."""
  if prefix is None:
    prefix = find_prefix(state, LLAVA_PREFIXES + JANUS_PREFIXES + ("",))
  return params_from_state(vit_tensor_sources(config, prefix), vit_param_shapes(config), state,
                           config.num_layers)
