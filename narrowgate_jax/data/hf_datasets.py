"""Datasets saved with Hugging Face's `datasets` library: `save_to_disk` folders (a Dataset or a
DatasetDict) and parquet files (one file, or a folder of them as the Hub stores datasets), for the
Narrow Gate study's data in that form (lmms-lab/VQAv2, nlphuji/flickr30k, imagenet-1k, ...).

  load_hf_dataset("vqav2_val", "vqa", split="validation", sample=2000, seed=42)
  load_hf_dataset("flickr30k/data", "caption", split="test", first=2000)
  load_hf_dataset("imagenet-1k/data", "classification", split="validation", classes=100,
                  per_class=100, image_dir="cache/imagenet")

Tasks and their columns (`columns` overrides a role's column; by default the first of the
candidates in `DEFAULT_COLUMNS` that the data has; None turns an optional role off):

  vqa             image, question, answers (a list of str, or of {"answer": ...} objects as in
                  VQAv2), answer (str; default multiple_choice_answer or answer; without it the
                  most common of answers), id
  caption         image, captions (a str, a list of str, or of {"raw": ...} objects), id
  classification  image, label (an int, whose names come from `class_names` or the column's
                  ClassLabel feature, or a str), id

An image cell is what `datasets.Image` stores ({"bytes", "path"}), raw bytes, or a path (relative
to the dataset's folder, or absolute). Images given as bytes are decoded when loading (so a bad
one fails here) and kept as PIL images in `Example.images` (`image_dir=None`, the default: held
in memory; ~0.5 MB per VQAv2 image), or written unchanged to `image_dir/<row:08d>.<ext>` (one
folder per dataset: rows are numbered within this dataset and split) with the paths in
`Example.images`. Images given as paths stay paths.

Splits: a DatasetDict's split by name (None: its only split); a parquet folder's files named
"<split>-*.parquet" / "<split>.parquet" or under a "<split>/" folder; otherwise the rows whose
"split" column equals `split`. Selection, on the split's rows in order (see `ng_common`): the
first `first`, a seeded `sample`, or (classification) `classes` x `per_class` seeded; all rows
when none is given. Ids: the id column's value where its values are unique among the chosen
rows (an explicit id column must be), else the row number. meta: {"row", "split"} and the row's
other scalar (str, int, float, bool) columns.

Errors (naming the path and row): neither a save_to_disk folder (it names the state.json or
dataset_dict.json it lacks) nor parquet, an unknown split (listing those present), a split with no
rows, a missing column (listing those present), an image that does not decode or whose file does
not exist, a label outside the class names. Needs `pyarrow` (parquet) and `datasets`
(save_to_disk folders), imported only here: pip install 'narrowgate-jax[data]'.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import io
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from PIL import Image

from narrowgate_jax.data.examples import Example, ImageRef
from narrowgate_jax.data.ng_common import (CAPTION_PROMPT, IMAGENET_PROMPT, VQA_PROMPT,
                                           NgDataset, check_template, count_or_none, first_rows,
                                           question_prompt, sample_rows, select_per_class,
                                           split_names)

TASKS = ("vqa", "caption", "classification")
TEMPLATES = {"vqa": VQA_PROMPT, "caption": CAPTION_PROMPT, "classification": IMAGENET_PROMPT}
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
ID_COLUMNS = ("id", "question_id", "img_id", "image_id", "cocoid", "filename")
DEFAULT_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "vqa": {"image": IMAGE_COLUMNS, "question": ("question",), "answers": ("answers",),
            "answer": ("multiple_choice_answer", "answer"), "id": ID_COLUMNS},
    "caption": {"image": IMAGE_COLUMNS, "captions": ("caption", "captions", "sentences", "text"),
                "id": ID_COLUMNS},
    "classification": {"image": IMAGE_COLUMNS, "label": ("label", "labels"), "id": ID_COLUMNS},
}
REQUIRED = {"vqa": ("image", "question"), "caption": ("image", "captions"),
            "classification": ("image", "label")}
DISK_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk writes (Dataset, Dict)
SPLIT_COLUMN = "split"


def _require(module: str, what: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    package = module.split(".")[0]
    raise ImportError(f"{what} needs the {package!r} package: pip install "
                      "'narrowgate-jax[data]'") from e


@dataclasses.dataclass
class _Part:
  """Rows of one file (or one save_to_disk dataset): read(columns, indices or None) -> Table."""

  rows: int
  read: Callable[[list[str], Optional[list[int]]], Any]


@dataclasses.dataclass
class _Source:
  label: str  # the path (and split), the prefix of error messages
  root: str  # the folder relative image paths start from
  schema: Any  # pyarrow.Schema
  features: dict  # the `datasets` features as a dict ({} for plain parquet)
  parts: list[_Part]
  split_filter: Optional[str]  # keep rows whose "split" column equals this

  @property
  def columns(self) -> list[str]:
    return list(self.schema.names)


# ------------------------------------------------------------------------------ opening


def _disk_part(ds: Any) -> _Part:
  def read(columns: list[str], indices: Optional[list[int]]) -> Any:
    view = ds.select_columns(columns).with_format("arrow")
    return view[:] if indices is None else view[indices]
  return _Part(len(ds), read)


def _open_disk(path: str, split: Optional[str]) -> _Source:
  datasets = _require("datasets", f"reading the save_to_disk folder {path!r}")
  loaded = datasets.load_from_disk(path)
  label, split_filter = path, split
  if isinstance(loaded, datasets.DatasetDict):
    names = list(loaded)
    if split is None and len(names) != 1:
      raise ValueError(f"{path}: has splits {', '.join(names)}; pass split=")
    split = names[0] if split is None else split
    if split not in loaded:
      raise ValueError(f"{path}: has no split {split!r} (splits: {', '.join(names)})")
    loaded, label, split_filter = loaded[split], f"{path} [{split}]", None
  return _Source(label, path, loaded.data.schema, loaded.features.to_dict(), [_disk_part(loaded)],
                 split_filter)


def _parquet_part(pq: Any, path: str) -> _Part:
  def read(columns: list[str], indices: Optional[list[int]]) -> Any:
    table = pq.read_table(path, columns=columns)
    return table if indices is None else table.take(indices)
  return _Part(pq.ParquetFile(path).metadata.num_rows, read)


def _names_split(relative: str, split: str) -> bool:
  parts = relative.replace(os.sep, "/").split("/")
  stem = parts[-1]
  return split in parts[:-1] or stem.startswith(f"{split}-") or stem == f"{split}.parquet"


def _parquet_features(schema: Any) -> dict:
  raw = (schema.metadata or {}).get(b"huggingface")
  try:
    return dict(json.loads(raw)["info"]["features"]) if raw else {}
  except (ValueError, KeyError, TypeError):
    return {}


def _open_parquet(path: str, files: list[str], split: Optional[str]) -> _Source:
  pq = _require("pyarrow.parquet", f"reading the parquet data {path!r}")
  label, split_filter = path, split
  if split is not None and os.path.isdir(path):
    named = [f for f in files if _names_split(os.path.relpath(f, path), split)]
    if named:
      files, label, split_filter = named, f"{path} [{split}]", None
  schema = pq.read_schema(files[0])
  for f in files[1:]:
    if pq.read_schema(f).names != schema.names:
      raise ValueError(f"{f}: its columns {pq.read_schema(f).names} differ from {files[0]}'s "
                       f"{schema.names}")
  root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  return _Source(label, root, schema, _parquet_features(schema),
                 [_parquet_part(pq, f) for f in files], split_filter)


def _open(path: str, split: Optional[str]) -> _Source:
  if not os.path.exists(path):
    raise FileNotFoundError(f"dataset {path!r} does not exist")
  if os.path.isfile(path):
    if not path.endswith(".parquet"):
      raise ValueError(f"dataset {path!r}: expected a save_to_disk folder or a .parquet file")
    return _open_parquet(path, [path], split)
  if any(os.path.isfile(os.path.join(path, n)) for n in DISK_FILES):
    return _open_disk(path, split)
  if any(n.endswith(".arrow") for n in os.listdir(path)):
    raise FileNotFoundError(f"dataset folder {path!r} holds .arrow files but no state.json (a "
                            "save_to_disk folder has one beside its data files)")
  files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                 if n.endswith(".parquet"))
  if not files:
    raise FileNotFoundError(f"dataset folder {path!r} is not a save_to_disk folder (no "
                            f"{' or '.join(DISK_FILES)}) and holds no .parquet files")
  return _open_parquet(path, files, split)


# ------------------------------------------------------------------------------ columns


def _resolve_columns(task: str, given: Mapping[str, Optional[str]],
                     source: _Source) -> dict[str, Optional[str]]:
  """role -> column (None: the role is off)."""
  defaults = DEFAULT_COLUMNS[task]
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"columns: unknown role {unknown[0]!r} for task {task!r}; roles: "
                     f"{', '.join(defaults)}")
  present = source.columns
  resolved: dict[str, Optional[str]] = {}
  for role, candidates in defaults.items():
    if role in given:
      column = given[role]
      if column is None and role in REQUIRED[task]:
        raise ValueError(f"columns: role {role!r} is needed for task {task!r}")
      if column is not None and column not in present:
        raise ValueError(f"{source.label}: has no column {column!r} (columns: "
                         f"{', '.join(present)})")
    else:
      column = next((c for c in candidates if c in present), None)
      if column is None and role in REQUIRED[task]:
        raise ValueError(f"{source.label}: has no {role} column (looked for "
                         f"{', '.join(candidates)}; columns: {', '.join(present)}); pass "
                         f"columns={{{role!r}: ...}}")
    resolved[role] = column
  if task == "vqa" and resolved["answer"] is None and resolved["answers"] is None:
    raise ValueError(f"{source.label}: has neither an answers nor an answer column (columns: "
                     f"{', '.join(present)}); pass columns={{'answers': ...}}")
  return resolved


def _scalar_columns(source: _Source, used: set[str]) -> list[str]:
  pa = _require("pyarrow", "reading datasets")
  kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
           pa.types.is_floating, pa.types.is_boolean)
  return [f.name for f in source.schema
          if f.name not in used and any(kind(f.type) for kind in kinds)]


def _read_columns(source: _Source, columns: list[str]) -> dict[str, list]:
  """column -> its values over all rows (parts concatenated)."""
  values: dict[str, list] = {c: [] for c in columns}
  for part in source.parts:
    table = part.read(columns, None)
    for c in columns:
      values[c].extend(table.column(c).to_pylist())
  return values


def _read_images(source: _Source, column: str, rows: list[int]) -> dict[int, Any]:
  """row -> its image cell, reading each part's image column once."""
  cells, start = {}, 0
  wanted = sorted(rows)
  for part in source.parts:
    local = [r - start for r in wanted if start <= r < start + part.rows]
    if local:
      table = part.read([column], local)
      for r, cell in zip(local, table.column(column).to_pylist()):
        cells[r + start] = cell
    start += part.rows
  return cells


# ------------------------------------------------------------------------------ selection


def _split_rows(source: _Source, values: dict[str, list], split: Optional[str]) -> list[int]:
  n = sum(p.rows for p in source.parts)
  if source.split_filter is None:
    rows = list(range(n))
  elif SPLIT_COLUMN not in values:
    raise ValueError(f"{source.label}: cannot pick split {split!r}: no split files, no "
                     f"DatasetDict split and no {SPLIT_COLUMN!r} column; pass split=None")
  else:
    rows = [i for i, s in enumerate(values[SPLIT_COLUMN]) if s == source.split_filter]
    if not rows:
      present = sorted({str(s) for s in values[SPLIT_COLUMN]})
      raise ValueError(f"{source.label}: split {split!r} has no rows (splits present: "
                       f"{', '.join(present) or 'none'})")
  if not rows:
    raise ValueError(f"{source.label}: has no rows")
  return rows


@dataclasses.dataclass(frozen=True)
class _Selection:
  first: Optional[int]
  sample: Optional[int]
  classes: Optional[int]
  per_class: Optional[int]
  seed: int


def _select(rows: list[int], selection: _Selection, labels: Optional[list],
            label: str) -> list[int]:
  if selection.first is not None:
    return [rows[i] for i in first_rows(len(rows), selection.first)]
  if selection.sample is not None:
    return [rows[i] for i in sample_rows(len(rows), selection.sample, selection.seed, label)]
  if labels is None or (selection.classes is None and selection.per_class is None):
    return rows
  groups: dict[Any, list[int]] = {}
  for r in rows:
    groups.setdefault(labels[r], []).append(r)
  chosen = select_per_class(groups, selection.classes, selection.per_class, selection.seed, label)
  return [r for _, members in chosen for r in members]


def _check_selection(task: str, first, sample, classes, per_class, seed) -> _Selection:
  selection = _Selection(count_or_none(first, "first"), count_or_none(sample, "sample"),
                         count_or_none(classes, "classes"), count_or_none(per_class, "per_class"),
                         int(seed))
  given = [k for k in ("first", "sample") if getattr(selection, k) is not None]
  by_class = selection.classes is not None or selection.per_class is not None
  if by_class and task != "classification":
    raise ValueError(f"classes/per_class select by label: task 'classification' only, not "
                     f"{task!r}")
  if len(given) + by_class > 1:
    raise ValueError("give at most one of first=, sample= and classes=/per_class=")
  return selection


# ------------------------------------------------------------------------------ cells


def _image(cell: Any, row: int, column: str, source: _Source,
           image_dir: Optional[str]) -> ImageRef:
  where = f"{source.label}: row {row}"
  data, rel = None, None
  if isinstance(cell, dict):
    data, rel = cell.get("bytes"), cell.get("path")
  elif isinstance(cell, (bytes, bytearray)):
    data = bytes(cell)
  elif isinstance(cell, str):
    rel = cell
  if data is None:
    if not rel:
      raise ValueError(f"{where}: image column {column!r} holds no image (got "
                       f"{type(cell).__name__})")
    path = os.path.join(source.root, rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: image file {rel!r} does not exist (looked in "
                              f"{source.root})")
    return os.path.abspath(path)
  try:
    image = Image.open(io.BytesIO(data))
    kind = image.format or "PNG"
    image.load()
  except Exception as e:  # PIL raises several types for bad data
    raise ValueError(f"{where}: image column {column!r} does not decode as an image ({e})") from e
  if image_dir is None:
    return image
  ext = {"JPEG": "jpg"}.get(kind, kind.lower())
  path = os.path.abspath(os.path.join(image_dir, f"{row:08d}.{ext}"))
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)
  return path


def _texts(cell: Any, key: str, where: str, field: str) -> tuple[str, ...]:
  """A str, a list of str, or a list of {key: str} objects -> the stripped non-empty texts."""
  items = [cell] if isinstance(cell, str) else cell
  if not isinstance(items, list) or not items:
    raise ValueError(f"{where}: column {field!r} must be a str or a non-empty list, got "
                     f"{type(cell).__name__}")
  texts = []
  for j, item in enumerate(items):
    text = item.get(key) if isinstance(item, dict) else item
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{where}: column {field!r} item {j} must be a non-empty str or an object "
                       f"with a str {key!r}")
    texts.append(text.strip())
  return tuple(texts)


def _class_names(column: str, features: dict, given: Optional[Sequence[str]]) -> Optional[list]:
  if given is not None:
    return list(given)
  feature = features.get(column)
  names = feature.get("names") if isinstance(feature, dict) else None
  return list(names) if isinstance(names, list) and names else None


def _label(cell: Any, names: Optional[list], where: str, column: str) -> tuple:
  """(label, answer, answers) of a classification cell."""
  if isinstance(cell, str) and cell.strip():
    return cell, cell, (cell,)
  if not isinstance(cell, int) or isinstance(cell, bool):
    raise ValueError(f"{where}: column {column!r} must be an int or a str, got {cell!r}")
  if cell < 0:
    raise ValueError(f"{where}: label {cell} in column {column!r} (unlabelled row)")
  if names is None:
    return cell, None, ()
  if cell >= len(names):
    raise ValueError(f"{where}: label {cell} in column {column!r} but there are only "
                     f"{len(names)} class names")
  synonyms = split_names(str(names[cell])) or (str(names[cell]),)
  return cell, synonyms[0], synonyms


def _task_fields(task: str, cols: dict[str, Optional[str]], values: dict[str, list], row: int,
                 template: str, names: Optional[list], where: str) -> dict:
  """The `Example` fields of one row other than id, images and meta."""
  if task == "vqa":
    prompt, question = question_prompt(template, values[cols["question"]][row], where)
    answers = (_texts(values[cols["answers"]][row], "answer", where, cols["answers"])
               if cols["answers"] else ())
    if cols["answer"]:
      answer = _texts(values[cols["answer"]][row], "answer", where, cols["answer"])[0]
    else:
      answer = collections.Counter(answers).most_common(1)[0][0]
    return {"prompt": prompt, "question": question, "answer": answer,
            "answers": answers or (answer,)}
  if task == "caption":
    return {"prompt": template,
            "answers": _texts(values[cols["captions"]][row], "raw", where, cols["captions"])}
  label, answer, answers = _label(values[cols["label"]][row], names, where, cols["label"])
  return {"prompt": template, "label": label, "answer": answer, "answers": answers}


def _ids(rows: list[int], column: Optional[str], explicit: bool, values: dict[str, list],
         label: str) -> list[str]:
  if column is not None:
    ids = [str(values[column][r]) for r in rows]
    if len(set(ids)) == len(ids):
      return ids
    if explicit:
      repeated = next(i for i, c in collections.Counter(ids).items() if c > 1)
      raise ValueError(f"{label}: id column {column!r} repeats {repeated!r}; pass columns="
                       "{'id': None} to number the rows")
  return [str(r) for r in rows]


# ------------------------------------------------------------------------------ loader


def load_hf_dataset(path: str | os.PathLike, task: str, *, split: Optional[str] = None,
                    columns: Optional[Mapping[str, Optional[str]]] = None,
                    class_names: Optional[Sequence[str]] = None,
                    template: Optional[str] = None, first: Optional[int] = None,
                    sample: Optional[int] = None, classes: Optional[int] = None,
                    per_class: Optional[int] = None, seed: int = 42,
                    image_dir: Optional[str | os.PathLike] = None,
                    name: Optional[str] = None) -> NgDataset:
  """A `datasets` save_to_disk folder or parquet file(s) as `Example`s of `task` ("vqa",
  "caption", "classification"); see the module docstring. template: default the study's prompt
  for the task (`TEMPLATES`)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
  template = check_template(TEMPLATES[task] if template is None else template,
                            with_question=task == "vqa")
  selection = _check_selection(task, first, sample, classes, per_class, seed)
  path = os.fspath(path)
  source = _open(path, split)
  cols = _resolve_columns(task, dict(columns or {}), source)
  used = {c for c in cols.values() if c is not None}
  text_columns = [c for c in source.columns if c in used and c != cols["image"]]
  extra = _scalar_columns(source, used)
  wanted = text_columns + extra
  if source.split_filter is not None and SPLIT_COLUMN in source.columns:
    wanted += [SPLIT_COLUMN] if SPLIT_COLUMN not in wanted else []
  values = _read_columns(source, wanted)
  rows = _split_rows(source, values, split)
  labels = values[cols["label"]] if task == "classification" else None
  rows = _select(rows, selection, labels, source.label)
  ids = _ids(rows, cols["id"], "id" in (columns or {}), values, source.label)
  names = (_class_names(cols["label"], source.features, class_names)
           if labels is not None else None)
  if image_dir is not None:
    image_dir = os.fspath(image_dir)
    os.makedirs(image_dir, exist_ok=True)
  cells = _read_images(source, cols["image"], rows)
  examples = []
  for row, ex_id in zip(rows, ids):
    where = f"{source.label}: row {row}"
    meta = {c: values[c][row] for c in extra}
    meta["row"] = row
    if split is not None:
      meta["split"] = split
    image = _image(cells[row], row, cols["image"], source, image_dir)
    examples.append(Example(id=ex_id, images=(image,), meta=meta,
                            **_task_fields(task, cols, values, row, template, names, where)))
  stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  return NgDataset(name or (f"{stem}-{split}" if split else stem), examples)
