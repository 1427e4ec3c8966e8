"""The blocked attention path (no probabilities formed) against the explicit one.

The explicit path is the one checked against transformers in test_parity.py (with probabilities
captured); sequences there are shorter than one query block, so the block logic is tested here.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from narrowgate_jax.models.attention import attend, base_mask


def _inputs(t, s, seed=0, n=6, k=2, h=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, n, h)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(2, s, k, h)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(2, s, k, h)), jnp.float32)
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
