"""Hugging Face checkpoint dir -> our parameter tree -> Orbax checkpoint dir.

  python -m checkpoints_convert.convert --hf_dir=DIR --out_dir=DIR [--dtype=bfloat16] [--allow_pickle]

The family is read from config.json. Conversion streams: it reads a block of a tensor's rows
(at most one 64 MiB chunk of our layout) and writes it straight into its place in the stacked array
on disk, so memory holds one block at a time and a checkpoint larger than RAM converts. Every key
and shape is checked from the file headers before anything is written. Native VLMs (Chameleon,
Emu3) also get their VQ image tokenizer's encoder, in float32, under image_params/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterator, Optional

import ml_dtypes
import numpy as np
from tqdm import tqdm

from checkpoints_convert import llava_original, vila_u
from checkpoints_convert.safetensors_stream import CheckpointReader
from narrowgate_jax import checkpoint
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.decoder import param_shapes
from narrowgate_jax.models.families import (Family, TensorSource, family_of, flat_shapes,
                                            iter_layer_keys)
from narrowgate_jax.models.image_sides import IMAGE_PARAMS_DIR, IMAGE_SIDES

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class ParamTree:
  """One parameter tree to read from a checkpoint and where it goes.

  Attributes:
    subdir: its directory in the converted checkpoint ("params", "image_params").
    sources: every checkpoint tensor it reads.
    shapes: "a/b/c" parameter path -> full shape (stacked layers first).
    num_layers: the depth of per-layer sources.
    dtype: the stored dtype.
  """

  subdir: str
  sources: tuple[TensorSource, ...]
  shapes: dict
  num_layers: int
  dtype: np.dtype

  def chunks(self) -> dict[str, tuple]:
    """Zarr chunks of every parameter, split along the axis the checkpoint's rows fill."""
    return {s.path: checkpoint.chunk_shape(self.shapes[s.path], self.dtype.itemsize,
                                           split_axis=s.layout.row_axis + s.per_layer,
                                           stacked=s.per_layer) for s in self.sources}

  def keys(self) -> set[str]:
    return {key for s in self.sources for _, key in iter_layer_keys(s, self.num_layers)}


def lm_tree(family: Family, config: DecoderConfig, dtype: np.dtype,
            keys: Optional[set] = None) -> ParamTree:
  return ParamTree(checkpoint.PARAMS_DIR, tuple(family.tensor_sources(config, keys)),
                   flat_shapes(param_shapes(config)), config.num_layers, dtype)


def image_tree(side, dtype: np.dtype) -> ParamTree:
  """The image side's tree, stored in its own dtype (VQ: float32) or the language model's."""
  return ParamTree(IMAGE_PARAMS_DIR, side.sources, side.shapes, side.num_layers,
                   DTYPES[side.dtype] if side.dtype else dtype)


def read_checkpoint(hf_dir: str, dtype: str, allow_pickle: bool):
  """(family, transformers config, DecoderConfig, image side or None, reader, trees), validated:
  every key and shape of every tree is checked before anything is read or written."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
  raw = llava_original.read_raw_config(hf_dir)
  reader_class = CheckpointReader
  if vila_u.is_vila_u(raw):  # llm/, vision_tower/, mm_projector/ read as one state dict
    hf_config, family = vila_u.equivalent_config(hf_dir, raw), vila_u.FAMILY
    reader_class = vila_u.ComponentReader
  elif llava_original.is_original_llava(raw):
    hf_config = llava_original.equivalent_config(hf_dir, raw)
    family = llava_original.family(hf_config)
  else:
    family, hf_config = family_of(hf_dir)
  config = family.decoder_config(hf_config)
  reader = reader_class(hf_dir, allow_pickle=allow_pickle)
  keys = set(reader.keys())
  side = None
  if hf_config.model_type in IMAGE_SIDES:
    side = IMAGE_SIDES[hf_config.model_type](hf_config, keys)
  trees = [lm_tree(family, config, DTYPES[dtype], keys)]
  if side:
    trees.append(image_tree(side, DTYPES[dtype]))
  for tree in trees:
    plan_tensors(reader, tree, family.name)
  return family, hf_config, config, side, reader, trees


def plan_tensors(reader: CheckpointReader, tree: ParamTree,
                 family: str) -> list[tuple[TensorSource, Optional[int], str, tuple]]:
  """Every (source, layer, checkpoint key, our shape) to read, checked against the headers.

  Raises KeyError naming the first missing tensor, or ValueError naming a tensor whose shape
  differs from what the config implies (both shapes given).
  """
  plan = []
  for source in tree.sources:
    ours = tree.shapes[source.path]
    slice_shape = ours[1:] if source.per_layer else ours
    for layer, key in iter_layer_keys(source, tree.num_layers):
      if key not in reader:
        raise KeyError(f"checkpoint {reader.directory} lacks tensor {key!r} "
                       f"(needed for parameter {source.path}"
                       f"{'' if layer is None else f', layer {layer}'})")
      expected = tuple(source.layout.torch_shape(slice_shape))
      found = reader.shape(key)
      if found != expected:
        raise ValueError(f"tensor {key!r} has shape {found} in the checkpoint, but the config "
                         f"({family}) implies {expected}")
      plan.append((source, layer, key, slice_shape))
  return plan


def iter_converted(reader: CheckpointReader, tree: ParamTree, progress: bool = False,
                   family: str = ""
                   ) -> Iterator[tuple[str, Optional[int], tuple, np.ndarray]]:
  """Yields (parameter path, layer or None, index within it, block in our layout and dtype).

  A block is the rows of one checkpoint tensor that fill one chunk of our array (see
  `ParamTree.chunks`), so memory holds one block, not one tensor, at a time.
  """
  plan = plan_tensors(reader, tree, family)
  chunks = tree.chunks()
  for source, layer, key, shape in tqdm(plan, desc=f"converting {tree.subdir}", unit="tensor",
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
          dtype=tree.dtype)


def _summarise(keys: list[str]) -> dict[str, int]:
  """Unused keys grouped by their first three dotted components, with counts."""
  groups: dict[str, int] = {}
  for k in keys:
    head = ".".join(k.split(".")[:3])
    groups[head] = groups.get(head, 0) + 1
  return groups


def convert(hf_dir: str, out_dir: str, dtype: str = "float32", allow_pickle: bool = False,
            progress: bool = True) -> str:
  """Converts an HF checkpoint dir; returns out_dir."""
  family, hf_config, config, side, reader, trees = read_checkpoint(hf_dir, dtype, allow_pickle)
  os.makedirs(out_dir, exist_ok=True)
  for tree in trees:
    writer = checkpoint.StreamingParamWriter(out_dir, _nest(tree.shapes), tree.dtype,
                                             tree.chunks(), subdir=tree.subdir)
    for path, layer, index, block in iter_converted(reader, tree, progress, family.name):
      writer.write(path, block, layer, index)
      del block  # before the next block is read
  used = set().union(*(tree.keys() for tree in trees))
  checkpoint.write_meta(out_dir, config, family=family.name, dtype=dtype,
                        image_tokenizer=side.kind if side else None,
                        source=os.path.abspath(hf_dir),
                        unconverted_tensors=_summarise([k for k in reader.keys() if k not in used]))
  for name in SIDE_FILES:
    if os.path.exists(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
  raw = llava_original.read_raw_config(hf_dir)
  if vila_u.is_vila_u(raw):  # its equivalent config, tokenizer from llm/, chat template
    vila_u.write_side_files(hf_dir, out_dir, hf_config)
  elif llava_original.is_original_llava(raw):
    # Written as its transformers equivalent, so loading needs no knowledge of the layout.
    hf_config.to_json_file(os.path.join(out_dir, "hf_config.json"))
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
      json.dump(processor_config(hf_dir, hf_config), f, indent=2)
  else:
    shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, "hf_config.json"))
  return out_dir


def processor_config(hf_dir: str, hf_config) -> dict:
  """The checkpoint's preprocessor_config.json; for the original LLaVA layout, which has none,
  the CLIP preprocessing its repository applies."""
  found = checkpoint.read_processor_config(hf_dir)
  if found:
    return found
  raw = llava_original.read_raw_config(hf_dir)
  if vila_u.is_vila_u(raw):
    return vila_u.processor_config(hf_dir, hf_config)
  if llava_original.is_original_llava(raw):
    return llava_original.processor_config(hf_config, raw)
  return {}


def load_in_memory(hf_dir: str, dtype: str = "float32", allow_pickle: bool = False):
  """Converts an HF checkpoint dir in memory, without writing files.

  Returns (DecoderConfig, LM params, image params or None, the transformers config), the trees
  as nested dicts of numpy arrays.
  """
  family, hf_config, config, side, reader, trees = read_checkpoint(hf_dir, dtype, allow_pickle)
  out = []
  for tree in trees:
    flat = {p: np.empty(s, tree.dtype) for p, s in tree.shapes.items()}
    for path, layer, index, block in iter_converted(reader, tree, family=family.name):
      target = flat[path] if layer is None else flat[path][layer]
      target[index] = block
    out.append(_nest(flat))
  return config, out[0], out[1] if side else None, hf_config


def _nest(flat: dict[str, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


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
