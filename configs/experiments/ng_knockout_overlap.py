"""Narrow Gate Table 1's ImageNet column and the progressive knockout: chi at the last layer on
the last token, clean and under each knockout in the last w layers.

  --config=configs/experiments/ng_knockout_overlap.py:<model> --config.data.path=<imagenet>
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "chameleon_7b") -> ml_collections.ConfigDict:
  config = run_config("ng_knockout_overlap", model)
  config.data = ml_collections.ConfigDict(dict(format="imagenet", path="data/imagenet", classes=100,
                                               per_class=100, seed=0, prompt="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(
      conditions=["eoi", "image_to_text", "random"],
      widths=["all", "4", "8", "16"],  # "all" = Table 1; numbers = the last w layers
      mode="post_softmax", random_tokens=10, random_repeats=1, k=30,
  ))
  return config
