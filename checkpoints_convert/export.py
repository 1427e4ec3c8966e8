"""Our parameter trees -> a Hugging Face (transformers) checkpoint dir: the converter backwards.

  python -m checkpoints_convert.export --converted=DIR --out_dir=DIR [--base_dir=DIR]
      [--dtype=bfloat16] [--max_shard_bytes=N] [--overwrite]

Every tensor the converter's tables cover (`Family.tensor_sources`, the image side's sources) is
written from our parameters through each layout's inverse (`Layout.to_torch`), under the key the
table names (the base checkpoint's own names where it has them), so converting the export gives
back the same parameters bit for bit (float32). A transformers model can hold tensors no table
covers (Chameleon's VQ `post_quant_conv`, a tied output projection): with `base_dir` those are
copied unchanged from that checkpoint, so the export is complete; without it only the covered
tensors are written, and transformers initialises the others itself when it loads the dir (the
log lists the ones known to be missing).

The weights go to safetensors files of at most `max_shard_bytes` each: one `model.safetensors`,
or `model-0000i-of-0000n.safetensors` and the standard `model.safetensors.index.json`. Every
parameter and base tensor is checked (names, shapes) before anything is written. A shard's
tensors are made contiguous (and cast, and base tensors read) only while that shard is written,
so host memory holds the parameters and one shard. No torch: numpy and safetensors' numpy API
only; pickled weights (.bin, .pt) are never read.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
from typing import Callable, Optional

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from checkpoints_convert import llava_original, vila_u
from checkpoints_convert.convert import SIDE_FILES, _summarise
from narrowgate_jax import checkpoint
from narrowgate_jax.models.decoder import param_shapes
from narrowgate_jax.models.families import (FAMILIES, Family, flat_shapes, iter_layer_keys,
                                            state_from_params)
from narrowgate_jax.models.image_sides import IMAGE_PARAMS_DIR, IMAGE_SIDES

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
MAX_SHARD_BYTES = 2 * 2**30
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# safetensors' dtype names -> bytes per element (to plan shards from headers, before reading).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One checkpoint tensor to write: produced (`load`) only when its shard is written.

  Attributes:
    key: its checkpoint key.
    shape: its torch-layout shape.
    nbytes: its size as stored.
    load: () -> the contiguous array to store.
    origin: "params" (from our parameters) or "base" (copied from base_dir).
  """

  key: str
  shape: tuple[int, ...]
  nbytes: int
  load: Callable[[], np.ndarray]
  origin: str


# ------------------------------------------------------------------------------ what to write


def family_for(hf_config) -> Family:
  """The family whose tables describe `hf_config`'s checkpoint layout."""
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r} has no transformers checkpoint layout to export "
                     f"to; exportable: {', '.join(sorted(FAMILIES))}")
  return FAMILIES[model_type]


def _from_params(state: dict[str, np.ndarray], dtype: np.dtype) -> list[Tensor]:
  """Tensors of a torch-layout state (views of our params), cast to `dtype` when written."""
  return [Tensor(key, tuple(value.shape), int(np.prod(value.shape)) * dtype.itemsize,
                 lambda value=value: np.ascontiguousarray(value, dtype=dtype), "params")
          for key, value in state.items()]


def covered_tensors(params, hf_config, image_params=None, keys=None,
                    dtype: str = "float32") -> list[Tensor]:
  """Every tensor our tables write for `hf_config`, from `params` (and `image_params`).

  keys: the base checkpoint's keys, to pick among candidate names (None: the tables' first).
  Image sides the converter keeps in a fixed dtype (the VQ encoders: float32, as codes are an
  argmin) keep it; everything else is written in `dtype`.
  Raises KeyError naming a parameter the tables need that the trees lack, ValueError naming a
  parameter of the wrong shape or one no checkpoint tensor holds.
  """
  family = family_for(hf_config)
  config = family.decoder_config(hf_config)
  sources = family.tensor_sources(config, keys)
  state = state_from_params(sources, params, config.num_layers,
                            flat_shapes(param_shapes(config)))
  out = _from_params(state, DTYPES[dtype])
  side = IMAGE_SIDES[hf_config.model_type](hf_config, keys) if (
      hf_config.model_type in IMAGE_SIDES) else None
  if image_params is not None:
    if side is None:
      raise ValueError(f"image_params given, but a {hf_config.model_type!r} checkpoint has no "
                       "image side")
    image_state = state_from_params(side.sources, image_params, side.num_layers, side.shapes)
    out += _from_params(image_state, DTYPES[side.dtype or dtype])
  elif side is not None:
    count = sum(1 for s in side.sources for _ in iter_layer_keys(s, side.num_layers))
    log.warning("no image_params: the %s image side's %d tensors are not written from params "
                "(a base_dir's are copied)", side.kind, count)
  return out


class BaseCheckpoint:
  """The safetensors tensors of an HF checkpoint dir (single file or shards), read one at a time.

  Pickled weights are never read: a dir holding only those is refused.
  """

  def __init__(self, directory: str):
    self.directory = directory
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"base_dir {directory} holds no *.safetensors weights (pickled "
                              ".bin/.pt weights are not read)")
    self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # key -> (file, dtype, shape)
    for path in files:
      with safetensors.safe_open(path, framework="numpy") as f:
        for key in f.keys():
          piece = f.get_slice(key)
          self.entries[key] = (path, piece.get_dtype(), tuple(piece.get_shape()))

  def tensor(self, key: str) -> Tensor:
    path, dtype, shape = self.entries[key]
    if dtype not in _ITEMSIZE:
      raise ValueError(f"tensor {key!r} in {path} has dtype {dtype}, which cannot be copied")

    def load() -> np.ndarray:
      with safetensors.safe_open(path, framework="numpy") as f:
        return f.get_tensor(key)

    return Tensor(key, shape, int(np.prod(shape)) * _ITEMSIZE[dtype], load, "base")


def tied_keys(hf_config) -> set[str]:
  """The output projection's candidate keys when the config ties it to the embeddings (then
  transformers shares the embedding matrix, and a stored copy must not be written)."""
  family = family_for(hf_config)
  if not family.decoder_config(hf_config).tie_embeddings:
    return set()
  return set(family.lm_head_keys)


def with_base(covered: list[Tensor], base: BaseCheckpoint, hf_config) -> list[Tensor]:
  """`covered`, plus every tensor of `base` they do not hold (copied unchanged), minus a tied
  output projection. Raises ValueError if a covered tensor's shape differs from the base's (the
  base is a checkpoint of another config)."""
  ours = {t.key: t for t in covered}
  for key, (_, _, shape) in base.entries.items():
    if key in ours and ours[key].shape != shape:
      raise ValueError(f"base_dir tensor {key!r} has shape {shape}, but the parameters give "
                       f"{ours[key].shape}: base_dir holds a checkpoint of another config")
  skipped = tied_keys(hf_config) & set(base.entries)
  if skipped:
    log.info("not copied from base_dir (tied to the embeddings by the config): %s",
             sorted(skipped))
  return covered + [base.tensor(k) for k in base.entries if k not in ours and k not in skipped]


# ---------------------------------------------------------------------------------- writing


def _natural(key: str) -> list:
  """Sort key: numbers as numbers ("layers.10" after "layers.9"), so each shard holds whole
  consecutive layers, as transformers orders a state dict."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def plan_shards(tensors: list[Tensor], max_shard_bytes: int) -> list[list[Tensor]]:
  """Tensors in key order, cut into shards of at most `max_shard_bytes` (a larger tensor gets a
  shard of its own)."""
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes}; expected a positive size")
  shards: list[list[Tensor]] = [[]]
  size = 0
  for t in sorted(tensors, key=lambda t: _natural(t.key)):
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def write_weights(out_dir: str, tensors: list[Tensor], max_shard_bytes: int) -> list[str]:
  """Writes the safetensors file(s) (and the index when sharded); returns the file names."""
  shards = plan_shards(tensors, max_shard_bytes)
  names = ([WEIGHTS_NAME] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    arrays = {t.key: t.load() for t in shard}
    for t in shard:
      if arrays[t.key].shape != t.shape:  # a layout inverse and its torch_shape must agree
        raise AssertionError(f"{t.key}: produced {arrays[t.key].shape}, planned {t.shape}")
    # "pt": the tensors are in torch's layout; transformers refuses files without a format.
    safetensors.numpy.save_file(arrays, os.path.join(out_dir, name), metadata={"format": "pt"})
    del arrays  # before the next shard is made
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": {t.key: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  return names


def _prepare_out_dir(out_dir: str, overwrite: bool, *sources: Optional[str]) -> None:
  for source in sources:
    if source and os.path.realpath(source) == os.path.realpath(out_dir):
      raise ValueError(f"out_dir {out_dir} is also a directory read from; choose another")
  os.makedirs(out_dir, exist_ok=True)
  existing = sorted(glob.glob(os.path.join(out_dir, "*.safetensors")) +
                    glob.glob(os.path.join(out_dir, "*.safetensors.index.json")))
  if existing and not overwrite:
    raise FileExistsError(f"out_dir {out_dir} already holds weights "
                          f"({', '.join(os.path.basename(p) for p in existing)}); pass "
                          "overwrite=True (--overwrite) to replace them")
  for path in existing:  # stale shards would be read alongside the new ones
    os.remove(path)


def _write_config(out_dir: str, hf_config, dtype: str) -> None:
  """config.json with `dtype` set to the stored dtype (transformers' default load dtype), as
  save_pretrained sets it: at the top, and in sub-configs that already name one."""
  config = copy.deepcopy(hf_config)
  config.dtype = dtype
  for name in getattr(config, "sub_configs", {}):
    sub = getattr(config, name, None)
    if getattr(sub, "dtype", None) is not None:
      sub.dtype = dtype
  config.to_json_file(os.path.join(out_dir, "config.json"))


def _copy_side_files(source: Optional[str], out_dir: str) -> list[str]:
  if source is None:
    log.warning("neither tokenizer_dir nor base_dir: no tokenizer or processor files copied")
    return []
  copied = [n for n in SIDE_FILES if os.path.exists(os.path.join(source, n))]
  for name in copied:
    shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
  return copied


def export(out_dir: str, params, *, hf_config, image_params=None, base_dir: Optional[str] = None,
           tokenizer_dir: Optional[str] = None, dtype: str = "float32",
           max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> str:
  """Writes `params` (and `image_params`) as a transformers checkpoint dir; returns out_dir.

  params: our language-model tree (`decoder.param_shapes(config)` layout; numpy or jax arrays).
  hf_config: the transformers config; its family's tables name the keys, and it is written as
    config.json (with `dtype` set to the stored dtype).
  image_params: the image side's tree (VQ encoder, or vision tower + projector), when any.
  base_dir: an HF checkpoint dir of the same config: every tensor our tables do not cover is
    copied from it unchanged (and its key names are used), so the export is complete. Without
    it only covered tensors are written: transformers then initialises the rest itself when it
    loads the dir (a warning says so; `export_converted` names what the conversion left out).
  tokenizer_dir: where the tokenizer / processor files (convert.SIDE_FILES) are copied from
    (default: base_dir).
  dtype: stored dtype of the written parameters ("float32", "bfloat16", "float16"); VQ encoders
    stay float32. Tensors copied from base_dir keep theirs.
  max_shard_bytes: largest safetensors file; beyond it, shards and an index are written.
  overwrite: replace weights already in out_dir (otherwise FileExistsError).

  Raises KeyError naming a parameter the tables need that `params` lacks, ValueError naming a
  parameter whose shape differs from what the config implies (or from base_dir's tensor).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes}; expected a positive size")
  base = BaseCheckpoint(base_dir) if base_dir else None
  if base is not None:
    _check_base_config(base_dir, hf_config)
  keys = set(base.entries) if base is not None else None
  tensors = covered_tensors(params, hf_config, image_params, keys, dtype)
  if base is not None:
    tensors = with_base(tensors, base, hf_config)
  _prepare_out_dir(out_dir, overwrite, base_dir, tokenizer_dir)
  names = write_weights(out_dir, tensors, max_shard_bytes)
  _write_config(out_dir, hf_config, dtype)
  side_files = _copy_side_files(tokenizer_dir or base_dir, out_dir)
  written = [t.key for t in tensors if t.origin == "params"]
  copied = [t.key for t in tensors if t.origin == "base"]
  log.info("exported %d tensors from params and %d from base_dir into %s (%s); side files: %s",
           len(written), len(copied), out_dir, ", ".join(names), ", ".join(side_files) or "none")
  if copied:
    log.info("copied unchanged from %s: %s", base_dir, _summarise(copied))
  if base is None:
    log.warning("no base_dir: only the tensors our tables cover were written; transformers "
                "initialises any other tensor of the model when it loads %s", out_dir)
  return out_dir


def _check_base_config(base_dir: str, hf_config) -> None:
  """base_dir must be a transformers-layout checkpoint of the same model type: its tensors not
  named by our tables are copied as they are, which only makes sense under the same names."""
  path = os.path.join(base_dir, "config.json")
  if not os.path.exists(path):
    return
  raw = llava_original.read_raw_config(base_dir)
  if llava_original.is_original_llava(raw) or vila_u.is_vila_u(raw):
    raise ValueError(f"base_dir {base_dir} is in its authors' repository layout, not the "
                     "transformers one: its tensors cannot complete a transformers checkpoint")
  if raw.get("model_type") != hf_config.model_type:
    raise ValueError(f"base_dir {base_dir} holds a {raw.get('model_type')!r} checkpoint; the "
                     f"parameters are a {hf_config.model_type!r} model's")


# ----------------------------------------------------------------------- converted checkpoints


def read_hf_config(converted_dir: str):
  """The transformers config a converted checkpoint keeps in hf_config.json."""
  import transformers  # configs only; no model code is imported

  path = os.path.join(converted_dir, "hf_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{converted_dir} has no hf_config.json: converted by an older "
                            "version? Pass its transformers config to export() instead")
  with open(path) as f:
    fields = json.load(f)
  model_type = fields.pop("model_type", None)
  if model_type not in FAMILIES:
    raise ValueError(f"{path}: model_type {model_type!r} has no transformers checkpoint layout "
                     f"to export to; exportable: {', '.join(sorted(FAMILIES))}")
  return transformers.AutoConfig.for_model(model_type, **fields)


def export_converted(converted_dir: str, out_dir: str, base_dir: Optional[str] = None, *,
                     dtype: Optional[str] = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                     overwrite: bool = False) -> str:
  """A converted checkpoint dir (ours: narrowgate.json, params/, image_params/, hf_config.json,
  tokenizer files) -> a transformers checkpoint dir; returns out_dir. `dtype` defaults to the
  stored one; see `export` for the rest.

  Without base_dir, the tensors the conversion left out (narrowgate.json's
  `unconverted_tensors`) are missing from the export, and are listed in a warning.
  """
  if not checkpoint.is_converted(converted_dir):
    raise FileNotFoundError(f"{converted_dir} is not a converted checkpoint (no "
                            f"{checkpoint.META_FILE})")
  _, meta = checkpoint.read_meta(converted_dir)
  hf_config = read_hf_config(converted_dir)
  params = checkpoint.restore_params(converted_dir)
  image_params = None
  if meta.get("image_tokenizer"):
    image_params = checkpoint.restore_params(converted_dir, subdir=IMAGE_PARAMS_DIR)
  export(out_dir, params, hf_config=hf_config, image_params=image_params, base_dir=base_dir,
         tokenizer_dir=converted_dir, dtype=dtype or meta.get("dtype", "float32"),
         max_shard_bytes=max_shard_bytes, overwrite=overwrite)
  missing = meta.get("unconverted_tensors") or {}
  if missing and base_dir is None:
    log.warning("not in the export (the conversion left them out): %s; pass base_dir=%s to copy "
                "them", missing, meta.get("source", "<the source checkpoint>"))
  return out_dir


def main(argv):
  del argv
  export_converted(FLAGS.converted, FLAGS.out_dir, FLAGS.base_dir, dtype=FLAGS.dtype,
                   max_shard_bytes=FLAGS.max_shard_bytes, overwrite=FLAGS.overwrite)
  print(f"exported {FLAGS.converted} -> {FLAGS.out_dir}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("converted", None, "A converted checkpoint directory (narrowgate.json).")
  flags.DEFINE_string("out_dir", None, "Where to write the transformers checkpoint.")
  flags.DEFINE_string("base_dir", None, "An HF checkpoint dir of the same config whose tensors "
                      "our tables do not cover are copied unchanged.")
  flags.DEFINE_enum("dtype", None, list(DTYPES), "Stored dtype (default: the converted one).")
  flags.DEFINE_integer("max_shard_bytes", MAX_SHARD_BYTES, "Largest safetensors file.")
  flags.DEFINE_bool("overwrite", False, "Replace weights already in out_dir.")
  flags.mark_flags_as_required(["converted", "out_dir"])
  FLAGS = flags.FLAGS
  app.run(main)
