"""What a forward pass returns besides logits: `Capture` asks, `Output` answers."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax
import numpy as np

from narrowgate_jax.processing.batch import Batch
from narrowgate_jax.processing.roles import Selector, positions_of, select


WEIGHTINGS = ("probability", "value_norm")


@dataclasses.dataclass(frozen=True)
class Capture:
  """Which internals to return.

  Attributes:
    resid: the residual stream: the embeddings, then every decoder layer's output (before the final
      norm) -> Output.resid [L+1, B, T, D].
    resid_at: keep the residual stream only at these positions -> [L+1, B, P, D] with
      Output.resid_index [B, P] (padded with T).
    attn_in: every layer's self-attention input (after its norm where the block has one: what an
      "attn_in" patch replaces) -> Output.attn_in [L, B, T, D], or [L, B, P, D] at `resid_at`.
    attn: post-softmax attention probabilities -> Output.attn [L', B, N, T, S].
    attn_layers: only these layers (L' = len(attn_layers)); all layers when None.
    received_from: for every layer and head, the attention each key position receives, summed over
      the query positions this selects -> Output.received [L, B, N, S]. Computed inside the layer
      scan; no [L, N, T, S] tensor is kept.
    received_weighting: "probability" (the post-softmax weights) or "value_norm": each weight
      times the norm of what the key contributes through its head, ||W_O^h v_j^h|| (the Narrow
      Gate study's value-norm-weighted variant of attention flow).
  """

  resid: bool = False
  resid_at: Optional[Selector] = None
  attn_in: bool = False
  attn: bool = False
  attn_layers: Optional[Sequence[int]] = None
  received_from: Optional[Selector] = None
  received_weighting: str = "probability"

  def plan(self, batch: Batch, num_layers: int) -> "CapturePlan":
    roles = np.asarray(batch.roles)
    seq_len = roles.shape[1]
    resid_index = None
    if self.resid_at is not None:
      resid_index = positions_of(select(self.resid_at, roles, what="Capture.resid_at"),
                                 fill=seq_len)
    attn_layers = ()
    if self.attn:
      attn_layers = tuple(range(num_layers)) if self.attn_layers is None else tuple(
          int(l) for l in self.attn_layers)
      bad = [l for l in attn_layers if not 0 <= l < num_layers]
      if bad:
        raise ValueError(f"Capture.attn_layers: layer {bad[0]} out of range for a model with "
                         f"{num_layers} layers")
    received = None
    if self.received_from is not None:
      received = select(self.received_from, roles, what="Capture.received_from")
    if self.received_weighting not in WEIGHTINGS:
      raise ValueError(f"Capture.received_weighting {self.received_weighting!r}; expected one of "
                       f"{WEIGHTINGS}")
    return CapturePlan(resid=self.resid or self.resid_at is not None, resid_index=resid_index,
                       attn_in=self.attn_in, attn_layers=attn_layers, received_queries=received,
                       value_weighted=self.received_weighting == "value_norm")


@flax.struct.dataclass
class CapturePlan:
  """A `Capture` resolved against one batch: static flags plus the position arrays it needs."""

  resid_index: Optional[jax.Array] = None  # [B, P] int32, or None for every position
  received_queries: Optional[jax.Array] = None  # [B, T] bool
  resid: bool = flax.struct.field(pytree_node=False, default=False)
  attn_in: bool = flax.struct.field(pytree_node=False, default=False)
  attn_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  value_weighted: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def needs_probabilities(self) -> bool:
    return bool(self.attn_layers) or self.received_queries is not None


@flax.struct.dataclass
class Output:
  """Shapes: B batch, T positions, V vocabulary, L layers, N query heads, S key positions."""

  logits: jax.Array  # [B, T, V] float32
  resid: Optional[jax.Array] = None  # [L+1, B, T, D] or [L+1, B, P, D]
  resid_index: Optional[jax.Array] = None  # [B, P] when Capture.resid_at was given
  attn_in: Optional[jax.Array] = None  # [L, B, T, D] or [L, B, P, D]
  attn: Optional[jax.Array] = None  # [L', B, N, T, S]
  received: Optional[jax.Array] = None  # [L, B, N, S]
