"""The training loop and LoRA adapters on tiny models.

  * loop: a two-layer MLP regression (with dropout, so the step keys matter): the learning-rate
    schedule at hand-computed points, AdamW's weight-decay mask, determinism (same seed ->
    bit-identical params), freezing (frozen leaves untouched and without optimizer state), resuming
    from a checkpoint (in process, and after SIGKILL in a subprocess: bit-identical to an
    uninterrupted run, the log without duplicate steps), a 2x2 mesh against one device, and
    one-line errors for bad input.
  * lora: a tiny Decoder: merging at init is the base exactly, merging matches an explicit numpy
    computation per layer, and training only the adapters lowers the loss while the base stays
    bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from narrowgate_jax.capture import CapturePlan
from narrowgate_jax.distributed import make_mesh
from narrowgate_jax.interventions import Interventions
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.decoder import Decoder
from narrowgate_jax.training import lora as L
from narrowgate_jax.training.loop import (TrainConfig, learning_rate_schedule, make_optimizer,
                                          opt_state_shardings, train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- a tiny regression

IN, HIDDEN, OUT, BATCH = 8, 16, 4, 16
TARGET = np.random.default_rng(123).normal(size=(IN, OUT)).astype(np.float32)


def mlp_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": (rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)).astype(np.float32),
                    "bias": np.zeros((HIDDEN,), np.float32)},
          "out": {"kernel": (rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32)}}


def batch_at(step: int) -> dict:
  x = np.random.default_rng(1000 + step).normal(size=(BATCH, IN)).astype(np.float32)
  return {"x": x, "y": x @ TARGET}


def mlp_loss(params, batch, rng):
  h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
  h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9  # dropout: the step key matters
  err = h @ params["out"]["kernel"] - batch["y"]
  return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


CONFIG = TrainConfig(steps=24, learning_rate=5e-2, warmup_steps=3, checkpoint_every=5,
                     log_every=5)


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_learning_rate_schedule_warms_up_then_decays_to_the_end_fraction():
  config = TrainConfig(steps=10, learning_rate=2.0, warmup_steps=4, end_lr_fraction=0.1)
  lr = [float(learning_rate_schedule(config)(s)) for s in range(10)]
  np.testing.assert_allclose(lr[:4], [0.5, 1.0, 1.5, 2.0], rtol=1e-6)  # (s + 1) / 4 of the peak
  # Cosine over steps 4..9: peak at 4, 0.2 at 9, and halfway (step 6.5) between the two.
  np.testing.assert_allclose([lr[4], lr[9]], [2.0, 0.2], rtol=1e-6)
  np.testing.assert_allclose(float(learning_rate_schedule(config)(6.5)), 1.1, rtol=1e-6)
  assert all(x > y for x, y in zip(lr[4:], lr[5:]))
  flat = TrainConfig(steps=3, learning_rate=1.0, end_lr_fraction=1.0)
  np.testing.assert_allclose([float(learning_rate_schedule(flat)(s)) for s in range(3)], 1.0)


def test_weight_decay_spares_norm_scales_and_biases():
  """With zero gradients Adam moves nothing, so only the decay acts: kernel * (1 - lr * wd)."""
  config = TrainConfig(steps=5, learning_rate=0.1, weight_decay=0.5, end_lr_fraction=1.0)
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)),
            "layers": {"norm": {"scale": jnp.ones((2, 4))}, "mlp": {"bias": jnp.ones((2, 4))}},
            "vector": jnp.ones((4,))}
  optimizer = make_optimizer(config)
  update = jax.jit(lambda p: optimizer.update(jax.tree.map(jnp.zeros_like, p),
                                              optimizer.init(p), p)[0])
  updates = update(params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5, rtol=1e-6)
  for leaf in (updates["bias"], updates["layers"]["norm"]["scale"],
               updates["layers"]["mlp"]["bias"], updates["vector"]):
    assert np.all(np.asarray(leaf) == 0)


def test_training_is_deterministic_and_lowers_the_loss(capsys):
  first = train(mlp_loss, mlp_params(), batch_at, CONFIG, progress=True, name="mlp")
  progress = capsys.readouterr().err
  assert "mlp" in progress and "loss=" in progress and "step/s" in progress
  second = train(mlp_loss, mlp_params(), batch_at, CONFIG, progress=False)
  assert leaves_equal(first.params, second.params)
  other_seed = train(mlp_loss, mlp_params(), batch_at,
                     dataclasses.replace(CONFIG, seed=1), progress=False)
  assert not leaves_equal(first.params, other_seed.params)

  assert first.resumed_from == 0
  assert [h["step"] for h in first.history] == [0, 5, 10, 15, 20, 23]
  assert list(first.history[0]) == ["step", "loss", "mae", "grad_norm", "lr"]
  assert first.history[-1]["loss"] < 0.5 * first.history[0]["loss"]
  schedule = learning_rate_schedule(CONFIG)
  for h in first.history:
    assert h["lr"] == pytest.approx(float(schedule(h["step"])))


def test_frozen_leaves_are_untouched_and_have_no_optimizer_state():
  params = jax.tree.map(jnp.asarray, mlp_params())
  trainable = {"dense": False, "out": True}  # a prefix of the params tree
  result = train(mlp_loss, params, batch_at, CONFIG, trainable=trainable, progress=False)
  for name in ("kernel", "bias"):  # passed through, not even copied
    assert result.params["dense"][name] is params["dense"][name]
  assert not np.array_equal(result.params["out"]["kernel"], params["out"]["kernel"])
  # The caller's trainable array was copied before being donated: still readable, unchanged.
  np.testing.assert_array_equal(params["out"]["kernel"], mlp_params()["out"]["kernel"])

  state = make_optimizer(CONFIG, trainable).init(params)
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert sum(x.size for x in floats) == 2 * HIDDEN * OUT  # Adam's mu and nu of out/kernel only
  assert sum(x.size for x in jax.tree.leaves(state)) <= 2 * HIDDEN * OUT + 4  # plus step counts


def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path):
  reference = train(mlp_loss, mlp_params(), batch_at, CONFIG, progress=False)
  workdir = str(tmp_path / "run")
  done = train(mlp_loss, mlp_params(), batch_at, CONFIG, workdir, progress=False, name="mlp")
  assert leaves_equal(done.params, reference.params)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(checkpoints), key=int) == ["20", "24"]  # keep_checkpoints=2
  stored = json.load(open(os.path.join(workdir, "train_config.json")))["config"]
  assert stored["name"] == "mlp" and stored["learning_rate"] == CONFIG.learning_rate

  # Finished: a restart restores step 24 and trains nothing.
  again = train(mlp_loss, mlp_params(), batch_at, CONFIG, workdir, progress=False, name="mlp")
  assert again.resumed_from == 24 and leaves_equal(again.params, reference.params)

  # As if stopped after the checkpoint of step 20: steps 20..23 run again, logged once.
  os.rename(os.path.join(checkpoints, "24"), str(tmp_path / "step24"))
  resumed = train(mlp_loss, mlp_params(), batch_at, CONFIG, workdir, progress=False, name="mlp")
  assert resumed.resumed_from == 20 and leaves_equal(resumed.params, reference.params)
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "train_log.jsonl"))]
  assert steps == [0, 5, 10, 15, 20, 23]
  assert resumed.history == reference.history

  with pytest.raises(ValueError, match=r"learning_rate: 0\.05 != 0\.02.*name: 'mlp' != 'other'"):
    train(mlp_loss, mlp_params(), batch_at, dataclasses.replace(CONFIG, learning_rate=0.02),
          workdir, progress=False, name="other")


# Trains the MLP of this file (imported from it) into argv[1], saving the final params to
# argv[2] (.npz) and the TrainResult's resumed_from and history to argv[3]; NG_STEP_SLEEP slows
# each batch so the parent can kill the run between checkpoints.
_TRAIN_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, os.path.join(sys.argv[4], "tests"))
import numpy as np
import test_training as T
from narrowgate_jax.training.loop import train

pause = float(os.environ.get("NG_STEP_SLEEP", "0"))
def slow_batch_at(step):
  time.sleep(pause)
  return T.batch_at(step)

config = T.TrainConfig(steps=30, learning_rate=1e-2, warmup_steps=3, checkpoint_every=4,
                       log_every=1)
result = train(T.mlp_loss, T.mlp_params(), slow_batch_at, config, sys.argv[1], progress=False)
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in T.flat(result.params).items()})
json.dump({"resumed_from": result.resumed_from, "history": result.history},
          open(sys.argv[3], "w"))
"""


def flat(params) -> dict:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _spawn(tmp_path, name: str, sleep: float) -> tuple[subprocess.Popen, list[str]]:
  paths = [str(tmp_path / name), str(tmp_path / f"{name}.npz"), str(tmp_path / f"{name}.json")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", NG_STEP_SLEEP=str(sleep))
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, *paths, REPO], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  return proc, paths


def _finished(proc: subprocess.Popen) -> None:
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()[-3000:]


def test_a_run_killed_mid_training_resumes_bit_identical(tmp_path):
  reference, (_, ref_npz, _) = _spawn(tmp_path, "reference", sleep=0)
  killed, (workdir, npz, summary) = _spawn(tmp_path, "killed", sleep=0.1)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 120
  while time.time() < deadline and killed.poll() is None:
    if os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints)):
      break  # a complete checkpoint: Orbax renames its temporary directory when done
    time.sleep(0.02)
  assert killed.poll() is None, killed.stderr.read().decode()[-3000:]
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  killed.stderr.close()
  _finished(reference)
  steps_at_kill = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert steps_at_kill and steps_at_kill[-1] < 30, steps_at_kill

  restarted, _ = _spawn(tmp_path, "killed", sleep=0)
  _finished(restarted)
  result = json.load(open(summary))
  assert 4 <= result["resumed_from"] < 30
  ours, ref = np.load(npz), np.load(ref_npz)
  assert sorted(ours) == sorted(ref)
  for key in ref:
    np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
  lines = open(os.path.join(workdir, "train_log.jsonl")).read().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(30))
  assert [h["step"] for h in result["history"]] == list(range(30))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_a_2x2_mesh_matches_one_device():
  mesh = make_mesh(data=2, model=2, devices=jax.devices()[:4])
  sharding = {"dense": {"kernel": NamedSharding(mesh, P(None, "model")),
                        "bias": NamedSharding(mesh, P("model"))},
              "out": {"kernel": NamedSharding(mesh, P("model", None))}}
  single = train(mlp_loss, mlp_params(), batch_at, CONFIG, progress=False)
  meshed = train(mlp_loss, mlp_params(), batch_at, CONFIG, mesh=mesh, param_sharding=sharding,
                 progress=False)
  for ours, ref in zip(jax.tree.leaves(meshed.params), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert jax.tree.map(lambda x: x.sharding.spec, meshed.params) == jax.tree.map(
      lambda s: s.spec, sharding)

  # Adam's moments are sharded like their parameters, the step counts replicated.
  params = mlp_params()
  optimizer = make_optimizer(CONFIG, {"dense": True, "out": True})
  shapes = jax.eval_shape(optimizer.init, params)
  specs = jax.tree_util.tree_flatten_with_path(
      opt_state_shardings(shapes, params, sharding, mesh))[0]
  moments = 0
  for path, s in specs:
    param = tuple(getattr(k, "key", None) for k in path[-2:])
    if param in (("dense", "kernel"), ("dense", "bias"), ("out", "kernel")):
      assert s.spec == sharding[param[0]][param[1]].spec, path
      moments += 1
    else:
      assert s.spec == P(), path
  assert moments == 6  # mu and nu of each parameter


def test_bad_input_fails_in_one_line():
  with pytest.raises(ValueError, match="steps=0"):
    TrainConfig(steps=0)
  with pytest.raises(ValueError, match="warmup_steps"):
    TrainConfig(steps=5, warmup_steps=6)
  with pytest.raises(TypeError, match="TrainConfig.steps must be an int"):
    TrainConfig(steps=2.5)
  params, config = mlp_params(), TrainConfig(steps=2)
  run = lambda loss=mlp_loss, **kw: train(loss, params, batch_at, config, progress=False, **kw)  # noqa: E731
  with pytest.raises(ValueError, match="trainable"):
    run(trainable={"dense": True})
  with pytest.raises(TypeError, match="must be a bool"):
    run(trainable={"dense": 1, "out": True})
  with pytest.raises(ValueError, match="every leaf frozen"):
    run(trainable={"dense": False, "out": False})
  with pytest.raises(ValueError, match="float scalar"):
    run(lambda p, b, r: (jnp.sum(p["out"]["kernel"], axis=0), {}))
  with pytest.raises(TypeError, match=r"\(loss, metrics dict\)"):
    run(lambda p, b, r: jnp.sum(p["out"]["kernel"]))
  with pytest.raises(ValueError, match="metric 'v' must be a scalar"):
    run(lambda p, b, r: (jnp.sum(p["out"]["kernel"]), {"v": p["out"]["kernel"]}))
  with pytest.raises(FloatingPointError, match="step 0"):
    run(lambda p, b, r: (jnp.sum(p["out"]["kernel"]) * jnp.nan, {}))
  with pytest.raises(ValueError, match="needs the mesh"):
    run(param_sharding=jax.tree.map(lambda _: None, params))
  with pytest.raises(TypeError, match="'count' is int32"):
    train(lambda p, b, r: (jnp.sum(p["w"]), {}), {"w": jnp.ones(3), "count": jnp.zeros((), int)},
          batch_at, config, progress=False)


# --------------------------------------------------------------------------------------- LoRA

DECODER = DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2,
                        num_heads=2, num_kv_heads=1, head_dim=8)
SEQ = 8


@functools.lru_cache(maxsize=None)
def decoder_params(seed: int = 0) -> dict:
  """The tiny decoder's random parameters (jax arrays: never donated by `train` nor mutated)."""
  ids = jnp.zeros((1, SEQ), jnp.int32)
  init = lambda key: Decoder(DECODER).init(key, ids, ids, jnp.ones((1, SEQ), bool),  # noqa: E731
                                           Interventions(), CapturePlan())["params"]
  return jax.jit(init)(jax.random.key(seed))


def token_batch_at(step: int) -> dict:
  """Counting sequences mod V from random starts: the next token is the current one plus 1."""
  starts = np.random.default_rng(step).integers(0, DECODER.vocab_size, size=(4, 1))
  return {"ids": ((starts + np.arange(SEQ)) % DECODER.vocab_size).astype(np.int32)}


def lm_loss(params, batch, rng):
  del rng
  ids = batch["ids"]
  positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
  logits = Decoder(DECODER).apply({"params": params}, ids, positions, jnp.ones(ids.shape, bool),
                                  Interventions(), CapturePlan())["logits"]
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
  return jnp.mean(nll), {}


def test_lora_shapes_and_merge_at_init_is_the_base():
  params = decoder_params()
  adapters = L.init_lora(params, rank=3, targets=tuple(L.LORA_TARGETS), seed=1)
  d, n, k, h, f, layers = 16, 2, 1, 8, 32, 2
  assert adapters["layers/attn/q/kernel"]["a"].shape == (layers, d, 3)
  assert adapters["layers/attn/q/kernel"]["b"].shape == (layers, 3, n, h)
  assert adapters["layers/attn/k/kernel"]["b"].shape == (layers, 3, k, h)
  assert adapters["layers/attn/o/kernel"]["a"].shape == (layers, n, h, 3)
  assert adapters["layers/attn/o/kernel"]["b"].shape == (layers, 3, d)
  assert adapters["layers/mlp/down/kernel"]["a"].shape == (layers, f, 3)
  for pair in adapters.values():
    assert not np.any(np.asarray(pair["b"]))
  a = np.concatenate([np.ravel(adapters[p]["a"]) * np.sqrt(16) for p in
                      ("layers/attn/q/kernel", "layers/attn/o/kernel")])
  assert 0.8 < a.std() < 1.2  # N(0, 1 / fan-in), rescaled to unit variance
  merged = jax.jit(lambda p, a: L.merge_lora(p, a, alpha=8.0))(params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert leaves_equal(merged, params)
  assert set(L.init_lora(params, rank=2)) == set(L.DEFAULT_TARGETS)


def test_merge_lora_matches_numpy_per_layer():
  params = decoder_params()
  rng = np.random.default_rng(0)
  rank, alpha = 3, 6.0
  adapters = {}
  for path in ("layers/attn/q/kernel", "layers/attn/o/kernel"):
    pair = L.init_lora(params, rank, targets=(path,))[path]
    adapters[path] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in pair.items()}
  merged = L.merge_lora(params, adapters, alpha)
  for path, n_in in (("layers/attn/q/kernel", 1), ("layers/attn/o/kernel", 2)):
    w = np.asarray(L.get_path(params, path))
    a, b = adapters[path]["a"], adapters[path]["b"]
    for layer in range(w.shape[0]):
      fan_in = int(np.prod(w.shape[1:1 + n_in]))
      delta = a[layer].reshape(fan_in, rank) @ b[layer].reshape(rank, -1)
      expected = w[layer] + (alpha / rank) * delta.reshape(w.shape[1:])
      np.testing.assert_allclose(L.get_path(merged, path)[layer], expected, rtol=1e-5,
                                 atol=1e-6)
  np.testing.assert_array_equal(merged["layers"]["attn"]["v"]["kernel"],
                                params["layers"]["attn"]["v"]["kernel"])
  assert merged["layers"]["mlp"] is params["layers"]["mlp"]  # untouched subtrees are shared

  with pytest.raises(ValueError, match="unknown LoRA targets"):
    L.init_lora(params, 2, targets=("layers/attn/x/kernel",))
  with pytest.raises(ValueError, match="'layers/attn/q/kernel'.*do not fit"):
    L.merge_lora(params, {"layers/attn/q/kernel": adapters["layers/attn/o/kernel"]}, alpha)
  with pytest.raises(KeyError, match="no 'lm_head'"):
    L.get_path({"embed": {}}, "lm_head/kernel")


def test_lora_only_training_lowers_the_loss_and_keeps_the_base(tmp_path):
  base = decoder_params()
  tree = L.lora_tree(base, L.init_lora(base, rank=4, targets=tuple(L.LORA_TARGETS)))
  config = TrainConfig(steps=30, learning_rate=3e-2, checkpoint_every=10, log_every=29)
  loss = L.lora_loss_fn(lm_loss, alpha=8.0)
  result = train(loss, tree, token_batch_at, config, str(tmp_path / "lora"),
                 trainable=L.trainable_lora_mask(tree), progress=False)
  first, last = result.history[0]["loss"], result.history[-1]["loss"]
  assert last < 0.7 * first, (first, last)
  assert leaves_equal(result.params["base"], decoder_params())
  assert not leaves_equal(result.params["lora"], tree["lora"])
  again = train(loss, tree, token_batch_at, config, str(tmp_path / "lora"),
                trainable=L.trainable_lora_mask(tree), progress=False)
  assert again.resumed_from == 30 and leaves_equal(again.params, result.params)
