"""Narrow Gate Fig. 3: cross-modal attention from the text after the image to the image span.

  --config=configs/experiments/ng_attention_flow.py:<model> --config.data.path=<imagenet folders>
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "chameleon_7b") -> ml_collections.ConfigDict:
  config = run_config("ng_attention_flow", model)
  config.data = ml_collections.ConfigDict(dict(format="imagenet", path="data/imagenet", classes=100,
                                               per_class=10, seed=0, prompt="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(
      weighting="probability",  # or "value_norm": weights times ||W_O v|| (the code's variant)
      hot=dict(),  # model-specific positions: name -> image-token indices, e.g. {"first": [0]}
  ))
  return config
