"""Training rows for a decoder: prepared prompts plus the tokens to learn, packed into one
left-padded array set, and the seeded batches `loop.train` reads.

A row is what `vlm.prepare` makes of a prompt (so training sees exactly the token layout that
inference and every analysis see), followed by the tokens to learn (an answer and EOS), or a
prompt whose own span is learned (an image after its caption). `pack` pads every row to one
length and shifts the flags so that position t is trained to predict token t + 1.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from narrowgate_jax.processing.batch import Batch, left_pad
from narrowgate_jax.processing.roles import Role


@dataclasses.dataclass(frozen=True)
class Row:
  """One unpadded row: ids, roles [t] int; trained [t] bool (the tokens to learn); features
  [t, D] and feature_mask [t] for non-native prompts (image features replacing embeddings)."""

  ids: np.ndarray
  roles: np.ndarray
  trained: np.ndarray
  features: Optional[np.ndarray] = None
  feature_mask: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class Rows:
  """Rows left-padded to one length T: ids, roles, positions [N, T] int32; targets [N, T] the next
  token; weights [N, T] float32, 1 where that next token is learned; features [N, T, D] and
  feature_mask [N, T] (non-native) or None."""

  ids: np.ndarray
  roles: np.ndarray
  positions: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  features: Optional[np.ndarray] = None
  feature_mask: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return self.ids.shape[0]

  def take(self, index: np.ndarray) -> dict:
    """The rows at `index` as a batch dict of numpy arrays (features only when present)."""
    out = {"ids": self.ids[index], "roles": self.roles[index], "positions": self.positions[index],
           "targets": self.targets[index], "weights": self.weights[index]}
    if self.features is not None:
      out.update(features=self.features[index], feature_mask=self.feature_mask[index])
    return out


def unpadded(batch: Batch) -> list[Row]:
  """A prepared batch -> its rows without padding, nothing trained yet."""
  real = np.asarray(batch.roles) != Role.PAD
  rows = []
  for b in range(real.shape[0]):
    keep = real[b]
    features = feature_mask = None
    if batch.features is not None:
      features = np.asarray(batch.features)[b][keep]
      feature_mask = np.asarray(batch.feature_mask)[b][keep]
    rows.append(Row(np.asarray(batch.input_ids)[b][keep], np.asarray(batch.roles)[b][keep],
                          np.zeros(int(keep.sum()), bool), features, feature_mask))
  return rows


def with_answer(row: Row, answer_ids: Sequence[int]) -> Row:
  """The row followed by `answer_ids` (Role.TEXT), which are what it learns."""
  extra = np.asarray(answer_ids, np.int32)
  features = feature_mask = None
  if row.features is not None:
    features = np.concatenate([row.features, np.zeros((extra.size, row.features.shape[1]),
                                                      row.features.dtype)])
    feature_mask = np.concatenate([row.feature_mask, np.zeros(extra.size, bool)])
  return Row(np.concatenate([row.ids, extra]),
                   np.concatenate([row.roles, np.full(extra.size, Role.TEXT, np.int32)]),
                   np.concatenate([np.zeros(row.ids.size, bool), np.ones(extra.size, bool)]),
                   features, feature_mask)


def answer_rows(vlm, prompts: Sequence[str], images: Sequence, answers: Sequence[str],
                chunk: int = 64) -> list[Row]:
  """Each prompt (with its images) prepared by `vlm`, then its answer and EOS to learn."""
  tokenizer = vlm.tokenizer
  eos = tokenizer.eos_token_id
  out = []
  for start in range(0, len(prompts), chunk):
    batch = vlm.prepare(images=list(images[start:start + chunk]),
                        prompts=list(prompts[start:start + chunk]))
    for row, answer in zip(unpadded(batch), answers[start:start + chunk]):
      answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
      out.append(with_answer(row, answer_ids + [eos]))
  return out


def pack(rows: Sequence[Row], pad_id: int) -> Rows:
  """Left-pads the rows to the longest and shifts `trained` onto the predicting positions."""
  has_features = rows[0].features is not None
  padded = left_pad([r.ids for r in rows], [r.roles for r in rows], pad_id=pad_id,
                    features=[r.features for r in rows] if has_features else None,
                    feature_masks=[r.feature_mask for r in rows] if has_features else None)
  ids = np.asarray(padded.input_ids)
  width = ids.shape[1]
  trained = np.zeros(ids.shape, np.float32)
  for b, r in enumerate(rows):
    trained[b, width - r.trained.size:] = r.trained
  # position t predicts token t + 1: a learned token's flag moves one step left
  return Rows(ids=ids, roles=np.asarray(padded.roles), positions=np.asarray(padded.positions),
              targets=np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1),
              weights=np.concatenate([trained[:, 1:], np.zeros_like(trained[:, :1])], axis=1),
              features=None if not has_features else np.asarray(padded.features),
              feature_mask=None if not has_features else np.asarray(padded.feature_mask))


def epoch_batches(rows: Rows, batch_size: int, seed: int, extra: Optional[dict] = None):
  """batch_at(step) for `loop.train`: each epoch a seeded permutation of the rows, cut into
  batches (a pure function of the step). `extra`: more [N, ...] arrays taken along."""
  n = len(rows)
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} is larger than the {n} training rows")
  per_epoch = n // batch_size

  def batch_at(step: int) -> dict:
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 4, epoch]).permutation(n)
    pick = order[within * batch_size:(within + 1) * batch_size]
    return {**rows.take(pick), **{k: v[pick] for k, v in (extra or {}).items()}}

  return batch_at
