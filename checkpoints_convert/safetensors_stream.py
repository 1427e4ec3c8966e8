"""Reads a Hugging Face checkpoint one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor), then raw data. Reading the header gives every shape without touching the
data; a tensor is then read with one seek, so memory holds one tensor at a time however large
the checkpoint is.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class PickleRefused(ValueError):
  pass


def _read_header(path: str) -> dict:
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  header.pop("__metadata__", None)
  base = 8 + length
  return {k: (path, base + v["data_offsets"][0], v["dtype"], tuple(v["shape"]))
          for k, v in header.items()}


class CheckpointReader:
  """Every tensor of a checkpoint dir (single file, sharded with an index, or several files)."""

  def __init__(self, directory: str, allow_pickle: bool = False):
    self.directory = directory
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    self._pickled: dict[str, np.ndarray] = {}
    self._entries: dict[str, tuple] = {}
    if files:
      for path in files:
        self._entries.update(_read_header(path))
      return
    pickles = sorted(p for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(directory, pat)))
    if not pickles:
      raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    if not allow_pickle:
      names = ", ".join(os.path.basename(p) for p in pickles)
      raise PickleRefused(
          f"{directory} holds only pickled weights ({names}). Pickles can run arbitrary code when "
          "loaded: convert them to safetensors, or pass --allow_pickle (allow_pickle=True) if you "
          "trust the source.")
    self._load_pickles(pickles)

  def _load_pickles(self, paths: Iterable[str]) -> None:
    try:
      import torch
    except ImportError as e:
      raise ImportError("reading pickled weights needs torch; install it or use safetensors") from e
    for path in paths:
      state = torch.load(path, map_location="cpu", weights_only=True)
      for key, value in state.items():
        if value.dtype == torch.bfloat16:
          value = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
          value = value.numpy()
        self._pickled[key] = value

  def keys(self) -> list[str]:
    return sorted(set(self._entries) | set(self._pickled))

  def __contains__(self, key: str) -> bool:
    return key in self._entries or key in self._pickled

  def shape(self, key: str) -> tuple[int, ...]:
    if key in self._pickled:
      return tuple(self._pickled[key].shape)
    return self._entries[key][3]

  def read(self, key: str) -> np.ndarray:
    """The whole tensor."""
    return self.read_rows(key, 0, self.shape(key)[0])

  def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor (its first axis), reading only their bytes."""
    if key in self._pickled:
      return self._pickled[key][start:stop]
    path, offset, dtype, shape = self._entries[key]
    if dtype not in _DTYPES:
      raise ValueError(f"tensor {key!r} in {path} has unsupported dtype {dtype}")
    np_dtype = np.dtype(_DTYPES[dtype])
    row = int(np.prod(shape[1:], dtype=np.int64))
    with open(path, "rb") as f:
      f.seek(offset + start * row * np_dtype.itemsize)
      data = np.fromfile(f, dtype=np_dtype, count=(stop - start) * row)
    return data.reshape((stop - start,) + tuple(shape[1:]))
