"""The experiment runner end to end on a tiny converted LLaVA and a synthetic dataset: what a run
writes, resuming after SIGKILL, 1 vs 8 devices, shape bucketing, reproduction from config.json,
and one-line errors for bad input before anything compiles."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import transformers

import reference as R
from checkpoints_convert.convert import convert
from configs.experiments import first_token_knockout
from experiments import first_token  # noqa: F401  (registers the experiment)
from narrowgate_jax import model as model_module
from narrowgate_jax.data import load_dataset
from narrowgate_jax.data.synthetic import WORDS as SYNTHETIC_WORDS
from narrowgate_jax.data.synthetic import write_synthetic
from narrowgate_jax.runs import loop
from narrowgate_jax.runs.records import RecordStore
from narrowgate_jax.runs.workdir import read_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
            projection_dim=32)
CONDITIONS = ("clean", "image_to_last", "image_to_text_post", "question_to_last")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny LLaVA-1.5 (CLIP + Llama) whose word-level tokenizer covers the synthetic data."""
  words = tuple(dict.fromkeys(R.WORDS + tuple(w.lower() for w in SYNTHETIC_WORDS)))
  vmap = {t: i for i, t in enumerate(SPECIALS + words)}
  tokenizer = R.word_tokenizer(vmap, SPECIALS, add_bos=True,
                               extra_special_tokens={"image_token": "<image>"})
  config = transformers.LlavaConfig(vision_config=CLIP,
                                    text_config=R.tiny_llama(vocab_size=max(97, len(vmap) + 8),
                                                             max_position_embeddings=256),
                                    image_token_index=vmap["<image>"])
  root = tmp_path_factory.mktemp("runner_model")
  R.build(config, root / "hf")
  tokenizer.save_pretrained(root / "hf")
  transformers.LlavaImageProcessorPil(size={"shortest_edge": 28},
                                      crop_size={"height": 28, "width": 28}).save_pretrained(
                                          root / "hf")
  convert(str(root / "hf"), str(root / "ng"), progress=False)
  return str(root / "ng")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("synthetic")
  write_synthetic(str(directory), num_examples=12, seed=0)
  return str(directory)


def _config(model_dir, data_dir, **overrides) -> ml_collections.ConfigDict:
  config = first_token_knockout.get_config("local")
  config.model.path = model_dir
  config.data.path = data_dir
  config.batch_size = 4
  config.buckets = (48, 64, 96, 128, 192, 256)
  config.mesh.data, config.mesh.model = 1, 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def finished(model_dir, data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "work")
  metrics = loop.run(_config(model_dir, data_dir), workdir, progress=False)
  return workdir, metrics


def _keys(workdir):
  records = RecordStore(os.path.join(workdir, "records.jsonl")).records()
  return [(r["example"], r["condition"]) for r in records]


def test_a_run_writes_config_records_metrics_figures_and_report(finished, data_dir):
  workdir, metrics = finished
  stored = json.load(open(os.path.join(workdir, "config.json")))
  assert stored["config"]["model"]["path"] and "jax" in json.dumps(stored["provenance"])
  ids = [load_dataset(data_dir)[i].id for i in range(12)]
  assert sorted(_keys(workdir)) == sorted((i, c) for i in ids for c in CONDITIONS)
  assert json.load(open(os.path.join(workdir, "metrics.json"))) == json.loads(json.dumps(metrics))
  assert set(metrics["conditions"]) == set(CONDITIONS)
  assert os.path.exists(os.path.join(workdir, "figures", "p_answer.png"))
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| condition |" in report and "figures/p_answer.png" in report


def _cli(*args) -> list[str]:
  config = os.path.join(REPO, "configs", "experiments", "first_token_knockout.py")
  return [sys.executable, "-m", "experiments.run", f"--config={config}:local", "--progress=false",
          *args]


def _cli_config_args(model_dir, data_dir) -> list[str]:
  return [f"--config.model.path={model_dir}", f"--config.data.path={data_dir}",
          "--config.batch_size=4", "--config.mesh.data=1",
          "--config.buckets=(48, 64, 96, 128, 192, 256)"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


# Runs experiments.run with one change: the second append to records.jsonl writes only half of
# its bytes, marks that it got there, and waits to be killed. So the kill lands mid-write on every
# machine, however fast, and leaves a torn line behind.
_TORN_RUN = """
import os, sys, time
from absl import app
from experiments import run
from narrowgate_jax.runs import records

marker, calls = sys.argv.pop(1), []
def half_then_wait(path, data):
  calls.append(path)
  if len(calls) < 2:
    return write_whole(path, data)
  fd = os.open(path, os.O_WRONLY | os.O_APPEND)
  os.write(fd, data[: len(data) // 2])
  os.fsync(fd)
  os.close(fd)
  open(marker, "w").close()
  time.sleep(600)
write_whole, records._append_bytes = records._append_bytes, half_then_wait
app.run(run.main, flags_parser=run.parse_flags)
"""


def test_a_killed_run_resumes_with_every_record_exactly_once(finished, model_dir, data_dir,
                                                             tmp_path):
  """SIGKILL in the middle of writing the second batch's records, restart, and compare with the
  run that was never interrupted."""
  workdir = str(tmp_path / "work")
  marker = str(tmp_path / "stopped_mid_write")
  config_args = _cli_config_args(model_dir, data_dir) + [f"--workdir={workdir}"]
  proc = subprocess.Popen([sys.executable, "-c", _TORN_RUN, marker, *_cli()[3:], *config_args],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not os.path.exists(marker):
    time.sleep(0.05)
  assert proc.poll() is None and os.path.exists(marker), proc.stderr.read().decode()[-2000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  records = os.path.join(workdir, "records.jsonl")
  assert not open(records, "rb").read().endswith(b"\n"), "the kill should leave a torn line"
  partial = len(_keys(workdir))  # opening the store cuts the torn line off
  assert 0 < partial < 12 * len(CONDITIONS)
  done = subprocess.run(_cli(*config_args), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  keys = _keys(workdir)
  assert len(keys) == len(set(keys)) == 12 * len(CONDITIONS)
  ours = json.load(open(os.path.join(workdir, "metrics.json")))
  reference = json.load(open(os.path.join(finished[0], "metrics.json")))
  np.testing.assert_allclose(_flat(ours), _flat(reference), rtol=1e-6)


def _flat(metrics) -> list[float]:
  return [v for c in sorted(metrics["conditions"]) for k, v in
          sorted(metrics["conditions"][c].items()) if v is not None]


def test_one_and_eight_devices_give_the_same_records(finished, model_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "mesh")
  config = _config(model_dir, data_dir, **{"mesh.data": 4, "mesh.model": 2})
  metrics = loop.run(config, workdir, progress=False)
  ours = {k: r for k, r in zip(_keys(workdir),
                               RecordStore(os.path.join(workdir, "records.jsonl")).records())}
  reference = {k: r for k, r in zip(_keys(finished[0]),
                                    RecordStore(os.path.join(finished[0],
                                                             "records.jsonl")).records())}
  assert ours.keys() == reference.keys()
  for key, record in ours.items():
    assert record["top_token"] == reference[key]["top_token"], key
    np.testing.assert_allclose(record["p_answer"], reference[key]["p_answer"], rtol=1e-4)
  np.testing.assert_allclose(_flat(metrics), _flat(finished[1]), rtol=1e-4)


def test_bucketing_bounds_the_compiled_shapes(model_dir, tmp_path):
  """50 examples of varied image sizes and prompt lengths compile one forward per bucket used."""
  data = tmp_path / "fifty"
  write_synthetic(str(data), num_examples=50, seed=1)
  buckets = (24, 32, 40, 48, 64)
  config = _config(model_dir, str(data), buckets=buckets)
  before = (model_module.forward_fn._cache_size(),
            model_module.forward_conditions_fn._cache_size())
  loop.run(config, str(tmp_path / "work"), progress=False)
  after = (model_module.forward_fn._cache_size(),
           model_module.forward_conditions_fn._cache_size())
  lengths = {loop.bucket_length(n, buckets) for n in _lengths(config)}
  assert 1 < len(lengths) <= len(buckets)
  # one clean forward and one stacked call per softmax mode, per bucket
  assert after[0] - before[0] <= len(lengths)
  assert after[1] - before[1] <= 2 * len(lengths)


def _lengths(config):
  import narrowgate_jax as ng
  from narrowgate_jax.runs.experiment import build

  vlm = ng.load(config.model.path)
  experiment = build(config)
  dataset = load_dataset(config.data.path)
  return [loop.prepare_one(config, vlm, experiment, dataset[i]).shape[1]
          for i in range(len(dataset))]


def test_config_json_alone_reproduces_the_run(finished, tmp_path):
  config = ml_collections.ConfigDict(read_config(finished[0]))
  metrics = loop.run(config, str(tmp_path / "again"), progress=False)
  assert metrics == finished[1]


def test_a_different_config_in_the_same_workdir_is_refused(finished, model_dir, data_dir):
  config = _config(model_dir, data_dir, batch_size=2)
  with pytest.raises(ValueError, match="batch_size"):
    loop.run(config, finished[0], progress=False)


@pytest.mark.parametrize("case", ["unknown_field", "missing_model", "unwritable", "empty_data"])
def test_bad_input_is_one_line_before_compiling(case, model_dir, data_dir, tmp_path):
  args = _cli_config_args(model_dir, data_dir)
  workdir = str(tmp_path / "work")
  if case == "unknown_field":
    args.append("--config.no_such_field=1")
    expected = "no_such_field"
  elif case == "missing_model":
    args[0] = f"--config.model.path={tmp_path / 'nowhere'}"
    expected = "does not exist"
  elif case == "unwritable":
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = str(blocker / "work")
    expected = "work"
  else:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "examples.jsonl").write_text("")
    args[1] = f"--config.data.path={empty}"
    expected = "no examples"
  done = subprocess.run(_cli(*args, f"--workdir={workdir}"), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and expected in lines[0], done.stderr[-2000:]


def test_dry_run_prints_shapes_and_memory(model_dir, data_dir, capsys):
  loop.run(_config(model_dir, data_dir), None, dry_run=True, progress=False)
  out = capsys.readouterr().out
  assert "forward shapes that will compile: [4, " in out and "estimated memory per device" in out
