"""The prepared batch every forward pass takes, and left-padded batching of token sequences."""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import numpy as np

from narrowgate_jax.processing.roles import Role


@flax.struct.dataclass
class Batch:
  """A left-padded batch.

  Attributes:
    input_ids: [B, T] int32 token ids (pad positions hold the pad id).
    positions: [B, T] int32 rotary positions: 0 at each example's first real token.
    roles: [B, T] int32 values of `Role`; `Role.PAD` marks padding.
  """

  input_ids: jax.Array
  positions: jax.Array
  roles: jax.Array

  @property
  def attention_mask(self):
    """[B, T] bool: real (non-pad) tokens."""
    return self.roles != Role.PAD

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.input_ids.shape)


def left_pad(sequences: Sequence[Sequence[int]], roles: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> Batch:
  """Token and role sequences of different lengths -> one left-padded `Batch` (numpy arrays).

  Left padding keeps every example's last prompt token at position T - 1, which is where
  generation continues from.
  """
  longest = max(len(s) for s in sequences)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f"length={length} is shorter than the longest sequence ({longest} tokens)")
  ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
  role_arr = np.full((len(sequences), length), int(Role.PAD), dtype=np.int32)
  for b, (seq, rol) in enumerate(zip(sequences, roles)):
    if len(seq) != len(rol):
      raise ValueError(f"example {b}: {len(seq)} tokens but {len(rol)} roles")
    if len(seq):
      ids[b, length - len(seq):] = seq
      role_arr[b, length - len(seq):] = rol
  real = role_arr != Role.PAD
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  return Batch(input_ids=ids, positions=positions, roles=role_arr)
