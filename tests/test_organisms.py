"""The analyses find what was planted in the shipped model organisms (organisms/), through the
same runner and experiment configs a study run uses; masked fine-tuning removes a planted gate;
the organisms load in transformers with our logits.

The questions ask the shape's size, the attribute every Chameleon organism answers reliably (the
gate organism, whose text sees the image through one token, learned size perfectly and colour
only half-way: see MANIFEST.json and the demo). Thresholds: two balanced answers, so chance is 0.5;
with 48 questions its binomial standard deviation is 0.072, and "at chance" is read as at most
0.5 + 2.5 sd = 0.68. "Intact" is at least 0.9 (the organisms answer 1.0 clean).
"""

import json
import os

import numpy as np
import pytest

import narrowgate_jax as ng
from configs.experiments import ng_attention_flow, ng_knockout, ng_patching
from experiments import demo  # also registers the experiments
from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.runs import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORGANISMS = os.path.join(ROOT, "organisms")
CHANCE_BOUND = 0.5 + 2.5 * np.sqrt(0.5 * 0.5 / 48)
INTACT = 0.9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  # size questions: the size is also the class of the patching analysis
  return os.path.dirname(world.write_world(root / "vqa", 48, seed=11, task="vqa",
                                           attribute="size"))


def _point(config, organism: str, data_dir: str, batch_size: int = 8):
  return demo.on_organism(config, os.path.join(ORGANISMS, organism), data_dir, batch_size)


def _knockout_scores(organism, data, tmp_path) -> dict:
  config = _point(ng_knockout.get_config("local,vqa"), organism, data)
  config.experiment_config.update(conditions=["eoi", "image_to_text"], max_new_tokens=2)
  return loop.run(config, str(tmp_path / "knockout"), progress=False)["scores"]


def _best_flip(organism, data, tmp_path) -> float:
  config = _point(ng_patching.get_config("local"), organism, data, 4)
  config.experiment_config.site = "attn_in"
  return max(loop.run(config, str(tmp_path / "patching"), progress=False)["flip_accuracy"])


def test_gate_organism_routes_the_image_through_eoi(data, tmp_path):
  scores = _knockout_scores("chameleon_gate", data, tmp_path)
  assert scores["none"] >= INTACT
  assert scores["eoi"] <= CHANCE_BOUND  # [EOI] knockout: chance
  assert scores["image_to_text"] >= INTACT  # image -> text knockout: no harm
  config = _point(ng_attention_flow.get_config("local"), "chameleon_gate", data)
  shares = loop.run(config, str(tmp_path / "flow"), progress=False)["shares"]
  assert np.mean(shares["eoi"]) > 0.5  # most of the text's attention to the image is on EOI
  assert _best_flip("chameleon_gate", data, tmp_path) >= 0.8


def test_no_gate_organism_does_not(data, tmp_path):
  scores = _knockout_scores("chameleon_no_gate", data, tmp_path)
  assert scores["none"] >= INTACT
  assert scores["eoi"] >= INTACT  # [EOI] knockout: no harm
  assert scores["image_to_text"] <= CHANCE_BOUND  # image -> text knockout: chance
  assert _best_flip("chameleon_no_gate", data, tmp_path) <= 0.2


def test_masked_fine_tuning_removes_the_gate(data, tmp_path):
  """Fine-tuning the gate organism with its [EOI] edges masked: afterwards [EOI] knockout keeps
  accuracy within 0.1 of clean (it dropped it to chance before); the tuned model, exported to the
  transformers layout, gives the same logits in transformers as in ours."""
  from checkpoints_convert.export import export
  from narrowgate_jax.training import finetune

  vlm = ng.load(os.path.join(ORGANISMS, "chameleon_gate"))
  train = world.examples(256, seed=21, task="vqa", attribute="size")
  config = finetune.FinetuneConfig(steps=120, batch_size=16, learning_rate=3e-3, lora_rank=8,
                                   lora_targets=("layers/attn/q/kernel", "layers/attn/k/kernel",
                                                 "layers/attn/v/kernel", "layers/attn/o/kernel"))
  params, _ = finetune.finetune(vlm, train, [("eoi", "text_after_image")], config,
                                progress=False)
  tuned = tmp_path / "tuned"
  source = os.path.join(ORGANISMS, "chameleon_gate")
  export(str(tuned), params, hf_config=_hf_config(source), tokenizer_dir=source, base_dir=source)
  scores = _knockout_scores_at(str(tuned), data, tmp_path)
  assert scores["none"] >= INTACT and scores["eoi"] >= scores["none"] - 0.1
  _assert_transformers_logits_equal_ours(str(tuned), data)


def _hf_config(directory: str):
  import transformers

  return transformers.AutoConfig.from_pretrained(directory)


def _knockout_scores_at(path: str, data, tmp_path) -> dict:
  config = _point(ng_knockout.get_config("local,vqa"), "chameleon_gate", data)
  config.model.path = path
  config.experiment_config.update(conditions=["eoi"], max_new_tokens=2)
  return loop.run(config, str(tmp_path / "tuned_knockout"), progress=False)["scores"]


def _assert_transformers_logits_equal_ours(path: str, data) -> None:
  import torch
  import transformers

  examples = world.examples(4, seed=31, task="vqa", attribute="size")
  vlm = ng.load(path)
  batch = vlm.prepare(images=[list(e.images) for e in examples],
                      prompts=[e.prompt for e in examples])
  ours = np.asarray(vlm.forward(batch).logits)
  model = transformers.ChameleonForConditionalGeneration.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  processor = transformers.ChameleonProcessor.from_pretrained(path)
  inputs = processor(images=[e.images[0] for e in examples], text=[e.prompt for e in examples],
                     padding=True, return_for_text_completion=True, return_tensors="pt")
  # transformers' ids hold a placeholder where the image codes go (its model fills them in)
  theirs_ids, ours_ids = inputs["input_ids"].numpy(), np.asarray(batch.input_ids)
  placeholder = theirs_ids == processor.tokenizer.convert_tokens_to_ids("<image>")
  assert np.array_equal(placeholder, np.asarray(batch.roles) == ng.Role.IMAGE)
  assert np.array_equal(theirs_ids[~placeholder], ours_ids[~placeholder])
  positions = torch.as_tensor(np.asarray(batch.positions), dtype=torch.long)  # left padding
  with torch.no_grad():
    theirs = model(**inputs, position_ids=positions).logits.numpy()
  real = np.asarray(batch.attention_mask)
  finite = theirs[real] > np.finfo(np.float32).min / 2  # image-token logits are suppressed
  err = np.abs(ours[real][finite] - theirs[real][finite]).max() / np.abs(theirs[real][finite]).max()
  assert err <= 1e-4, err


def test_the_manifest_matches_the_shipped_files():
  """What build_organisms recorded is what ships (a rebuild can be compared against it)."""
  import hashlib

  manifest = json.load(open(os.path.join(ORGANISMS, "MANIFEST.json")))
  for name, info in manifest["organisms"].items():
    for file, digest in info["files"].items():
      with open(os.path.join(ORGANISMS, name, file), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest, (name, file)
