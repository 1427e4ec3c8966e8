"""Narrow Gate Fig. 5: activation patching at EOI between paired ImageNet classes.

  --config=configs/experiments/ng_patching.py:<model> --config.data.path=<imagenet folders>
Classes are paired in label order (0 with 1, 2 with 3, ...), the i-th images of a pair with
each other; every image is once the recipient and once the source.
"""

import ml_collections

from configs.experiments import run_config


def get_config(model: str = "chameleon_7b") -> ml_collections.ConfigDict:
  config = run_config("ng_patching", model)
  config.data = ml_collections.ConfigDict(dict(format="imagenet", path="data/imagenet", classes=20,
                                               per_class=50, seed=0, prompt="", limit=0))
  # "resid_pre": layer l's input at EOI, one layer at a time; "attn_in": the attention input at EOI
  # in every layer from l on (the study's two variants)
  config.experiment_config = ml_collections.ConfigDict(dict(site="resid_pre"))
  config.batch_size = 2  # examples per batch; each is two rows (recipient, source)
  return config
