"""Logit lens: the vocabulary distribution each layer's residual stream would give (CM answer
formation, PROTOCOLS.md §3).

For correctly answered samples, the last prompt position's hidden state after every layer is
projected with the unembedding (optionally after the model's final norm), softmaxed, and the
probability of a few candidate tokens (lower-case / capitalised answer, true/false options) is
tracked across depth.

`out.resid` is [L+1, B, T, D]: the embeddings, then each decoder layer's output, all *before* the
final norm, so `logit_lens(..., final_norm=norm)` on row L reproduces the model's own output
distribution. The model side (unembedding, final norm) comes in as callables; everything here is
pure jax.numpy and can be jitted with them closed over.

Axis legend: L layers (L+1 rows: embeddings + one per layer) · B batch · T positions ·
  D model width · V vocabulary · K candidate tokens
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

NO_TOKEN = -1  # pads a candidate list [B, K] where an example has fewer than K candidates


def gather_position(resid: jax.Array, position: jax.Array) -> jax.Array:
  """One position per example: resid [L+1, B, T, D], position [B] int -> [L+1, B, D]."""
  index = jnp.asarray(position)[None, :, None, None]  # [1, B, 1, 1]
  return jnp.take_along_axis(resid, index, axis=2)[:, :, 0]


def logit_lens(resid: jax.Array, unembed: Callable[[jax.Array], jax.Array],
               final_norm: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
  """resid [L+1, B, D] (one position per example) -> probs [L+1, B, V] float32.

  unembed: h [..., D] -> logits [..., V] (the model's LM head).
  final_norm: h [..., D] -> [..., D] applied before `unembed`, or None to project the raw stream.
  The softmax is taken in float32 whatever dtype `unembed` returns.
  """
  h = resid if final_norm is None else final_norm(resid)
  logits = unembed(h).astype(jnp.float32)  # [L+1, B, V]
  return jax.nn.softmax(logits, axis=-1)


def token_trajectories(probs: jax.Array, tokens: jax.Array) -> jax.Array:
  """Probability of K candidate tokens per layer: probs [L+1, B, V], tokens [B, K] -> [L+1, B, K].

  Entries of `tokens` equal to NO_TOKEN (-1) mark absent candidates (e.g. no true/false option
  for a task that has none) and give NaN; any other token outside 0..V−1 gives NaN too.
  """
  tokens = jnp.asarray(tokens)
  present = tokens != NO_TOKEN
  index = jnp.broadcast_to(jnp.where(present, tokens, 0)[None],
                           probs.shape[:1] + tokens.shape)  # [L+1, B, K]
  picked = jnp.take_along_axis(probs, index, axis=-1, mode="fill", fill_value=jnp.nan,
                               wrap_negative_indices=False)
  return jnp.where(present[None], picked, jnp.nan)
