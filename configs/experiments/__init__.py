"""Experiment configs: one file per figure or table of the studies, each a `get_config(arg)`
returning the full run config (`run_config` below plus the experiment's own fields).

  python -m experiments.run --config=configs/experiments/<name>.py:<model> --workdir=DIR
"""

from __future__ import annotations

import ml_collections

from configs import models


def run_config(experiment: str, model: str) -> ml_collections.ConfigDict:
  """The fields every run has. `model` names a configs/models module."""
  return ml_collections.ConfigDict(dict(
      experiment=experiment,
      model=models.get(model),
      # format "jsonl" reads `path`; "gqa" / "gqa_csv" read their own fields (see
      # narrowgate_jax.runs.loop.load_data). limit > 0: only the first `limit` examples.
      data=dict(format="jsonl", path="data/synthetic", limit=0),
      batch_size=8,
      buckets=(),  # token lengths batches are padded to, e.g. (256, 384, 512); () = automatic
      mesh=dict(data=-1, model=1),  # -1: every device the model axis leaves
      seed=0,
      experiment_config=dict(),
  ))
