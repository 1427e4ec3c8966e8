"""Activation patching and steering at EOI (NG Fig. 5, PROTOCOLS.md §2 (e)).

Pairs of ImageNet classes (A, B), the i-th image of one paired with the i-th of the other; three
passes per pair: source clean, recipient clean, recipient with the EOI activation patched from
the source. The metrics here compare the next-token outputs of those passes:

  distribution_similarity  Σ_v min(p_v, q_v) between two next-token distributions (1 for equal
                           distributions, 0 for disjoint supports); the study compares the
                           patched recipient with the clean source, and the clean recipient
                           with the clean source as the baseline
  flip_accuracy            fraction of pairs where the sign of
                           logit(recipient class token) − logit(source class token)
                           differs between the clean and the patched recipient
  steering_direction       mean_B − mean_A of EOI activations; adding α times it at EOI is the
                           steering generalisation of patching

All in float32 on device (jax.numpy).

Axis legend: N pairs · V vocabulary · D model width
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def distribution_similarity(p: jax.Array, q: jax.Array) -> jax.Array:
  """Σ_v min(p_v, q_v): p [..., V], q [..., V] probabilities (broadcasting) -> [...] float32.

  Equals 1 − total variation distance for normalised p, q. Pass probabilities, not logits:
  the study takes softmax(logits) in float32 first (`jax.nn.softmax(logits.astype(f32))`).
  """
  p = jnp.asarray(p).astype(jnp.float32)
  q = jnp.asarray(q).astype(jnp.float32)
  return jnp.minimum(p, q).sum(axis=-1)


def logit_difference(logits: jax.Array, token_a: jax.Array, token_b: jax.Array) -> jax.Array:
  """logits [N, V], token_a [N], token_b [N] int -> [N] float32 logit(a) − logit(b) per row."""
  logits = jnp.asarray(logits).astype(jnp.float32)
  picked = jnp.take_along_axis(logits, jnp.stack([token_a, token_b], axis=-1), axis=-1)  # [N, 2]
  return picked[:, 0] - picked[:, 1]


@jax.jit
def _flips(recipient_logits, patched_logits, recipient_token, source_token) -> jax.Array:
  clean = logit_difference(recipient_logits, recipient_token, source_token)
  patched = logit_difference(patched_logits, recipient_token, source_token)
  # The study's comparison, sign(patched) != sign(clean): a difference of exactly 0 on one side
  # only counts as a flip, 0 on both sides does not.
  return jnp.sign(clean) != jnp.sign(patched)  # [N] bool


def flip_accuracy(recipient_logits, patched_logits, recipient_class_token,
                  source_class_token) -> float:
  """Fraction of pairs whose recipient-vs-source logit difference changes sign under patching.

  recipient_logits [N, V]: next-token logits of the clean recipient pass.
  patched_logits [N, V]: the same position in the recipient pass with EOI patched.
  recipient_class_token, source_class_token [N] int: the token of each pair's recipient class
  and source class (e.g. the first token of " cat" and of " dog").
  Returns mean over pairs of 1[sign(d_clean) ≠ sign(d_patched)], d = logit(recipient) −
  logit(source), a float in [0, 1].
  """
  recipient_logits = jnp.asarray(recipient_logits)
  patched_logits = jnp.asarray(patched_logits)
  if recipient_logits.ndim != 2 or recipient_logits.shape != patched_logits.shape:
    raise ValueError(f"expected recipient and patched logits [N, V] of one shape, got "
                     f"{recipient_logits.shape} and {patched_logits.shape}")
  n, vocab = recipient_logits.shape
  if n == 0:
    raise ValueError("flip_accuracy of zero pairs is undefined")
  tokens = []
  for name, token in (("recipient_class_token", recipient_class_token),
                      ("source_class_token", source_class_token)):
    token = np.asarray(token)
    if token.shape != (n,) or not np.issubdtype(token.dtype, np.integer):
      raise ValueError(f"{name} must be [N] = [{n}] integers, got {token.dtype} {token.shape}")
    if token.min() < 0 or token.max() >= vocab:
      raise ValueError(f"{name} has tokens outside 0..{vocab - 1}")
    tokens.append(jnp.asarray(token, jnp.int32))
  return float(jnp.mean(_flips(recipient_logits, patched_logits, *tokens)))


def steering_direction(acts_a: jax.Array, acts_b: jax.Array) -> jax.Array:
  """mean_B − mean_A: acts_a [Na, D], acts_b [Nb, D] -> [D] float32 (means in float32)."""
  acts_a = jnp.asarray(acts_a)
  acts_b = jnp.asarray(acts_b)
  if acts_a.ndim != 2 or acts_b.ndim != 2 or acts_a.shape[1] != acts_b.shape[1]:
    raise ValueError(f"expected acts_a [Na, D] and acts_b [Nb, D], got {acts_a.shape} and "
                     f"{acts_b.shape}")
  if acts_a.shape[0] == 0 or acts_b.shape[0] == 0:
    raise ValueError("steering_direction needs at least one activation of each class")
  return acts_b.astype(jnp.float32).mean(axis=0) - acts_a.astype(jnp.float32).mean(axis=0)
