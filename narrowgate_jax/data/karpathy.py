"""Caption test sets in Karpathy's split files (dataset_coco.json, dataset_flickr30k.json), for
the Narrow Gate study's caption knockout evaluation (PROTOCOLS.md §2 (d): the first 2,000 rows of
the test split).

  {"dataset": "coco", "images": [{"filename", "filepath"?, "split", "imgid", "cocoid"?,
                                  "sentences": [{"raw", "tokens", ...}, ...], ...}, ...]}

Images: COCO rows have a "filepath" (val2014, train2014): `<images_root>/<filepath>/<filename>`,
with `<images_root>/<filename>` accepted too (a flat folder); Flickr rows have none:
`<images_root>/<filename>`.

Each row of the split (in file order; the first `first`, fewer when the split is shorter: the
Flickr30k test split has 1,000 rows) becomes an `Example`: id str(cocoid) for COCO rows, else the
file name without its extension; the prompt from `template` (the study's `CAPTION_PROMPT`), no
question, answer None, answers = the raw reference captions (stripped), meta {"dataset", "split",
"filename", "imgid", "cocoid" (COCO)}. Errors (naming the file and row): a folder without a
Karpathy file (or with several), a missing field, a row without captions, a missing image file,
a split with no rows, two rows with one id.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from narrowgate_jax.data.examples import Example
from narrowgate_jax.data.ng_common import (CAPTION_PROMPT, NgDataset, check_folder,
                                           check_template, count_or_none, first_rows, read_json)

KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")


def resolve_karpathy_file(path: str | os.PathLike) -> str:
  """A Karpathy JSON file, or the one of `KARPATHY_FILES` in a folder."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Karpathy split file {path!r} does not exist")
    return path
  found = [n for n in KARPATHY_FILES if os.path.isfile(os.path.join(path, n))]
  if not found:
    raise FileNotFoundError(f"Karpathy folder {path!r} has no split file (one of "
                            f"{', '.join(KARPATHY_FILES)})")
  if len(found) > 1:
    raise ValueError(f"Karpathy folder {path!r} has {' and '.join(found)}; pass the file")
  return os.path.join(path, found[0])


def _str_field(row: dict, key: str, where: str) -> str:
  value = row.get(key)
  if not isinstance(value, str) or not value:
    got = "nothing" if key not in row else repr(value)
    raise ValueError(f"{where}: field {key!r} must be a non-empty str, got {got}")
  return value


def _captions(row: dict, where: str) -> tuple[str, ...]:
  sentences = row.get("sentences")
  if not isinstance(sentences, list) or not sentences:
    raise ValueError(f"{where}: field 'sentences' must be a non-empty list")
  captions = []
  for j, sentence in enumerate(sentences):
    raw = sentence.get("raw") if isinstance(sentence, dict) else None
    if not isinstance(raw, str) or not raw.strip():
      raise ValueError(f"{where}: sentences[{j}] must be an object with a non-empty str 'raw'")
    captions.append(raw.strip())
  return tuple(captions)


def _image(row: dict, images_root: str, where: str) -> str:
  filename = _str_field(row, "filename", where)
  candidates = [filename]
  if row.get("filepath"):
    candidates.insert(0, os.path.join(str(row["filepath"]), filename))
  for rel in candidates:
    path = os.path.join(images_root, rel)
    if os.path.isfile(path):
      return os.path.abspath(path)
  tried = " or ".join(repr(c) for c in candidates)
  raise FileNotFoundError(f"{where}: image file {tried} does not exist in {images_root}")


def _example(row: dict, dataset: str, images_root: str, template: str, where: str) -> Example:
  path = _image(row, images_root, where)
  filename = row["filename"]
  meta: dict[str, Any] = {"dataset": dataset, "split": row.get("split"), "filename": filename,
                          "imgid": row.get("imgid")}
  if "cocoid" in row:
    meta["cocoid"] = row["cocoid"]
  ex_id = str(row["cocoid"]) if "cocoid" in row else os.path.splitext(filename)[0]
  return Example(id=ex_id, prompt=template, images=(path,), answers=_captions(row, where),
                 meta=meta)


def _split_rows(rows: list, split: Optional[str], path: str) -> list[tuple[int, dict]]:
  """(index in the file, row) of the rows of `split` (all rows when None)."""
  chosen = []
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ValueError(f"{path}: images[{i}]: expected a JSON object, got {type(row).__name__}")
    if split is None or row.get("split") == split:
      chosen.append((i, row))
  if not chosen:
    present = sorted({str(r.get("split")) for r in rows})
    raise ValueError(f"{path}: split {split!r} has no rows (splits present: "
                     f"{', '.join(present) or 'none'})")
  return chosen


def load_karpathy(path: str | os.PathLike, images_root: str | os.PathLike, *,
                  split: Optional[str] = "test", first: Optional[int] = 2000,
                  template: str = CAPTION_PROMPT, name: Optional[str] = None) -> NgDataset:
  """The first `first` rows (all when None) of `split` (every row when None) of a Karpathy file
  (or a folder holding one); see the module docstring."""
  path = resolve_karpathy_file(path)
  images_root = check_folder(images_root, "caption images folder")
  template = check_template(template, with_question=False)
  first = count_or_none(first, "first")
  data = read_json(path, "Karpathy split")
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"{path}: expected a JSON object with a list 'images'")
  dataset = str(data.get("dataset") or os.path.splitext(os.path.basename(path))[0])
  rows = _split_rows(data["images"], split, path)
  examples, seen = [], {}
  for i, row in (rows[k] for k in first_rows(len(rows), first)):
    where = f"{path}: images[{i}]"
    example = _example(row, dataset, images_root, template, where)
    if example.id in seen:
      raise ValueError(f"{where}: id {example.id!r} already used by images[{seen[example.id]}]")
    seen[example.id] = i
    examples.append(example)
  default = f"{dataset}-{split}" if split else dataset
  return NgDataset(name or default, examples)
