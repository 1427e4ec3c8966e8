"""The experiment runner: a config and a workdir in, records, metrics, figures and a report out.

  run(config, workdir)    what `python -m experiments.run` calls

Order of work, so that bad input fails in one line before anything compiles: the experiment
name, the dataset (it must exist and have examples), the model path, the workdir (writable; the
same config as any earlier run there), then the model is loaded and the examples not yet fully
recorded are processed.

Batching streams: each example is prepared on its own (`Experiment.prepare`: tokenizer, image
encoder; one row, or several when an experiment reads an example in several prompts), queued
under the bucket its token count falls in (`runs.batching`), and a bucket's
queue runs as one batch, padded to the bucket's length, once it holds `batch_size` examples; what
is left at the end runs with filler rows (copies of a queued example, whose records are dropped).
With a fixed batch size a dataset therefore compiles at most one forward per bucket used, and
memory holds at most batch_size prepared examples per bucket.

Data parallel: the model is loaded on a (data, model) mesh of this process's devices
(`config.mesh`), so each batch is split over `data` and the parameters over `model`. With several
processes (hosts), each reads only its share of the dataset (example i on process i % count) and
writes its own records file; after one barrier, process 0 computes the metrics from all of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from narrowgate_jax import data as D
from narrowgate_jax.data import Example, load_dataset, shard
from narrowgate_jax.data.gqa import load_gqa, load_gqa_csv
from narrowgate_jax.processing.batch import Batch, concatenate, pad_to
from narrowgate_jax.runs import report
from narrowgate_jax.runs.arrays import store_arrays
from narrowgate_jax.runs.batching import bucket_length, default_buckets, plan_batches
from narrowgate_jax.runs.experiment import Experiment, build
from narrowgate_jax.runs.records import RecordStore
from narrowgate_jax.runs.workdir import Workdir, provenance


@dataclasses.dataclass
class _Queue:
  """Prepared examples waiting for their bucket's batch to fill."""

  examples: list
  batches: list


def load_data(data: ml_collections.ConfigDict):
  """config.data -> the dataset, by `format`:
    jsonl        `path` (narrowgate_jax.data.jsonl)
    gqa          the official `questions` and `scene_graphs` JSON files and the `images` folder,
                 filtered to `task`; questions with a box outside their image, or none when
                 `require_boxes`, are skipped and counted (`on_bad`)
    gqa_csv      the cross-modal study's per-task `csv` file and `images` (`scene_graphs` for
                 boxes the CSV lacks)
    vqav2        `path`: the official questions / annotations files and val2014 images
                 (`sample` questions drawn with `seed`)
    karpathy     `path`: a Karpathy caption JSON, `images` its image root (`split`, `first`)
    imagenet     `path`: class folders with a synset mapping (`classes`, `per_class`, `seed`)
    hf_datasets  `path`: a `datasets` folder or parquet files, `task` vqa / caption /
                 classification (`split`)
  `prompt` replaces the format's default prompt template (the study's)."""
  fmt = data.get("format", "jsonl")
  limit = int(data.get("limit") or 0) or None
  options = dict(on_bad=data.get("on_bad", "skip"), require_boxes=data.get("require_boxes", False))
  if fmt == "jsonl":
    return load_dataset(data.path)
  if fmt == "gqa":
    return load_gqa(data.questions, data.scene_graphs, data.images, task=data.task or None,
                    limit=limit, **options)
  if fmt == "gqa_csv":
    return load_gqa_csv(data.csv, data.images, task=data.task or None, limit=limit,
                        scene_graphs_json=data.get("scene_graphs") or None, **options)
  prompt = {"template": data.prompt} if data.get("prompt") else {}
  if fmt == "vqav2":  # the study: 2,000 questions sampled with seed 42
    return D.load_vqav2(data.path, sample=data.get("sample") or None,
                        seed=int(data.get("seed", 42)), **prompt)
  if fmt == "karpathy":  # the study: the first 2,000 rows of the test split
    return D.load_karpathy(data.path, data.images, split=data.get("split", "test"),
                           first=data.get("first") or None, **prompt)
  if fmt == "imagenet":
    return D.load_imagenet_folders(data.path, classes=data.get("classes") or None,
                                   per_class=data.get("per_class") or None,
                                   seed=int(data.get("seed", 0)), **prompt)
  if fmt == "hf_datasets":
    return D.load_hf_dataset(data.path, data.task, split=data.get("split") or None, **prompt)
  raise ValueError(f"config.data.format {fmt!r}; expected one of jsonl, gqa, gqa_csv, vqav2, "
                   "karpathy, imagenet, hf_datasets")


def check_inputs(config: ml_collections.ConfigDict) -> tuple[Experiment, object, dict]:
  """The experiment, the dataset (this process's share) and what the loader skipped (reason ->
  count), or a one-line error."""
  experiment = build(config)
  dataset = load_data(config.data)
  skipped = dict(getattr(dataset, "skipped", {}) or {})
  if len(dataset) == 0:
    where = config.data.get("path") or config.data.get("questions") or config.data.get("csv")
    raise ValueError(f"dataset {where} has no examples")
  if config.data.get("limit"):
    dataset = _first(dataset, int(config.data.limit))
  dataset = shard(dataset, jax.process_index(), jax.process_count())
  if not os.path.isdir(config.model.path):
    raise FileNotFoundError(f"model path {config.model.path} does not exist (config.model.path)")
  return experiment, dataset, skipped


def _first(dataset, n: int):
  from narrowgate_jax.data import ListDataset

  return ListDataset(dataset.name, [dataset[i] for i in range(min(n, len(dataset)))])


def make_mesh(config: ml_collections.ConfigDict):
  """config.mesh (data, model) -> a Mesh over this process's devices, or None for one device.

  Each process's mesh holds only its own devices: examples are independent, so processes need
  no collective until the end, and each runs at its own pace (its share of the dataset can
  bucket into different shapes and batch counts without any process waiting on another)."""
  import narrowgate_jax as ng

  data, model = int(config.mesh.data), int(config.mesh.model)
  if data == -1:
    data = max(1, jax.local_device_count() // model)
  if data == 1 and model == 1:
    return None
  return ng.make_mesh(data=data, model=model, devices=jax.local_devices()[:data * model])


def records_file(workdir: Workdir, process: Optional[int] = None) -> str:
  """records.jsonl; with several processes, records.<process>.jsonl for each."""
  if jax.process_count() == 1:
    return workdir.records_jsonl
  index = jax.process_index() if process is None else process
  return workdir.records_jsonl.replace(".jsonl", f".{index}.jsonl")


def run(config: ml_collections.ConfigDict, workdir_path: str, *, dry_run: bool = False,
        progress: bool = True) -> Optional[dict]:
  """Runs (or resumes) `config` in `workdir_path`; returns the metrics (None for a dry run)."""
  import narrowgate_jax as ng

  experiment, dataset, data_skipped = check_inputs(config)
  mesh = make_mesh(config)
  workdir = None
  if not dry_run:
    workdir = Workdir(workdir_path).open(config.to_dict(), provenance(mesh))
  vlm = ng.load(config.model.path, mesh=mesh, dtype=config.model.get("dtype") or None)
  conditions = experiment.conditions(vlm)
  buckets = _buckets(config, vlm)
  if dry_run:
    print_dry_run(config, vlm, experiment, dataset, conditions, buckets)
    return None
  experiment.workdir = workdir.path
  store = RecordStore(records_file(workdir))
  todo = [dataset[i] for i in range(len(dataset))
          if experiment.keep(dataset[i]) and store.missing(dataset[i].id, conditions)]
  _process(config, vlm, experiment, todo, buckets, store, progress)
  return finish(experiment, workdir, data_skipped)


def _buckets(config, vlm) -> tuple[int, ...]:
  if not config.buckets:
    return tuple(default_buckets(vlm.config.max_positions or 4096))
  return tuple(int(b) for b in config.buckets)


def prepare_one(config, vlm, experiment: Experiment, example: Example) -> Batch:
  return experiment.prepare(vlm, example, chat=bool(config.model.get("chat", False)))


def _process(config, vlm, experiment: Experiment, todo: Sequence[Example], buckets, store,
             progress: bool) -> None:
  size = int(config.batch_size)
  pad = getattr(vlm.tokenizer, "pad_token_id", None) or 0
  queues: dict[int, _Queue] = {}
  bar = tqdm(total=len(todo), desc=experiment.name, unit="ex", disable=not progress,
             dynamic_ncols=True)
  tokens, start = 0, time.perf_counter()

  def flush(length: int) -> None:
    nonlocal tokens
    queue = queues.pop(length)
    rows = queue.batches + [queue.batches[-1]] * (size - len(queue.batches))  # fillers
    batch = concatenate([pad_to(b, length, pad) for b in rows])
    try:
      records = experiment.run_batch(vlm, batch, queue.examples)
    except ValueError as e:  # e.g. a selector that matches nothing: name the examples, not rows
      per = batch.shape[0] // size
      ids = ", ".join(f"row {i * per}: {ex.id!r}" for i, ex in enumerate(queue.examples))
      raise ValueError(f"{e} [batch rows are examples {ids}]") from None
    store.append(store_arrays(records, experiment.workdir))
    tokens += int(sum(np.asarray(b.attention_mask).sum() for b in queue.batches))
    bar.update(len(queue.examples))
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(ex_per_s=f"{bar.n / elapsed:.2f}", tok_per_s=f"{tokens / elapsed:.0f}")

  for example in todo:
    batch = prepare_one(config, vlm, experiment, example)
    length = bucket_length(batch.shape[1], buckets)
    queue = queues.setdefault(length, _Queue([], []))
    queue.examples.append(example)
    queue.batches.append(batch)
    if len(queue.examples) == size:
      flush(length)
  for length in sorted(queues):
    flush(length)
  bar.close()


def finish(experiment: Experiment, workdir: Workdir,
           data_skipped: Optional[dict] = None) -> Optional[dict]:
  """Metrics, figures and report.md from every record (process 0, once all have finished);
  the metrics also count the examples the dataset loader skipped (reason -> count)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("narrowgate records written")
    if jax.process_index() != 0:
      return None
  records = [r for i in range(jax.process_count())
             for r in RecordStore(records_file(workdir, i)).records()]
  metrics = experiment.metrics(records)
  if data_skipped:
    metrics["data_skipped"] = data_skipped
  workdir.write_metrics(metrics)
  os.makedirs(workdir.figures_dir, exist_ok=True)
  figures = experiment.figures(records, metrics, workdir.figures_dir)
  report.write_report(workdir, experiment, metrics, figures)
  return metrics


def print_dry_run(config, vlm, experiment: Experiment, dataset, conditions, buckets) -> None:
  """The resolved config, the shapes that will compile, and an estimate of memory per device."""
  lengths = [prepare_one(config, vlm, experiment, dataset[i]).shape[1]
             for i in range(len(dataset))]
  plans = plan_batches(lengths, int(config.batch_size), buckets)
  shapes = sorted({p.length for p in plans})
  print(config)
  print(f"{len(dataset)} examples x {len(conditions)} conditions ({', '.join(conditions)}); "
        f"{len(plans)} batches of {config.batch_size}")
  print("forward shapes that will compile: " + ", ".join(
      f"[{config.batch_size}, {t}]" for t in shapes))
  devices = jax.device_count()
  model_axis = int(config.mesh.model) if int(config.mesh.model) > 0 else 1
  params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(vlm.params))
  c = vlm.config
  longest = max(shapes)
  per_row = longest * c.hidden_size * 4 * (c.num_layers + 1)  # residual stream, float32
  activations = int(config.batch_size) * len(conditions) * per_row
  data_axis = max(1, devices // model_axis)
  print(f"estimated memory per device: parameters {params / model_axis / 2**20:.1f} MiB, "
        f"activations up to {activations / data_axis / 2**20:.1f} MiB (residual stream of every "
        f"layer for every condition at length {longest}); {devices} device(s)")
