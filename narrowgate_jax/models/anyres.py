"""Packing the vision features of one image's views into its token sequence (LLaVA-NeXT and
LLaVA-OneVision AnyRes; the single-view families pass straight through).

The token order is the one `narrowgate_jax.processing.anyres.Layout` describes: the base view's
g·g features, then the HD tiles stitched into one grid, cropped to the unpadded region,
(OneVision) shrunk bilinearly exactly as torch's F.interpolate(mode="bilinear",
align_corners=False), and each row followed by the learned newline feature. All shape facts come
from the layout's hashable `PackPlan`, so one compile serves every image with the same plan.

Axis legend for einsum strings:
  V views · P patches of one view (g·g) · D feature width
  I tile row · J tile column · R patch row inside a tile · C patch column inside a tile
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.processing.anyres import Layout, PackPlan


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The two source indices and weights of each output index of a 1-D linear resize n_in ->
  n_out, computed as torch's CPU kernel does for align_corners=False: scale = n_in / n_out in
  float32, source position scale · (i + 0.5) − 0.5 rounded once to float32 (torch's build fuses
  it into one multiply-add; two roundings move weights by up to 1e-6), clamped at 0; the upper
  neighbour clamped to the last index.

  -> (i0 [n_out] int32, i1 [n_out] int32, w0 [n_out] float32, w1 [n_out] float32).
  """
  scale = np.float32(n_in) / np.float32(n_out)
  # Exact in float64 (a 24-bit by ~13-bit product), then one rounding: the fused multiply-add.
  src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
  i1 = np.where(i0 < n_in - 1, i0 + 1, i0).astype(np.int32)
  return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def resize_bilinear(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[h, w, D] -> [size[0], size[1], D], torch's bilinear (align_corners=False, no antialias).

  Interpolates along columns first, then rows, with the products summed in torch's order, so the
  float32 result matches torch's CPU kernel to rounding.
  """
  h, w, _ = grid.shape
  r0, r1, rw0, rw1 = bilinear_taps(h, size[0])
  c0, c1, cw0, cw1 = bilinear_taps(w, size[1])
  cols = grid[:, c0] * cw0[None, :, None] + grid[:, c1] * cw1[None, :, None]
  return cols[r0] * rw0[:, None, None] + cols[r1] * rw1[:, None, None]


@functools.partial(jax.jit, static_argnames="plan")
def _pack(view_features: jax.Array, newline: jax.Array | None, plan: PackPlan) -> jax.Array:
  g = plan.grid
  dim = view_features.shape[-1]
  parts = [view_features[0]]
  if plan.tiles:
    nh, nw = plan.tiles
    tiles = view_features[1:plan.num_views].reshape(nh, nw, g, g, dim)
    hd = jnp.einsum("IJRCD->IRJCD", tiles).reshape(nh * g, nw * g, dim)
    top, bottom, left, right = plan.crop
    hd = hd[top:bottom, left:right]
    if plan.resize:
      hd = resize_bilinear(hd, plan.resize)
    rows = hd.shape[0]
    column = jnp.broadcast_to(newline.astype(hd.dtype), (rows, 1, dim))
    parts.append(jnp.concatenate([hd, column], axis=1).reshape(-1, dim))
  if plan.trailing_newline:
    parts.append(newline.astype(view_features.dtype)[None])
  return jnp.concatenate(parts, axis=0)


def pack_features(view_features: jax.Array, layout: Layout | PackPlan,
                  newline: jax.Array | None = None) -> jax.Array:
  """One image's projected vision features in token order.

  Args:
    view_features: [V, P, D], the views in pixel_values order with CLS already dropped
      (P = g·g); views past the layout's count (batch padding) are ignored.
    layout: the image's `Layout` (or its `PackPlan`).
    newline: [D] the learned image_newline; required when the layout has newline tokens.

  Returns:
    [n, D] with n = layout.num_tokens, equal to transformers' pack_image_features.
  """
  plan = layout.plan if isinstance(layout, Layout) else layout
  v, p, _ = view_features.shape
  if p != plan.grid ** 2 or v < plan.num_views:
    raise ValueError(f"view_features of shape {view_features.shape}; the layout needs at least "
                     f"{plan.num_views} views of {plan.grid ** 2} patches (CLS dropped)")
  if newline is None and plan.has_newlines:
    raise ValueError("this layout has newline tokens: pass the model's image_newline")
  return _pack(view_features, newline if plan.has_newlines else None, plan=plan)
