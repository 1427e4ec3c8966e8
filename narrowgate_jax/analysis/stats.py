"""Statistics of the cross-modal (CM) study: the knockout metric and its bootstrap band.

PROTOCOLS.md §3: the metric is the probability of the model's own greedy first answer token t*,
relative change (p_knock − p_base) / p_base × 100, averaged over samples per window centre with a
bootstrap 95% band.

Bookkeeping (relative change, bootstrap) is numpy in float64; `first_token_probability` runs on
device (jax.numpy, float32).

Axis legend used in einsum strings below:
  R bootstrap resamples (one chunk of them) · N samples · C columns (trailing axes flattened)
"""

from __future__ import annotations

import operator
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# Resamples are drawn and reduced in chunks of about this many [resample, sample] entries, so the
# count matrix stays ~32 MB in float64 however many samples or resamples are asked for.
_CHUNK_ENTRIES = 1 << 22


def relative_change(p_knock, p_base) -> np.ndarray:
  """(p_knock − p_base) / p_base × 100, elementwise (broadcasting), float64.

  Raises ValueError where p_base is 0: the relative change of a token the clean run gives no
  probability is undefined (CM only keeps samples the model answers correctly, so p_base of its own
  greedy token is never 0 there).
  """
  p_knock = np.asarray(p_knock, np.float64)
  p_base = np.asarray(p_base, np.float64)
  zero = p_base == 0
  if zero.any():
    where = tuple(int(i) for i in np.argwhere(zero)[0])
    raise ValueError(f"relative_change: p_base is 0 at {int(zero.sum())} entr"
                     f"{'y' if zero.sum() == 1 else 'ies'} (first at index {where}); the relative "
                     "change of a token with zero baseline probability is undefined")
  return (p_knock - p_base) / p_base * 100.0


def _chunk_size(n: int, num_resamples: int) -> int:
  return max(1, min(num_resamples, _CHUNK_ENTRIES // n))


def _index_chunks(n: int, num_resamples: int, seed: int):
  """Yields [r, n] int64 resample indices, chunk after chunk, from one generator seeded by `seed`.

  The chunk size depends only on (n, num_resamples), so the stream is a function of (n,
  num_resamples, seed) alone.
  """
  rng = np.random.default_rng(seed)
  size = _chunk_size(n, num_resamples)
  for start in range(0, num_resamples, size):
    yield rng.integers(0, n, size=(min(size, num_resamples - start), n))


def bootstrap_indices(n: int, num_resamples: int = 1000, seed: int = 0) -> np.ndarray:
  """[R, N] the sample indices `bootstrap_band` draws for each resample (for references/tests)."""
  return np.concatenate(list(_index_chunks(n, num_resamples, seed)))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
  """[R, N] resample indices -> [R, N] float64: how often each sample is drawn in each resample."""
  r = idx.shape[0]
  flat = (idx + n * np.arange(r)[:, None]).ravel()
  return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def bootstrap_band(values, num_resamples: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean over samples and a percentile-bootstrap band of that mean.

  values [N, ...] -> (mean, low, high), each [...] float64.

  Each resample draws N sample indices with replacement (the same rows for every column, so e.g.
  all window centres of a sweep are resampled together); its mean per column is taken; low and
  high are the (1 − level)/2 and (1 + level)/2 quantiles (linear interpolation) of those R means.
  Deterministic given `seed` (the indices are `bootstrap_indices(N, num_resamples, seed)`).

  NaNs are ignored per column: the mean and every resample's mean use only the non-NaN entries of
  that column (a resample that draws none of them is left out of that column's quantiles). A
  column with no non-NaN value gives NaN for all three. With N = 1 every resample is the one
  sample, so the band collapses onto the mean.
  """
  values = np.asarray(values, np.float64)
  num_resamples = operator.index(num_resamples)
  if values.ndim == 0 or values.shape[0] == 0:
    raise ValueError(f"bootstrap_band needs values [N, ...] with N >= 1, got shape {values.shape}")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be at least 1, got {num_resamples}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  n, rest = values.shape[0], values.shape[1:]
  flat = values.reshape(n, -1)  # [N, C]
  valid = ~np.isnan(flat)
  filled = np.where(valid, flat, 0.0)
  valid = valid.astype(np.float64)

  # Resample means as count-weighted sums: counts [R, N] @ values [N, C], instead of gathering an
  # [R, N, C] tensor of resampled rows.
  means = []
  for idx in _index_chunks(n, num_resamples, seed):
    counts = _counts(idx, n)
    sums = np.einsum("RN,NC->RC", counts, filled, optimize=True)
    drawn = np.einsum("RN,NC->RC", counts, valid, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      means.append(np.where(drawn > 0, sums / drawn, np.nan))
  means = np.concatenate(means)  # [R, C]

  tail = (1.0 - level) / 2.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN out, as documented
    mean = np.nanmean(flat, axis=0)
    low, high = np.nanquantile(means, [tail, 1.0 - tail], axis=0)
  return mean.reshape(rest), low.reshape(rest), high.reshape(rest)


def first_token_probability(logits: jax.Array, token: jax.Array) -> jax.Array:
  """Softmax probability of `token` under `logits`: logits [..., V], token [...] int -> [...] f32.

  Computed as exp(log_softmax) in float32 (max-subtracted, so large logits do not overflow).
  A token outside 0..V−1 (negative included) gives NaN rather than another token's probability.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
  token = jnp.asarray(token)[..., None]
  picked = jnp.take_along_axis(logp, token, axis=-1, mode="fill", fill_value=jnp.nan,
                               wrap_negative_indices=False)
  return jnp.exp(picked[..., 0])
