"""The blocked attention path (no probabilities formed) against the explicit one.

The explicit path is the one checked against transformers in test_parity.py (with probabilities
captured); sequences there are shorter than one query block, so the block logic is tested here.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from narrowgate_jax.models.attention import attend, attend_step, base_mask, visibility


def _inputs(t, s, seed=0, n=6, k=2, h=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, n, h)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(2, k, s, h)), jnp.float32)  # heads-major, as cached
  values = jnp.asarray(rng.normal(size=(2, k, s, h)), jnp.float32)
  return q, keys, values


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("block", [4, 8, 64])
def test_blocks_equal_explicit_attention(window, block):
  t = 37
  q, k, v = _inputs(t, t)
  real = np.ones((2, t), bool)
  real[1, :6] = False  # left padding in the second example
  visible = base_mask(jnp.asarray(real), jnp.int32(window))
  knocked = np.zeros((2, t, t), bool)
  knocked[:, 20:, 10:14] = True  # a pre-softmax knockout that leaves every row something to see
  visible = visible & ~knocked
  blocked, none = attend(q, k, v, visible, scale=0.3, query_block=block)
  explicit, probs = attend(q, k, v, visible, scale=0.3, need_probabilities=True)
  assert none is None and probs.shape == (2, 6, t, t)
  np.testing.assert_allclose(blocked, explicit, rtol=1e-5, atol=1e-6)


def test_queries_after_a_prefix_of_keys():
  """T < S: the queries are the last T positions (as when a prefix is cached)."""
  t, s = 9, 23
  q, k, v = _inputs(t, s, seed=1)
  visible = jnp.asarray(np.tril(np.ones((s, s), bool))[None, s - t:].repeat(2, axis=0))
  blocked, _ = attend(q, k, v, visible, scale=0.3, query_block=4)
  explicit, _ = attend(q, k, v, visible, scale=0.3, need_probabilities=True)
  np.testing.assert_allclose(blocked, explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [4, 64])
def test_post_softmax_knockout_in_blocks_equals_zeroed_probabilities(block):
  """Blocks zero the knocked edges' weights after the row total: the explicit path's
  probabilities zeroed after the softmax, without renormalising."""
  t = 29
  q, k, v = _inputs(t, t, seed=2)
  visible = base_mask(jnp.asarray(np.ones((2, t), bool)), jnp.int32(0))
  cut = np.zeros((2, t, t), bool)
  cut[:, 12:, [3, 7, 11]] = True
  blocked, none = attend(q, k, v, visible, scale=0.3, post_softmax_block=jnp.asarray(cut),
                         query_block=block)
  explicit, probs = attend(q, k, v, visible, scale=0.3, post_softmax_block=jnp.asarray(cut),
                           need_probabilities=True)
  assert none is None and float(probs[:, :, 12:][..., [3, 7, 11]].max()) == 0.0
  assert float(probs.sum(-1).min()) < 0.99  # not renormalised
  np.testing.assert_allclose(blocked, explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [None, "pre_softmax", "post_softmax"])
def test_a_step_over_the_cache_equals_attention_with_its_key_written_in(mode):
  """attend_step keeps the new key apart from the cache; attend sees it written at its slot."""
  s, slot, window = 19, 13, 6
  q, _, _ = _inputs(1, 1, seed=3)
  _, k, v = _inputs(s, s, seed=4)  # [2, K, S, H]; slots >= slot are stale and must be ignored
  k_new, v_new = k[:, :, :1] + 1.0, v[:, :, :1] - 1.0
  written_k, written_v = k.at[:, :, slot].set(k_new[:, :, 0]), v.at[:, :, slot].set(v_new[:, :, 0])
  key_real = np.ones((2, s), bool)
  key_real[1, :2] = False  # padding keys
  visible = visibility(jnp.asarray([slot]), jnp.arange(s), jnp.asarray(key_real), window)
  cut = np.zeros((2, 1, s), bool)
  cut[:, :, [9, 11]] = True
  full_visible = visible & ~cut if mode == "pre_softmax" else visible
  post = jnp.asarray(cut) if mode == "post_softmax" else None
  expected, _ = attend(q, written_k, written_v, full_visible, scale=0.3,
                       post_softmax_block=post, need_probabilities=True)
  step = attend_step(q, k_new, v_new, (k, v), full_visible & (jnp.arange(s) < slot), scale=0.3,
                     post_softmax_block=post)
  np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-6)
