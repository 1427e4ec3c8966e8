"""Attention flow (PROTOCOLS §2(b)) from received attention [L, B, N, S], against a direct numpy
computation from full [L, B, N, T, S] probabilities (the in-scan capture itself is tested against
transformers in test_interventions.py)."""

import numpy as np
import pytest

from narrowgate_jax.analysis import category_sums, flow_shares
from narrowgate_jax.processing.roles import Role, select


def _roles():
  """Two examples: BOS, image start, 4 image tokens, EOI, text; the second left-padded."""
  row = [Role.BOS, Role.IMAGE_START] + [Role.IMAGE] * 4 + [Role.IMAGE_END] + [Role.TEXT] * 3
  return np.asarray([row, [Role.PAD] + row[:-1]], np.int32)


def test_shares_equal_a_direct_computation():
  rng = np.random.default_rng(0)
  roles = _roles()
  layers, b, heads, t = 3, 2, 4, roles.shape[1]
  probs = rng.random((layers, b, heads, t, t))
  text = select("text_after_image", roles)
  received = np.einsum("LBNTS,BT->LBNS", probs, text)
  hot = np.zeros_like(text)
  hot[:, 3] = True  # a user-named position inside the image
  shares = flow_shares(category_sums(received, roles, {"hot": hot}))
  f = np.einsum("LBNTS,BT->LBS", probs, text) / heads  # head average of the summed queries
  span = select(["image", "image_break", "eoi"], roles)
  total = (f * span).sum(-1).mean(-1)  # [L]: mean over examples of the span's attention
  eoi, last = select("eoi", roles), select("last_image", roles)
  hot_only = hot & span & ~eoi & ~last
  for name, mask in (("eoi", eoi), ("last_image", last), ("hot", hot_only),
                     ("other_image", span & ~eoi & ~last & ~hot_only)):
    np.testing.assert_allclose(shares[name], (f * mask).sum(-1).mean(-1) / total, rtol=1e-12)
  np.testing.assert_allclose(sum(shares.values()), 1.0, rtol=1e-12)


def test_a_mask_of_the_wrong_shape_is_named():
  roles = _roles()
  with pytest.raises(ValueError, match="positions 'hot'"):
    category_sums(np.ones((1, 2, 1, roles.shape[1])), roles, {"hot": np.ones((2, 3), bool)})
