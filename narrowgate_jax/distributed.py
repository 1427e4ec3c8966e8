"""One device mesh with a `data` and a `model` axis, and where every array lives on it.

Parameters carry logical axis names (`decoder.logical_axes`); `LOGICAL_RULES` maps those names to
mesh axes. An axis whose size the mesh axis does not divide is replicated instead (a 2-KV-head
model on a 4-way model axis keeps its K axis whole), so every checkpoint runs on every mesh.
Multi-host: call `jax.distributed.initialize()` before `make_mesh`; nothing else changes.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from narrowgate_jax.models.decoder import logical_axes

DATA, MODEL = "data", "model"
LOGICAL_RULES: dict[str, Optional[str]] = {
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "head_dim": None,
    "layers": None,
}


def make_mesh(data: int = -1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all); data=-1 takes what model leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"model={model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Logical names -> PartitionSpec, replicating axes the mesh axis does not divide."""
  used, spec = set(), []
  for name, size in zip(names, shape):
    axis = LOGICAL_RULES.get(name) if name else None
    if axis is None or axis in used or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return PartitionSpec(*spec)


def param_shardings(shapes: Mapping, mesh: Mesh) -> dict:
  """A NamedSharding for every parameter of a tree of arrays or ShapeDtypeStructs."""

  def one(path, leaf):
    names = logical_axes("/".join(k.key for k in path))
    return NamedSharding(mesh, spec_for(names, leaf.shape, mesh))

  return jax.tree_util.tree_map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shards axis `batch_axis` of an ndim-array over `data`, the rest replicated."""
  spec = [None] * ndim
  spec[batch_axis] = DATA
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree, mesh: Mesh, batch_axis: int = 0):
  """Places every array of `tree` with its batch axis over `data` (replicated if it won't divide)."""
  data_size = mesh.shape[DATA]

  def place(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim <= batch_axis or x.shape[batch_axis] % data_size:
      return jax.device_put(x, replicated(mesh))
    return jax.device_put(x, batch_sharding(mesh, x.ndim, batch_axis))

  return jax.tree.map(place, tree)
