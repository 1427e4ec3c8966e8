"""Hugging Face checkpoint dir -> our parameter tree -> Orbax checkpoint dir.

  python -m checkpoints_convert.convert --hf_dir=DIR --out_dir=DIR [--dtype=bfloat16] [--allow_pickle]

The family is read from config.json. Conversion streams: it reads a block of a tensor's rows
(at most one 64 MiB chunk of our layout) and writes it straight into its place in the stacked array
on disk, so memory holds one block at a time and a checkpoint larger than RAM converts. Every key and shape is checked from the file headers before anything is written.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator, Optional

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from checkpoints_convert.safetensors_stream import CheckpointReader
from narrowgate_jax import checkpoint
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.decoder import param_shapes
from narrowgate_jax.models.families import Family, TensorSource, family_of, iter_layer_keys

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")


def _flat_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def plan_tensors(reader: CheckpointReader, family: Family,
                 config: DecoderConfig) -> list[tuple[TensorSource, Optional[int], str, tuple]]:
  """Every (source, layer, checkpoint key, our shape) to read, checked against the headers.

  Raises KeyError naming the first missing tensor, or ValueError naming a tensor whose shape
  differs from what the config implies (both shapes given).
  """
  shapes = _flat_shapes(config)
  plan = []
  for source in family.tensor_sources(config):
    ours = shapes[source.path]
    slice_shape = ours[1:] if source.per_layer else ours
    for layer, key in iter_layer_keys(source, config.num_layers):
      if key not in reader:
        raise KeyError(f"checkpoint {reader.directory} lacks tensor {key!r} "
                       f"(needed for parameter {source.path}"
                       f"{'' if layer is None else f', layer {layer}'})")
      expected = tuple(source.layout.torch_shape(slice_shape))
      found = reader.shape(key)
      if found != expected:
        raise ValueError(f"tensor {key!r} has shape {found} in the checkpoint, but the config "
                         f"({family.name}) implies {expected}")
      plan.append((source, layer, key, slice_shape))
  return plan


def chunk_plan(family: Family, config: DecoderConfig, dtype: np.dtype) -> dict[str, tuple]:
  """Zarr chunks of every parameter, split along the axis the checkpoint's rows fill."""
  shapes = _flat_shapes(config)
  return {s.path: checkpoint.chunk_shape(shapes[s.path], dtype.itemsize,
                                         split_axis=s.layout.row_axis + s.per_layer,
                                         stacked=s.per_layer)
          for s in family.tensor_sources(config)}


def iter_converted(reader: CheckpointReader, family: Family, config: DecoderConfig,
                   dtype: np.dtype, progress: bool = False
                   ) -> Iterator[tuple[str, Optional[int], tuple, np.ndarray]]:
  """Yields (parameter path, layer or None, index within it, block in our layout and `dtype`).

  A block is the rows of one checkpoint tensor that fill one chunk of our array (see
  `chunk_plan`), so memory holds one block, not one tensor, at a time.
  """
  plan = plan_tensors(reader, family, config)
  chunks = chunk_plan(family, config, dtype)
  for source, layer, key, shape in tqdm(plan, desc="converting", unit="tensor",
                                        disable=not progress):
    layout, axis = source.layout, source.layout.row_axis
    unit = layout.rows_per_index(shape)
    step = chunks[source.path][axis + source.per_layer]
    for start in range(0, shape[axis], step):
      stop = min(start + step, shape[axis])
      block_shape = shape[:axis] + (stop - start,) + shape[axis + 1:]
      index = (slice(None),) * axis + (slice(start, stop),)
      # One expression: the raw rows and the layout view are freed before the block is yielded.
      yield source.path, layer, index, np.ascontiguousarray(
          layout.to_ours(reader.read_rows(key, start * unit, stop * unit), block_shape),
          dtype=dtype)


def unused_keys(reader: CheckpointReader, family: Family, config: DecoderConfig) -> list[str]:
  used = {key for s in family.tensor_sources(config) for _, key in
          iter_layer_keys(s, config.num_layers)}
  return [k for k in reader.keys() if k not in used]


def _summarise(keys: list[str]) -> dict[str, int]:
  """Unused keys grouped by their first two dotted components, with counts."""
  groups: dict[str, int] = {}
  for k in keys:
    head = ".".join(k.split(".")[:2])
    groups[head] = groups.get(head, 0) + 1
  return groups


def convert(hf_dir: str, out_dir: str, dtype: str = "float32", allow_pickle: bool = False,
            progress: bool = True) -> str:
  """Converts an HF checkpoint dir; returns out_dir."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
  family, hf_config = family_of(hf_dir)
  config = family.decoder_config(hf_config)
  reader = CheckpointReader(hf_dir, allow_pickle=allow_pickle)
  plan_tensors(reader, family, config)  # fail on a bad checkpoint before writing anything
  os.makedirs(out_dir, exist_ok=True)
  writer = checkpoint.StreamingParamWriter(out_dir, _nested_shapes(config), DTYPES[dtype],
                                           chunk_plan(family, config, DTYPES[dtype]))
  for path, layer, index, block in iter_converted(reader, family, config, DTYPES[dtype],
                                                   progress):
    writer.write(path, block, layer, index)
    del block  # before the next block is read
  checkpoint.write_meta(out_dir, config, family=family.name, dtype=dtype,
                        source=os.path.abspath(hf_dir),
                        unconverted_tensors=_summarise(unused_keys(reader, family, config)))
  shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, "hf_config.json"))
  for name in SIDE_FILES:
    if os.path.exists(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
  return out_dir


def load_in_memory(hf_dir: str, dtype: str = "float32", allow_pickle: bool = False
                   ) -> tuple[DecoderConfig, dict]:
  """Converts an HF checkpoint dir into a nested dict of numpy arrays, without writing files."""
  family, hf_config = family_of(hf_dir)
  config = family.decoder_config(hf_config)
  reader = CheckpointReader(hf_dir, allow_pickle=allow_pickle)
  flat = {p: np.empty(s, DTYPES[dtype]) for p, s in _flat_shapes(config).items()}
  for path, layer, index, block in iter_converted(reader, family, config, DTYPES[dtype]):
    target = flat[path] if layer is None else flat[path][layer]
    target[index] = block
  return config, _nest(flat)


def _nest(flat: dict[str, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _nested_shapes(config: DecoderConfig) -> dict:
  return _nest(_flat_shapes(config))


def main(argv):
  del argv
  convert(FLAGS.hf_dir, FLAGS.out_dir, dtype=FLAGS.dtype, allow_pickle=FLAGS.allow_pickle)
  print(f"converted {FLAGS.hf_dir} -> {FLAGS.out_dir}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + weights).")
  flags.DEFINE_string("out_dir", None, "Where to write the converted checkpoint.")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored parameter dtype.")
  flags.DEFINE_bool("allow_pickle", False, "Read pickled .bin/.pt weights (runs their code).")
  flags.mark_flags_as_required(["hf_dir", "out_dir"])
  FLAGS = flags.FLAGS
  app.run(main)
