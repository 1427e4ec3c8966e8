"""Modality gap in the residual stream (NG Fig. 2, PROTOCOLS.md §2 (a)).

Two readings per layer of one image-token vector and one text-token vector per example:

  cosine_quantiles      quantiles (25/50/75 % by default) of the cosine similarity of ALL
                        image×text pairs, signed or absolute (a config field: the study's first
                        version is signed, its later code takes |cos|)
  modality_homogeneity  cluster image + text vectors with Advanced Density Peaks (the study's
                        DADApy pipeline, `analysis.adp`) and score the homogeneity of the
                        clusters w.r.t. modality

Cosine quantiles are exact without ever holding the [N, M] matrix (10,000 × 10,000 per layer in
the study): a two-pass radix select on device. Each float32 cosine maps to a uint32 key whose
unsigned order is the float order (flip all bits of negatives, set the sign bit of the rest).
Pass 1 streams the matrix in [block, M] row blocks and histograms the top 16 key bits (65,536
bins); the cumulative counts give, for every order statistic a quantile needs, the bucket it
falls in and its rank inside that bucket. Pass 2 streams the matrix again and histograms the low
16 bits of only the keys in those buckets, which pins each order statistic to a single key, i.e.
to one exact float32 value. The quantile is then numpy's default ('linear') interpolation between
the two order statistics around (n − 1)·q, in float64. So the result equals np.quantile applied
to the full float32 matrix that the kernel computes; the only error is that of the cosines
themselves (float32 dot products of unit vectors, `Precision.HIGHEST`, ~1e-7 absolute).

Cost per layer: two [N, D]×[D, M] matmuls (one per pass) and two scatter-adds over the N·M keys;
memory: one [block, M] block plus two small histograms. Counts are int32, so N·M < 2^31.

Homogeneity runs `analysis.adp`, a port of the DADApy 0.3.4 pipeline the study called
(https://github.com/sissa-data-science/DADApy; dadapy itself pins jax==0.4.30 and numpy<2, so it
cannot share an environment with this package). The port reproduces DADApy 0.3.4: the same
neighbours, intrinsic dimension and densities to float64 round-off and the same cluster labels
(exact ties between duplicate points aside, see `analysis.adp`); tests/test_adp.py checks this
against DADApy itself, run in an environment of its own.

Axis legend: L layers · N image vectors · M text vectors · D model width · b rows of one block ·
  R order statistics being selected · Q quantiles
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.analysis.adp import advanced_density_peaks

_HALF_BITS = 16
_BINS = 1 << _HALF_BITS  # buckets per radix pass
_LOW_MASK = _BINS - 1
_SIGN = np.uint32(0x80000000)
_MAX_PAIRS = 2**31 - 1  # histograms count in int32

# ---------------------------------------------------------------------------- cosine quantiles


def _unit_rows(x: jax.Array) -> jax.Array:
  """[n, D] -> [n, D] float32 rows of unit norm; an all-zero row stays zero (cosine 0)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def _row_blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """[n, D] -> ([n_blocks, block, D] zero-padded rows, [n_blocks, block] bool: real row)."""
  n = x.shape[0]
  n_blocks = -(-n // block)
  padded = jnp.pad(x, ((0, n_blocks * block - n), (0, 0)))
  valid = jnp.arange(n_blocks * block) < n
  return padded.reshape(n_blocks, block, x.shape[1]), valid.reshape(n_blocks, block)


def sortable_keys(x: jax.Array) -> jax.Array:
  """float32 [...] -> uint32 [...] whose unsigned order is the float order (NaN excluded).

  Negative floats have their bits flipped (larger magnitude -> smaller key); non-negative ones
  get the sign bit set, so every non-negative key is above every negative one. −0.0 lands one
  key below +0.0; both are the float 0.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN))


def keys_to_float(keys) -> np.ndarray:
  """Inverse of `sortable_keys` on the host: uint32 [...] -> float32 [...]."""
  keys = np.asarray(keys, np.uint32)
  bits = np.where(keys & _SIGN, keys ^ _SIGN, ~keys).astype(np.uint32)
  return bits.view(np.float32)


def _cosine_keys(image_block: jax.Array, text: jax.Array, absolute: bool) -> jax.Array:
  """Unit rows [b, D] × unit rows [M, D] -> uint32 keys [b, M] of their (absolute) cosines."""
  # HIGHEST: on GPU the default matmul precision (TF32) would put ~1e-3 error on every cosine.
  cos = jnp.einsum("bD,MD->bM", image_block, text, precision=jax.lax.Precision.HIGHEST)
  return sortable_keys(jnp.abs(cos) if absolute else cos)


@functools.partial(jax.jit, static_argnames=("absolute", "block"))
def _high_histogram(image: jax.Array, text: jax.Array, *, absolute: bool,
                    block: int) -> jax.Array:
  """Pass 1: image [N, D], text [M, D] -> [65536] int32 counts of the keys' top 16 bits."""
  blocks, valid = _row_blocks(_unit_rows(image), block)
  text = _unit_rows(text)

  def step(hist, xs):
    rows, ok = xs
    keys = _cosine_keys(rows, text, absolute)  # [b, M]
    high = (keys >> _HALF_BITS).astype(jnp.int32)
    weight = jnp.broadcast_to(ok[:, None], keys.shape).astype(jnp.int32)  # padded rows count 0
    return hist.at[high.ravel()].add(weight.ravel()), None

  hist, _ = jax.lax.scan(step, jnp.zeros(_BINS, jnp.int32), (blocks, valid))
  return hist


@functools.partial(jax.jit, static_argnames=("absolute", "block"))
def _low_histograms(image: jax.Array, text: jax.Array, buckets: jax.Array, *, absolute: bool,
                    block: int) -> jax.Array:
  """Pass 2: counts of the low 16 key bits inside each of R chosen top-16-bit buckets.

  buckets: [R] int32, ascending, distinct; entries equal to 65536 are padding (no key's top
  16 bits reach that value, so they match nothing). Returns [R, 65536] int32.
  """
  blocks, valid = _row_blocks(_unit_rows(image), block)
  text = _unit_rows(text)
  num = buckets.shape[0]

  def step(hist, xs):
    rows, ok = xs
    keys = _cosine_keys(rows, text, absolute)  # [b, M]
    high = (keys >> _HALF_BITS).astype(jnp.int32)
    low = (keys & _LOW_MASK).astype(jnp.int32)
    # Which selected bucket (if any) each key is in: one scatter for all R buckets, instead of
    # R masked scatters over the whole block.
    slot = jnp.minimum(jnp.searchsorted(buckets, high), num - 1)
    hit = (buckets[slot] == high) & ok[:, None]
    index = jnp.where(hit, slot * _BINS + low, num * _BINS)  # misses go to one spare bin
    return hist.at[index.ravel()].add(1), None

  hist, _ = jax.lax.scan(step, jnp.zeros(num * _BINS + 1, jnp.int32), (blocks, valid))
  return hist[:-1].reshape(num, _BINS)


def _quantile_positions(n: int, quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
  """np.quantile's 'linear' method: ([Q] lower rank, [Q] upper rank, [Q] float64 weight)."""
  virtual = (n - 1) * quantiles
  lower = np.floor(virtual)
  gamma = virtual - lower
  lower = lower.astype(np.int64)
  upper = np.minimum(lower + 1, n - 1)
  return lower, upper, gamma


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
  """numpy's own quantile interpolation (same rounding): a + (b−a)·t, or b − (b−a)(1−t) if t≥½."""
  diff = b - a
  return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def select_order_statistics(high_histogram, low_histograms_fn, ranks: np.ndarray) -> np.ndarray:
  """Exact order statistics from the two radix passes (host bookkeeping, int64).

  high_histogram: [65536] counts of the keys' top 16 bits (pass 1).
  low_histograms_fn: buckets [R] int32 (ascending, distinct, padded with 65536) -> [R, 65536]
    counts of the low 16 bits of the keys in each bucket (pass 2).
  ranks: [K] 0-based ranks in ascending order of all keys.
  Returns [K] float32: the rank-th smallest value for each rank.
  """
  hist = np.asarray(high_histogram, np.int64)
  cum = np.cumsum(hist)
  ranks = np.asarray(ranks, np.int64)
  if ranks.size and (ranks.min() < 0 or ranks.max() >= cum[-1]):
    raise ValueError(f"ranks must lie in 0..{cum[-1] - 1}, got {ranks}")
  bucket = np.searchsorted(cum, ranks, side="right")  # first bucket whose cumulative count > rank
  within = ranks - (cum[bucket] - hist[bucket])  # rank among the keys of that bucket
  chosen = np.unique(bucket)
  padded = np.full(len(ranks), _BINS, np.int32)  # fixed length R: one compile per K
  padded[:len(chosen)] = chosen
  low = np.asarray(low_histograms_fn(padded), np.int64)  # [R, 65536]
  slot = np.searchsorted(chosen, bucket)
  low_cum = np.cumsum(low[slot], axis=-1)  # [K, 65536]
  low_bits = np.array([np.searchsorted(c, w, side="right") for c, w in zip(low_cum, within)],
                      np.int64)
  keys = (bucket.astype(np.uint64) << _HALF_BITS) | low_bits.astype(np.uint64)
  return keys_to_float(keys.astype(np.uint32))


def cosine_quantiles(image, text, absolute: bool,
                     quantiles: Sequence[float] = (0.25, 0.5, 0.75),
                     block: int = 1024) -> np.ndarray:
  """Quantiles of the cosine similarity of all image×text pairs, per layer.

  image [L, N, D], text [L, M, D] (any float dtype; cosines in float32) -> [L, Q] float64, with
  [ℓ, q] = np.quantile(cos_ℓ.ravel(), quantiles[q]) (default 'linear' method) where
  cos_ℓ[i, j] = <image[ℓ, i], text[ℓ, j]> / (‖·‖‖·‖), or |cos| if `absolute`.

  Exact (see the module docstring): two streaming passes over the matrix in blocks of `block`
  image rows, never more than [block, M] of it at once. One layer at a time goes to the device,
  so host (numpy) inputs need only one layer's vectors in device memory. Requires N·M < 2^31.
  A zero vector has cosine 0 with everything (instead of NaN); NaN inputs are not checked for
  (their cosines would sort above every number, where np.quantile returns NaN).
  """
  image_shape, text_shape = np.shape(image), np.shape(text)
  if len(image_shape) != 3 or len(text_shape) != 3:
    raise ValueError(f"cosine_quantiles expects image [L, N, D] and text [L, M, D], got shapes "
                     f"{image_shape} and {text_shape}")
  (layers, n, width), (text_layers, m, text_width) = image_shape, text_shape
  if layers != text_layers or width != text_width:
    raise ValueError(f"image {image_shape} and text {text_shape} must agree on L and D")
  if n == 0 or m == 0:
    raise ValueError(f"no pairs: N={n} image and M={m} text vectors")
  if n * m > _MAX_PAIRS:
    raise ValueError(f"N·M = {n * m} pairs exceed the int32 counters (< 2^31): pass fewer "
                     "vectors or split the pairs and merge the histograms")
  block = operator.index(block)
  if block < 1:
    raise ValueError(f"block must be at least 1, got {block}")
  block = min(block, n)  # one block covers everything: don't pad beyond N
  q = np.asarray(quantiles, np.float64).reshape(-1)
  if q.size == 0 or np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
    raise ValueError(f"quantiles must lie in [0, 1], got {quantiles}")

  lower, upper, gamma = _quantile_positions(n * m, q)
  ranks = np.unique(np.concatenate([lower, upper]))
  out = np.empty((layers, q.size), np.float64)
  for layer in range(layers):
    img, txt = jnp.asarray(image[layer]), jnp.asarray(text[layer])
    high = _high_histogram(img, txt, absolute=bool(absolute), block=block)
    low = functools.partial(_low_histograms, img, txt, absolute=bool(absolute), block=block)
    values = select_order_statistics(high, low, ranks)
    values = values.astype(np.float64)
    a = values[np.searchsorted(ranks, lower)]
    b = values[np.searchsorted(ranks, upper)]
    out[layer] = _lerp(a, b, gamma)
  return out


# -------------------------------------------------------------------------------- homogeneity

def adp_clusters(points, *, metric: str = "cosine", maxk: int = 128,
                 gride_range_max: int = 128, gride_scale: int = 3, density_k: int = 16,
                 z: float = 1.65) -> np.ndarray:
  """Advanced Density Peaks cluster labels of points [N, D] -> [N] int64 (float64 throughout).

  The study's pipeline (PROTOCOLS.md §2 (a); the public code's `homogeneity_score`), each step
  a keyword argument with the study's value as default, as DADApy 0.3.4 runs it (`analysis.adp`):
    metric, maxk          cosine distance, 128 nearest neighbours (exact, float64)
    remove zero distances duplicate points' zero distances -> machine epsilon
    gride_range_max       GRIDE intrinsic dimension at neighbour ranks up to 128; scale i
    gride_scale           compares the 2^i-th and 2^(i+1)-th neighbour distances, the study
                          takes i = 3 (8th vs 16th)
    density_k             kNN log density with that dimension, k = 16
    z                     merge density peaks at confidence Z = 1.65
  Raises ValueError for a metric other than cosine, N ≤ maxk points, points that are not [N, D],
  NaN/inf or zero vectors, gride_range_max > maxk, a gride_scale beyond ⌊log2 gride_range_max⌋
  scales, or density_k > maxk.
  """
  if metric != "cosine":
    raise ValueError(f"only the cosine metric (the study's) is implemented, got {metric!r}")
  return advanced_density_peaks(points, maxk=maxk, gride_range_max=gride_range_max,
                                gride_scale=gride_scale, density_k=density_k, z=z).labels


def modality_homogeneity(points, labels, *, metric: str = "cosine", maxk: int = 128,
                         gride_range_max: int = 128, gride_scale: int = 3,
                         density_k: int = 16, z: float = 1.65) -> float:
  """Homogeneity of ADP clusters w.r.t. modality: points [N, D], labels [N] -> float in [0, 1].

  Clusters with `adp_clusters` (same keyword arguments, the study's values as defaults), then
  scores sklearn's homogeneity_completeness_v_measure(labels, clusters)[0]: 1 when every
  cluster holds one modality only (the modalities are apart), lower as clusters mix them.
  labels: e.g. 0 for text vectors, 1 for image vectors (any hashable values).
  """
  labels = np.asarray(labels)
  if labels.shape != (np.shape(points)[0],):
    raise ValueError(f"labels must be [N] for points [N, D]; got labels {labels.shape}, "
                     f"points {np.shape(points)}")
  clusters = adp_clusters(points, metric=metric, maxk=maxk, gride_range_max=gride_range_max,
                          gride_scale=gride_scale, density_k=density_k, z=z)
  # Imported on use: sklearn costs ~1 s to import and only this host-side score needs it.
  from sklearn.metrics import homogeneity_completeness_v_measure

  homogeneity, _, _ = homogeneity_completeness_v_measure(labels, clusters)
  return float(homogeneity)
