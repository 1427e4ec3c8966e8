"""Narrow Gate: steering at EOI with alpha * (class-B mean - class-A mean), alpha swept.

  --config=configs/experiments/ng_steering.py:<model> --config.data.path=<imagenet folders>
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "chameleon_7b") -> ml_collections.ConfigDict:
  config = run_config("ng_steering", model)
  config.data = ml_collections.ConfigDict(dict(format="imagenet", path="data/imagenet", classes=20,
                                               per_class=50, seed=0, prompt="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(
      layer=-1,  # a layer index; -1: use `depth`
      depth=0.5,  # a fraction of the model's depth (the study's effect peaks at 0.3-0.7)
      alphas=[0.5, 1.0, 2.0, 4.0],
  ))
  config.batch_size = 2
  return config
