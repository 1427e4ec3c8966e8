"""Building blocks shared by the VQ image tokenizers (Chameleon's VQ-GAN, Emu3's VQ-VAE).

Channels-last throughout (flax convolutions are NHWC). Everything runs in float32 at
`Precision.HIGHEST`: codes are an argmin, so a reduced-precision matmul (bf16 passes on TPU, TF32
on GPU) could flip a code against the float32 reference, and the encoder runs once per image.

Axis legend: B batch · Y, X grid rows, columns · C channels · M flattened latent positions ·
E code width · N codebook entries.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from narrowgate_jax.models import families
from narrowgate_jax.models.families import SAME, Layout, TensorSource

PRECISION = jax.lax.Precision.HIGHEST
GROUPS = 32  # torch.nn.GroupNorm(num_groups=32, ...) in both encoders
GROUP_NORM_EPS = 1e-6


class LevelsConfig:
  """What the VQ encoder configs share (mixed into their frozen dataclasses): reading the
  transformers config, and the resolution levels (`base_channels`, `channel_multiplier`)."""

  @classmethod
  def from_hf(cls, vq_config: Any):
    """From the transformers VQ config object, or its dict form (config.json's vq_config)."""
    get = (vq_config.get if isinstance(vq_config, Mapping)
           else lambda name, default=None: getattr(vq_config, name, default))
    fields = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
    fields["channel_multiplier"] = tuple(int(m) for m in fields["channel_multiplier"])
    fields["attn_resolutions"] = tuple(int(r) for r in (fields["attn_resolutions"] or ()))
    return cls(**fields)

  @property
  def num_levels(self) -> int:
    return len(self.channel_multiplier)

  @property
  def level_channels(self) -> tuple[int, ...]:
    """C_l: the output channels of each level's blocks."""
    return tuple(self.base_channels * m for m in self.channel_multiplier)


def conv(features: int, kernel: tuple[int, ...], name: str, strides: tuple[int, ...] | None = None,
         padding: Any = None) -> nn.Conv:
  """A channels-last conv of any rank; padding k // 2 on each side unless given (torch's
  Conv2d(k, padding=k // 2))."""
  if padding is None:
    padding = tuple((k // 2, k // 2) for k in kernel)
  return nn.Conv(features, kernel, strides=strides or (1,) * len(kernel), padding=padding,
                 precision=PRECISION, param_dtype=jnp.float32, name=name)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm(32, C, eps=1e-6, affine=True) on x [B, Y, X, C] -> [B, Y, X, C].

  Channel c belongs to group c // (C / 32) (contiguous groups, as torch). Biased variance over
  (Y, X, channels of the group), taken as the mean of squared deviations (two passes, like
  torch's kernel; flax's nn.GroupNorm defaults to the less exact E[x²] - E[x]²).
  """

  @nn.compact
  def __call__(self, x):
    b, y, w, c = x.shape
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    grouped = x.reshape(b, y, w, GROUPS, c // GROUPS)
    mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(x.shape)
    return normed * scale + bias


class ResnetBlock(nn.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), x [B, Y, X, C_in] -> [B, Y, X, C_out].

  The skip is a 1x1 conv ("nin_shortcut") when C_in != C_out: neither encoder builds
  transformers' 3x3 `conv_shortcut` variant. No dropout: the tokenizers are frozen.
  """

  out_channels: int

  @nn.compact
  def __call__(self, x):
    h = nn.silu(GroupNorm(name="norm1")(x))
    h = conv(self.out_channels, (3, 3), "conv1")(h)
    h = nn.silu(GroupNorm(name="norm2")(h))
    h = conv(self.out_channels, (3, 3), "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, (1, 1), "nin_shortcut")(x)
    return x + h


class DownLevel(nn.Module):
  """One resolution level: `num_blocks` residual blocks, each followed by an attention block when
  `attention` (a factory: name -> module) is given, then a stride-2 downsample unless this is the
  last level. [B, Y, X, C] -> [B, Y', X', channels].
  """

  channels: int
  num_blocks: int
  attention: Optional[Callable[..., nn.Module]]
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = ResnetBlock(self.channels, name=f"block_{i}")(x)
      if self.attention is not None:
        x = self.attention(name=f"attn_{i}")(x)
    if self.downsample:
      # torch pads right and bottom by one, then a VALID 3x3 stride-2 conv: Y' = Y // 2. A
      # symmetric ((1, 1), (1, 1)) padding would shift every output pixel by one input pixel.
      x = conv(self.channels, (3, 3), "downsample", (2, 2), ((0, 1), (0, 1)))(x)
    return x


def code_distances(latents: jax.Array, codebook: jax.Array) -> jax.Array:
  """latents [M, E], codebook [N, E] -> squared distances [M, N] float32.

  Same formula and operation order as transformers (|z|² + |e|² - 2 z·e), not |z - e|², so
  near-ties resolve the same way up to matmul round-off.
  """
  return (jnp.sum(latents**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)
          - 2 * jnp.einsum("ME,NE->MN", latents, codebook, precision=PRECISION))


def nearest_codes(latents: jax.Array, codebook: jax.Array) -> jax.Array:
  """latents [M, E], codebook [N, E] -> int32 [M]: the nearest entry (the first of equal minima,
  as torch.argmin)."""
  return jnp.argmin(code_distances(latents, codebook), axis=1).astype(jnp.int32)


class Codebook(nn.Module):
  """The quantiser's codebook [size, dim] (transformers' quantize.embedding)."""

  size: int
  dim: int

  @nn.compact
  def __call__(self):
    return self.param("embedding", nn.initializers.normal(1.0), (self.size, self.dim), jnp.float32)


# --------------------------------------------------------------------------- checkpoint maps

# torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out]; checkpoint rows (out
# channels) fill our last axis.
CONV2D = Layout("conv2d", 3, lambda ours: (ours[3], ours[2], ours[0], ours[1]),
                lambda w, ours: w.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
# torch Conv3d weight [out, in, kt, kh, kw] -> flax kernel [kt, kh, kw, in, out].
CONV3D = Layout("conv3d", 4, lambda ours: (ours[4], ours[3], ours[0], ours[1], ours[2]),
                lambda w, ours: w.transpose(2, 3, 4, 1, 0), lambda x: x.transpose(4, 3, 0, 1, 2))

Sources = list[tuple[str, str, Layout]]  # (our "/"-joined path, checkpoint key, layout)


def conv_sources(ours: str, theirs: str, layout: Layout = CONV2D) -> Sources:
  return [(f"{ours}/kernel", f"{theirs}.weight", layout), (f"{ours}/bias", f"{theirs}.bias", SAME)]


def norm_sources(ours: str, theirs: str) -> Sources:
  return [(f"{ours}/scale", f"{theirs}.weight", SAME), (f"{ours}/bias", f"{theirs}.bias", SAME)]


def block_sources(ours: str, theirs: str, has_shortcut: bool) -> Sources:
  out = (norm_sources(f"{ours}/norm1", f"{theirs}.norm1")
         + conv_sources(f"{ours}/conv1", f"{theirs}.conv1")
         + norm_sources(f"{ours}/norm2", f"{theirs}.norm2")
         + conv_sources(f"{ours}/conv2", f"{theirs}.conv2"))
  if has_shortcut:
    out += conv_sources(f"{ours}/nin_shortcut", f"{theirs}.nin_shortcut")
  return out


def params_from_state(sources: Sequence[tuple[str, str, Layout]], shape_tree,
                      state: Mapping[str, Any]) -> dict:
  """`families.params_from_state` for a VQ table of (our path, checkpoint key, layout) triples
  (no per-layer tensors)."""
  return families.params_from_state([TensorSource(p, k, layout, per_layer=False)
                                     for p, k, layout in sources], shape_tree, state)
