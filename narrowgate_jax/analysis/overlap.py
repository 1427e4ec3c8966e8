"""Neighbourhood overlap with labels (NG Fig. 4, PROTOCOLS.md §2 (c)).

  χ = (1/n) Σ_i (1/k) Σ_{j ∈ kNN(i)} 1[y_j = y_i]

the fraction of each point's k nearest neighbours (Euclidean, the point itself excluded) that
share its label (ImageNet class in the study, k = 30), averaged over points. χ is 1 when every
neighbourhood is pure and ≈ the label frequency when representations carry no label
information.

Computed on device in blocks of query rows: a block of `block` queries against all N points is a
[block, N] matrix of squared distances, the largest array held (10,000 points × 4,096 dims never
make an [N, N] matrix). Squared distances come from ‖q‖² + ‖x‖² − 2 q·x in float32 with
`Precision.HIGHEST`; the square root is skipped since it does not change the order.

Ties: neighbours are the k smallest distances, equal distances broken by the lower point index
(`jax.lax.top_k` keeps the lower index first). Self is excluded by index, so an exact duplicate
of point i (a different index at distance 0) does count as its neighbour. The expanded form
carries float32 rounding (relative to ‖x‖²), so two neighbours whose distances differ by less
than that may swap order.

Axis legend: L layers · N points · D width · b queries of one block · k neighbours
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np


def _neighbour_matches(x: jax.Array, labels: jax.Array, k: int, block: int) -> jax.Array:
  """x [N, D] float32, labels [N] int -> int32 total of label matches over all kNN lists."""
  n = x.shape[0]
  sq_norm = jnp.einsum("ND,ND->N", x, x, precision=jax.lax.Precision.HIGHEST)  # [N]
  n_blocks = -(-n // block)
  pad = n_blocks * block - n
  queries = jnp.pad(x, ((0, pad), (0, 0))).reshape(n_blocks, block, -1)
  index = jnp.arange(n_blocks * block, dtype=jnp.int32).reshape(n_blocks, block)
  columns = jnp.arange(n, dtype=jnp.int32)

  def step(total, xs):
    q, q_index = xs  # [b, D], [b] global row index (>= n on padding rows)
    dot = jnp.einsum("bD,ND->bN", q, x, precision=jax.lax.Precision.HIGHEST)
    q_norm = jnp.einsum("bD,bD->b", q, q, precision=jax.lax.Precision.HIGHEST)
    dist = q_norm[:, None] + sq_norm[None, :] - 2.0 * dot  # [b, N] squared distances
    dist = jnp.where(columns[None, :] == q_index[:, None], jnp.inf, dist)  # exclude self
    # top_k of −dist: the k smallest distances, the lower index first among equals.
    _, neighbours = jax.lax.top_k(-dist, k)  # [b, k]
    real = q_index < n
    own = labels[jnp.minimum(q_index, n - 1)]  # [b]
    same = (labels[neighbours] == own[:, None]) & real[:, None]
    return total + same.sum(dtype=jnp.int32), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.int32), (queries, index))
  return total


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _overlap_one(x: jax.Array, labels: jax.Array, k: int, block: int) -> jax.Array:
  return _neighbour_matches(x.astype(jnp.float32), labels, k, block)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _overlap_layers(x: jax.Array, labels: jax.Array, k: int, block: int) -> jax.Array:
  # lax.map: one layer at a time inside the compiled loop, so the [block, N] working set is
  # not multiplied by L.
  return jax.lax.map(lambda layer: _neighbour_matches(layer.astype(jnp.float32), labels, k,
                                                      block), x)


def _check(shape: tuple, labels, k: int, block: int) -> tuple[np.ndarray, int, int]:
  n = shape[-2]
  k, block = operator.index(k), operator.index(block)
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"labels must be [N] = [{n}], got shape {labels.shape}")
  if not 1 <= k <= n - 1:
    raise ValueError(f"k must be in 1..N−1 = 1..{n - 1} (self is excluded), got k={k}")
  if block < 1:
    raise ValueError(f"block must be at least 1, got {block}")
  if n * k > 2**31 - 1:
    raise ValueError(f"N·k = {n * k} exceeds the int32 match counter")
  # Labels of any kind (strings too) become dense int32 codes: only equality matters.
  _, codes = np.unique(labels, return_inverse=True)
  return codes.astype(np.int32).reshape(n), k, min(block, n)


def neighbourhood_overlap(x, labels, k: int = 30, block: int = 1024) -> float:
  """χ of points x [N, D] (any float dtype, float32 on device) with labels [N] -> float.

  Exact as a count: the int32 number of matching neighbours divided by N·k in float64.
  Requires N·k < 2^31.
  """
  shape = np.shape(x)
  if len(shape) != 2:
    raise ValueError(f"neighbourhood_overlap expects x [N, D], got shape {shape}")
  codes, k, block = _check(shape, labels, k, block)
  matches = _overlap_one(jnp.asarray(x), jnp.asarray(codes), k=k, block=block)
  return float(int(matches) / (shape[0] * k))


def neighbourhood_overlap_per_layer(x, labels, k: int = 30, block: int = 1024) -> np.ndarray:
  """χ per layer: x [L, N, D], labels [N] (the same points in every layer) -> [L] float64.

  One compiled loop over layers (`lax.map`); the whole [L, N, D] goes to the device, so for
  inputs larger than device memory call `neighbourhood_overlap` layer by layer instead.
  """
  shape = np.shape(x)
  if len(shape) != 3:
    raise ValueError(f"neighbourhood_overlap_per_layer expects x [L, N, D], got shape {shape}")
  codes, k, block = _check(shape, labels, k, block)
  matches = _overlap_layers(jnp.asarray(x), jnp.asarray(codes), k=k, block=block)
  return np.asarray(matches, np.int64) / float(shape[1] * k)
