"""Analysis functions of the cross-modal (CM) study, each against a direct numpy reading of its
definition (PROTOCOLS.md §3): layer windows, relative change, bootstrap band (against a loop over
the same resample indices), first-token probability and the logit lens.
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import narrowgate_jax as ng
from narrowgate_jax import analysis
from narrowgate_jax.analysis import stats
from narrowgate_jax.interventions import NO_LAYER

# ----------------------------------------------------------------------------------- windows


def protocol_window(centre, k, num_layers):
  """PROTOCOLS.md §3 as written: layers max(0, ℓ−⌊k/2⌋) … min(L, ℓ+⌈k/2⌉)−1."""
  return list(range(max(0, centre - math.floor(k / 2)),
                    min(num_layers, centre + math.ceil(k / 2))))


SIZES = {32: (9, 7, 8, 1, 32), 40: (9, 7), 5: (1, 2, 3, 4, 5), 1: (1,)}  # num_layers -> k
CASES = [(num_layers, k, centre)
         for num_layers, ks in SIZES.items()
         for k in ks
         for centre in sorted({0, 1, k // 2 - 1, k // 2, k // 2 + 1, num_layers // 2,
                               num_layers - k // 2 - 1, num_layers - 2, num_layers - 1})
         if 0 <= centre < num_layers]


@pytest.mark.parametrize("num_layers,k,centre", CASES)
def test_window_layers_matches_protocol(num_layers, k, centre):
  assert analysis.window_layers(centre, k, num_layers) == protocol_window(centre, k, num_layers)


def test_window_layers_examples():
  assert analysis.window_layers(0, 9, 32) == [0, 1, 2, 3, 4]
  assert analysis.window_layers(10, 9, 32) == list(range(6, 15))
  assert analysis.window_layers(31, 9, 32) == [27, 28, 29, 30, 31]
  assert analysis.window_layers(10, 7, 40) == list(range(7, 14))
  assert analysis.window_layers(10, 8, 40) == list(range(6, 14))  # even k: centre in upper half
  assert analysis.window_layers(np.int64(3), 1, 5) == [3]


@pytest.mark.parametrize("centre,k,num_layers,message", [
    (0, 0, 32, "at least 1"),
    (0, -3, 32, "at least 1"),
    (0, 33, 32, "larger than the model"),
    (-1, 9, 32, "centre -1 out of range"),
    (32, 9, 32, "centre 32 out of range"),
])
def test_window_layers_errors(centre, k, num_layers, message):
  with pytest.raises(ValueError, match=message):
    analysis.window_layers(centre, k, num_layers)


@pytest.mark.parametrize("k,message", [(0, "at least 1"), (33, "larger than the model")])
def test_all_windows_errors(k, message):
  with pytest.raises(ValueError, match=message):
    analysis.all_windows(k, 32)


@pytest.mark.parametrize("num_layers,k", [(32, 9), (40, 7), (6, 6), (5, 1), (7, 2)])
def test_all_windows(num_layers, k):
  windows = analysis.all_windows(k, num_layers)
  assert windows.shape == (num_layers, k) and windows.dtype == np.int32
  for centre, row in enumerate(windows):
    layers = protocol_window(centre, k, num_layers)
    np.testing.assert_array_equal(row[:len(layers)], layers)
    assert (row[len(layers):] == NO_LAYER).all()


def test_all_windows_drive_a_knockout():
  """A row of `all_windows` is a valid `Knockout.layers` rule: it blocks exactly its layers."""
  num_layers, k = 12, 5
  windows = analysis.all_windows(k, num_layers)
  q = np.ones((1, 1, 3), bool)
  for centre in (0, 5, 11):
    ko = ng.Knockout(layers=jnp.asarray(windows[centre][None]), queries=q, keys=q)
    blocked = [bool(ko.blocked(jnp.int32(layer)).any()) for layer in range(num_layers)]
    assert [i for i, b in enumerate(blocked) if b] == protocol_window(centre, k, num_layers)


# ------------------------------------------------------------------------------------- stats


def test_relative_change():
  rng = np.random.default_rng(1)
  p_base = rng.uniform(0.01, 1.0, (4, 6))
  p_knock = rng.uniform(0.0, 1.0, (4, 6))
  np.testing.assert_allclose(analysis.relative_change(p_knock, p_base),
                             (p_knock - p_base) / p_base * 100, rtol=1e-14)
  assert analysis.relative_change(0.25, 0.5) == -50.0
  # broadcasting: one baseline per sample against [samples, windows] knockouts
  np.testing.assert_allclose(analysis.relative_change(p_knock, p_base[:, :1]),
                             (p_knock - p_base[:, :1]) / p_base[:, :1] * 100, rtol=1e-14)


def test_relative_change_rejects_zero_baseline():
  with pytest.raises(ValueError, match=r"p_base is 0 at 2 entries \(first at index \(1,\)\)"):
    analysis.relative_change([0.1, 0.2, 0.3], [0.5, 0.0, 0.0])


def loop_bootstrap(values, idx, level):
  """Reference: one resample at a time, np.nanmean of the resampled rows, then quantiles."""
  means = np.stack([np.nanmean(values[rows], axis=0) for rows in idx])
  tail = (1 - level) / 2
  with np.errstate(all="ignore"):
    return (np.nanmean(values, axis=0), np.nanquantile(means, tail, axis=0),
            np.nanquantile(means, 1 - tail, axis=0))


@pytest.mark.parametrize("shape,level", [((50, 7), 0.95), ((13,), 0.9), ((30, 2, 3), 0.5)])
def test_bootstrap_band_matches_loop(shape, level):
  values = np.random.default_rng(2).normal(size=shape)
  idx = analysis.bootstrap_indices(shape[0], 300, seed=5)
  assert idx.shape == (300, shape[0]) and idx.min() >= 0 and idx.max() < shape[0]
  got = analysis.bootstrap_band(values, num_resamples=300, level=level, seed=5)
  want = loop_bootstrap(values, idx, level)
  for g, w in zip(got, want):
    assert g.shape == shape[1:]
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_bootstrap_band_chunked(monkeypatch):
  """Tiny chunks (many draws) give the same result as the reference over the same indices."""
  monkeypatch.setattr(stats, "_CHUNK_ENTRIES", 64)
  values = np.random.default_rng(3).normal(size=(20, 4))
  idx = analysis.bootstrap_indices(20, 101, seed=9)
  assert idx.shape == (101, 20)
  got = analysis.bootstrap_band(values, num_resamples=101, seed=9)
  for g, w in zip(got, loop_bootstrap(values, idx, 0.95)):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_bootstrap_band_nans_ignored_per_column():
  rng = np.random.default_rng(4)
  values = rng.normal(size=(40, 3))
  values[rng.random((40, 3)) < 0.3] = np.nan
  values[:, 2] = np.nan  # a column with no value at all
  values[5, 1] = 7.0
  idx = analysis.bootstrap_indices(40, 200, seed=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN column
    want = loop_bootstrap(values, idx, 0.95)
  got = analysis.bootstrap_band(values, num_resamples=200)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
  assert np.isnan([g[2] for g in got]).all()
  assert np.isfinite([g[:2] for g in got]).all()


def test_bootstrap_band_properties():
  rng = np.random.default_rng(6)
  # deterministic given the seed, different across seeds
  values = rng.normal(size=(25, 5))
  a = analysis.bootstrap_band(values, seed=1)
  b = analysis.bootstrap_band(values, seed=1)
  c = analysis.bootstrap_band(values, seed=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[1], c[1])
  # the band contains the mean and narrows as N grows (width ~ 1/sqrt(N))
  widths = []
  for n in (20, 2000):
    mean, low, high = analysis.bootstrap_band(rng.normal(size=(n, 5)), seed=0)
    assert (low <= mean).all() and (mean <= high).all()
    widths.append(high - low)
  assert (widths[1] < widths[0] / 4).all()
  # N = 1: every resample is the one sample, so the band collapses onto it
  one = np.array([[0.3, -2.0, np.nan]])
  mean, low, high = analysis.bootstrap_band(one)
  np.testing.assert_array_equal(mean[:2], one[0, :2])
  np.testing.assert_array_equal(low[:2], one[0, :2])
  np.testing.assert_array_equal(high[:2], one[0, :2])
  assert np.isnan([mean[2], low[2], high[2]]).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(values=np.zeros((0, 3))), "N >= 1"),
    (dict(values=np.float64(1.0)), "N >= 1"),
    (dict(values=np.zeros(3), num_resamples=0), "num_resamples"),
    (dict(values=np.zeros(3), level=1.0), "level"),
])
def test_bootstrap_band_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    analysis.bootstrap_band(**kwargs)


def numpy_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_first_token_probability():
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=3.0, size=(2, 3, 50)).astype(np.float32)
  token = rng.integers(0, 50, (2, 3))
  want = np.take_along_axis(numpy_softmax(logits), token[..., None], -1)[..., 0]
  got = analysis.first_token_probability(jnp.asarray(logits), jnp.asarray(token))
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  # stable for large logits, and computed in float32 from bfloat16 inputs
  big = np.array([[1e4, 1e4 - 1.0, -1e4]], np.float32)
  np.testing.assert_allclose(np.asarray(analysis.first_token_probability(big, np.array([1]))),
                             numpy_softmax(big)[:, 1], rtol=1e-5)
  low = jnp.asarray(logits, jnp.bfloat16)
  got16 = analysis.first_token_probability(low, token)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(
      np.asarray(got16),
      np.take_along_axis(numpy_softmax(np.asarray(low.astype(jnp.float32))), token[..., None],
                         -1)[..., 0], rtol=1e-5, atol=1e-7)
  # a token outside the vocabulary is NaN, never another token's probability
  bad = np.asarray(analysis.first_token_probability(logits[0], np.array([50, -1, 0])))
  assert np.isnan(bad[:2]).all() and np.isfinite(bad[2])


# -------------------------------------------------------------------------------- logit lens


def test_logit_lens_matches_numpy():
  rng = np.random.default_rng(8)
  layers, b, t, d, v, eps = 5, 3, 6, 16, 40, 1e-6
  resid_all = rng.normal(size=(layers + 1, b, t, d)).astype(np.float32)
  w = rng.normal(scale=0.3, size=(d, v)).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, d).astype(np.float32)
  position = np.array([5, 2, 0])

  resid = analysis.gather_position(jnp.asarray(resid_all), jnp.asarray(position))
  np.testing.assert_array_equal(np.asarray(resid), resid_all[:, np.arange(b), position])

  def unembed(h):  # D model width · V vocabulary
    return jnp.einsum("...D,DV->...V", h, w)

  def rms_norm(h):
    return h * jnp.asarray(scale) / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + eps)

  h64 = resid_all[:, np.arange(b), position].astype(np.float64)
  normed = h64 * scale / np.sqrt((h64 ** 2).mean(-1, keepdims=True) + eps)

  for norm, h_ref in ((None, h64), (rms_norm, normed)):
    probs = analysis.logit_lens(resid, unembed, norm)
    assert probs.shape == (layers + 1, b, v) and probs.dtype == jnp.float32
    want = numpy_softmax(h_ref @ w.astype(np.float64))
    np.testing.assert_allclose(np.asarray(probs), want, rtol=1e-4, atol=1e-6)

  # bfloat16 unembedding output is softmaxed in float32
  probs16 = analysis.logit_lens(resid, lambda h: unembed(h).astype(jnp.bfloat16))
  assert probs16.dtype == jnp.float32

  tokens = np.array([[3, 7, 39, -1], [0, 0, 12, 5], [38, 1, -1, -1]])
  traj = np.asarray(analysis.token_trajectories(probs, jnp.asarray(tokens)))
  assert traj.shape == (layers + 1, b, 4)
  p = np.asarray(probs)
  for i in range(b):
    for j in range(4):
      if tokens[i, j] == analysis.NO_TOKEN:
        assert np.isnan(traj[:, i, j]).all()
      else:
        np.testing.assert_array_equal(traj[:, i, j], p[:, i, tokens[i, j]])
  out_of_range = np.asarray(analysis.token_trajectories(probs, jnp.full((b, 1), v)))
  assert np.isnan(out_of_range).all()
