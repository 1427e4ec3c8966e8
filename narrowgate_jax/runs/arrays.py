"""Arrays that belong to records but do not fit in a JSON line: residual vectors for the
neighbourhood overlap and the modality gap, per example and condition.

An experiment puts them in a record under ARRAYS ({name: array}); before the record is appended,
`store_arrays` writes the batch's arrays to one file, arrays/<digest>.npz, named by a digest of
the batch's record keys, and leaves in each record the file name and its row. The file is
written (atomically) before any of its records, so a run killed in between rewrites the same
file on restart and the records that point to it always find it. `load_arrays` reads one array
name back for a list of records, in their order.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

ARRAYS = "_arrays"  # the key an experiment puts arrays under
FILE, ROW = "arrays_file", "arrays_row"  # what a stored record keeps instead
DIRECTORY = "arrays"


def store_arrays(records: list[dict], workdir: str) -> list[dict]:
  """Moves every record's ARRAYS into one .npz under workdir/arrays; returns the records with
  FILE / ROW in their place (records without arrays are returned as they are)."""
  carrying = [r for r in records if ARRAYS in r]
  if not carrying:
    return records
  names = sorted(carrying[0][ARRAYS])
  for r in carrying:
    if sorted(r[ARRAYS]) != names:
      raise ValueError(f"records of one batch carry different arrays: {names} and "
                       f"{sorted(r[ARRAYS])}")
  keys = json.dumps([[r["example"], r["condition"]] for r in carrying])
  name = hashlib.sha256(keys.encode()).hexdigest()[:20] + ".npz"
  directory = os.path.join(workdir, DIRECTORY)
  os.makedirs(directory, exist_ok=True)
  stacked = {n: np.stack([np.asarray(r[ARRAYS][n]) for r in carrying]) for n in names}
  tmp = os.path.join(directory, f".{name}.tmp.npz")
  np.savez(tmp, **stacked)
  os.replace(tmp, os.path.join(directory, name))
  out, row = [], 0
  for r in records:
    if ARRAYS in r:
      r = {k: v for k, v in r.items() if k != ARRAYS} | {FILE: name, ROW: row}
      row += 1
    out.append(r)
  return out


def load_arrays(records: Sequence[dict], name: str, workdir: str) -> np.ndarray:
  """Array `name` of every record, stacked in the records' order: [len(records), ...]."""
  cache: dict[str, np.lib.npyio.NpzFile] = {}
  rows = []
  for r in records:
    if FILE not in r:
      raise ValueError(f"record {r['example']!r} / {r['condition']!r} has no stored arrays")
    if r[FILE] not in cache:
      cache[r[FILE]] = np.load(os.path.join(workdir, DIRECTORY, r[FILE]))
    rows.append(cache[r[FILE]][name][r[ROW]])
  return np.stack(rows) if rows else np.zeros((0,))
