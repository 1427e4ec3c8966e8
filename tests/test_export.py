"""Our parameters back in the transformers checkpoint layout (`checkpoints_convert.export`).

Tiny Llama, Qwen2 (tied embeddings, q/k/v biases), Chameleon (with its VQ encoder) and LLaVA
(CLIP tower + projector + Llama) models are built with transformers in code and saved with
save_pretrained. Each is converted in memory, every parameter is moved by seeded noise (so an
export that merely copied the source files would fail), and exported. The checks:

  (a) transformers' `from_pretrained(export)` gives the logits of our forward with the perturbed
      parameters (prompts with images), within 1e-4 relative;
  (b) converting the export gives back the perturbed parameters bit for bit (a sharded export
      and a bfloat16 one too);
  (c) with base_dir, the export is complete (transformers misses no tensor) and the tensors our
      tables do not cover are byte-identical to the base's;
  (d) export_converted on a converted dir reproduces the source checkpoint (also for Emu3, and
      through the CLI with torch unimportable);
  (e) bad input is refused naming the problem;
  (f) every layout's `to_torch` undoes `to_ours`, whole and a block of rows at a time.

Expected values come from transformers (its model and the files save_pretrained wrote), never
from the export code.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import narrowgate_jax as ng
import reference as R
import test_native as NA
import test_nonnative as NN
from checkpoints_convert import convert, export
from narrowgate_jax.models.families import HEAD_BIAS, HEADS_IN, HEADS_OUT, LINEAR, SAME
from narrowgate_jax.models.vq_common import CONV2D, CONV3D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
NOISE = 0.05  # of each parameter's spread: far above the tolerance, small enough to keep VQ codes
FLOAT_MIN = np.finfo(np.float32).min


# ------------------------------------------------------------------------------------- helpers


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): np.asarray(leaf) for path, leaf in leaves}


def _perturb(tree, seed: int) -> dict:
  """Every leaf plus seeded Gaussian noise of NOISE times its spread (1 where it has none)."""
  rng = np.random.default_rng(seed)
  flat = _flat(tree)
  out = {}
  for path in sorted(flat):
    x = flat[path]
    scale = NOISE * (float(np.std(x)) or 1.0)
    out[path] = (x + scale * rng.standard_normal(x.shape)).astype(np.float32)
  return convert._nest(out)


def _tensors(directory) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint dir's safetensors files (read with safetensors itself)."""
  out = {}
  for path in glob.glob(os.path.join(str(directory), "*.safetensors")):
    out.update(safetensors.numpy.load_file(path))
  return out


def _assert_same_bits(ours: dict, theirs: dict, what: str) -> None:
  assert sorted(ours) == sorted(theirs), what
  for key in ours:
    a, b = np.asarray(ours[key]), np.asarray(theirs[key])
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {key}"
    assert a.tobytes() == b.tobytes(), f"{what}: {key} differs"


# ------------------------------------------------------------------------------------ families


def _text(config):
  def inputs(vlm):
    batch = vlm.prepare(token_ids=R.two_prompts(config.vocab_size))
    ids, mask, pos = R.torch_inputs(batch)
    return batch, dict(input_ids=ids, attention_mask=mask, position_ids=pos)

  return SimpleNamespace(config=config, save=lambda model, d: None, inputs=inputs)


def _chameleon():
  config, tokenizer, image_processor, _, call = NA._chameleon(False)

  def save(model, d):
    # Codebook entries from the encoder's own latents, so every code is a decisive argmin.
    _codebook_from_latents(model, call)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    image_processor.save_pretrained(d)

  def inputs(vlm):
    batch = vlm.prepare(images=NA._images(), prompts=NA.PROMPTS)
    theirs = dict(call(NA._images(), NA.PROMPTS))
    theirs["position_ids"] = torch.as_tensor(np.asarray(batch.positions), dtype=torch.long)
    return batch, theirs

  tokenizer.padding_side = "left"
  return SimpleNamespace(config=config, save=save, inputs=inputs)


def _codebook_from_latents(model, call):
  NA._codebook_from_latents(model, call(NA._images(), NA.PROMPTS),
                            model.model.vqmodel.quantize.embedding.weight.shape[0])


def _llava():
  config, tokenizer, image_processor, _ = NN._llava()
  tokenizer.padding_side = "left"

  def save(model, d):
    tokenizer.save_pretrained(d)
    image_processor.save_pretrained(d)

  def inputs(vlm):
    images = NN._images()
    batch = vlm.prepare(images=images, prompts=NN.PROMPTS)
    ids = np.where(np.asarray(batch.feature_mask), config.image_token_id,
                   np.asarray(batch.input_ids))
    theirs = NN._torch_pixels("llava", image_processor, images)
    theirs.update(input_ids=torch.as_tensor(ids, dtype=torch.long),
                  attention_mask=torch.as_tensor(np.asarray(batch.attention_mask)),
                  position_ids=torch.as_tensor(np.asarray(batch.positions), dtype=torch.long))
    return batch, theirs

  return SimpleNamespace(config=config, save=save, inputs=inputs)


FAMILIES = {"llama": lambda: _text(R.tiny_llama()), "qwen2": lambda: _text(R.tiny_qwen2()),
            "chameleon": _chameleon, "llava": _llava}
# A sharded export for one family (a few kB per shard), to check the index as transformers reads it.
SHARD_BYTES = {"llama": 40_000}


def _torch_class(config):
  return R._MODEL_CLASSES.get(type(config), transformers.AutoModelForCausalLM)


def _from_pretrained(config, directory, **kw):
  """The transformers model of an export, in float32 (with the loading info when asked for)."""
  return _torch_class(config).from_pretrained(str(directory), dtype=torch.float32,
                                              attn_implementation="eager", **kw)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tmp_path_factory):
  """A family's saved checkpoint, its in-memory conversion with perturbed parameters, and the
  export of those (no base_dir)."""
  spec = FAMILIES[request.param]()
  root = tmp_path_factory.mktemp(f"export_{request.param}")
  hf_dir = root / "hf"
  original = R.build(spec.config, hf_dir)
  spec.save(original, hf_dir)
  _, params, image_params, hf_config = convert.load_in_memory(str(hf_dir))
  params = _perturb(params, seed=1)
  image_params = None if image_params is None else _perturb(image_params, seed=2)
  out_dir = export.export(str(root / "out"), params, hf_config=hf_config,
                          image_params=image_params, tokenizer_dir=str(hf_dir),
                          max_shard_bytes=SHARD_BYTES.get(request.param, export.MAX_SHARD_BYTES))
  return SimpleNamespace(name=request.param, spec=spec, hf_dir=hf_dir,
                         original=original, params=params, image_params=image_params,
                         hf_config=hf_config, out_dir=out_dir)


def _ours_and_theirs(case, model):
  """(our logits, transformers' logits, mask of the entries to compare, transformers' inputs) on
  the family's prompts; ours from the original dir loaded with the perturbed parameters."""
  vlm = ng.load(str(case.hf_dir))
  vlm.params = jax.tree.map(jnp.asarray, case.params)
  if case.image_params is not None:
    vlm.images.params = jax.tree.map(jnp.asarray, case.image_params)
  batch, inputs = case.spec.inputs(vlm)
  ours = np.asarray(vlm.forward(batch).logits)
  with torch.no_grad():
    theirs = model(**inputs).logits.numpy()
  # Chameleon forces image-token logits to the dtype minimum (both sides): compared as a mask.
  suppressed = theirs <= FLOAT_MIN
  np.testing.assert_array_equal(ours <= FLOAT_MIN, suppressed)
  keep = np.asarray(batch.attention_mask)[..., None] & ~suppressed
  return ours, theirs, keep, inputs


# ---------------------------------------------------------------------------------- (a) logits


def test_transformers_reads_the_export_as_our_forward(case):
  model = _from_pretrained(case.spec.config, case.out_dir).eval()
  ours, theirs, keep, inputs = _ours_and_theirs(case, model)
  assert R.relative_error(ours, theirs, keep) < TOLERANCE
  with torch.no_grad():  # and the perturbation matters: the source model's logits differ
    source = case.original(**inputs).logits.numpy()
  assert R.relative_error(source, theirs, keep) > 100 * TOLERANCE


def test_files_follow_the_config(case):
  """Tied embeddings: no output projection stored; sharded exports carry the standard index;
  config.json and the tokenizer files are the source's."""
  tensors = _tensors(case.out_dir)
  tied = case.name == "qwen2"
  assert any(k.endswith("lm_head.weight") for k in tensors) is (not tied)
  assert all(v.dtype == np.float32 for v in tensors.values())
  if case.name in SHARD_BYTES:
    with open(os.path.join(case.out_dir, "model.safetensors.index.json")) as f:
      index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert not os.path.exists(os.path.join(case.out_dir, "model.safetensors"))
  config = transformers.AutoConfig.from_pretrained(case.out_dir)
  assert config.to_diff_dict() == transformers.AutoConfig.from_pretrained(
      case.hf_dir).to_diff_dict()
  side_files = [n for n in convert.SIDE_FILES if os.path.exists(os.path.join(case.hf_dir, n))]
  assert "generation_config.json" in side_files
  for name in side_files:
    with open(os.path.join(case.hf_dir, name)) as a, open(os.path.join(case.out_dir, name)) as b:
      assert a.read() == b.read(), name


# ------------------------------------------------------------------------------ (b) round trip


def test_converting_the_export_gives_the_perturbed_params_bit_for_bit(case):
  _, params, image_params, _ = convert.load_in_memory(case.out_dir)
  _assert_same_bits(_flat(params), _flat(case.params), "params")
  if case.image_params is not None:
    _assert_same_bits(_flat(image_params), _flat(case.image_params), "image params")


def test_bfloat16_export_rounds_each_parameter_once(case, tmp_path):
  """bf16 files hold each float32 parameter rounded to nearest (ml_dtypes' cast, independent of
  the export); the VQ encoder stays float32."""
  out = export.export(str(tmp_path / "bf16"), case.params, hf_config=case.hf_config,
                      image_params=case.image_params, dtype="bfloat16")
  dtypes = {str(v.dtype) for v in _tensors(out).values()}
  assert "bfloat16" in dtypes and dtypes <= {"bfloat16", "float32"}
  _, params, image_params, _ = convert.load_in_memory(out, dtype="bfloat16")
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), case.params)
  _assert_same_bits(_flat(params), _flat(rounded), "bf16 params")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  if case.name == "chameleon":
    assert all(_tensors(out)[k].dtype == np.float32 for k in _tensors(out) if "vqmodel" in k)


# --------------------------------------------------------------------------------- (c) base_dir


def test_with_base_dir_the_export_is_complete(case, tmp_path):
  """Every tensor of the base is in the export: the perturbed ones (all our tables cover, as
  converting the export shows) and, byte-identical, the rest (Chameleon: post_quant_conv)."""
  out = export.export(str(tmp_path / "full"), case.params, hf_config=case.hf_config,
                      image_params=case.image_params, base_dir=str(case.hf_dir))
  base, ours = _tensors(case.hf_dir), _tensors(out)
  assert sorted(ours) == sorted(base)  # and named as the base names them
  unchanged = sorted(k for k in base if ours[k].tobytes() == base[k].tobytes())
  expected = ([f"model.vqmodel.post_quant_conv.{p}" for p in ("bias", "weight")]
              if case.name == "chameleon" else [])
  assert unchanged == expected
  _assert_same_bits({k: ours[k] for k in unchanged}, {k: base[k] for k in unchanged}, "copied")
  _, params, image_params, _ = convert.load_in_memory(out)
  _assert_same_bits(_flat(params), _flat(case.params), "params")
  _, info = _from_pretrained(case.spec.config, out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info


# ------------------------------------------------------------------------ (d) converted dirs


def test_export_converted_reproduces_the_source_checkpoint(case, tmp_path, caplog):
  """HF -> convert -> export_converted: with base_dir, every tensor is the source's, bit for bit;
  without it, the tensors the conversion left out are missing and named in a warning."""
  converted = convert.convert(str(case.hf_dir), str(tmp_path / "ng"), progress=False)
  full = export.export_converted(converted, str(tmp_path / "full"), base_dir=str(case.hf_dir))
  _assert_same_bits(_tensors(full), _tensors(case.hf_dir), "export_converted")
  with caplog.at_level(logging.WARNING, logger="checkpoints_convert.export"):
    bare = export.export_converted(converted, str(tmp_path / "bare"))
  # Named as the tables name them first (LLaVA's tower: "vision_tower.vision_model."), so
  # compared as parameters: the same as the source's, bit for bit.
  for ours, theirs in zip(convert.load_in_memory(bare)[1:3],
                          convert.load_in_memory(str(case.hf_dir))[1:3]):
    _assert_same_bits(_flat(ours or {}), _flat(theirs or {}), "no base_dir")
  if case.name == "chameleon":
    assert "model.vqmodel.post_quant_conv" in caplog.text


# Runs the CLI with torch unimportable (and invisible to transformers), as on a machine without it.
NO_TORCH_CLI = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'export'; "
                "runpy.run_module('checkpoints_convert.export', run_name='__main__')")


def test_export_cli_runs_without_torch(case, tmp_path):
  if case.name != "chameleon":
    pytest.skip("the CLI is checked once")
  converted = convert.convert(str(case.hf_dir), str(tmp_path / "ng"), progress=False)
  out = tmp_path / "cli"
  run = subprocess.run([sys.executable, "-c", NO_TORCH_CLI, f"--converted={converted}",
                        f"--out_dir={out}", f"--base_dir={case.hf_dir}"],
                       cwd=REPO, env=dict(os.environ), text=True, capture_output=True)
  assert run.returncode == 0, run.stderr
  _assert_same_bits(_tensors(out), _tensors(case.hf_dir), "CLI export")
  for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
    assert os.path.exists(out / name), name


def test_emu3_round_trips_through_a_converted_dir(tmp_path):
  """Emu3 (3-D convolutions, its text model's two naming schemes): convert, export with the
  source as base -> the source's tensors bit for bit."""
  config = transformers.Emu3Config(text_config=transformers.Emu3TextConfig(**R.COMMON),
                                   vq_config=NA.EMU3_VQ,
                                   vocabulary_map=R.emu3_vocabulary_map(97, 16))
  hf_dir = tmp_path / "hf"
  R.build(config, hf_dir)
  converted = convert.convert(str(hf_dir), str(tmp_path / "ng"), progress=False)
  out = export.export_converted(converted, str(tmp_path / "out"), base_dir=str(hf_dir))
  _assert_same_bits(_tensors(out), _tensors(hf_dir), "emu3")


# ------------------------------------------------------------------------------ (e) bad input


def test_bad_input_is_refused_naming_the_problem(case, tmp_path):
  if case.name not in ("llama", "llava"):
    pytest.skip("checked on a text-only and a non-native family")
  kw = dict(hf_config=case.hf_config, image_params=case.image_params)
  params = case.params

  def without(tree, *path):
    tree = jax.tree.map(lambda x: x, tree)  # a copy of the containers
    node = tree
    for p in path[:-1]:
      node = node[p]
    del node[path[-1]]
    return tree

  with pytest.raises(KeyError, match="layers/attn/q/kernel"):
    export.export(str(tmp_path / "a"), without(params, "layers", "attn", "q"), **kw)
  wrong = jax.tree.map(lambda x: x, params)
  wrong["embed"]["embedding"] = params["embed"]["embedding"][:-1]
  with pytest.raises(ValueError, match=r"embed/embedding has shape \(96, 64\).*\(97, 64\)"):
    export.export(str(tmp_path / "b"), wrong, **kw)
  extra = jax.tree.map(lambda x: x, params)
  extra["stray"] = {"kernel": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="stray/kernel"):
    export.export(str(tmp_path / "c"), extra, **kw)
  with pytest.raises(ValueError, match="dtype 'int8'"):
    export.export(str(tmp_path / "d"), params, dtype="int8", **kw)
  with pytest.raises(FileExistsError, match="already holds weights"):
    export.export(case.out_dir, params, **kw)
  with pytest.raises(ValueError, match="'gpt2' has no transformers checkpoint layout"):
    export.export(str(tmp_path / "e"), params, hf_config=transformers.GPT2Config())
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    export.export(str(tmp_path / "f"), params, base_dir=str(pickled), **kw)
  other = tmp_path / "other"  # the source's tensors, but a checkpoint of another model type
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  os.symlink(case.hf_dir / "model.safetensors", other / "model.safetensors")
  with pytest.raises(ValueError, match="holds a 'mistral' checkpoint"):
    export.export(str(tmp_path / "g"), params, base_dir=str(other), **kw)
  (other / "config.json").write_text(json.dumps({"model_type": "llava_llama",
                                                 "mm_vision_tower": "clip"}))
  with pytest.raises(ValueError, match="authors' repository layout"):
    export.export(str(tmp_path / "g"), params, base_dir=str(other), **kw)
  if case.image_params is not None:
    with pytest.raises(KeyError, match="projector/linear_1/kernel"):
      export.export(str(tmp_path / "h"), params, hf_config=case.hf_config,
                    image_params=without(case.image_params, "projector", "linear_1"))


# ------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout, ours", [
    (SAME, (5, 3)), (LINEAR, (6, 4)), (HEADS_OUT, (8, 3, 4)), (HEADS_IN, (3, 4, 8)),
    (HEAD_BIAS, (3, 4)), (CONV2D, (3, 2, 5, 6)), (CONV3D, (2, 3, 3, 5, 6))])
def test_layout_inverse_is_exact_and_blockwise(layout, ours):
  """to_torch undoes to_ours exactly, whole and for any block of our row axis (whose rows are
  the checkpoint's rows [start * unit, stop * unit))."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal(layout.torch_shape(ours)).astype(np.float32)
  x = layout.to_ours(w, ours)
  assert x.shape == ours
  np.testing.assert_array_equal(layout.to_torch(x), w)
  axis, unit = layout.row_axis, layout.rows_per_index(ours)
  index = (slice(None),) * axis + (slice(1, 3),)
  np.testing.assert_array_equal(layout.to_torch(x[index]), w[unit:3 * unit])
