"""Per-example results of a run: an append-only JSON-lines file that survives being killed at any
moment, and the JSON conversion every file a run writes goes through.

Each record is one flat dict on one line, identified by its key fields (by default
("example", "condition")). Why a killed and restarted run ends with every record exactly once:

  - Records are keyed, and `append` never writes a key that is already stored (or repeated within
    the call), so no duplicate can ever reach the file.
  - One append is one os.write of whole lines, then fsync. A kill can only leave a prefix of that
    write: complete lines, which are kept, and at most one torn last line, which `RecordStore`
    cuts off when the file is next opened (before anything else is appended).
  - A restarted run asks `missing(example, conditions)` and recomputes (deterministically) every
    example with a record missing, appending only the missing keys. So records lost with a torn
    write are written again, and records already stored are not.

One process writes a store at a time (on several hosts, only process 0).
"""

from __future__ import annotations

import json
import os
from typing import Any, Hashable, Iterator, Sequence

import numpy as np

DEFAULT_KEY_FIELDS = ("example", "condition")


def to_jsonable(value: Any, field: str = "value") -> Any:
  """`value` with numpy (or any array-like: jax) scalars and arrays turned into Python numbers and
  lists, tuples into lists; raises TypeError naming `field` (dotted / indexed inside containers)
  for anything JSON cannot hold."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return to_jsonable(value.item(), field)
  if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
    return to_jsonable(np.asarray(value).tolist(), field)
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v, f"{field}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise TypeError(f"{field}: key {k!r} is a {type(k).__name__}; JSON keys must be strings")
      out[k] = to_jsonable(v, f"{field}.{k}")
    return out
  raise TypeError(f"{field}: a {type(value).__name__} is not JSON-serialisable "
                  "(convert it to a number, string, list or numpy array)")


def _key(record: dict, key_fields: Sequence[str], where: str) -> tuple:
  """The record's key: the tuple of its key fields' JSON values."""
  key = []
  for name in key_fields:
    if name not in record:
      raise ValueError(f"{where}: no key field {name!r} (key fields: {tuple(key_fields)})")
    value = record[name]
    if not isinstance(value, Hashable):
      raise ValueError(f"{where}: key field {name!r} is a {type(value).__name__}; "
                       "key fields must be strings or numbers")
    key.append(value)
  return tuple(key)


def _lines(path: str) -> Iterator[tuple[int, int, bytes]]:
  """(line number from 1, byte offset just past the line, line bytes with its newline) of every
  line of the file, the last one possibly without a newline."""
  end = 0
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      end += len(line)
      yield number, end, line


def fsync_dir(directory: str) -> None:
  # Makes a file's creation (or replacement) durable, not just its contents.
  fd = os.open(directory or ".", os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class RecordStore:
  """An append-only JSON-lines file of keyed records (see the module docstring).

  Opening reads every complete line and cuts off a torn last line (no trailing newline, or not
  valid JSON); any other unreadable line, or one without a key field, is an error naming it.
  Only the keys stay in memory; `records()` reads the file again.
  """

  def __init__(self, path: str, key_fields: Sequence[str] = DEFAULT_KEY_FIELDS):
    if not key_fields:
      raise ValueError(f"{path}: a record store needs at least one key field")
    self.path = path
    self.key_fields = tuple(key_fields)
    self._keys: set[tuple] = set()
    if not os.path.exists(path):
      os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
      fsync_dir(os.path.dirname(path))
    self._load()

  def _load(self) -> None:
    good_end = 0  # byte offset just past the last complete, valid line
    first_line = {}
    bad = None  # an unreadable complete line: a torn write only if nothing follows it
    for number, end, line in _lines(self.path):
      if bad is not None:
        raise ValueError(bad)
      if not line.endswith(b"\n"):
        break  # the last line, torn by a kill in the middle of a write: cut below
      where = f"{self.path} line {number}"
      try:
        record = json.loads(line)
      except ValueError as e:
        bad = f"{where}: not valid JSON ({e})"
        continue
      if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
      key = _key(record, self.key_fields, where)
      if key in first_line:
        # `append` cannot write one, so the file was edited or written by two runs at once.
        raise ValueError(f"{where}: duplicate key {key} (first at line {first_line[key]})")
      first_line[key] = number
      good_end = end
    self._keys = set(first_line)
    if good_end < os.path.getsize(self.path):
      with open(self.path, "r+b") as f:
        f.truncate(good_end)
        f.flush()
        os.fsync(f.fileno())

  def keys(self) -> set[tuple]:
    """Every stored key (a copy)."""
    return set(self._keys)

  def __contains__(self, key: Any) -> bool:
    key = tuple(to_jsonable(list(key) if isinstance(key, (tuple, list)) else [key], "key"))
    return key in self._keys

  def __len__(self) -> int:
    return len(self._keys)

  def records(self) -> list[dict]:
    """Every stored record, in file order."""
    return [json.loads(line) for _, _, line in _lines(self.path)]

  def missing(self, example_id: Any, conditions: Sequence[Any]) -> list:
    """The conditions (in the given order) with no record yet for `example_id`: what a restarted
    run still has to compute for that example. Needs two key fields (example, condition)."""
    if len(self.key_fields) != 2:
      raise ValueError(f"{self.path}: missing() needs two key fields (example, condition), "
                       f"not {self.key_fields}")
    example_id = to_jsonable(example_id, self.key_fields[0])
    return [c for c in conditions
            if (example_id, to_jsonable(c, self.key_fields[1])) not in self._keys]

  def append(self, records: Sequence[dict]) -> int:
    """Writes the records whose key is neither stored nor repeated earlier in `records`, in one
    write of whole lines followed by fsync. Returns how many were written."""
    keys, lines = [], []
    seen = set()
    for i, record in enumerate(records):
      if not isinstance(record, dict):
        raise TypeError(f"{self.path}: record {i} of the append is a {type(record).__name__}, "
                        "not a dict")
      record = {name: to_jsonable(value, f"record {i} field {name!r}")
                for name, value in record.items()}
      key = _key(record, self.key_fields, f"{self.path}: record {i} of the append")
      if key in self._keys or key in seen:
        continue
      seen.add(key)
      keys.append(key)
      lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    if not lines:
      return 0
    _append_bytes(self.path, "".join(lines).encode("utf-8"))
    self._keys.update(keys)
    return len(keys)


def _append_bytes(path: str, data: bytes) -> None:
  """Appends `data` durably. One os.write, looping only if the kernel writes less (huge data); if
  writing fails, the file is cut back to its old size so no torn line stays before later ones."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND)
  try:
    start = os.fstat(fd).st_size
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      os.fsync(fd)
    except BaseException:
      os.ftruncate(fd, start)
      raise
  finally:
    os.close(fd)
