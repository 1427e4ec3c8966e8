"""Scaled dot-product attention with the edits the studies need, and the masks it runs under.

Legend as in `layers.py`: B batch, T queries, S keys, N query heads, K key/value heads,
G = N / K query heads per key/value head, H head width.

Queries are laid out [B, K, G, T, H] against keys and values [B, K, S, H] (heads-major, the
layout of the decoder's KV cache), so each score and value product is one batched matrix
multiply with (B, K) as batch axes, grouped-query attention needs no copy of the key/value heads,
and a decoding step (`attend_step`) reads the cache where it lies, without a transposed copy.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

SCORE_MIN = jnp.finfo(jnp.float32).min  # what transformers' eager masks add to a blocked score
QUERY_BLOCK = 256  # queries per block when probabilities are not needed (see `_causal_blocks`)


def visibility(query_index: jax.Array, key_index: jax.Array, key_real: jax.Array,
               window: jax.Array, query_real: Optional[jax.Array] = None) -> jax.Array:
  """Causal, padding and sliding-window visibility from absolute indices.

  query_index: [T] int, each query's index in the key sequence (in a KV cache: its cache slot).
  key_index: [S] int, each key's index in the same sequence (0..S-1 for a cache or a full pass).
  key_real: [B, S] bool, False at padding keys. window: scalar int (0 = no window).
  query_real: [B, T] bool or None. Where given, a padding query also sees itself, so that no row is
    empty and nothing padded can turn into NaN.
  Returns [B, T, S] bool: key s visible to query t when key_index[s] <= query_index[t], within the
  window (query_index - window < key_index), and key s is real.
  """
  distance = query_index[:, None] - key_index[None, :]  # [T, S]: query index minus key index
  causal = distance >= 0
  in_window = jnp.where(window > 0, distance < window, True)
  visible = causal & in_window & key_real[:, None, :]
  if query_real is None:
    return visible
  return visible | ((distance == 0) & ~query_real[:, :, None])


def base_mask(attention_mask: jax.Array, window: jax.Array) -> jax.Array:
  """Visibility of a full pass over one sequence: queries and keys are the same T positions.

  attention_mask: [B, T] bool (real tokens); window: scalar int (0 = no window).
  Returns [B, T, S] bool (S = T); a padding query sees itself only.
  """
  t = jnp.arange(attention_mask.shape[1])
  return visibility(t, t, attention_mask, window, attention_mask)


def _scores(qg, k, visible, scale):
  """qg [B, K, G, T, H], k [B, K, S, H], visible [B, T, S] -> masked scores [B, K, G, T, S] f32."""
  scores = jnp.einsum("BKGTH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(visible[:, None, None], scores, SCORE_MIN)


def _weighted_values(weights, v):
  """weights [B, K, G, T, S], v [B, K, S, H] -> [B, K, G, T, H]."""
  return jnp.einsum("BKGTS,BKSH->BKGTH", weights.astype(v.dtype), v)


def _causal_blocks(qg, k, v, visible, scale, block, post_softmax_block=None):
  """Attention without forming normalised probabilities, in blocks of queries.

  A block of queries ending at t only needs keys up to t (causality), so block i reads the first
  (i + 1) * block keys: about half the work of the full square. Each row is normalised after the
  value product, on [.., H] instead of [.., S]. A post-softmax knockout zeroes its edges' weights
  after the row total is taken, which is zeroing their probabilities without renormalising.
  Returns [B, K, G, T, H].
  """
  t, s = qg.shape[3], k.shape[2]
  # Queries are at most the last t positions of the keys (in a KV cache they may sit earlier, with
  # later slots still empty): block i never needs keys past offset + its last query.
  offset = s - t
  out = []
  for start in range(0, t, block):
    stop = min(start + block, t)
    keys = offset + stop
    scores = _scores(qg[:, :, :, start:stop], k[:, :, :keys], visible[:, start:stop, :keys], scale)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if post_softmax_block is not None:
      weights = jnp.where(post_softmax_block[:, None, None, start:stop, :keys], 0.0, weights)
    out.append(_weighted_values(weights, v[:, :, :keys]) / total.astype(v.dtype))
  return jnp.concatenate(out, axis=3)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
           scale: float, post_softmax_block: Optional[jax.Array] = None,
           need_probabilities: bool = False,
           query_block: int = QUERY_BLOCK) -> tuple[jax.Array, Optional[jax.Array]]:
  """Attention of queries q [B, T, N, H] over keys k, values v [B, K, S, H] (S >= T, the queries
  being the last T positions, or earlier ones as in a KV cache whose later slots are still empty:
  `visible` hides those).

  visible: [B, T, S] bool, False where the score is set to the dtype minimum before the softmax
    (causality, padding, pre-softmax knockouts).
  post_softmax_block: [B, T, S] bool, probabilities zeroed after the softmax (no renormalisation).
  Returns (out [B, T, N, H], probabilities [B, N, T, S] float32 or None).

  Probabilities are formed only when asked for; otherwise attention (post-softmax knockouts
  included) runs in causal query blocks and never holds a [T, S] score matrix for the whole
  sequence.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[1]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  probs = None
  if not need_probabilities:
    out = _causal_blocks(qg, k, v, visible, scale, query_block, post_softmax_block)
  else:
    probs = jax.nn.softmax(_scores(qg, k, visible, scale), axis=-1)
    if post_softmax_block is not None:
      probs = jnp.where(post_softmax_block[:, None, None], 0.0, probs)
    out = _weighted_values(probs, v)
    probs = probs.reshape(b, n, t, -1)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), probs


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache, visible: jax.Array, *,
                scale: float, post_softmax_block: Optional[jax.Array] = None) -> jax.Array:
  """One new query per example over a KV cache that does not hold its own key yet.

  q [B, 1, N, H]; k, v [B, K, 1, H]: the new position's own key and value; cache: (keys, values)
  [B, K, S, H] of the earlier slots; visible [B, 1, S] bool over the cache's slots (the new
  position's own slot and every later one hidden); post_softmax_block [B, 1, S] or None, over
  the cache's slots (a generated position is never a knockout key, so its own edge is never cut).
  Returns out [B, 1, N, H].

  One softmax over the cache's scores and the own score together (a shared maximum and row
  total): equal to writing the key into the cache first, without copying the cache to do so.
  """
  b, _, n, h = q.shape
  kv_heads = k.shape[1]
  qg = q.reshape(b, kv_heads, n // kv_heads, h)  # [B, K, G, H]
  cache_k, cache_v = cache
  # The cache as the left operand: one pass over it makes [S, G] per (B, K). The barrier keeps
  # XLA from folding the transpose into the product, which makes it pick a batched product
  # that is ~3x slower on CPU (measured with 24 sequences x 1,060 slots).
  scores = jnp.einsum("BKSH,BKGH->BKSG", cache_k.astype(q.dtype), qg,
                      preferred_element_type=jnp.float32)
  scores = jax.lax.optimization_barrier(scores).transpose(0, 1, 3, 2) * scale  # [B, K, G, S]
  scores = jnp.where(visible[:, :, None, :], scores, SCORE_MIN)  # [B, 1->K, 1->G, S]
  own = jnp.einsum("BKGH,BKH->BKG", qg, k[:, :, 0], preferred_element_type=jnp.float32) * scale
  top = jnp.maximum(jnp.max(scores, axis=-1), own)  # [B, K, G]
  weights = jnp.exp(scores - top[..., None])
  own_weight = jnp.exp(own - top)
  total = jnp.sum(weights, axis=-1) + own_weight
  if post_softmax_block is not None:
    weights = jnp.where(post_softmax_block[:, :, None, :], 0.0, weights)
  out = (jnp.einsum("BKGS,BKSH->BKGH", weights.astype(v.dtype), cache_v.astype(v.dtype))
         + own_weight[..., None].astype(v.dtype) * v[:, :, :1])
  out = out / total[..., None].astype(v.dtype)
  return out.reshape(b, 1, n, h)
