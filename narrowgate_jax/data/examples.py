"""One example of an experiment's dataset, the `Dataset` protocol every loader implements, and
views over a dataset (a fixed list, one host's shard).

An `Example` holds exactly what `vlm.prepare` takes for one prompt (the prompt with its "<image>"
markers, one image per marker, the user's question inside the prompt) plus what the evaluation
needs (reference answers, a class label) and anything else a protocol uses (`meta`: object boxes,
attribute names). Loaders for on-disk formats live beside this file; they all return `Dataset`s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

from PIL import Image

from narrowgate_jax.processing.prompts import IMAGE_MARKER

ImageRef = Union[str, os.PathLike, Image.Image]


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt with its images and references.

  Attributes:
    id: unique within its dataset; names the example in results and error messages.
    prompt: the text given to the model, with one "<image>" marker where each image goes.
    images: one image per marker, in order: file paths or PIL images.
    question: the user's part of `prompt` (a substring of it that does not cross an "<image>"),
      whose tokens get Role.TEXT; None when the whole prompt is template.
    answer: the reference answer (e.g. VQA's most common one), or None.
    answers: every reference answer (VQA's ten, a caption set); `(answer,)` when only one exists.
    label: a class index or name (classification), or None.
    meta: anything else a protocol reads (object boxes, attribute names, the source split).
  """

  id: str
  prompt: str
  images: tuple = ()
  question: Optional[str] = None
  answer: Optional[str] = None
  answers: tuple[str, ...] = ()
  label: Optional[Union[int, str]] = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # A lone path or answer would otherwise become a tuple of its characters.
    if isinstance(self.images, (str, os.PathLike, Image.Image)):
      raise TypeError(f"example {self.id!r}: images must be a sequence, one per marker; "
                      "wrap a single image as (image,)")
    if isinstance(self.answers, str):
      raise TypeError(f"example {self.id!r}: answers must be a sequence of str; wrap one as "
                      "(answer,)")
    # Loaders and users hand over lists; tuples keep an Example immutable like its dataclass.
    object.__setattr__(self, "images", tuple(self.images))
    object.__setattr__(self, "answers", tuple(self.answers))

  @property
  def num_markers(self) -> int:
    """How many "<image>" markers the prompt has (must equal len(images) for `vlm.prepare`)."""
    return self.prompt.count(IMAGE_MARKER)


@runtime_checkable
class Dataset(Protocol):
  """A named, indexable, finite sequence of `Example`s (what the experiment runner reads)."""

  name: str

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Example:
    ...

  def __iter__(self) -> Iterator[Example]:
    ...


def _check_index(index: int, length: int, name: str) -> int:
  """`index` as a non-negative int in [0, length), negative indices counting from the end."""
  if not isinstance(index, int) or isinstance(index, bool):
    raise TypeError(f"dataset {name!r}: index must be an int, got {type(index).__name__}")
  if not -length <= index < length:
    raise IndexError(f"dataset {name!r}: index {index} out of range for {length} examples")
  return index % length


class ListDataset:
  """A dataset held in memory: `ListDataset("probe", [Example(...), ...])`."""

  def __init__(self, name: str, examples: Sequence[Example]):
    self.name = name
    self._examples = tuple(examples)
    for i, e in enumerate(self._examples):
      if not isinstance(e, Example):
        raise TypeError(f"dataset {name!r}: item {i} is a {type(e).__name__}, not an Example")

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> Example:
    return self._examples[_check_index(index, len(self._examples), self.name)]

  def __iter__(self) -> Iterator[Example]:
    return iter(self._examples)

  def __repr__(self) -> str:
    return f"ListDataset({self.name!r}, {len(self)} examples)"


def check_unique_ids(dataset: Dataset) -> None:
  """Raises ValueError naming the first id that occurs twice (with both indices)."""
  seen: dict[str, int] = {}
  for i, example in enumerate(dataset):
    if example.id in seen:
      raise ValueError(f"dataset {dataset.name!r}: id {example.id!r} occurs twice "
                       f"(examples {seen[example.id]} and {i})")
    seen[example.id] = i


class ShardedDataset:
  """One host's share of a dataset: the examples i with i % count == index, in dataset order.

  The view keeps the parent's name (it is the same dataset; results from all hosts merge by
  example id). `parent_index(j)` maps the shard's j-th example back to the parent's index.
  """

  def __init__(self, dataset: Dataset, index: int, count: int):
    if not isinstance(count, int) or count < 1:
      raise ValueError(f"shard count must be a positive int, got {count!r}")
    if not isinstance(index, int) or not 0 <= index < count:
      raise ValueError(f"shard index must be in [0, {count}), got {index!r}")
    self.dataset, self.index, self.count = dataset, index, count
    self.name = dataset.name

  def __len__(self) -> int:
    # Examples index, index + count, ... below len(parent).
    return max(0, (len(self.dataset) - self.index + self.count - 1) // self.count)

  def parent_index(self, j: int) -> int:
    """The parent dataset's index of this shard's example j."""
    return self.index + _check_index(j, len(self), self.name) * self.count

  def __getitem__(self, j: int) -> Example:
    return self.dataset[self.parent_index(j)]

  def __iter__(self) -> Iterator[Example]:
    for j in range(len(self)):
      yield self[j]

  def __repr__(self) -> str:
    return f"ShardedDataset({self.name!r}, shard {self.index}/{self.count}, {len(self)} examples)"


def shard(dataset: Dataset, index: int, count: int) -> ShardedDataset:
  """Host `index` of `count`'s examples: example i goes to host i % count (deterministic, every
  example on exactly one host, shard sizes differing by at most one).

  Shards can differ in length by one, so per-host batch plans can differ in their number of
  batches; an SPMD multi-host step needs every host to run the same shapes in the same order, so
  either plan on the whole dataset and give each host its slice of every batch, or pad the
  shorter hosts' plans with filler batches.
  """
  return ShardedDataset(dataset, index, count)
