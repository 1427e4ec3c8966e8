"""Small building blocks of the decoder: norms, rotary embeddings, the gated MLP.

Axis legend used in einsum strings throughout `narrowgate_jax.models`:
  B batch · T query positions · S key positions · D model width · F MLP width
  N query heads · K key/value heads · G query heads per key/value head (N = K·G) · H head width
  V vocabulary · L layers
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.models.config import DecoderConfig



def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions. torch's "gelu" is the exact erf form; the tanh forms
# ("gelu_pytorch_tanh", "gelu_new") are jax's approximate=True.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
  """A transformers activation name -> the function; a clear error for one we lack."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32 (as transformers' Llama/Chameleon/Emu3 do)."""

  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class HeadLayerNorm(nn.Module):
  """Chameleon's qk-norm: LayerNorm over H with a separate affine per head.

  x: [B, T, N, H] -> [B, T, N, H]; scale and bias are [N, H].
  """

  num_heads: int
  eps: float

  @nn.compact
  def __call__(self, x):
    shape = (self.num_heads, x.shape[-1])
    scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normed = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return normed * scale.astype(x.dtype) + bias.astype(x.dtype)


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
  """[H/2] float32 inverse frequencies, with the checkpoint's scaling rule applied."""
  p = config.rope_parameters
  dim = config.head_dim
  inv_freq = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  if p["rope_type"] == "linear":
    return (inv_freq / np.float32(p["factor"])).astype(np.float32)
  if p["rope_type"] == "llama3":
    return _llama3_scaling(inv_freq, p)
  return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, p: dict) -> np.ndarray:
  """Llama-3.1 frequency scaling: long wavelengths divided by `factor`, a smooth ramp between."""
  factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
  old_context = p["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_context / low, old_context / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, config: DecoderConfig) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] int -> (cos, sin), each [B, T, H] float32 (halves repeated, not interleaved)."""
  inv_freq = jnp.asarray(rope_inverse_frequencies(config))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, H] rotated by (cos, sin) [B, T, H] in the 'rotate half' convention."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)); x [B, T, D] -> [B, T, D]."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, use_bias=c.mlp_bias, dtype=x.dtype, param_dtype=jnp.float32, name=name)
    hidden = activation(c.hidden_act)(dense(c.intermediate_size, "gate")(x))
    hidden = hidden * dense(c.intermediate_size, "up")(x)
    return dense(c.hidden_size, "down")(hidden)
