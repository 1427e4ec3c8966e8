"""The prepared batch every forward pass takes, and left-padded batching of token sequences."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

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
    features: [B, T, D] float, or None: input embeddings that replace the token embeddings where
      `feature_mask` is True (non-native VLMs: projected vision-tower features and learned image
      newlines, computed once by `vlm.prepare`).
    feature_mask: [B, T] bool, or None.
    image_coords: [B, T, 4] int32, or None: for each image token (image index in its prompt,
      view, row, col), where view 0 is the base view and 1.. the high-resolution tiles, and
      (row, col) the patch in that view's grid; -1 for every other token. Maps a region of the
      picture to token positions.
  """

  input_ids: jax.Array
  positions: jax.Array
  roles: jax.Array
  features: Optional[jax.Array] = None
  feature_mask: Optional[jax.Array] = None
  image_coords: Optional[jax.Array] = None

  @property
  def attention_mask(self):
    """[B, T] bool: real (non-pad) tokens."""
    return self.roles != Role.PAD

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.input_ids.shape)


def left_pad(sequences: Sequence[Sequence[int]], roles: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None, features: Optional[Sequence[np.ndarray]] = None,
             feature_masks: Optional[Sequence[np.ndarray]] = None,
             coords: Optional[Sequence[np.ndarray]] = None) -> Batch:
  """Token and role sequences of different lengths -> one left-padded `Batch` (numpy arrays).

  Left padding keeps every example's last prompt token at position T - 1, which is where
  generation continues from.
  features, feature_masks, coords: optionally, per example, [t, D] input embeddings, [t] bool
    where they apply, [t, 4] image coordinates (see `Batch`).
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
  batch = Batch(input_ids=ids, positions=positions, roles=role_arr)
  if features is not None:
    batch = batch.replace(features=_left_pad_rows(features, length, 0.0),
                          feature_mask=_left_pad_rows(feature_masks, length, False))
  if coords is not None:
    batch = batch.replace(image_coords=_left_pad_rows(coords, length, -1))
  return batch


def _left_pad_rows(rows: Sequence[np.ndarray], length: int, fill) -> np.ndarray:
  """Per-example arrays [t_b, ...] -> [B, length, ...], each right-aligned, `fill` before it."""
  out = np.full((len(rows), length) + rows[0].shape[1:], fill, rows[0].dtype)
  for b, r in enumerate(rows):
    out[b, length - len(r):] = r
  return out


def pad_to(batch: Batch, length: int, pad_id: int) -> Batch:
  """A left-padded batch (numpy arrays) -> the same batch padded on the left to `length`
  positions (a bucket), so batches of different prompts share one compiled shape."""
  current = batch.shape[1]
  if length < current:
    raise ValueError(f"length={length} is shorter than the batch's {current} positions")
  extra = length - current
  fills = {"input_ids": pad_id, "positions": 0, "roles": int(Role.PAD), "features": 0.0,
           "feature_mask": False, "image_coords": -1}

  def grow(name, x):
    if x is None:
      return None
    x = np.asarray(x)
    widths = [(0, 0), (extra, 0)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, widths, constant_values=fills[name])

  return Batch(**{f.name: grow(f.name, getattr(batch, f.name))
                  for f in dataclasses.fields(Batch)})


def concatenate(batches: Sequence[Batch]) -> Batch:
  """Batches of equal length -> one batch (numpy arrays). Optional fields present in some
  batches only are filled for the others (no features: mask False; no coordinates: -1)."""
  lengths = {b.shape[1] for b in batches}
  if len(lengths) != 1:
    raise ValueError(f"batches of different lengths {sorted(lengths)}: pad them first (pad_to)")

  def field(name):
    present = [getattr(b, name) for b in batches if getattr(b, name) is not None]
    if not present:
      return None
    like = np.asarray(present[0])
    fill = {"features": 0.0, "feature_mask": False, "image_coords": -1}[name]
    return np.concatenate([
        np.asarray(getattr(b, name)) if getattr(b, name) is not None
        else np.full(b.shape + like.shape[2:], fill, like.dtype) for b in batches])

  required = {n: np.concatenate([np.asarray(getattr(b, n)) for b in batches])
              for n in ("input_ids", "positions", "roles")}
  return Batch(**required, **{n: field(n) for n in ("features", "feature_mask", "image_coords")})
