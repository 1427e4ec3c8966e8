"""Converted checkpoints on disk: an Orbax PyTree checkpoint of the parameters, with the model
config and the tokenizer files beside it.

  <dir>/narrowgate.json   {"decoder": DecoderConfig, "family": ..., "dtype": ..., "source": ...}
  <dir>/params/           Orbax checkpoint (zarr arrays, one per parameter; stacked layers [L, ...])
  <dir>/hf_config.json, tokenizer files   copied from the source checkpoint

Parameters can be written without ever holding a stacked array in memory: `StreamingParamWriter`
lets Orbax write the tree's metadata for a skeleton, then fills each array through tensorstore,
one block (at most one zarr chunk of one layer) at a time. Orbax restores the result like any checkpoint of its
own, onto any sharding.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from narrowgate_jax.models.config import DecoderConfig

META_FILE = "narrowgate.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 64 * 2**20  # largest zarr chunk: bounds the memory a write or a sharded read needs


def is_converted(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, META_FILE))


def write_meta(directory: str, config: DecoderConfig, **extra: Any) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, META_FILE), "w") as f:
    json.dump({"decoder": config.to_dict(), **extra}, f, indent=2, sort_keys=True)


def read_meta(directory: str) -> tuple[DecoderConfig, dict]:
  with open(os.path.join(directory, META_FILE)) as f:
    meta = json.load(f)
  return DecoderConfig.from_dict(meta.pop("decoder")), meta


def read_processor_config(directory: str) -> dict:
  """preprocessor_config.json (the image processor's settings), with processor_config.json (the
  processor's own: Pixtral's patch size and image tokens) under "processor" when present; {}
  when there is neither."""
  def read(name: str) -> Optional[dict]:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  out = read("preprocessor_config.json") or {}
  processor = read("processor_config.json")
  if processor is not None:
    out["processor"] = processor
  return out


def _checkpointer() -> ocp.Checkpointer:
  # One zarr array per parameter (no OCDBT), so each array can be filled in place after Orbax has
  # written the tree metadata.
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))


def save_params(directory: str, params: Mapping, subdir: str = PARAMS_DIR) -> None:
  """Writes an in-memory parameter tree to <directory>/<subdir>."""
  path = os.path.abspath(os.path.join(directory, subdir))
  _checkpointer().save(path, args=ocp.args.PyTreeSave(jax.tree.map(np.asarray, params)),
                       force=True)


def restore_params(directory: str, shardings: Optional[Mapping] = None,
                   subdir: str = PARAMS_DIR) -> dict:
  """Reads <directory>/<subdir>; each array lands on its sharding (default: the first device)."""
  path = os.path.abspath(os.path.join(directory, subdir))
  checkpointer = _checkpointer()
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    structure = checkpointer.metadata(path).item_metadata.tree
    shardings = jax.tree.map(lambda _: device, structure)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def chunk_shape(shape: tuple[int, ...], itemsize: int, split_axis: int,
                stacked: bool) -> tuple[int, ...]:
  """Zarr chunks of an array: one layer per chunk along a stacked axis, then `split_axis` halved
  (then the largest axis) until a chunk holds at most CHUNK_BYTES.

  Writers fill whole chunks by writing blocks along `split_axis`, so no chunk is read back and
  rewritten; readers of a shard read only the chunks it overlaps.
  """
  chunks = list(shape)
  if stacked and chunks:
    chunks[0] = 1
  while int(np.prod(chunks)) * itemsize > CHUNK_BYTES:
    axis = split_axis if chunks[split_axis] > 1 else int(np.argmax(chunks))
    chunks[axis] = (chunks[axis] + 1) // 2
  return tuple(chunks)


def _zarr_dtype(dtype: np.dtype) -> str:
  return "bfloat16" if dtype.name == "bfloat16" else dtype.str


class StreamingParamWriter:
  """Writes a parameter tree block by block, never holding a whole array.

  shapes: nested dict of parameter path -> shape (the layout of `decoder.param_shapes`).
  chunks: flat dict of "a/b/c" path -> zarr chunk shape (see `chunk_shape`).
  Every array is created up front; `write` stores one block.
  """

  def __init__(self, directory: str, shapes: Mapping, dtype: np.dtype,
               chunks: Mapping[str, tuple[int, ...]], subdir: str = PARAMS_DIR):
    self.path = os.path.abspath(os.path.join(directory, subdir))
    self.dtype = np.dtype(dtype)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    flat = {"/".join(k.key for k in key): v
            for key, v in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]}
    skeleton = jax.tree.map(lambda _: np.zeros((1,), self.dtype), shapes, is_leaf=is_shape)
    _checkpointer().save(self.path, args=ocp.args.PyTreeSave(skeleton), force=True)
    self._arrays = {p: self._create(p, shape, chunks[p]) for p, shape in flat.items()}

  def _create(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...]):
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(self.path, path.replace("/", "."))},
        "metadata": {"shape": list(shape), "dtype": _zarr_dtype(self.dtype),
                     "chunks": list(chunks), "compressor": {"id": "zstd", "level": 1}},
    }
    return ts.open(spec, create=True, delete_existing=True).result()

  def write(self, path: str, value: np.ndarray, layer: Optional[int] = None,
            index: tuple = ()) -> None:
    """Stores `value` at [layer][index] of parameter `path` (layer None: not stacked)."""
    target = self._arrays[path] if layer is None else self._arrays[path][layer]
    value = np.asarray(value, dtype=self.dtype)
    # The write completes before this returns, so tensorstore may read `value` in place.
    target[index].write(value, can_reference_source_data_indefinitely=True).result()
