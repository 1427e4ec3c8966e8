"""The HF -> Orbax converter: streaming memory, layouts, dtypes, bad inputs, CLI, sharded restore.

Every checkpoint here is built in code: tiny transformers models (`reference.build`) and, for the
memory test, a ~2.2 GiB synthetic Llama checkpoint written one tensor at a time. Expected values
are computed in the test from the source tensors with the torch -> ours layout written out by hand
(q_proj [N*H, D] -> kernel [D, N, H], ...), never through the converter's own layout code.

The 2.2 GiB checkpoint tests take about a minute on 2 cores and are marked slow; run them, with the
figures they print, by `pytest tests/test_convert.py -m slow -s`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import tensorstore as ts
import torch
import transformers

import narrowgate_jax as ng
from checkpoints_convert import convert as convert_mod
from checkpoints_convert.convert import convert
from checkpoints_convert.safetensors_stream import CheckpointReader, PickleRefused
from narrowgate_jax import checkpoint

import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB, GiB = 2**20, 2**30


def _run_python(args, **kw) -> subprocess.CompletedProcess:
  """`python args...` from the repository root, with this session's environment (8 CPU devices)."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ), text=True,
                        capture_output=True, **kw)


def _logits(vlm: ng.VLM, vocab_size: int) -> np.ndarray:
  batch = vlm.prepare(token_ids=reference.two_prompts(vocab_size))
  return np.asarray(vlm.forward(batch).logits, np.float32)


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def _listing(directory) -> list[str]:
  """Every file below `directory` (relative paths), [] when it does not exist."""
  if not os.path.exists(directory):
    return []
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, files in os.walk(directory) for f in files)


# ------------------------------------------------------------------------------ tiny checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random Llama saved with save_pretrained (safetensors), its torch model and state."""
  hf_dir = tmp_path_factory.mktemp("tiny_hf")
  config = reference.tiny_llama()
  model = reference.build(config, str(hf_dir))
  return dict(hf_dir=str(hf_dir), config=config, model=model,
              state={k: v.detach().numpy().copy() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
  """The tiny checkpoint converted in float32 and in bfloat16."""
  root = tmp_path_factory.mktemp("tiny_converted")
  out = {dtype: str(root / dtype) for dtype in ("float32", "bfloat16")}
  for dtype, directory in out.items():
    convert(tiny["hf_dir"], directory, dtype=dtype, progress=False)
  return out


def _copy_hf(tiny, directory) -> str:
  shutil.copytree(tiny["hf_dir"], directory)
  return str(directory)


def _expected_params(state: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """Our parameter tree from a torch state dict, layouts written out without the library's code."""
  n, k = config.num_attention_heads, config.num_key_value_heads
  h = config.hidden_size // n
  d = config.hidden_size
  layers = range(config.num_hidden_layers)
  stack = lambda name: np.stack([state[f"model.layers.{i}.{name}"] for i in layers])  # noqa: E731
  q, kk, v, o = (stack(f"self_attn.{p}_proj.weight") for p in "qkvo")
  return {
      "embed/embedding": state["model.embed_tokens.weight"],
      "final_norm/scale": state["model.norm.weight"],
      "lm_head/kernel": state["lm_head.weight"].T,
      # [L, N*H, D] -> [L, D, N, H]: kernel[l, d, n, h] = W[l, n*H + h, d]
      "layers/attn/q/kernel": q.reshape(-1, n, h, d).transpose(0, 3, 1, 2),
      "layers/attn/k/kernel": kk.reshape(-1, k, h, d).transpose(0, 3, 1, 2),
      "layers/attn/v/kernel": v.reshape(-1, k, h, d).transpose(0, 3, 1, 2),
      # [L, D, N*H] -> [L, N, H, D]: kernel[l, n, h, d] = W[l, d, n*H + h]
      "layers/attn/o/kernel": o.reshape(-1, d, n, h).transpose(0, 2, 3, 1),
      "layers/mlp/gate/kernel": stack("mlp.gate_proj.weight").transpose(0, 2, 1),
      "layers/mlp/up/kernel": stack("mlp.up_proj.weight").transpose(0, 2, 1),
      "layers/mlp/down/kernel": stack("mlp.down_proj.weight").transpose(0, 2, 1),
      "layers/input_norm/scale": stack("input_layernorm.weight"),
      "layers/post_attn_norm/scale": stack("post_attention_layernorm.weight"),
  }


# ------------------------------------------------------------------------------- round trip


def test_float32_conversion_matches_the_torch_state_dict(tiny, converted):
  params = _flat(checkpoint.restore_params(converted["float32"]))
  expected = _expected_params(tiny["state"], tiny["config"])
  assert sorted(params) == sorted(expected)
  for path, want in expected.items():
    got = np.asarray(params[path])
    assert got.dtype == np.float32, path
    np.testing.assert_array_equal(got, want, err_msg=path)


def test_bfloat16_conversion_is_the_float32_one_rounded(converted):
  f32 = _flat(checkpoint.restore_params(converted["float32"]))
  bf16 = _flat(checkpoint.restore_params(converted["bfloat16"]))
  assert sorted(f32) == sorted(bf16)
  for path in f32:
    got = np.asarray(bf16[path])
    assert got.dtype == ml_dtypes.bfloat16, path
    np.testing.assert_array_equal(got, np.asarray(f32[path]).astype(ml_dtypes.bfloat16),
                                  err_msg=path)
  _, meta = checkpoint.read_meta(converted["bfloat16"])
  assert meta["dtype"] == "bfloat16"
  assert ng.load(converted["bfloat16"]).dtype == np.dtype(ml_dtypes.bfloat16)


def test_loading_the_hf_dir_equals_loading_the_converted_dir(tiny, converted):
  vocab = tiny["config"].vocab_size
  for dtype in ("float32", "bfloat16"):
    from_hf = ng.load(tiny["hf_dir"], dtype=dtype)
    from_disk = ng.load(converted[dtype])
    assert from_hf.config == from_disk.config
    a, b = _flat(from_hf.params), _flat(from_disk.params)
    assert sorted(a) == sorted(b)
    for path in a:
      assert a[path].dtype == b[path].dtype == jnp.dtype(dtype), (dtype, path)
      np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]),
                                    err_msg=f"{dtype} {path}")
    np.testing.assert_array_equal(_logits(from_hf, vocab), _logits(from_disk, vocab))


def test_converted_logits_match_transformers(tiny, converted):
  """The converted float32 checkpoint reproduces the torch model it came from."""
  vlm = ng.load(converted["float32"])
  batch = vlm.prepare(token_ids=reference.two_prompts(tiny["config"].vocab_size))
  ids, mask, pos = reference.torch_inputs(batch)
  with torch.no_grad():
    theirs = tiny["model"](input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
  ours = np.asarray(vlm.forward(batch).logits)
  keep = np.asarray(batch.attention_mask, bool)
  assert reference.relative_error(ours, theirs, keep) < 1e-5


# ------------------------------------------------------------------------------- bad inputs


def _rewrite_weights(hf_dir, edit) -> None:
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _assert_refused(hf_dir, out_dir, exc_type, *fragments):
  """convert() and ng.load() both raise exc_type naming every fragment; nothing is written."""
  for attempt in (lambda: convert(hf_dir, str(out_dir), progress=False),
                  lambda: ng.load(hf_dir)):
    with pytest.raises(exc_type) as info:
      attempt()
    message = str(info.value)
    for fragment in fragments:
      assert fragment in message, (fragment, message)
  assert _listing(out_dir) == [], "a conversion that failed validation wrote files"
  assert not os.path.exists(out_dir)


def test_missing_tensor_is_named(tiny, tmp_path):
  hf_dir = _copy_hf(tiny, tmp_path / "hf")
  key = "model.layers.1.mlp.up_proj.weight"
  _rewrite_weights(hf_dir, lambda t: t.pop(key))
  _assert_refused(hf_dir, tmp_path / "out", KeyError, key, "layers/mlp/up/kernel", "layer 1")


def test_wrong_shape_names_the_key_and_both_shapes(tiny, tmp_path):
  hf_dir = _copy_hf(tiny, tmp_path / "hf")
  key = "model.layers.2.self_attn.k_proj.weight"
  expected = tiny["state"][key].shape  # (K*H, D) = (32, 64)
  wrong = (expected[0] + 8, expected[1])
  _rewrite_weights(hf_dir, lambda t: t.update({key: np.zeros(wrong, np.float32)}))
  _assert_refused(hf_dir, tmp_path / "out", ValueError, key, str(wrong), str(tuple(expected)))


def test_wrong_shape_of_a_late_tensor_writes_nothing(tiny, tmp_path):
  """lm_head is the last tensor converted: validation must still come before the first write."""
  hf_dir = _copy_hf(tiny, tmp_path / "hf")
  key = "lm_head.weight"
  _rewrite_weights(hf_dir, lambda t: t.update({key: np.zeros((5, 64), np.float32)}))
  _assert_refused(hf_dir, tmp_path / "out", ValueError, key, "(5, 64)")


def test_unknown_model_type_is_named_with_the_supported_ones(tiny, tmp_path):
  hf_dir = _copy_hf(tiny, tmp_path / "hf")
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg["model_type"] = "gpt_neox"
  with open(path, "w") as f:
    json.dump(cfg, f)
  _assert_refused(hf_dir, tmp_path / "out", ValueError, "'gpt_neox'", "supported",
                  "llama", "chameleon", "emu3", "qwen2")


def test_unknown_dtype_is_refused(tiny, tmp_path):
  with pytest.raises(ValueError, match="float16"):
    convert(tiny["hf_dir"], str(tmp_path / "out"), dtype="float16", progress=False)
  assert not os.path.exists(tmp_path / "out")


@pytest.fixture
def pickle_dir(tiny, tmp_path):
  """The tiny model as a pickle-only checkpoint: config.json + pytorch_model.bin."""
  directory = tmp_path / "pickled"
  directory.mkdir()
  shutil.copy(os.path.join(tiny["hf_dir"], "config.json"), directory / "config.json")
  torch.save(tiny["model"].state_dict(), directory / "pytorch_model.bin")
  return str(directory)


def test_pickle_only_dir_is_refused_without_allow_pickle(pickle_dir, tmp_path):
  for attempt in (lambda: convert(pickle_dir, str(tmp_path / "out"), progress=False),
                  lambda: ng.load(pickle_dir)):
    with pytest.raises(PickleRefused) as info:
      attempt()
    message = str(info.value)
    assert "pickle" in message.lower() and "--allow_pickle" in message, message
    assert "pytorch_model.bin" in message, message
  assert not os.path.exists(tmp_path / "out")


def test_pickle_only_dir_with_allow_pickle_matches_safetensors(tiny, converted, pickle_dir,
                                                               tmp_path):
  vocab = tiny["config"].vocab_size
  want = _logits(ng.load(converted["float32"]), vocab)
  np.testing.assert_array_equal(_logits(ng.load(pickle_dir, allow_pickle=True), vocab), want)
  out = str(tmp_path / "out")
  convert(pickle_dir, out, allow_pickle=True, progress=False)
  np.testing.assert_array_equal(_logits(ng.load(out), vocab), want)


def test_load_of_a_missing_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    ng.load(str(tmp_path / "does_not_exist"))


def test_load_of_a_dir_that_is_no_checkpoint_is_a_clear_error(tmp_path):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(FileNotFoundError) as info:
    ng.load(str(tmp_path))
  message = str(info.value)
  assert "neither a converted checkpoint" in message and "config.json" in message, message


def test_hf_dir_without_weights_is_a_clear_error(tiny, tmp_path):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  shutil.copy(os.path.join(tiny["hf_dir"], "config.json"), hf_dir / "config.json")
  for attempt in (lambda: convert(str(hf_dir), str(tmp_path / "out"), progress=False),
                  lambda: ng.load(str(hf_dir))):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
      attempt()
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------- CLI


def test_cli_converts_and_the_result_loads(tiny, converted, tmp_path):
  out = tmp_path / "cli_out"
  proc = _run_python(["-m", "checkpoints_convert.convert", f"--hf_dir={tiny['hf_dir']}",
                      f"--out_dir={out}"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "converted" in proc.stdout
  assert {"narrowgate.json", "hf_config.json", "params"} <= set(os.listdir(out))
  assert os.path.isdir(out / "params")
  with open(out / "narrowgate.json") as f:
    meta = json.load(f)
  assert meta["family"] == "llama" and meta["dtype"] == "float32"
  assert meta["decoder"]["num_layers"] == tiny["config"].num_hidden_layers
  with open(out / "hf_config.json") as f, open(os.path.join(tiny["hf_dir"], "config.json")) as g:
    assert json.load(f) == json.load(g)
  vocab = tiny["config"].vocab_size
  np.testing.assert_array_equal(_logits(ng.load(str(out)), vocab),
                                _logits(ng.load(converted["float32"]), vocab))


def test_cli_reports_a_bad_checkpoint_and_writes_nothing(tiny, tmp_path):
  hf_dir = _copy_hf(tiny, tmp_path / "hf")
  key = "model.layers.0.self_attn.q_proj.weight"
  _rewrite_weights(hf_dir, lambda t: t.pop(key))
  out = tmp_path / "cli_out"
  proc = _run_python(["-m", "checkpoints_convert.convert", f"--hf_dir={hf_dir}",
                      f"--out_dir={out}"], timeout=300)
  assert proc.returncode != 0
  assert key in proc.stderr, proc.stderr[-3000:]
  assert not os.path.exists(out)


# ---------------------------------------------------------------------------- sharded restore


def _spec(sharding, ndim: int) -> tuple:
  """A PartitionSpec as a tuple padded with None to ndim entries (P() == P(None, None) here)."""
  spec = tuple(sharding.spec)
  return spec + (None,) * (ndim - len(spec))


@pytest.fixture(scope="module")
def shardable(tmp_path_factory):
  """A tiny Llama whose vocab (128), heads (4) and MLP width (96) divide a 4-way model axis and
  whose KV heads (2) do not."""
  root = tmp_path_factory.mktemp("shardable")
  config = reference.tiny_llama(vocab_size=128)
  reference.build(config, str(root / "hf"))
  convert(str(root / "hf"), str(root / "out"), progress=False)
  return dict(config=config, hf_dir=str(root / "hf"), out_dir=str(root / "out"))


# The distributed rules written out for this config: 'model' on vocab / heads / mlp axes that 4
# divides; kv_heads (2) replicated; embed, head_dim, layers never sharded; nothing over 'data'.
EXPECTED_SPECS = {
    "embed/embedding": ("model", None),                 # [V=128, D]
    "final_norm/scale": (None,),
    "lm_head/kernel": (None, "model"),                  # [D, V=128]
    "layers/attn/q/kernel": (None, None, "model", None),  # [L, D, N=4, H]
    "layers/attn/k/kernel": (None, None, None, None),     # [L, D, K=2, H]: 2 % 4 != 0
    "layers/attn/v/kernel": (None, None, None, None),
    "layers/attn/o/kernel": (None, "model", None, None),  # [L, N=4, H, D]
    "layers/mlp/gate/kernel": (None, None, "model"),      # [L, D, F=96]
    "layers/mlp/up/kernel": (None, None, "model"),
    "layers/mlp/down/kernel": (None, "model", None),      # [L, F=96, D]
    "layers/input_norm/scale": (None, None),
    "layers/post_attn_norm/scale": (None, None),
}


def test_sharded_restore_follows_the_rules_and_keeps_the_values(shardable):
  assert len(jax.devices()) == 8, "conftest should give 8 simulated CPU devices"
  mesh = ng.make_mesh(data=2, model=4)
  single = _flat(checkpoint.restore_params(shardable["out_dir"]))
  for source in (shardable["out_dir"], shardable["hf_dir"]):  # Orbax restore, in-memory convert
    vlm = ng.load(source, mesh=mesh)
    params = _flat(vlm.params)
    assert sorted(params) == sorted(EXPECTED_SPECS)
    for path, want in EXPECTED_SPECS.items():
      array = params[path]
      assert array.sharding.mesh == mesh, path
      assert _spec(array.sharding, array.ndim) == want, (source, path, array.sharding.spec)
      assert len(array.addressable_shards) == 8
      shard_shape = tuple(s // (4 if axis == "model" else 1) for s, axis in zip(array.shape, want))
      assert array.addressable_shards[0].data.shape == shard_shape, path
      np.testing.assert_array_equal(np.asarray(array), np.asarray(single[path]), err_msg=path)
  # The sharded model computes what the single-device one does.
  vocab = shardable["config"].vocab_size
  np.testing.assert_allclose(_logits(vlm, vocab), _logits(ng.load(shardable["out_dir"]), vocab),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------- streaming: one tensor at a time


class _Tracker:
  """Weak references to every block the reader returned and the writer received."""

  def __init__(self):
    self.read = []      # (key, weakref to the buffer CheckpointReader.read_rows returned)
    self.written = []   # (path, layer, weakref to the buffer StreamingParamWriter.write got)
    self.problems = []
    self.collections = 0

  def record_read(self, key: str, array: np.ndarray) -> None:
    self.read.append((key, weakref.ref(_owner(array))))

  def alive(self) -> list[str]:
    def names():
      return ([f"read {k}" for k, r in self.read if r() is not None] +
              [f"written {p}[{layer}]" for p, layer, r in self.written if r() is not None])
    if names() and self.collections < 3:  # refcounting frees at once; rule out cycles (slow)
      gc.collect()
      self.collections += 1
    return names()


def _owner(array: np.ndarray) -> np.ndarray:
  """The array that owns the memory `array` views (numpy collapses view chains to the owner)."""
  while isinstance(array.base, np.ndarray):
    array = array.base
  return array


def _tracked_reads(monkeypatch, tracker, check_before=False):
  original = CheckpointReader.read_rows

  def read_rows(self, key, start, stop):
    if check_before and tracker.read:
      alive = tracker.alive()
      if alive:
        tracker.problems.append(f"reading {key}[{start}:{stop}] while alive: {alive}")
    array = original(self, key, start, stop)
    tracker.record_read(key, array)
    return array

  monkeypatch.setattr(CheckpointReader, "read_rows", read_rows)


def test_iter_converted_keeps_no_copy_of_the_source_block(tiny, monkeypatch):
  """While the consumer holds a converted block, the raw rows it came from must be gone unless
  the block is a view of them: otherwise two copies of every transposed block are in memory."""
  tracker = _Tracker()
  _tracked_reads(monkeypatch, tracker)
  family, hf_config = convert_mod.family_of(tiny["hf_dir"])
  config = family.decoder_config(hf_config)
  reader = CheckpointReader(tiny["hf_dir"])
  blocks = convert_mod.iter_converted(reader, convert_mod.lm_tree(family, config, np.dtype("float32")))
  for path, layer, index, value in blocks:
    key, ref = tracker.read[-1]
    raw = ref()
    if raw is not None and not np.shares_memory(raw, value):
      tracker.problems.append(f"{key}: its raw rows ({raw.nbytes} bytes) are still referenced "
                              f"beside the converted block {value.shape}")
    del raw, value
  assert tracker.read
  assert not tracker.problems, "\n".join(tracker.problems)


def test_convert_reads_the_next_block_only_after_dropping_the_last(tiny, tmp_path, monkeypatch):
  """When block k+1 is read, nothing read or converted for block k may still be referenced."""
  tracker = _Tracker()
  _tracked_reads(monkeypatch, tracker, check_before=True)
  original_write = checkpoint.StreamingParamWriter.write

  def write(self, path, value, layer=None, index=()):
    tracker.written.append((path, layer, weakref.ref(_owner(value))))
    return original_write(self, path, value, layer, index)

  monkeypatch.setattr(checkpoint.StreamingParamWriter, "write", write)
  convert(tiny["hf_dir"], str(tmp_path / "out"), progress=False)
  assert tracker.read and tracker.written
  assert not tracker.problems, "\n".join(tracker.problems[:5])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_chunks_split_every_tensor_into_blocks_with_the_same_result(
    tiny, converted, tmp_path, monkeypatch, dtype):
  """With 1 KiB chunks every tensor is converted in many row blocks; the result equals the
  conversion in one block per tensor. A block is at most a chunk, or one index of the axis the
  rows fill when that alone is larger (q/k/v rows come by whole heads: D x H values)."""
  monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1024)
  sizes = []
  original = CheckpointReader.read_rows

  def read_rows(self, key, start, stop):
    array = original(self, key, start, stop)
    sizes.append(array.size * np.dtype(convert_mod.DTYPES[dtype]).itemsize)
    return array

  monkeypatch.setattr(CheckpointReader, "read_rows", read_rows)
  out = str(tmp_path / "small_chunks")
  convert(tiny["hf_dir"], out, dtype=dtype, progress=False)
  config = tiny["config"]
  one_head = config.hidden_size * (config.hidden_size // config.num_attention_heads) * (
      np.dtype(convert_mod.DTYPES[dtype]).itemsize)
  assert max(sizes) <= max(1024, one_head) and len(sizes) > 3 * len(tiny["state"])
  small = _flat(checkpoint.restore_params(out))
  whole = _flat(checkpoint.restore_params(converted[dtype]))
  assert small.keys() == whole.keys()
  for path in whole:
    np.testing.assert_array_equal(np.asarray(small[path]), np.asarray(whole[path]), err_msg=path)


# ------------------------------------------------------- streaming: a 2.2 GiB checkpoint's RSS

BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=10,
           num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
SHARD_BYTES = 300 * MiB
# Peak RSS (KiB on Linux) of the largest child of a fresh helper process: one helper per figure, so
# no earlier child's peak can leak into it.
RSS_PROBE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(r.returncode)")


def _big_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  h = d // n
  out = [("model.embed_tokens.weight", (v, d))]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out += [(p + "self_attn.q_proj.weight", (n * h, d)),
            (p + "self_attn.k_proj.weight", (k * h, d)),
            (p + "self_attn.v_proj.weight", (k * h, d)),
            (p + "self_attn.o_proj.weight", (d, n * h)),
            (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,))]
  return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def _big_tensor(index: int, shape) -> np.ndarray:
  """Tensor number `index` of the synthetic checkpoint, regenerated on demand from its seed."""
  return np.random.default_rng([20240917, index]).random(shape, dtype=np.float32) - 0.5


def _write_sharded_checkpoint(directory: str, tensors) -> int:
  """Sharded safetensors + model.safetensors.index.json as save_pretrained lays them out, written
  header first and then one tensor at a time (never more than one tensor in memory)."""
  shards, current, size = [], [], 0
  for index, (name, shape) in enumerate(tensors):
    nbytes = int(np.prod(shape)) * 4
    if current and size + nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = [], 0
    current.append((index, name, shape))
    size += nbytes
  shards.append(current)
  weight_map, total = {}, 0
  for s, shard in enumerate(shards):
    filename = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for _, name, shape in shard:
      nbytes = int(np.prod(shape)) * 4
      header[name] = {"dtype": "F32", "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = filename
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(os.path.join(directory, filename), "wb") as f:
      f.write(struct.pack("<Q", len(encoded)))
      f.write(encoded)
      for index, _, shape in shard:
        f.write(memoryview(_big_tensor(index, shape)).cast("B"))
    total += offset
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return total


def _peak_rss_mib(args) -> float:
  proc = _run_python(["-c", RSS_PROBE, sys.executable, *args], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return int(proc.stdout.strip().splitlines()[-1]) / 1024


@pytest.fixture(scope="module")
def big(tmp_path_factory):
  """Writes the synthetic checkpoint, converts it through the CLI under an RSS probe, measures the
  baselines, and deletes every big file afterwards."""
  root = tmp_path_factory.mktemp("big")
  hf_dir, out_dir = root / "hf", root / "out"
  hf_dir.mkdir()
  try:
    start = time.perf_counter()
    transformers.LlamaConfig(**BIG).save_pretrained(hf_dir)
    tensors = _big_tensors(BIG)
    nbytes = _write_sharded_checkpoint(str(hf_dir), tensors)
    generated = time.perf_counter()
    # What the converter needs before it touches a tensor, each in its own fresh process:
    # the imports the brief names, then those imports plus reading the config as the converter
    # does (family_of imports transformers' config machinery, which imports torch when installed)
    # and shaping the parameter tree.
    base_imports = _peak_rss_mib(["-c", "import jax, checkpoints_convert.convert"])
    base_setup = _peak_rss_mib([
        "-c", "import sys, jax; from checkpoints_convert import convert as c; "
        "from narrowgate_jax.models.decoder import param_shapes; "
        "f, h = c.family_of(sys.argv[1]); param_shapes(f.decoder_config(h))", str(hf_dir)])
    before = time.perf_counter()
    peak = _peak_rss_mib(["-m", "checkpoints_convert.convert", f"--hf_dir={hf_dir}",
                          f"--out_dir={out_dir}"])
    converted_at = time.perf_counter()
    print(f"\n[convert] synthetic Llama checkpoint: {nbytes / GiB:.2f} GiB in "
          f"{len(os.listdir(hf_dir)) - 2} shards, largest tensor "
          f"{max(int(np.prod(s)) for _, s in tensors) * 4 / MiB:.0f} MiB; written in "
          f"{generated - start:.1f} s, converted in {converted_at - before:.1f} s")
    print(f"[convert] peak RSS: converter {peak:.0f} MiB; baseline (import jax + converter module) "
          f"{base_imports:.0f} MiB; baseline (+ config read / transformers + torch import, "
          f"param shapes) {base_setup:.0f} MiB")
    print(f"[convert] converter peak RSS above baseline: {peak - base_setup:.0f} MiB "
          f"({peak - base_imports:.0f} MiB above the import-only baseline) for a "
          f"{nbytes / GiB:.2f} GiB checkpoint")
    yield dict(hf_dir=str(hf_dir), out_dir=str(out_dir), tensors=tensors, nbytes=nbytes,
               peak=peak, base_imports=base_imports, base_setup=base_setup)
  finally:
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_big_checkpoint_is_at_least_2_gb(big):
  assert big["nbytes"] >= 2e9
  assert len([f for f in os.listdir(big["hf_dir"]) if f.endswith(".safetensors")]) >= 5


@pytest.mark.slow
def test_big_checkpoint_converts_correctly(big):
  """Slices of the converted arrays equal the regenerated source tensors in our layout."""
  cfg, tensors = BIG, big["tensors"]
  index = {name: (i, shape) for i, (name, shape) in enumerate(tensors)}
  d, n, k = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
  h = d // n
  params = os.path.join(big["out_dir"], checkpoint.PARAMS_DIR)

  def stored(path):  # one zarr array per parameter, read lazily through tensorstore
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                  "path": os.path.join(params, path)}}).result()

  def source(name):
    return _big_tensor(*index[name])

  assert checkpoint.read_meta(big["out_dir"])[0].num_layers == cfg["num_hidden_layers"]
  q, kk, o = stored("layers.attn.q.kernel"), stored("layers.attn.k.kernel"), stored(
      "layers.attn.o.kernel")
  down = stored("layers.mlp.down.kernel")
  assert q.shape == (10, d, n, h) and kk.shape == (10, d, k, h) and o.shape == (10, n, h, d)
  assert down.shape == (10, cfg["intermediate_size"], d)
  rng = np.random.default_rng(0)
  for layer in (2, 9):
    w = source(f"model.layers.{layer}.self_attn.q_proj.weight")            # [N*H, D]
    got = q[layer].read().result()                                        # [D, N, H]
    np.testing.assert_array_equal(got, w.T.reshape(d, n, h))
    for dd, nn, hh in zip(rng.integers(0, d, 50), rng.integers(0, n, 50), rng.integers(0, h, 50)):
      assert got[dd, nn, hh] == w[nn * h + hh, dd]
    w = source(f"model.layers.{layer}.self_attn.k_proj.weight")            # [K*H, D]
    np.testing.assert_array_equal(kk[layer].read().result(), w.T.reshape(d, k, h))
    w = source(f"model.layers.{layer}.self_attn.o_proj.weight")            # [D, N*H]
    got = o[layer].read().result()                                        # [N, H, D]
    np.testing.assert_array_equal(got, w.reshape(d, n, h).transpose(1, 2, 0))
    w = source(f"model.layers.{layer}.mlp.down_proj.weight")               # [D, F]
    np.testing.assert_array_equal(down[layer].read().result(), w.T)
    np.testing.assert_array_equal(
        stored("layers.post_attn_norm.scale")[layer].read().result(),
        source(f"model.layers.{layer}.post_attention_layernorm.weight"))
  np.testing.assert_array_equal(stored("embed.embedding")[1000:1100].read().result(),
                                source("model.embed_tokens.weight")[1000:1100])
  np.testing.assert_array_equal(stored("lm_head.kernel")[:, 31900:].read().result(),
                                source("lm_head.weight")[31900:].T)


@pytest.mark.slow
def test_big_checkpoint_conversion_memory(big):
  """The converter's peak RSS above baseline stays under 1 GiB for a 2.2 GiB checkpoint."""
  above = big["peak"] - big["base_setup"]
  assert above * MiB < 1 * GiB, (
      f"converter peak RSS {big['peak']:.0f} MiB is {above:.0f} MiB above the "
      f"{big['base_setup']:.0f} MiB baseline for a {big['nbytes'] / GiB:.2f} GiB checkpoint")
