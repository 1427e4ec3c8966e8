"""Advanced Density Peaks clustering: DADApy 0.3.4's pipeline, reproduced step by step.

The modality-gap homogeneity (PROTOCOLS.md §2 (a)) clusters the image and text vectors of one
layer the way the study did with DADApy (https://github.com/sissa-data-science/DADApy):

    data = Data(points)                                       # float64
    data.compute_distances(metric="cosine", maxk=128)         # cosine kNN, the point itself first
    data.distances = data.remove_zero_dists(data.distances)   # 0 -> machine epsilon
    ids, _, _ = data.return_id_scaling_gride(range_max=128)   # GRIDE intrinsic dimension per scale
    data.set_id(ids[3])
    data.compute_density_kNN(k=16)                            # kNN log density and its error
    labels = data.compute_clustering_ADP(Z=1.65)              # density peaks, merged at Z

DADApy cannot share an environment with this package (dadapy 0.3.4 pins jax 0.4.30 and numpy<2),
so each step is a function here, and `advanced_density_peaks` chains them:

  cosine_neighbours      exact float64 cosine kNN without an [N, N] matrix (below)
  remove_zero_distances  neighbour distances below float64 epsilon -> epsilon (column 0 kept)
  gride_ids              GRIDE maximum-likelihood intrinsic dimension at every scale 2^i vs 2^(i+1)
  knn_log_density        log(k / (N · ω_d · r_k^d)) and its error 1/√k
  adp_labels             putative peaks, preliminary assignment, saddle points, merging at Z

They give DADApy 0.3.4's results: the same neighbour indices, intrinsic dimension and log
densities to float64 round-off, and the same cluster labels, numbered as DADApy numbers them
(tests/test_adp.py runs DADApy itself on the same inputs). The details that change the output
and are kept: the sklearn cosine distance 1 − x̂·ŷ clipped to [0, 2]; GRIDE's filter of ratios
above 20·(q95 − q50) + q50, its bisection on the derivative of the likelihood (which has (N−1)
log d, as DADApy writes it), its tolerance and bracket; the density's prefactor through exp/log;
the halo option off; every comparison's strictness and every loop order of DADApy's cython ADP,
including how it pairs removed peaks with their denser neighbours in its fallback assignment.

Ties differ in one place only. Among neighbours at exactly equal distance (duplicate points) this
module puts the point itself first, then the others by index, and ranks equal densities by index;
DADApy orders them by BLAS round-off in sklearn's 1 − x̂·ŷ (a point's distance to itself or to its
copy comes out as 0 or a few 1e-16, depending on where it sits in the matrix) and by numpy's
unstable sorts, neither reproducible across machines. With no exact ties the results are
identical, and copies of points away from density peaks leave the clusters alone (the order
only decides which copy a list names first). Two copies of a density peak are two equal peaks
to ADP: which one heads the other's neighbour list can decide whether one of them stays a
one-point cluster, here as in DADApy.

Exact cosine kNN at the study's scale (20,000 points × 4,096 dims per layer) in two passes:
  1. float32 on device: [b, N] similarity blocks of unit rows (Precision.HIGHEST) and their top
     C = maxk + margin (the point itself excluded); never an [N, N] matrix.
  2. float64 (jax x64): the similarities of the candidates that can be neighbours (float32
     similarity ≥ τ − 2δ, below) recomputed from float64 unit rows, sorted by (distance, index);
     the first maxk are the neighbours.
  Exact by construction: any float32 cosine is within δ of the float64 one (a rigorous bound,
  `_float32_error_bound`), so every true neighbour has a float32 similarity ≥ τ − 2δ, where τ is
  the maxk-th best float32 similarity of that row. A row is accepted when its last candidate is
  below τ − 2δ (then no point outside the candidates can be a neighbour); rows that fail the test
  (near-ties wider than the margin, e.g. many duplicates) are recomputed against all N points
  in float64. The margin therefore changes the speed, never the result. Cost per layer: one
  float32 [N, D]×[D, N] product in blocks, then about N·(maxk + a few)·D float64 products on
  gathered rows (memory-bound; the larger part on a CPU, small on a GPU).

Axis legend: N points · D width · K = maxk + 1 neighbour columns (column 0: the point itself) ·
  b query rows of one block · C candidates per row · S GRIDE scales · P putative density peaks
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

_EPS = float(np.finfo(np.float64).eps)

# ---------------------------------------------------------------------------- neighbours


def _float32_error_bound(width: int) -> float:
  """Bound on |float32 cosine − float64 cosine| for unit rows of `width` coordinates.

  Rounding both unit rows to float32 and summing `width` float32 products in any order is within
  γ_{width+2} = n·u / (1 − n·u), u = 2^-24, of the exact dot product (Higham, Accuracy and
  Stability of Numerical Algorithms, §3.1; |x̂|·|ŷ| ≤ 1); the float64 side is ~1e-16·width.
  Doubled as a margin for platforms whose Precision.HIGHEST emulates float32 (TPU). Infinite
  where the bound fails (width ≥ 2^22): every row then takes the exact float64 path.
  """
  n = width + 2
  unit = 2.0**-24
  if n * unit >= 0.25:
    return math.inf
  return 2 * n * unit / (1 - n * unit)


def _checked_points(points, maxk: int) -> np.ndarray:
  """points -> [N, D] float64, or ValueError: not 2-D, N ≤ maxk, NaN/inf, or a zero row (the
  cosine distance needs a direction)."""
  x = np.asarray(points, np.float64)
  if x.ndim != 2:
    raise ValueError(f"ADP expects points [N, D], got shape {x.shape}")
  maxk = operator.index(maxk)
  if maxk < 1 or x.shape[0] <= maxk:
    raise ValueError(f"maxk={maxk} neighbours need N > maxk points (and maxk ≥ 1), got "
                     f"N={x.shape[0]}")
  bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if len(bad):
    raise ValueError(f"points contain NaN or inf in {len(bad)} rows (first: {bad[:5].tolist()})")
  zero = np.flatnonzero(~x.any(axis=1))
  if len(zero):
    raise ValueError(f"cosine distance is undefined for zero vectors: rows {zero[:5].tolist()}")
  return x


def unit_rows(points) -> np.ndarray:
  """points [N, D] -> [N, D] float64 x / ‖x‖, the norm as sklearn's `normalize` computes it."""
  x = np.asarray(points, np.float64)
  norms = np.sqrt(np.einsum("ND,ND->N", x, x))
  return x / norms[:, None]


@functools.partial(jax.jit, static_argnames=("count", "block"))
def _float32_candidates(unit: jax.Array, count: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Pass 1: unit rows [N, D] float32 -> the `count` most similar other rows of each row:
  ([N, C] float32 similarities, descending; [N, C] int32 indices; lower index first on ties)."""
  n, width = unit.shape
  n_blocks = -(-n // block)
  queries = jnp.pad(unit, ((0, n_blocks * block - n), (0, 0))).reshape(n_blocks, block, width)
  rows = jnp.arange(n_blocks * block, dtype=jnp.int32).reshape(n_blocks, block)
  columns = jnp.arange(n, dtype=jnp.int32)

  def step(carry, xs):
    q, q_rows = xs  # [b, D], [b] global row index (>= n on padding rows)
    sims = jnp.einsum("bD,ND->bN", q, unit, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(columns[None, :] == q_rows[:, None], -jnp.inf, sims)  # itself: column 0
    return carry, jax.lax.top_k(sims, count)

  _, (values, index) = jax.lax.scan(step, None, (queries, rows))
  return values.reshape(-1, count)[:n], index.reshape(-1, count)[:n]


@jax.jit
def _float64_rerank(unit: jax.Array, rows: jax.Array, candidates: jax.Array,
                    count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pass 2 (under x64): unit [N, D] float64, rows [b], candidates [b, C], count [b] (how many
  leading candidates can be neighbours) -> those candidates' cosine distances and indices
  sorted by (distance, index), the others last at +inf: ([b, C] float64, [b, C] int)."""
  sims = jnp.einsum("bD,bCD->bC", unit[rows], unit[candidates],
                    precision=jax.lax.Precision.HIGHEST)
  distance = jnp.clip(1.0 - sims, 0.0, 2.0)  # sklearn's cosine_distances clips the same way
  inside = jnp.arange(candidates.shape[1])[None, :] < count[:, None]
  distance = jnp.where(inside, distance, jnp.inf)
  return jax.lax.sort((distance, candidates), dimension=-1, num_keys=2)


@jax.jit
def _float64_all(unit: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The exact path (under x64): rows [b] against all N points -> distances to all of them,
  sorted by (distance, index), the row itself last: ([b, N] float64, [b, N] int)."""
  sims = jnp.einsum("bD,ND->bN", unit[rows], unit, precision=jax.lax.Precision.HIGHEST)
  distance = jnp.clip(1.0 - sims, 0.0, 2.0)
  index = jnp.broadcast_to(jnp.arange(unit.shape[0]), distance.shape)
  distance = jnp.where(index == rows[:, None], jnp.inf, distance)
  return jax.lax.sort((distance, index), dimension=-1, num_keys=2)


def _chunk(rows: int, cap: int) -> int:
  """Rows per compiled chunk: the next power of two ≥ rows, at most `cap` (at least 1), so that
  varying row counts reuse a few compiled shapes."""
  return max(1, min(1 << max(rows - 1, 0).bit_length(), cap))


def _in_chunks(fn, rows: np.ndarray, *args, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """fn(rows_chunk, *args_chunk) over fixed-size chunks of `rows` (one compiled shape; the
  last chunk padded by repeating its final row) -> the concatenated numpy outputs."""
  outs = []
  for start in range(0, len(rows), chunk):
    take = np.arange(start, min(start + chunk, len(rows)))
    padded = np.concatenate([take, np.full(chunk - len(take), take[-1])])
    result = fn(jnp.asarray(rows[padded]), *(jnp.asarray(a[padded]) for a in args))
    outs.append([np.asarray(r)[:len(take)] for r in result])
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def cosine_neighbours(points, maxk: int, *, block: int = 1024,
                      margin: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact float64 cosine kNN: points [N, D] -> (distances [N, K], indices [N, K]), K = maxk + 1.

  Column 0 is the point itself at distance 0; columns 1..maxk its maxk nearest other points by
  cosine distance 1 − x̂·ŷ (float64, clipped to [0, 2]), ascending, equal distances by index.
  Two passes (module docstring): the top maxk + margin float32 candidates (margin: default
  maxk) on device in blocks of `block` rows, then float64 re-ranking of those that can be
  neighbours; rows whose candidates cannot be certified are recomputed against all points.
  Never holds more than [block, N] similarities or ~2^25 gathered float64 values at once.
  """
  unit = unit_rows(_checked_points(points, maxk))
  maxk = operator.index(maxk)
  n, width = unit.shape
  margin = maxk if margin is None else operator.index(margin)
  count = min(n - 1, maxk + max(margin, 0))
  values, candidates = _float32_candidates(jnp.asarray(unit, jnp.float32), count=count,
                                           block=max(1, min(operator.index(block), n)))
  values = np.asarray(values, np.float64)
  candidates = np.asarray(candidates, np.int64)
  # Only candidates at or above τ − 2δ can be neighbours (values descend along each row). The
  # row is certified when its last candidate is below that, or every other point is a candidate.
  floor = values[:, maxk - 1] - 2 * _float32_error_bound(width)
  window = np.sum(values >= floor[:, None], axis=1)  # [N], ≥ maxk
  certified = (window < count) | (count == n - 1)
  rows = np.arange(n)
  distances = np.zeros((n, maxk + 1), np.float64)
  indices = np.empty((n, maxk + 1), np.int64)
  indices[:, 0] = rows
  # Rows per float64 chunk: at most ~2^25 gathered elements (256 MiB) or one [chunk, N] block;
  # rows grouped by their window rounded up to 32 columns, so that the float64 work follows
  # the window (typically maxk plus a few) rather than the margin.
  widths = np.minimum(-(-window // 32) * 32, count)
  with jax.enable_x64(True):
    unit64 = jnp.asarray(unit, jnp.float64)
    for size in np.unique(widths[certified]):
      good = rows[certified & (widths == size)]
      chunk = _chunk(len(good), 2**25 // (int(size) * width))
      dist, index = _in_chunks(functools.partial(_float64_rerank, unit64), good,
                               candidates[good, :size], window[good], chunk=chunk)
      distances[good, 1:], indices[good, 1:] = dist[:, :maxk], index[:, :maxk]
    bad = rows[~certified]
    if len(bad):
      chunk = _chunk(len(bad), 2**25 // max(n, width))
      dist, index = _in_chunks(functools.partial(_float64_all, unit64), bad, chunk=chunk)
      distances[bad, 1:], indices[bad, 1:] = dist[:, :maxk], index[:, :maxk]
  return distances, indices


def remove_zero_distances(distances) -> np.ndarray:
  """[N, K] -> [N, K]: neighbour distances (columns 1..) below float64 epsilon set to epsilon,
  as DADApy's `remove_zero_dists`, so that distance ratios and logs stay finite."""
  out = np.array(distances, np.float64)
  out[:, 1:] = np.where(out[:, 1:] < _EPS, _EPS, out[:, 1:])
  return out


# ---------------------------------------------------------------------------------- GRIDE


def _filter_ratios(mus: np.ndarray) -> np.ndarray:
  """[N] ratios -> the ones GRIDE keeps: exact 1s nudged up by 10 eps (log 0 otherwise), then
  only ratios below 20·(q95 − q50) + q50 (very large ones come from overlapping points)."""
  mus = np.where(mus == 1, mus + 10 * _EPS, mus)
  q95, q50 = np.percentile(mus, [95, 50])
  return mus[mus < 20 * (q95 - q50) + q50]


def _gride_slope(d: float, mus: np.ndarray, n1: int, n2: int, eps: float) -> float:
  """−∂/∂d of GRIDE's log-likelihood (N−1)·log d + Σ (n2−n1−1)·log(μ^d − 1) − Σ ((n2−1)·d + 1)·
  log μ − Σ log B(n2−n1, n1), over the kept ratios μ [N]; 1 − μ^-d floored at 2·eps."""
  one_minus = 1.0 - mus ** (-d)
  one_minus = np.where(one_minus < 2 * eps, 2 * eps, one_minus)
  total = np.sum(((1 - n2 + n1) / one_minus + n2 - 1.0) * np.log(mus))
  return total - (len(mus) - 1) / d


def gride_id(mus, n1: int, n2: int, *, d0: float = 0.001, d1: float = 1000.0,
             eps: float = 1e-7) -> float:
  """GRIDE at one scale: ratios r_{n2}/r_{n1} [N] -> the maximum-likelihood intrinsic dimension,
  by bisection of the likelihood's slope on [d0, d1] down to an interval of `eps` (DADApy's
  `_argmax_loglik`: the bracket end d1 fixes the sign compared against)."""
  mus = _filter_ratios(np.asarray(mus, np.float64))
  slope_d1 = _gride_slope(d1, mus, n1, n2, eps)
  while abs(d0 - d1) > eps:
    mid = (d0 + d1) / 2.0
    if _gride_slope(mid, mus, n1, n2, eps) * slope_d1 > 0:
      d1 = mid
    else:
      d0 = mid
  return (d0 + d1) / 2.0


def gride_scales(range_max: int) -> int:
  """How many GRIDE scales neighbour ranks up to `range_max` give: ⌊log2 range_max⌋."""
  return max(operator.index(range_max), 1).bit_length() - 1


def gride_ids(distances, range_max: int, *, d0: float = 0.001, d1: float = 1000.0,
              eps: float = 1e-7) -> np.ndarray:
  """GRIDE intrinsic dimension at every scale: distances [N, K] -> [S] float64, S = ⌊log2
  range_max⌋; entry i compares the 2^i-th and 2^(i+1)-th neighbour distances.

  DADApy's `return_id_scaling_gride(range_max)` on stored neighbour distances, which it uses
  only when range_max ≤ maxk = K − 1 (beyond that it recomputes all distances, which fails for
  the cosine metric), hence that bound here. With the cosine distance 1 − cos θ ≈ θ²/2 the
  ratios are squared angle ratios, so the estimate is about half the dimension of the
  directions (as in the study; ADP uses it only as the scale of log-density differences
  against their 1/√k errors).
  """
  distances = np.asarray(distances, np.float64)
  range_max = operator.index(range_max)
  if not 2 <= range_max <= distances.shape[1] - 1:
    raise ValueError(f"GRIDE range_max must be in 2..maxk = 2..{distances.shape[1] - 1} (the "
                     f"neighbour distances computed), got {range_max}")
  ranks = 2 ** np.arange(gride_scales(range_max) + 1)
  mus = distances[:, ranks[1:]] / distances[:, ranks[:-1]]  # [N, S]
  return np.array([gride_id(mus[:, s], int(ranks[s]), int(ranks[s + 1]), d0=d0, d1=d1, eps=eps)
                   for s in range(mus.shape[1])])


# -------------------------------------------------------------------------------- density


def knn_log_density(distances, intrinsic_dim: float, k: int) -> tuple[np.ndarray, np.ndarray]:
  """kNN log density at intrinsic dimension d: distances [N, K] -> (log ρ [N], error [N]).

  log ρ_i = log k − (log ω_d + d·log r_{i,k}) − log N, ω_d = π^(d/2) / Γ(d/2 + 1) the volume of
  the unit d-ball (computed through exp then log, as DADApy does); error 1/√k for every point.
  """
  distances = np.asarray(distances, np.float64)
  k = operator.index(k)
  if not 1 <= k <= distances.shape[1] - 1:
    raise ValueError(f"density k must be in 1..maxk = 1..{distances.shape[1] - 1}, got {k}")
  d = float(intrinsic_dim)
  if not d > 0:
    raise ValueError(f"the intrinsic dimension must be positive, got {d}")
  prefactor = np.exp(d / 2.0 * np.log(np.pi) - math.lgamma((d + 2) / 2))
  n = distances.shape[0]
  log_density = np.full(n, np.log(k), np.float64)
  log_density = log_density - (np.log(prefactor) + d * np.log(distances[:, k]))
  log_density -= np.log(n)
  return log_density, np.full(n, 1.0 / np.sqrt(k), np.float64)


# ------------------------------------------------------------------------------------ ADP


def _putative_peaks(neighbours: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Points whose g is ≥ that of each of their k neighbours [N, k] -> [P] indices, ascending."""
  return np.flatnonzero(~np.any(g[:, None] < g[neighbours], axis=1))


def _prune_peaks(neighbours: np.ndarray, g: np.ndarray,
                 putative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Drop putative peaks that sit in the k-neighbourhood of a denser point.

  neighbours [N, k], g [N], putative [P] -> (peaks [P'] ascending; DADApy's `to_remove` table
  [P, 2] int, −1 where unwritten). The table is built exactly as DADApy's loop writes it: row r
  holds the r-th removed peak in column 0, but column 1 (the densest point that has that peak
  among its neighbours) is written one row further down, so rows pair a removed peak with the
  densest neighbour-holder of the previous one. Only the fallback assignment reads column 1.
  """
  table = np.full((len(putative), 2), -1, np.int64)
  is_putative = np.zeros(len(g), bool)
  is_putative[putative] = True
  holder, column = np.nonzero(is_putative[neighbours] & (g[:, None] > g[neighbours]))
  peak = neighbours[holder, column]
  order = np.lexsort((holder, peak))  # DADApy: peaks ascending, then holders ascending
  removed = 0
  for c, rows in _groups(peak[order], holder[order]):
    max_rho = -999.0
    for i in rows:
      table[removed, 0] = c
      if max_rho < 0:  # once per removed peak, as g ≥ 1 − err + z·err > 0 here
        removed += 1
      if g[i] > max_rho:
        max_rho = g[i]
        table[removed, 1] = i
  peaks = putative[~np.isin(putative, table[:removed, 0])]
  return peaks, table


def _groups(keys: np.ndarray, values: np.ndarray):
  """Sorted keys [M], values [M] -> (key, values of that key) in order."""
  starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else []
  ends = list(starts[1:]) + [len(keys)]
  for start, end in zip(starts, ends):
    yield int(keys[start]), values[start:end]


def _assign(indices: np.ndarray, g: np.ndarray, peaks: np.ndarray,
            table: np.ndarray) -> np.ndarray:
  """Preliminary clusters: indices [N, K], g [N], peaks [P'] -> cluster [N] int (−1: none).

  Points in order of decreasing g (equal g by index) take the cluster of their nearest already
  assigned neighbour (columns 1..K−1). One with none takes, as DADApy does, the cluster of the
  densest column-1 entry of the `to_remove` rows whose column 0 is among its neighbours (−1
  entries index the last point, as numpy indexing does in DADApy).
  """
  cluster = np.full(len(g), -1, np.int64)
  cluster[peaks] = np.arange(len(peaks))
  for ele in np.argsort(-g, kind="stable"):
    if cluster[ele] != -1:
      continue
    labels = cluster[indices[ele, 1:]]
    assigned = np.flatnonzero(labels != -1)
    if len(assigned):
      cluster[ele] = labels[assigned[0]]
      continue
    _, _, rows = np.intersect1d(indices[ele], table[:, 0], return_indices=True)
    if len(rows) == 0:
      raise ValueError(f"ADP cannot assign point {ele}: none of its {indices.shape[1] - 1} "
                       "neighbours is assigned and none is a removed peak (DADApy 0.3.4 fails "
                       "here as well); use a larger maxk")
    denser = table[rows, 1]
    cluster[ele] = cluster[denser[np.argmax(g[denser])]]
  return cluster


def _saddles(indices: np.ndarray, k: int, g: np.ndarray, cluster: np.ndarray,
             is_peak: np.ndarray, n_clusters: int) -> dict[tuple[int, int], int]:
  """The border point between each pair of adjacent clusters -> {(c, c') with c < c': point}.

  A non-peak p1 of cluster c borders the cluster c' of its first k-neighbour p2 outside c when
  p1 is the first point of c among p2's neighbours (or none of c is there). Of a pair's border
  points the one with the largest g wins, the first in DADApy's order (cluster, then index) on
  ties, and only g > 0 counts (its running maximum starts at 0).
  """
  points = np.flatnonzero((cluster != -1) & ~is_peak)
  own = cluster[points]
  outside = cluster[indices[points, 1:k + 1]] != own[:, None]  # [M, k]
  has = outside.any(axis=1)
  points, own = points[has], own[has]
  p2 = indices[points, 1 + np.argmax(outside[has], axis=1)]
  # An unassigned p2 has cluster −1, which DADApy's buffer indexing wraps to the last cluster.
  other = np.where(cluster[p2] == -1, n_clusters - 1, cluster[p2])
  row = indices[p2, 1:]  # [M, K−1]
  same = cluster[row] == own[:, None]
  first = np.argmax(same, axis=1)
  border = ~same.any(axis=1) | (row[np.arange(len(points)), first] == points)
  border &= (other != own) & (g[points] > 0)
  points, own, other = points[border], own[border], other[border]
  order = np.lexsort((points, own))  # DADApy's loop order
  best: dict[tuple[int, int], int] = {}
  for p, c, cp in zip(points[order], own[order], other[order]):
    pair = (int(min(c, cp)), int(max(c, cp)))
    if pair not in best or g[p] > g[best[pair]]:
      best[pair] = int(p)
  return best


def _merge(peaks: np.ndarray, saddles: dict[tuple[int, int], int], rho: np.ndarray,
           err: np.ndarray, z: float) -> tuple[np.ndarray, dict[int, dict[int, tuple]]]:
  """Merge statistically insignificant peaks: -> (survivor of each cluster [P'], borders).

  Pairs (i < j) whose saddle density ρ_s is within z·(err_peak + err_s) of either peak are
  candidates; the candidate with the densest saddle merges first (the first (i, j) on ties):
  the peak with the lower (ρ_peak − ρ_s)/(err_peak + err_s) goes, its points and its saddles
  with other clusters pass to the other one where denser. Repeats until no candidate is left.
  DADApy rescans every pair after each merge; only the merged pair's saddles change, so a heap
  of saddles (stale entries skipped) picks the same pair. Pairs without a saddle (density 0 in
  DADApy's matrix) and removed clusters (−1) are never candidates: every ρ ≥ 1 + z·err.
  """
  borders: dict[int, dict[int, tuple]] = {c: {} for c in range(len(peaks))}
  heap = []
  for (i, j), point in saddles.items():
    entry = (float(rho[point]), float(err[point]), point)
    borders[i][j] = borders[j][i] = entry
    heap.append((-entry[0], i, j, entry))
  heapq.heapify(heap)
  survivor = np.arange(len(peaks))

  def candidate(i, j, entry) -> bool:
    value, error, _ = entry
    a1, a2 = rho[peaks[i]] - value, rho[peaks[j]] - value
    e1, e2 = z * (err[peaks[i]] + error), z * (err[peaks[j]] + error)
    return a1 < e1 or a2 < e2

  while heap:
    _, i, j, entry = heapq.heappop(heap)
    if borders[i].get(j) != entry or not candidate(i, j, entry):
      continue  # stale (the pair changed or is gone) or significant
    value, error, _ = entry
    c1 = (rho[peaks[i]] - value) / (err[peaks[i]] + error)
    c2 = (rho[peaks[j]] - value) / (err[peaks[j]] + error)
    keep, gone = (j, i) if c1 < c2 else (i, j)
    survivor[survivor == gone] = keep
    del borders[keep][gone], borders[gone][keep]
    for other, theirs in borders.pop(gone).items():
      del borders[other][gone]
      mine = borders[keep].get(other)
      if (0.0 if mine is None else mine[0]) < theirs[0]:
        borders[keep][other] = borders[other][keep] = theirs
        heapq.heappush(heap, (-theirs[0], min(keep, other), max(keep, other), theirs))
    borders[gone] = {}
  return survivor, borders


def adp_labels(indices, log_density, log_density_err, k: int, z: float,
               halo: bool = False) -> np.ndarray:
  """Advanced Density Peaks clusters: indices [N, K] (column 0 the point itself), log densities
  and their errors [N] -> labels [N] int64 (DADApy's `compute_clustering_ADP(Z=z, halo=halo)`).

  Densities are shifted so every ρ − z·err ≥ 1, g = ρ − err ranks points. Peaks: points with the
  largest g in their k-neighbourhood and in no denser point's; every other point joins its
  nearest assigned neighbour in order of decreasing g; clusters merge while a saddle is within z
  errors of a peak (`_merge`). Labels number the surviving clusters by their peak's index. With
  `halo`, points below their cluster's densest saddle get −1. Points DADApy leaves unassigned
  (its output there is uninitialised memory) get −1.
  """
  indices = np.asarray(indices, np.int64)
  log_density = np.asarray(log_density, np.float64)
  err = np.asarray(log_density_err, np.float64)
  n, width = indices.shape
  k = operator.index(k)
  if log_density.shape != (n,) or err.shape != (n,):
    raise ValueError(f"log densities and errors must be [N] = [{n}], got {log_density.shape} and "
                     f"{err.shape}")
  if not 1 <= k <= width - 1:
    raise ValueError(f"k must be in 1..K−1 = 1..{width - 1}, got {k}")
  if not z >= 0:
    raise ValueError(f"z must be ≥ 0, got {z}")
  if np.isnan(log_density).any() or np.isnan(err).any():
    raise ValueError("log densities contain NaN")
  rho = log_density - np.min(log_density - z * err) + 1  # so that ρ − z·err ≥ 1
  g = rho - err
  neighbours = indices[:, 1:k + 1]
  peaks, table = _prune_peaks(neighbours, g, _putative_peaks(neighbours, g))
  cluster = _assign(indices, g, peaks, table)
  is_peak = np.zeros(n, bool)
  is_peak[peaks] = True
  saddles = _saddles(indices, k, g, cluster, is_peak, len(peaks))
  survivor, borders = _merge(peaks, saddles, rho, err, float(z))
  alive = np.unique(survivor)
  rank = np.full(len(peaks), -1, np.int64)
  rank[alive] = np.arange(len(alive))
  labels = np.where(cluster == -1, -1, rank[survivor[np.maximum(cluster, 0)]])
  if halo:
    for c in alive:
      # DADApy: the row's maximum, over saddle densities, 0 for other clusters, −1 on the diagonal
      cutoff = max([v for v, _, _ in borders[c].values()] + [0.0 if len(alive) > 1 else -1.0])
      labels[(labels == rank[c]) & (rho < cutoff)] = -1
  return labels


# ------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class ADPResult:
  """Every step's output of `advanced_density_peaks` (numpy, float64)."""

  distances: np.ndarray  # [N, K] cosine distances, column 0 the point itself, zeros -> eps
  indices: np.ndarray  # [N, K] int64 neighbour indices
  intrinsic_dims: np.ndarray  # [S] GRIDE at every scale
  intrinsic_dim: float  # the one used: intrinsic_dims[gride_scale]
  log_density: np.ndarray  # [N]
  log_density_err: np.ndarray  # [N]
  labels: np.ndarray  # [N] int64 cluster labels


def advanced_density_peaks(points, *, maxk: int = 128, gride_range_max: int = 128,
                           gride_scale: int = 3, density_k: int = 16, z: float = 1.65,
                           halo: bool = False, block: int = 1024) -> ADPResult:
  """The study's pipeline on points [N, D] (module docstring); the defaults are its values.

  Raises ValueError for points that are not a finite [N, D] array with N > maxk and no zero
  row (the cosine distance needs a direction), and for GRIDE or density settings outside the
  neighbours computed (gride_range_max ≤ maxk, gride_scale < ⌊log2 gride_range_max⌋,
  density_k ≤ maxk).
  """
  x = _checked_points(points, maxk)
  scales = gride_scales(gride_range_max)
  if not 2 <= gride_range_max <= maxk:
    raise ValueError(f"gride_range_max must be in 2..maxk = 2..{maxk}, got {gride_range_max}")
  if not 0 <= gride_scale < scales:
    raise ValueError(f"gride_scale={gride_scale} out of range: gride_range_max="
                     f"{gride_range_max} gives {scales} scales (0..{scales - 1})")
  if not 1 <= density_k <= maxk:
    raise ValueError(f"density_k must be in 1..maxk = 1..{maxk}, got {density_k}")
  distances, indices = cosine_neighbours(x, maxk, block=block)
  distances = remove_zero_distances(distances)
  ids = gride_ids(distances, gride_range_max)
  log_density, err = knn_log_density(distances, ids[gride_scale], density_k)
  labels = adp_labels(indices, log_density, err, density_k, z, halo=halo)
  return ADPResult(distances, indices, ids, float(ids[gride_scale]), log_density, err, labels)
