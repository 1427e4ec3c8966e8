"""A run's config.json as a config file: reproduce a run from what it wrote.

  python -m experiments.run --config=configs/from_json.py:results/run/config.json --workdir=NEW
"""

import ml_collections

from narrowgate_jax.runs.workdir import read_config


def get_config(path: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(read_config(path))
