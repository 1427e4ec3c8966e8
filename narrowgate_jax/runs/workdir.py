"""A run's working directory: what it was run with, its records, and what it concluded.

  <workdir>/config.json    {"config": ..., "provenance": ...}: the experiment config (enough to
                           reproduce the run: `read_config`) and where it first ran (versions, git
                           commit, devices); a restart adds its own provenance under "resumed"
  <workdir>/records.jsonl  one record per (example, condition): `records.RecordStore`
  <workdir>/metrics.json   aggregate metrics, rewritten whole (`write_json`)
  <workdir>/report.md, <workdir>/figures/

A run restarted in the same workdir continues from its records, but only with the same config:
records computed under two configs would be mixed silently otherwise. Provenance (versions,
hosts, devices) may differ between restarts; it is recorded, never checked.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
from typing import Any, Mapping, Optional, Sequence

from narrowgate_jax.runs.records import DEFAULT_KEY_FIELDS, RecordStore, fsync_dir, to_jsonable

CONFIG_FILE = "config.json"
RECORDS_FILE = "records.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
MAX_LISTED_DIFFERENCES = 5
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "transformers")


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` (numpy values converted) as sorted, indented JSON, atomically: a temporary file
  in the same directory, fsync, then os.replace, so a kill leaves the old file or the new one."""
  text = json.dumps(to_jsonable(obj, os.path.basename(path)), indent=2, sort_keys=True) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fsync_dir(directory)


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str) -> dict:
  """The config a run was started with, from its workdir or its config.json."""
  if os.path.isdir(path):
    path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file (not a run's workdir?)")
  stored = _read_json(path)
  if not isinstance(stored, dict) or "config" not in stored:
    raise ValueError(f"{path}: no \"config\" field (not written by Workdir.open?)")
  return stored["config"]


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def config_differences(stored: Any, new: Any, prefix: str = "") -> list[str]:
  """"path: stored != new" for every differing leaf of two JSON configs, with dotted paths into
  nested dicts ("model.path: 'a' != 'b'"); a field only one side has is "(absent)" on the other."""
  if isinstance(stored, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(stored) | set(new)):
      path = f"{prefix}.{k}" if prefix else k
      if k not in stored:
        out.append(f"{path}: (absent) != {_short(new[k])}")
      elif k not in new:
        out.append(f"{path}: {_short(stored[k])} != (absent)")
      else:
        out.extend(config_differences(stored[k], new[k], path))
    return out
  if stored == new and isinstance(stored, bool) == isinstance(new, bool):  # else True == 1
    return []
  return [f"{prefix or '(config)'}: {_short(stored)} != {_short(new)}"]


def _as_json_config(config: Any) -> dict:
  """The config as it reads back from config.json (ConfigDicts as dicts, tuples as lists), so a
  restart compares like with like."""
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a dict or a ConfigDict, not {type(config).__name__}")
  return json.loads(json.dumps(to_jsonable(dict(config), "config")))


def _git(directory: str, *args: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                         timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None  # no git, or too slow to matter
  return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def provenance(mesh: Any = None) -> dict:
  """Where and with what a run ran: package versions (None when not installed; from package
  metadata, so nothing heavy is imported), the git commit of the checkout holding narrowgate_jax
  (None when it is not one) and whether its tracked files differ from it, the JAX backend, devices
  and processes, the mesh's axis sizes when given, the host, and the UTC time now."""
  import jax  # here, so that reading and writing records never needs it

  package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = _git(package_dir, "rev-parse", "HEAD")
  status = _git(package_dir, "status", "--porcelain", "--untracked-files=no") if commit else None
  devices = jax.devices()
  return {
      "versions": {"python": platform.python_version(),
                   "narrowgate_jax": _version("narrowgate-jax"),
                   **{p: _version(p) for p in PACKAGES}},
      "git_commit": commit,
      "git_dirty": None if status is None else bool(status),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "process_index": jax.process_index(),
      "mesh_shape": None if mesh is None else {str(k): int(v) for k, v in mesh.shape.items()},
      "hostname": socket.gethostname(),
      "start_time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _prepare_directory(path: str) -> None:
  """Creates `path` (and parents) and checks that files can be created in it; one-line OSError
  naming the workdir otherwise. Probes with a real file: os.access says yes to root even where a
  write would fail."""
  try:
    os.makedirs(path, exist_ok=True)
    os.makedirs(os.path.join(path, FIGURES_DIR), exist_ok=True)
  except OSError as e:
    raise OSError(f"workdir {path}: cannot create it ({e.strerror or e})") from None
  try:
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise OSError(f"workdir {path}: not writable ({e.strerror or e})") from None


_provenance = provenance  # `Workdir.open`'s argument of the same name hides it


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The files of one run (see the module docstring). `Workdir(path).open(config, provenance)`
  starts or resumes the run; the properties are just paths."""

  path: str

  @property
  def config_json(self) -> str:
    return os.path.join(self.path, CONFIG_FILE)

  @property
  def records_jsonl(self) -> str:
    return os.path.join(self.path, RECORDS_FILE)

  @property
  def metrics_json(self) -> str:
    return os.path.join(self.path, METRICS_FILE)

  @property
  def report_md(self) -> str:
    return os.path.join(self.path, REPORT_FILE)

  @property
  def figures_dir(self) -> str:
    return os.path.join(self.path, FIGURES_DIR)

  def open(self, config: Any, provenance: Optional[dict] = None) -> Workdir:
    """Starts the run here, or resumes it. Creates the directory; on the first start writes
    config.json = {"config": config, "provenance": provenance}; on a restart checks that the
    stored config equals `config` (ValueError listing the differing fields otherwise) and adds
    `provenance` to the "resumed" list. provenance: `provenance()` (no mesh) when not given.
    Returns self."""
    config = _as_json_config(config)
    provenance = to_jsonable(provenance if provenance is not None else _provenance(), "provenance")
    _prepare_directory(self.path)
    if not os.path.exists(self.config_json):
      if os.path.exists(self.records_jsonl) and os.path.getsize(self.records_jsonl):
        # config.json is written before any record, so someone removed it: nothing to check.
        raise ValueError(f"workdir {self.path}: has {RECORDS_FILE} but no {CONFIG_FILE}, so "
                         "its config cannot be checked; use a new workdir")
      write_json(self.config_json, {"config": config, "provenance": provenance})
      return self
    stored = _read_json(self.config_json)
    if not isinstance(stored, dict) or "config" not in stored:
      raise ValueError(f"{self.config_json}: no \"config\" field (not written by Workdir.open?)")
    differences = config_differences(stored["config"], config)
    if differences:
      listed = "; ".join(differences[:MAX_LISTED_DIFFERENCES])
      more = len(differences) - MAX_LISTED_DIFFERENCES
      listed += f"; and {more} more" if more > 0 else ""
      raise ValueError(f"workdir {self.path} holds a run with a different config (stored != new: "
                       f"{listed}); use a new workdir, or this one's config ({CONFIG_FILE})")
    stored["resumed"] = stored.get("resumed", []) + [provenance]
    write_json(self.config_json, stored)
    return self

  def config(self) -> dict:
    """The stored config."""
    return read_config(self.config_json)

  def records(self, key_fields: Sequence[str] = DEFAULT_KEY_FIELDS) -> RecordStore:
    """The run's record store (opening it repairs a torn last line)."""
    return RecordStore(self.records_jsonl, key_fields)

  def write_metrics(self, metrics: Mapping[str, Any]) -> None:
    """Replaces metrics.json atomically."""
    write_json(self.metrics_json, dict(metrics))
