"""Scaled dot-product attention with the edits the studies need, and the masks it runs under.

Legend as in `layers.py`: B batch, T queries, S keys, N query heads, K key/value heads,
G = N / K query heads per key/value head, H head width.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

SCORE_MIN = jnp.finfo(jnp.float32).min  # what transformers' eager masks add to a blocked score


def base_mask(attention_mask: jax.Array, window: jax.Array) -> jax.Array:
  """Causal, padding and sliding-window visibility.

  attention_mask: [B, T] bool (real tokens); window: scalar int (0 = no window).
  Returns [B, T, S] bool (S = T). A padding query also sees itself, so that no row is empty
  and nothing padded can turn into NaN.
  """
  t = jnp.arange(attention_mask.shape[1])
  distance = t[:, None] - t[None, :]  # [T, S]: query index minus key index
  causal = distance >= 0
  in_window = jnp.where(window > 0, distance < window, True)
  visible = causal & in_window & attention_mask[:, None, :]
  return visible | ((distance == 0) & ~attention_mask[:, :, None])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
           scale: float, post_softmax_block: Optional[jax.Array] = None,
           need_probabilities: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
  """Attention of queries q [B, T, N, H] over keys k, values v [B, S, K, H].

  visible: [B, T, S] bool, False where the score is set to the dtype minimum before the softmax
    (causality, padding, pre-softmax knockouts).
  post_softmax_block: [B, T, S] bool, probabilities zeroed after the softmax (no renormalisation).
  Returns (out [B, T, N, H], probabilities [B, N, T, S] float32 or None).

  The fused `jax.nn.dot_product_attention` runs when no probability is needed and no
  post-softmax edit is asked for; otherwise the probabilities are formed explicitly.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if post_softmax_block is None and not need_probabilities:
    out = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], scale=scale)
    return out, None
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible[:, None, None], scores, SCORE_MIN)
  probs = jax.nn.softmax(scores, axis=-1)
  if post_softmax_block is not None:
    probs = jnp.where(post_softmax_block[:, None, None], 0.0, probs)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v).reshape(b, t, n, h)
  return out, probs.reshape(b, n, t, -1)
