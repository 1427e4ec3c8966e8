"""Narrow Gate Fig. 4: neighbourhood overlap chi of the probe positions with the ImageNet class.

  --config=configs/experiments/ng_overlap.py:<model> --config.data.path=<imagenet folders>
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "chameleon_7b") -> ml_collections.ConfigDict:
  config = run_config("ng_overlap", model)
  config.data = ml_collections.ConfigDict(dict(format="imagenet", path="data/imagenet", classes=100,
                                               per_class=100, seed=0, prompt="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(k=30))
  return config
