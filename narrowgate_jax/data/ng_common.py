"""What the Narrow Gate study's data loaders share (`vqav2`, `karpathy`, `imagenet`,
`hf_datasets`): the study's prompts, a dataset that says what it skipped, JSON reading with
`path:line:` errors, prompt templates, and the seeded selections.

Prompt templates. A template is a prompt with one "<image>" marker; a question template also
holds "{question}" once, where the raw question goes (by plain replacement, so braces elsewhere
in the template or the question are kept as written). The raw question is `Example.question`, so
it is always a substring of the prompt.

Selections (all deterministic; numpy's `Generator` streams are stable across versions in
practice but not promised):

  first N        the first N rows, in file order (fewer when there are fewer)
  sample N       sorted(numpy.random.default_rng(seed).choice(n, size=N, replace=False)): N
                 distinct rows drawn at random, kept in file order
  classes, per_class
                 rng = numpy.random.default_rng(seed); the classes (in label order) are
                 sorted(rng.choice(#classes, size=classes, replace=False)); then, class by class
                 in label order, the items of a class with more than per_class are
                 sorted(rng.choice(#items, size=per_class, replace=False)) (the same generator
                 goes on), a class with fewer keeping all of them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Hashable, Mapping, Optional, Sequence, TypeVar

import numpy as np

from narrowgate_jax.data.examples import Example, ListDataset
from narrowgate_jax.processing.prompts import IMAGE_MARKER

# The study's prompts (PROTOCOLS.md §2 (b), (d), (e); Chameleon's text-completion mode). Other
# models wrap them in their chat templates; that is the model's business, not the loader's.
VQA_PROMPT = IMAGE_MARKER + "{question}\nAnswer the question using a single word or phrase. Answer:"
CAPTION_PROMPT = IMAGE_MARKER + "Provide a one-sentence caption for the provided image."
IMAGENET_PROMPT = IMAGE_MARKER + " This animal is a"
QUESTION_FIELD = "{question}"
# Image files a class folder may hold (compared lower-case).
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

T = TypeVar("T")


class NgDataset(ListDataset):
  """A `ListDataset` that also says what the loader skipped and why.

  Attributes:
    skipped: reason -> how many items were skipped for it ({} when none was).
    skip_log: (what was skipped, message), in reading order.
  """

  def __init__(self, name: str, examples: Sequence[Example],
               skipped: Optional[Mapping[str, int]] = None,
               skip_log: Sequence[tuple[str, str]] = ()):
    super().__init__(name, examples)
    self.skipped = dict(skipped or {})
    self.skip_log = tuple(skip_log)

  def __repr__(self) -> str:
    return f"NgDataset({self.name!r}, {len(self)} examples, skipped {self.skipped})"


class Skips:
  """Counts what a loader skipped, by reason, with a log line for each."""

  def __init__(self):
    self.counts: dict[str, int] = {}
    self.log: list[tuple[str, str]] = []

  def skip(self, what: str, reason: str, message: str) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    self.log.append((what, f"{reason}: {message}"))


def read_json(path: str | os.PathLike, what: str) -> Any:
  """The decoded JSON file; errors name the file (and the line of a syntax error)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e


def in_folder(root: str, name: str | os.PathLike) -> str:
  """`name` relative to `root` (an absolute `name` is kept)."""
  return os.path.join(root, os.fspath(name))


def check_folder(path: str | os.PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist or is not a directory")
  return path


def count_or_none(value: Any, field: str) -> Optional[int]:
  """A positive int or None (meaning "all"); raises naming the argument otherwise."""
  if value is None:
    return None
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{field} must be a positive int or None (all), got {value!r}")
  return int(value)


def check_template(template: str, with_question: bool) -> str:
  """The template, checked: one "<image>" marker; "{question}" once (question prompts) or not
  at all (the others)."""
  if not isinstance(template, str):
    raise TypeError(f"template must be a str, got {type(template).__name__}")
  if template.count(IMAGE_MARKER) != 1:
    raise ValueError(f"template {template!r} must hold exactly one {IMAGE_MARKER} marker")
  fields = template.count(QUESTION_FIELD)
  if with_question and fields != 1:
    raise ValueError(f"template {template!r} must hold {QUESTION_FIELD} exactly once")
  if not with_question and fields:
    raise ValueError(f"template {template!r} holds {QUESTION_FIELD} but this data has no "
                     "question")
  return template


def question_prompt(template: str, question: Any, where: str) -> tuple[str, str]:
  """(prompt, question) for a raw question: non-empty, without an image marker."""
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: field 'question' must be a non-empty str, got {question!r}")
  if IMAGE_MARKER in question:
    raise ValueError(f"{where}: question {question!r} holds {IMAGE_MARKER!r}")
  return template.replace(QUESTION_FIELD, question), question


def first_rows(n: int, first: Optional[int]) -> list[int]:
  """Indices of the first `first` of n rows (all when None)."""
  return list(range(n if first is None else min(first, n)))


def sample_rows(n: int, sample: Optional[int], seed: int, what: str) -> list[int]:
  """sorted(default_rng(seed).choice(n, sample, replace=False)); all n rows when sample is None.

  Raises when asked for more rows than there are (pass sample=None for all of them).
  """
  if sample is None:
    return list(range(n))
  if sample > n:
    raise ValueError(f"{what}: asked for a sample of {sample} but there are only {n}; pass "
                     "sample=None for all of them")
  chosen = np.random.default_rng(seed).choice(n, size=sample, replace=False)
  return sorted(int(i) for i in chosen)


def select_per_class(groups: Mapping[Hashable, Sequence[T]], classes: Optional[int],
                     per_class: Optional[int], seed: int,
                     what: str) -> list[tuple[Hashable, list[T]]]:
  """[(class, its chosen items)], classes in key order (see the module docstring).

  groups: class -> its items in a fixed order, keys sortable (labels); no empty groups.
  """
  keys = sorted(groups)
  rng = np.random.default_rng(seed)
  if classes is not None:
    if classes > len(keys):
      raise ValueError(f"{what}: asked for {classes} classes but only {len(keys)} have images")
    keys = [keys[int(i)] for i in sorted(rng.choice(len(keys), size=classes, replace=False))]
  chosen = []
  for key in keys:
    items = list(groups[key])
    if per_class is not None and len(items) > per_class:
      items = [items[int(i)] for i in sorted(rng.choice(len(items), size=per_class,
                                                        replace=False))]
    chosen.append((key, items))
  return chosen


def split_names(text: str) -> tuple[str, ...]:
  """ImageNet-style synonyms "tench, Tinca tinca" -> ("tench", "Tinca tinca")."""
  return tuple(n.strip() for n in text.split(",") if n.strip())
