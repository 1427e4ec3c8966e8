"""Cross-modal answer formation (PROTOCOLS.md §3): the logit lens at the last prompt position.

  --config=configs/experiments/cm_answer_formation.py:<model>,<task>
"""

import ml_collections

from configs.experiments import run_config


def get_config(arg: str = "llava_1_5_7b,ChooseAttr") -> ml_collections.ConfigDict:
  model, task = (arg.split(",") + ["", ""])[:2]
  config = run_config("answer_formation", model or "llava_1_5_7b")
  config.model.chat = True
  config.data = ml_collections.ConfigDict(dict(
      format="gqa", task=task or "ChooseAttr", questions="", scene_graphs="", images="",
      csv="", path="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(final_norm=True))
  return config
