"""The storage half of the experiment runner: records that survive SIGKILL at any moment with every
key exactly once, and the workdir's config check, provenance and atomic JSON files."""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from narrowgate_jax.runs import records as records_lib
from narrowgate_jax.runs.records import RecordStore, to_jsonable
from narrowgate_jax.runs.workdir import Workdir, provenance, read_config, write_json

CONDITIONS = ("clean", "knockout", "patch")
BATCH = 2  # examples per append, as the runner writes a batch at a time

# A run that appends one batch of records at a time until `limit` examples (forever when < 0),
# recomputing every example with a record missing, like a restarted experiment. It loads
# records.py by path: the package's __init__ imports jax, which would make each start take seconds.
CHILD = f"""
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("records", {records_lib.__file__!r})
records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(records)
path, limit = sys.argv[1], int(sys.argv[2])
store = records.RecordStore(path)
example = 0
while limit < 0 or example < limit:
  batch = [{{"example": e, "condition": c, "value": np.float32(e) / 4,
             "text": f"{{e}}/{{c}}|" * 500}}
           for e in range(example, example + {BATCH}) if store.missing(e, {CONDITIONS!r})
           for c in {CONDITIONS!r}]  # the whole example again: append skips what is stored
  store.append(batch)
  example += {BATCH}
"""


def _spawn(path: str, limit: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", CHILD, path, str(limit)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_growth(path: str, size: int, proc: subprocess.Popen, timeout: float = 30) -> None:
  deadline = time.monotonic() + timeout
  while not (os.path.exists(path) and os.path.getsize(path) > size):
    if proc.poll() is not None:
      raise AssertionError(f"child exited early: {proc.stderr.read().decode()}")
    assert time.monotonic() < deadline, "child wrote nothing"
    time.sleep(0.005)


def test_sigkill_at_random_moments_keeps_every_key_exactly_once(tmp_path):
  path = str(tmp_path / "records.jsonl")
  rng = random.Random(0)
  torn_seen = 0
  for life in range(6):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    proc = _spawn(path, -1)
    _wait_for_growth(path, size, proc)  # so that every life writes something before it dies
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(path, "rb") as f:
      data = f.read()
    torn_seen += not data.endswith(b"\n")
    if life % 2:
      # A kill lands inside os.write only now and then; so also cut the file at a random byte of
      # its last writes (about 40 kB each), which is what such a kill leaves.
      cut = rng.randrange(max(0, len(data) - 60_000), len(data))
      os.truncate(path, cut)
      torn_seen += not data[:cut].endswith(b"\n")
  assert torn_seen > 0

  stored = RecordStore(path)
  limit = max(e for e, _ in stored.keys()) + 1 + 2 * BATCH
  limit += -limit % BATCH
  proc = _spawn(path, limit)
  assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()

  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  assert lines[-1] == b"", "torn last line"
  recs = [json.loads(line) for line in lines[:-1]]
  counts = collections.Counter((r["example"], r["condition"]) for r in recs)
  assert set(counts) == {(e, c) for e in range(limit) for c in CONDITIONS}
  assert set(counts.values()) == {1}
  for r in recs:  # no record mixes bytes of two writes
    assert r["text"] == f"{r['example']}/{r['condition']}|" * 500
    assert r["value"] == r["example"] / 4
  assert len(RecordStore(path)) == len(recs)


def _write(path, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


GOOD = '{"example":0,"condition":"a","v":1}\n{"example":1,"condition":"a","v":2}\n'


@pytest.mark.parametrize("tail", ['{"example":2,"cond', '{"example":2,"condition":"a"}',
                                  '{"example":2,"cond\n', "\x00\x00\x00\n"])
def test_torn_last_line_is_cut_on_open(tmp_path, tail):
  path = str(tmp_path / "r.jsonl")
  _write(path, GOOD + tail)
  store = RecordStore(path)
  assert store.keys() == {(0, "a"), (1, "a")}
  with open(path) as f:
    assert f.read() == GOOD
  assert store.append([{"example": 2, "condition": "a"}]) == 1
  assert [r["example"] for r in RecordStore(path).records()] == [0, 1, 2]


def test_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
  path = str(tmp_path / "r.jsonl")
  lines = GOOD.splitlines(keepends=True)
  _write(path, lines[0] + '{"example":5,"cond\n' + lines[1])
  with pytest.raises(ValueError, match=r"r\.jsonl line 2: not valid JSON"):
    RecordStore(path)
  _write(path, lines[0] + '{"example":5}\n' + lines[1])
  with pytest.raises(ValueError, match=r"line 2: no key field 'condition'"):
    RecordStore(path)
  _write(path, GOOD + lines[0])
  with pytest.raises(ValueError, match=r"line 3: duplicate key \(0, 'a'\) \(first at line 1\)"):
    RecordStore(path)


def test_duplicates_are_never_written(tmp_path):
  path = str(tmp_path / "r.jsonl")
  store = RecordStore(path)
  a, b, c = ({"example": i, "condition": "x", "v": i} for i in range(3))
  assert store.append([a, dict(a, v=99), b]) == 2
  assert store.append([b, a, c, c]) == 1
  assert store.append([]) == 0
  reopened = RecordStore(path)
  assert len(reopened) == 3 and (0, "x") in reopened and (3, "x") not in reopened
  assert [r["v"] for r in reopened.records()] == [0, 1, 2]
  assert reopened.missing(1, ["x", "y", "z"]) == ["y", "z"]
  assert reopened.append([a]) == 0
  with open(path) as f:
    assert len(f.readlines()) == 3


def test_numpy_values_round_trip_and_bad_values_are_refused(tmp_path):
  path = str(tmp_path / "r.jsonl")
  store = RecordStore(path)
  rec = {"example": np.int64(3), "condition": "x", "loss": np.float32(0.25),
         "hit": np.bool_(True), "probs": np.arange(6, dtype=np.float16).reshape(2, 3) / 2,
         "jax": jax.numpy.arange(2), "tokens": (1, 2)}
  assert store.append([rec]) == 1
  (back,) = RecordStore(path).records()
  assert back == {"example": 3, "condition": "x", "loss": 0.25, "hit": True,
                  "probs": [[0.0, 0.5, 1.0], [1.5, 2.0, 2.5]], "jax": [0, 1], "tokens": [1, 2]}
  reopened = RecordStore(path)
  assert (3, "x") in reopened and (np.int64(3), "x") in reopened and ("3", "x") not in reopened
  assert reopened.missing(np.int64(3), ["x", "y"]) == ["y"]
  with pytest.raises(TypeError, match=r"record 0 field 'extra'.*\[1\]: a object is not JSON"):
    store.append([{"example": 4, "condition": "x", "extra": [1, object()]}])
  with pytest.raises(ValueError, match="record 1 of the append: no key field 'example'"):
    store.append([{"example": 4, "condition": "x"}, {"condition": "x"}])
  assert len(RecordStore(path)) == 1  # a refused append writes nothing


CONFIG = {"model": {"path": "a", "layers": [0, 1]}, "seed": 0, "batch_size": 8}


def test_workdir_first_start_writes_config_and_provenance(tmp_path):
  wd = Workdir(str(tmp_path / "run")).open(CONFIG)
  with open(wd.config_json) as f:
    stored = json.load(f)
  assert stored["config"] == CONFIG
  prov = stored["provenance"]
  assert prov["versions"]["jax"] == jax.__version__ and prov["versions"]["python"]
  assert prov["backend"] == "cpu" and prov["device_count"] == jax.device_count()
  assert prov["process_count"] == 1 and prov["process_index"] == 0
  assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
  assert prov["hostname"] and prov["start_time_utc"].endswith("+00:00")
  assert os.path.isdir(wd.figures_dir)
  assert wd.records().keys() == set() and os.path.exists(wd.records_jsonl)
  assert read_config(wd.path) == read_config(wd.config_json) == wd.config() == CONFIG


def test_provenance_records_the_mesh_shape():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  assert provenance(mesh)["mesh_shape"] == {"data": 2, "model": 4}
  assert provenance()["mesh_shape"] is None


def test_workdir_restart_same_config_passes_and_changed_config_refuses(tmp_path):
  path = str(tmp_path / "run")
  Workdir(path).open(CONFIG, {"host": "first"})
  same = ml_collections.ConfigDict({**CONFIG, "model": {"path": "a", "layers": (0, 1)}})
  Workdir(path).open(same, {"host": "second"})  # a ConfigDict with a tuple reads back the same
  with open(os.path.join(path, "config.json")) as f:
    stored = json.load(f)
  assert stored["provenance"] == {"host": "first"} and stored["resumed"] == [{"host": "second"}]

  changed = {**CONFIG, "model": {"path": "b", "layers": [0, 1]}}
  with pytest.raises(ValueError, match=r"model\.path: 'a' != 'b'\); use a new workdir") as e:
    Workdir(path).open(changed, {"host": "first"})
  assert "\n" not in str(e.value)
  many = {"model": {"path": "b", "layers": [0]}, "seed": 1, "batch_size": True,
          **{f"new{i}": i for i in range(4)}}
  with pytest.raises(ValueError, match=r"batch_size: 8 != True; .*; and 3 more\)") as e:
    Workdir(path).open(many, {})
  assert "new1: (absent) != 1; and 3 more" in str(e.value) and "new2" not in str(e.value)
  assert read_config(path) == CONFIG  # a refused restart changes nothing


def test_unwritable_workdir_is_a_one_line_error(tmp_path):
  afile = tmp_path / "file"
  afile.write_text("")
  with pytest.raises(OSError, match=r"workdir .*file/run: cannot create it") as e:
    Workdir(str(afile / "run")).open(CONFIG, {})
  assert "\n" not in str(e.value)

  readonly = tmp_path / "readonly"
  readonly.mkdir()
  readonly.chmod(0o555)
  try:
    if os.access(readonly, os.W_OK):
      pytest.skip("running as root: permissions do not stop writes")
    with pytest.raises(OSError, match=r"workdir .*readonly/run: cannot create it"):
      Workdir(str(readonly / "run")).open(CONFIG, {})
  finally:
    readonly.chmod(0o755)


def test_write_json_is_atomic_sorted_and_converts_numpy(tmp_path):
  path = str(tmp_path / "metrics.json")
  write_json(path, {"b": np.float32(0.5), "a": np.arange(3)})
  write_json(path, {"b": np.float32(1.5), "a": np.arange(2)})
  with open(path) as f:
    text = f.read()
  assert json.loads(text) == {"a": [0, 1], "b": 1.5} and text.index('"a"') < text.index('"b"')
  assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left behind
  with pytest.raises(TypeError, match=r"metrics\.json\.bad: a set is not JSON"):
    write_json(path, {"bad": {1}})
  assert json.loads(open(path).read()) == {"a": [0, 1], "b": 1.5}
  assert to_jsonable({"x": (np.int8(1), None)}) == {"x": [1, None]}
