"""The generic on-disk dataset: a JSONL file, one example per line, images beside it.

  {"id": "q1", "prompt": "<image>What colour is the shape?", "image": "images/q1.png",
   "question": "What colour is the shape?", "answer": "red", "answers": ["red", "red"],
   "label": 0, "bbox": [3, 4, 20, 21]}

"image" (one path) or "images" (a list, one per "<image>" marker; absent or [] for a text-only
prompt) are relative to the JSONL file's directory (absolute paths are kept). Every key other than
the `Example` fields goes to `Example.meta`. Everything a run needs is checked when the file is
loaded (fields, marker counts, that each image file exists), so a bad dataset fails before
anything compiles, with the file, line and field in the message.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from PIL import Image

from narrowgate_jax.data.examples import Dataset, Example, ListDataset
from narrowgate_jax.processing.prompts import IMAGE_MARKER

EXAMPLES_FILE = "examples.jsonl"
FIELDS = ("id", "prompt", "image", "images", "question", "answer", "answers", "label")


def resolve_path(path: str | os.PathLike) -> str:
  """A dataset path -> its JSONL file: the path itself, or `examples.jsonl` in a directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    inner = os.path.join(path, EXAMPLES_FILE)
    if not os.path.isfile(inner):
      raise FileNotFoundError(f"dataset directory {path!r} has no {EXAMPLES_FILE}")
    return inner
  if not os.path.exists(path):
    raise FileNotFoundError(f"dataset file {path!r} does not exist")
  return path


def _field(record: dict, key: str, types: tuple, where: str, optional: bool = True):
  """record[key] checked against `types` (None allowed when optional)."""
  if key not in record:
    if optional:
      return None
    raise ValueError(f"{where}: missing field {key!r}")
  value = record[key]
  if value is None and optional:
    return None
  # bool is an int in Python; a true/false label or id is a mistake in the file.
  if not isinstance(value, types) or isinstance(value, bool):
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
  return value


def _string_list(record: dict, key: str, where: str) -> list[str]:
  values = _field(record, key, (list,), where) or []
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise ValueError(f"{where}: field {key!r} item {i} must be str, got {type(v).__name__}")
  return values


def parse_record(record: Any, root: str, where: str) -> Example:
  """One decoded JSON line -> an `Example`, image paths resolved against `root` and checked.

  where: "file:line", the prefix of every error message.
  """
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  ex_id = _field(record, "id", (str, int), where, optional=False)
  prompt = _field(record, "prompt", (str,), where, optional=False)
  if "image" in record and "images" in record:
    raise ValueError(f"{where}: give either 'image' or 'images', not both")
  one = _field(record, "image", (str,), where)
  paths = [one] if one is not None else _string_list(record, "images", where)
  images = []
  for rel in paths:
    full = os.path.normpath(os.path.join(root, rel))
    if not os.path.isfile(full):
      raise FileNotFoundError(f"{where}: image file {rel!r} does not exist ({full})")
    images.append(full)
  markers = prompt.count(IMAGE_MARKER)
  if markers != len(images):
    raise ValueError(f"{where}: prompt has {markers} {IMAGE_MARKER} marker(s) but "
                     f"{len(images)} image(s)")
  question = _field(record, "question", (str,), where)
  # vlm.prepare finds the question in the prompt; say so here, before anything compiles.
  if question is not None and (not question or question not in prompt or IMAGE_MARKER in question):
    raise ValueError(f"{where}: field 'question' {question!r} is not a non-empty part of the "
                     "prompt between its images")
  answer = _field(record, "answer", (str,), where)
  answers = _string_list(record, "answers", where)
  if not answers and answer is not None:
    answers = [answer]
  return Example(id=str(ex_id), prompt=prompt, images=tuple(images), question=question,
                 answer=answer, answers=tuple(answers),
                 label=_field(record, "label", (int, str), where),
                 meta={k: v for k, v in record.items() if k not in FIELDS})


def read_jsonl(path: str) -> list[Example]:
  """Every example of a JSONL file (blank lines skipped), checked; raises naming file and line."""
  root = os.path.dirname(os.path.abspath(path))
  examples, lines_of = [], {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
      example = parse_record(record, root, where)
      if example.id in lines_of:
        raise ValueError(f"{where}: id {example.id!r} already used on line {lines_of[example.id]}")
      lines_of[example.id] = lineno
      examples.append(example)
  if not examples:
    raise ValueError(f"dataset file {path!r} has no examples")
  return examples


class JsonlDataset(ListDataset):
  """A dataset read from a JSONL file (or a directory holding `examples.jsonl`), all in memory.

  name: defaults to the directory's name for `.../NAME/examples.jsonl`, else the file's stem.
  """

  def __init__(self, path: str | os.PathLike, name: Optional[str] = None):
    self.path = resolve_path(path)
    if name is None:
      stem = os.path.splitext(os.path.basename(self.path))[0]
      parent = os.path.basename(os.path.dirname(os.path.abspath(self.path)))
      name = parent if os.path.basename(self.path) == EXAMPLES_FILE and parent else stem
    super().__init__(name, read_jsonl(self.path))

  def __repr__(self) -> str:
    return f"JsonlDataset({self.name!r}, {self.path!r}, {len(self)} examples)"


def load_dataset(path: str | os.PathLike, name: Optional[str] = None) -> Dataset:
  """A dataset from disk: a `.jsonl` file, or a directory containing `examples.jsonl`."""
  path = os.fspath(path)
  if not os.path.isdir(path) and os.path.exists(path) and not path.endswith(".jsonl"):
    raise ValueError(f"dataset {path!r}: expected a .jsonl file or a directory with "
                     f"{EXAMPLES_FILE}")
  return JsonlDataset(path, name=name)


def example_record(example: Example, root: str) -> dict:
  """An `Example` -> its JSON object, image paths written relative to `root` (the JSONL file's
  directory) so the dataset directory can be moved as a whole."""
  images = []
  for i, image in enumerate(example.images):
    if isinstance(image, Image.Image):
      raise ValueError(f"example {example.id!r}: image {i} is a PIL image; save it to a file "
                       "before writing the JSONL")
    images.append(os.path.relpath(os.path.abspath(os.fspath(image)), root))
  clash = sorted(set(example.meta) & set(FIELDS))
  if clash:
    raise ValueError(f"example {example.id!r}: meta key {clash[0]!r} is a reserved field name")
  record: dict[str, Any] = {"id": example.id, "prompt": example.prompt}
  if len(images) == 1:
    record["image"] = images[0]
  elif images:
    record["images"] = images
  for key in ("question", "answer", "label"):
    if getattr(example, key) is not None:
      record[key] = getattr(example, key)
  if example.answers:
    record["answers"] = list(example.answers)
  record.update(example.meta)
  return record


def write_jsonl(path: str | os.PathLike, examples: Sequence[Example]) -> str:
  """Writes `examples` to a JSONL file (the inverse of `read_jsonl`); returns the path."""
  path = os.fspath(path)
  root = os.path.dirname(os.path.abspath(path))
  os.makedirs(root, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for example in examples:
      f.write(json.dumps(example_record(example, root), ensure_ascii=False) + "\n")
  return path
