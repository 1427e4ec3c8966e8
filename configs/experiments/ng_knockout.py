"""Narrow Gate Table 1: generation under attention knockout, scored per task.

  --config=configs/experiments/ng_knockout.py:<model>,<task>[,<layers>]
    task    vqa (VQAv2 validation, 2,000 questions, seed 42, 20 new tokens, VQA accuracy) or
            caption (Karpathy test split, first 2,000 rows, 60 new tokens, CIDEr-D)
    layers  all (default) or last:<w> (the progressive knockout: only the last w layers)
  e.g. --config=configs/experiments/ng_knockout.py:chameleon_7b,vqa --config.data.path=vqav2
"""

import ml_collections

from configs.experiments import run_config


def get_config(arg: str = "chameleon_7b,vqa") -> ml_collections.ConfigDict:
  model, task, layers = (arg.split(",") + ["", "", ""])[:3]
  task = task or "vqa"
  config = run_config("ng_knockout_eval", model or "chameleon_7b")
  if task == "vqa":
    config.data = ml_collections.ConfigDict(dict(format="vqav2", path="data/vqav2", sample=2000,
                                                 seed=42, prompt="", limit=0))
  else:
    config.data = ml_collections.ConfigDict(dict(format="karpathy",
                                                 path="data/karpathy/dataset_coco.json",
                                                 images="data/coco", split="test", first=2000,
                                                 prompt="", limit=0))
  config.experiment_config = ml_collections.ConfigDict(dict(
      task=task,
      conditions=["eoi", "image_to_text", "random", "last_image", "all_image"],
      layers=layers or "all",
      mode="post_softmax",  # the Narrow Gate study's semantics; "pre_softmax" renormalises
      random_tokens=10,
      random_repeats=5 if task == "vqa" else 3,
      max_new_tokens=20 if task == "vqa" else 60,
      normalize_unanimous=False,  # official VQA rule; the study's code normalises always (True)
  ))
  return config
