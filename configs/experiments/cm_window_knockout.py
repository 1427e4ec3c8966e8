"""Cross-modal window knockout (PROTOCOLS.md §3, the study's main figures), on GQA.

  --config=configs/experiments/cm_window_knockout.py:<model>,<task>,<flows>
    model  a configs/models name (default llava_1_5_7b)
    task   ChooseAttr | ChooseCat | ChooseRel | CompareAttr | LogicalObj | QueryAttr
    flows  "last" (Question->Last, Image->Last, Last->Last) or "question" (Image->Question,
           Related-image-patches->Question, Other-image-patches->Question)
  e.g. --config=configs/experiments/cm_window_knockout.py:llava_1_5_13b,ChooseAttr,question \
       --config.data.questions=gqa/val_balanced_questions.json \
       --config.data.scene_graphs=gqa/val_sceneGraphs.json --config.data.images=gqa/images
"""

import ml_collections

from configs.experiments import run_config
from experiments.cross_modal import FLOWS_TO_LAST, FLOWS_TO_QUESTION


def get_config(arg: str = "llava_1_5_7b,ChooseAttr,last") -> ml_collections.ConfigDict:
  model, task, flows = (arg.split(",") + ["", "", ""])[:3]
  config = run_config("cross_modal_windows", model or "llava_1_5_7b")
  config.model.chat = True  # the study prompts every model in its chat template
  config.data = ml_collections.ConfigDict(dict(
      format="gqa", task=task or "ChooseAttr", questions="", scene_graphs="", images="",
      csv="", path="", limit=0))
  flow_set = {"last": FLOWS_TO_LAST, "question": FLOWS_TO_QUESTION}[flows or "last"]
  config.experiment_config = ml_collections.ConfigDict(dict(
      flows=flow_set,
      window=9,  # k; the study's plots also use 7 for some models
      mode="pre_softmax",
      only_correct=True,  # the study keeps the examples the model answers correctly
      bootstrap=1000,
  ))
  config.batch_size = 1
  return config
