"""Shape bucketing: which examples go in which batch, and how long each batch is padded.

Every distinct [batch, length] shape is one compilation of the forward pass. Padding each batch to
the longest prompt in it compiles one shape per distinct length (tens on a real dataset); padding
everything to the model's context wastes most of the compute. Buckets sit between the two: each
example goes to the smallest bucket that holds it, batches are formed within a bucket, and a
batch's token length is its bucket. With a fixed batch size, the number of compiled forward
shapes is at most the number of buckets the dataset uses (`count_shapes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

FILLER = -1


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  buckets = tuple(buckets)
  if not buckets:
    raise ValueError("buckets is empty; give at least one length")
  if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets):
    raise ValueError(f"buckets must be positive ints, got {buckets}")
  if any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError(f"buckets must be strictly increasing, got {buckets}")
  return buckets


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n. Raises ValueError when n exceeds the largest bucket."""
  buckets = _check_buckets(buckets)
  if n < 0:
    raise ValueError(f"length must be >= 0, got {n}")
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket ({buckets[-1]}); raise max_length "
                   "or add a longer bucket")


def default_buckets(max_length: int, min_length: int = 64, ratio: float = 1.25,
                    multiple: int = 16) -> tuple[int, ...]:
  """Geometric buckets from `min_length` up to `max_length`: each the previous times `ratio`,
  rounded up to a multiple of `multiple`; the last is `max_length` itself (the model's context).

  A prompt of n > min_length tokens is padded to fewer than ratio * n + multiple tokens (at most
  25% + 16 by default; shorter ones to min_length), while a dataset whose lengths span a factor
  of 2 uses about 3-4 buckets. Multiples of 16 keep the matmul tiles on accelerators full.
  Returns: strictly increasing ints, the last == max_length.
  """
  if max_length < 1 or min_length < 1 or multiple < 1:
    raise ValueError(f"max_length, min_length and multiple must be positive, got {max_length}, "
                     f"{min_length}, {multiple}")
  if ratio <= 1:
    raise ValueError(f"ratio must be > 1, got {ratio}")
  buckets = []
  b = multiple * math.ceil(min_length / multiple)
  while b < max_length:
    buckets.append(b)
    # The rounding can never stall: the next bucket is at least one `multiple` longer.
    b = max(multiple * math.ceil(b * ratio / multiple), b + multiple)
  return tuple(buckets) + (max_length,)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One batch: dataset indices (length batch_size, `FILLER` = -1 for a filler slot) and the
  token length its prompts are padded to (the bucket)."""

  indices: tuple[int, ...]
  length: int

  @property
  def real(self) -> tuple[int, ...]:
    """The dataset indices in this batch, without fillers."""
    return tuple(i for i in self.indices if i != FILLER)

  @property
  def mask(self) -> tuple[bool, ...]:
    """Per slot: True for a real example, False for a filler (whose outputs are dropped)."""
    return tuple(i != FILLER for i in self.indices)

  @property
  def filled(self) -> tuple[int, ...]:
    """`indices` with each filler replaced by the batch's first example: a duplicate that keeps
    the shape without a special case in preparation; drop its outputs with `mask`."""
    first = self.indices[0]
    return tuple(first if i == FILLER else i for i in self.indices)


def plan_batches(lengths: Sequence[int], batch_size: int,
                 buckets: Sequence[int]) -> list[BatchPlan]:
  """Groups examples by bucket into batches of `batch_size` slots.

  lengths: per example, its prepared token length (index i = dataset example i).
  Returns: the batches, longest bucket first (so an out-of-memory shape fails at the start of a
    run, not hours in), dataset order within each bucket; every example in exactly one batch;
    only the last batch of each bucket has fillers, at its end. With a fixed batch size the
    number of distinct shapes is at most the number of buckets used.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  buckets = _check_buckets(buckets)
  groups: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    try:
      groups.setdefault(bucket_length(int(n), buckets), []).append(i)
    except ValueError as e:
      raise ValueError(f"example {i}: {e}") from None
  plans = []
  for length in sorted(groups, reverse=True):
    members = groups[length]
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      plans.append(BatchPlan(tuple(chunk) + (FILLER,) * (batch_size - len(chunk)), length))
  return plans


def count_shapes(plans: Sequence[BatchPlan]) -> int:
  """The number of distinct (batch_size, length) shapes: compilations of the forward pass."""
  return len({(len(p.indices), p.length) for p in plans})
