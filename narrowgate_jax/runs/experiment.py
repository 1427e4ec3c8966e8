"""What an experiment is, as the runner sees it, and the registry that names them.

An experiment says which conditions it measures and how one prepared batch becomes records; the
runner (`runs.loop`) owns everything else: reading the dataset, bucketing and batching, the mesh,
resuming, progress, and writing config.json, records.jsonl, metrics.json, figures and report.md.
Experiments are registered by name; an experiment config names one in `config.experiment`.

Records are flat dicts with at least "example" (the example's id) and "condition"; one per
example and condition. Vectors go under `runs.arrays.ARRAYS` and are stored beside the records
(`Experiment.arrays` reads them back). A restarted run recomputes an example when any of its records is missing
and stores only the missing ones, so computations must be deterministic given the config.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from narrowgate_jax.data import Example
from narrowgate_jax.processing.batch import Batch


class Experiment:
  """Base class. Subclasses set `name` and implement `conditions` and `run_batch`; `metrics`,
  `figures` and `report` have useful defaults.

  The constructor takes the experiment config (`config.experiment_config`, a ConfigDict) and the
  whole run config, read-only.
  """

  name = ""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.workdir = None  # set by the runner: where `arrays` reads stored vectors from

  def arrays(self, records: Sequence[dict], name: str):
    """The array `name` stored with each record (see `runs.arrays`): [len(records), ...]."""
    from narrowgate_jax.runs.arrays import load_arrays

    return load_arrays(records, name, self.workdir)

  def conditions(self, vlm) -> list[str]:
    """The condition names this run records for every example."""
    raise NotImplementedError

  def prompts(self, example: Example) -> tuple[str, str | None]:
    """The prompt and its question part for `example` (default: the example's own)."""
    return example.prompt, example.question

  def keep(self, example: Example) -> bool:
    """Whether this experiment measures `example` (default: every one)."""
    return True

  def prepare(self, vlm, example: Example, chat: bool = False) -> Batch:
    """One example as batch rows (default: its prompt, one row). An experiment that reads an
    example in several prompts returns one row per prompt, the same number for every example."""
    prompt, question = self.prompts(example)
    images = [list(example.images)] if example.images else None
    return vlm.prepare(images=images, prompts=[prompt],
                       questions=[question] if question is not None else None, chat=chat)

  def run_batch(self, vlm, batch: Batch, examples: Sequence[Example]) -> list[dict]:
    """One prepared batch -> the records of `examples` (its first rows, in order, as many per
    example as `prepare` gives; the rows after them are fillers)."""
    raise NotImplementedError

  def metrics(self, records: Sequence[dict]) -> dict:
    return {"records": len(records)}

  def figures(self, records: Sequence[dict], metrics: dict, directory: str) -> list[str]:
    """Writes figures into `directory`; returns their file names."""
    return []

  def report(self, metrics: dict, figures: Sequence[str]) -> str:
    """The experiment's section of report.md (markdown)."""
    return ""


EXPERIMENTS: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
  """Class decorator: makes an experiment available to configs by its `name`."""
  if not cls.name or cls.name in EXPERIMENTS:
    raise ValueError(f"experiment name {cls.name!r} is empty or taken")
  EXPERIMENTS[cls.name] = cls
  return cls


def build(config: ml_collections.ConfigDict) -> Experiment:
  """The registered experiment `config.experiment` names (`experiments/run.py` imports the
  modules that register them)."""
  if config.experiment not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {config.experiment!r}; known: {sorted(EXPERIMENTS)}")
  return EXPERIMENTS[config.experiment](config)
