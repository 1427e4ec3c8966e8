"""Analysis functions of the Narrow Gate (NG) study, each against a direct numpy reading of its
definition (PROTOCOLS.md §2): image×text cosine quantiles (np.quantile on the full matrix), the
neighbourhood overlap (brute-force numpy kNN) and the patching metrics. The ADP modality
homogeneity is tested in test_adp.py (each step, and against DADApy itself).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from narrowgate_jax import analysis
from narrowgate_jax.analysis import modality_gap

# ---------------------------------------------------------------------------- cosine quantiles


def numpy_cosines(image, text, absolute):
  """[N, D], [M, D] -> [N, M] float64 cosines, the definition read directly."""
  a = np.asarray(image, np.float64)
  b = np.asarray(text, np.float64)
  cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1,
                                                                              keepdims=True)).T
  return np.abs(cos) if absolute else cos


def test_sortable_keys_round_trip_and_order():
  rng = np.random.default_rng(0)
  spread = rng.normal(size=1000) * 10.0 ** rng.integers(-30, 30, 1000)  # past float32: ±inf
  x = np.concatenate([spread.astype(np.float32),
                      np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf,
                                np.finfo(np.float32).tiny, -np.finfo(np.float32).tiny],
                               np.float32)])
  keys = np.asarray(modality_gap.sortable_keys(jnp.asarray(x)))
  assert keys.dtype == np.uint32
  np.testing.assert_array_equal(modality_gap.keys_to_float(keys).view(np.uint32),
                                x.view(np.uint32))  # bit-exact, −0.0 included
  np.testing.assert_array_equal(x[np.argsort(keys, kind="stable")], np.sort(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_select_order_statistics_is_exact(seed):
  """The two radix passes pick exactly np.sort(values)[rank], ties and signed zeros included."""
  rng = np.random.default_rng(seed)
  values = np.concatenate([rng.normal(size=5000), rng.choice([0.5, -0.25, 0.0], 3000),
                           np.full(7, -0.0), rng.uniform(-1e-30, 1e-30, 500)]).astype(np.float32)
  keys = np.asarray(modality_gap.sortable_keys(jnp.asarray(values))).astype(np.int64)
  high, low = keys >> 16, keys & 0xFFFF
  high_hist = np.bincount(high, minlength=1 << 16)

  def low_hists(buckets):
    real = buckets[buckets < 1 << 16]  # then padding, 65536, which matches no key
    assert buckets.dtype == np.int32 and np.all(np.diff(real) > 0)
    assert np.all(buckets[len(real):] == 1 << 16)
    return np.stack([np.bincount(low[high == b], minlength=1 << 16) for b in buckets])

  ranks = np.array(sorted({0, 1, 2999, 4000, 5000, 7999, 8003, 8506, values.size - 1,
                           *rng.integers(0, values.size, 5).tolist()}))
  got = modality_gap.select_order_statistics(high_hist, low_hists, ranks)
  expected = np.sort(values)[ranks]
  np.testing.assert_array_equal(got, expected)  # as floats: −0.0 == 0.0


@pytest.mark.parametrize("absolute", [False, True])
def test_cosine_quantiles_match_numpy(absolute):
  rng = np.random.default_rng(3)
  image = rng.normal(size=(3, 300, 48)).astype(np.float32)
  text = (rng.normal(size=(3, 257, 48)) + 0.2).astype(np.float32)
  quantiles = (0.25, 0.5, 0.75, 0.0, 1.0, 0.1234)
  got = analysis.cosine_quantiles(image, text, absolute, quantiles=quantiles, block=64)
  assert got.shape == (3, 6) and got.dtype == np.float64
  for layer in range(3):
    expected = np.quantile(numpy_cosines(image[layer], text[layer], absolute).ravel(), quantiles)
    # float32 cosines against float64 ones; the selection itself is exact (tests above/below).
    np.testing.assert_allclose(got[layer], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block,absolute", [(1, True), (7, False), (1000, False), (1000, True)])
def test_cosine_quantiles_exact_on_representable_cosines(block, absolute):
  """Vectors of four ±1 entries: unit rows are ±0.5, every cosine a multiple of 1/4 computed
  without rounding, so the result must equal np.quantile exactly (and ties are everywhere)."""
  rng = np.random.default_rng(4)

  def sparse_signs(n, d):
    x = np.zeros((n, d), np.float32)
    for row in x:
      row[rng.choice(d, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x * rng.choice([1.0, 3.0, 0.25], (n, 1)).astype(np.float32)  # norms need not be 2

  image = np.stack([sparse_signs(61, 9), sparse_signs(61, 9)])
  text = np.stack([sparse_signs(37, 9), sparse_signs(37, 9)])
  quantiles = (0.25, 0.5, 0.75, 0.3, 0.999, 0.0, 1.0)
  got = analysis.cosine_quantiles(image, text, absolute, quantiles=quantiles, block=block)
  for layer in range(2):
    expected = np.quantile(numpy_cosines(image[layer], text[layer], absolute).ravel(), quantiles)
    np.testing.assert_array_equal(got[layer], expected)


def test_cosine_quantiles_small_and_bfloat16():
  rng = np.random.default_rng(5)
  image = rng.normal(size=(1, 1, 8)).astype(np.float32)
  text = rng.normal(size=(1, 1, 8)).astype(np.float32)
  got = analysis.cosine_quantiles(image, text, False)
  np.testing.assert_allclose(got, np.full((1, 3), numpy_cosines(image[0], text[0], False)[0, 0]),
                             atol=1e-6)
  # bfloat16 residuals (what models return) are upcast; compare against the upcast values.
  image = jnp.asarray(rng.normal(size=(2, 20, 16)), jnp.bfloat16)
  text = jnp.asarray(rng.normal(size=(2, 30, 16)), jnp.bfloat16)
  got = analysis.cosine_quantiles(image, text, True, block=6)
  for layer in range(2):
    expected = np.quantile(numpy_cosines(np.asarray(image[layer], np.float32),
                                         np.asarray(text[layer], np.float32), True).ravel(),
                           (0.25, 0.5, 0.75))
    np.testing.assert_allclose(got[layer], expected, atol=1e-6)


@pytest.mark.parametrize("image_shape,text_shape,kwargs,message", [
    ((2, 5, 4), (3, 5, 4), {}, "must agree"),
    ((2, 5, 4), (2, 5, 3), {}, "must agree"),
    ((5, 4), (5, 4), {}, r"\[L, N, D\]"),
    ((1, 5, 4), (1, 5, 4), {"quantiles": (0.5, 1.5)}, r"in \[0, 1\]"),
    ((1, 5, 4), (1, 5, 4), {"block": 0}, "at least 1"),
    ((1, 0, 4), (1, 5, 4), {}, "no pairs"),
])
def test_cosine_quantiles_errors(image_shape, text_shape, kwargs, message):
  with pytest.raises(ValueError, match=message):
    analysis.cosine_quantiles(np.ones(image_shape, np.float32), np.ones(text_shape, np.float32),
                              False, **kwargs)


# ---------------------------------------------------------------------------------- overlap


def numpy_overlap(x, labels, k):
  """Brute force: float64 distances, self excluded, stable sort (lower index first on ties)."""
  x = np.asarray(x, np.float64)
  labels = np.asarray(labels)
  dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  np.fill_diagonal(dist, np.inf)
  neighbours = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return float((labels[neighbours] == labels[:, None]).mean())


@pytest.mark.parametrize("n,k,block", [(257, 30, 50), (257, 30, 1024), (100, 5, 1), (64, 63, 8)])
def test_neighbourhood_overlap_matches_brute_force(n, k, block):
  rng = np.random.default_rng(n + k)
  labels = rng.integers(0, 6, n)
  x = (rng.normal(size=(n, 40)) + 1.5 * np.eye(6, 40)[labels]).astype(np.float32)
  got = analysis.neighbourhood_overlap(x, labels, k=k, block=block)
  assert got == pytest.approx(numpy_overlap(x, labels, k), abs=1e-12)


def test_neighbourhood_overlap_ties_nearest_then_lower_index():
  """Integer lattice points: many exactly equal distances, all computed exactly in float32."""
  rng = np.random.default_rng(7)
  x = rng.integers(-2, 3, size=(150, 3)).astype(np.float32)  # duplicates too
  labels = rng.integers(0, 3, 150)
  for k, block in [(1, 16), (10, 37), (30, 150)]:
    got = analysis.neighbourhood_overlap(x, labels, k=k, block=block)
    assert got == pytest.approx(numpy_overlap(x, labels, k), abs=1e-12)


def test_neighbourhood_overlap_extremes_and_labels_of_any_kind():
  x = np.concatenate([np.zeros((20, 4)), np.full((20, 4), 100.0)]).astype(np.float32)
  x += np.random.default_rng(0).normal(scale=0.01, size=x.shape).astype(np.float32)
  labels = np.array(["cat"] * 20 + ["dog"] * 20)
  assert analysis.neighbourhood_overlap(x, labels, k=19, block=9) == 1.0
  assert analysis.neighbourhood_overlap(x, labels, k=39) == pytest.approx(19 / 39)


def test_neighbourhood_overlap_per_layer_matches_single():
  rng = np.random.default_rng(8)
  labels = rng.integers(0, 4, 90)
  x = rng.normal(size=(3, 90, 12)).astype(np.float32)
  x[1] += 3.0 * np.eye(4, 12)[labels]  # layer 1 carries the labels
  got = analysis.neighbourhood_overlap_per_layer(jnp.asarray(x, jnp.bfloat16), labels, k=7,
                                                 block=20)
  assert got.shape == (3,)
  x32 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
  expected = [numpy_overlap(x32[layer], labels, 7) for layer in range(3)]
  np.testing.assert_allclose(got, expected, atol=1e-12)
  assert got[1] > got[0] and got[1] > got[2]


@pytest.mark.parametrize("shape,labels_len,k,message", [
    ((10, 3), 9, 3, r"labels must be \[N\]"),
    ((10, 3), 10, 10, "k must be in 1..N−1"),
    ((10, 3), 10, 0, "k must be in 1..N−1"),
    ((2, 10, 3, 1), 10, 3, r"x \[N, D\]"),
])
def test_neighbourhood_overlap_errors(shape, labels_len, k, message):
  with pytest.raises(ValueError, match=message):
    analysis.neighbourhood_overlap(np.zeros(shape, np.float32), np.zeros(labels_len), k=k)


# --------------------------------------------------------------------------------- patching


def test_distribution_similarity_matches_numpy():
  rng = np.random.default_rng(9)
  logits_p, logits_q = rng.normal(size=(2, 5, 4, 33)) * 3
  p = np.exp(logits_p) / np.exp(logits_p).sum(-1, keepdims=True)
  q = np.exp(logits_q) / np.exp(logits_q).sum(-1, keepdims=True)
  got = analysis.distribution_similarity(p, q)
  assert got.shape == (5, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.minimum(p, q).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(analysis.distribution_similarity(p, p), 1.0, rtol=1e-6)
  # broadcasting one reference distribution against many, and disjoint supports give 0
  np.testing.assert_allclose(analysis.distribution_similarity(p, q[0, 0]),
                             np.minimum(p, q[0, 0]).sum(-1), rtol=1e-6)
  assert float(analysis.distribution_similarity(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))) == 0


def test_flip_accuracy_matches_numpy():
  rng = np.random.default_rng(10)
  n, vocab = 50, 40
  clean = rng.normal(size=(n, vocab)).astype(np.float32)
  patched = rng.normal(size=(n, vocab)).astype(np.float32)
  rec = rng.integers(0, vocab, n)
  src = (rec + rng.integers(1, vocab, n)) % vocab
  d_clean = clean[np.arange(n), rec] - clean[np.arange(n), src]
  d_patched = patched[np.arange(n), rec] - patched[np.arange(n), src]
  expected = np.mean(np.sign(d_clean) != np.sign(d_patched))
  assert analysis.flip_accuracy(clean, patched, rec, src) == pytest.approx(expected, abs=1e-7)
  np.testing.assert_allclose(analysis.logit_difference(clean, rec, src), d_clean, rtol=1e-6)
  assert analysis.flip_accuracy(clean, clean, rec, src) == 0.0
  assert analysis.flip_accuracy(clean, -clean, rec, src) == 1.0


def test_flip_accuracy_zero_differences():
  clean = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]], np.float32)
  patched = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [2.0, 1.0]], np.float32)
  rec, src = np.zeros(4, np.int32), np.ones(4, np.int32)
  # signs clean: +, 0, 0, −; patched: 0, 0, −, +  ->  flips: yes, no, yes, yes
  assert analysis.flip_accuracy(clean, patched, rec, src) == 0.75


@pytest.mark.parametrize("rec,src,shape,message", [
    ([0, 1], [1, 5], (2, 5), "outside 0..4"),
    ([0, -1], [1, 2], (2, 5), "outside 0..4"),
    ([0, 1, 2], [1, 2, 3], (2, 5), r"must be \[N\] = \[2\]"),
    ([0.0, 1.0], [1, 2], (2, 5), "integers"),
])
def test_flip_accuracy_errors(rec, src, shape, message):
  logits = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match=message):
    analysis.flip_accuracy(logits, logits, np.asarray(rec), np.asarray(src))


def test_steering_direction_matches_numpy():
  rng = np.random.default_rng(11)
  a = rng.normal(size=(13, 24)).astype(np.float32)
  b = (rng.normal(size=(7, 24)) + 2.0).astype(np.float32)
  got = analysis.steering_direction(a, jnp.asarray(b, jnp.bfloat16))
  assert got.shape == (24,) and got.dtype == jnp.float32
  b32 = np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(got, b32.mean(0) - a.astype(np.float64).mean(0), atol=1e-5)
  with pytest.raises(ValueError, match="acts_a"):
    analysis.steering_direction(a, b[:, :5])
