"""The cross-modal study's window knockout on tiny LLaVA-1.5 and LLaVA-NeXT models: every flow and
window against transformers' eager attention with the blocked edges added to the mask in the
window's layers (the study's implementation), and the shared-prefix sweep against the naive one
(every condition a full forward)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import narrowgate_jax as ng
import reference as R
import test_interventions as TI
import test_nonnative as NN
from experiments.cross_modal import FLOWS_TO_LAST, FLOWS_TO_QUESTION, IMAGE_SPAN
from narrowgate_jax.analysis import all_windows
from narrowgate_jax.processing.roles import select

QUESTIONS = ["what is in the picture ?", "this animal is a"]
BOXES = [[[(2, 3, 20, 15)]], [[(0, 30, 19, 51)]]]  # one box per image, in its own pixels
WINDOW = 2
# The reference attention function gets eager's causal + padding mask built from the 2-D mask.
AttentionMaskInterface.register(TI.REFERENCE_ATTENTION, eager_mask)


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def model(request, tmp_path_factory):
  config, tokenizer, image_processor, _ = NN.FAMILIES[request.param]()
  hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
  torch_model = R.build(config, hf_dir)
  tokenizer.save_pretrained(hf_dir)
  image_processor.save_pretrained(hf_dir)
  vlm = R.convert_and_load(hf_dir, hf_dir.parent / "ng")
  images = NN._images()
  batch = vlm.prepare(images=images, prompts=NN.PROMPTS, questions=QUESTIONS)
  related = vlm.region(batch, images, BOXES)
  pixels = NN._torch_pixels(request.param, image_processor, images)
  return SimpleNamespace(name=request.param, vlm=vlm, torch=torch_model, batch=batch,
                         related=related, pixels=pixels, config=config)


def _selector(name, m):
  if name == "related":
    return m.related
  if name == "other":
    return select("image", m.batch.roles) & ~m.related
  return IMAGE_SPAN if name == "image_span" else name


def _conditions(m, flows):
  windows = all_windows(WINDOW, m.vlm.num_layers)
  items = [(f, c) for f in sorted(flows) for c in range(m.vlm.num_layers)]
  conditions = ng.stack_conditions([
      m.vlm.knockout(m.batch, keys=_selector(flows[f]["source"], m),
                     queries=_selector(flows[f]["target"], m),
                     layers=[int(l) for l in windows[c] if l >= 0]) for f, c in items])
  return items, conditions


def _torch_last_logits(m, blocked: np.ndarray, layers) -> np.ndarray:
  """transformers' LLaVA forward, the blocked [B, T, S] edges set to the float32 minimum in the
  attention mask of `layers` (eager attention), at the last position."""
  batch = m.batch
  ids = np.where(np.asarray(batch.feature_mask), m.config.image_token_id,
                 np.asarray(batch.input_ids))
  layers_list = R.decoder_layers(m.torch)
  text_config = m.torch.config.text_config
  implementation = text_config._attn_implementation
  try:
    for l in layers:
      layers_list[l].self_attn._ng_pre = torch.as_tensor(blocked)[:, None]
    text_config._attn_implementation = TI.REFERENCE_ATTENTION
    m.torch.config._attn_implementation = TI.REFERENCE_ATTENTION
    with torch.no_grad():
      out = m.torch(input_ids=torch.as_tensor(ids),
                    attention_mask=torch.as_tensor(np.asarray(batch.attention_mask),
                                                   dtype=torch.long),
                    position_ids=torch.as_tensor(np.asarray(batch.positions), dtype=torch.long),
                    **m.pixels)
  finally:
    text_config._attn_implementation = implementation
    m.torch.config._attn_implementation = implementation
    for layer in layers_list:
      if hasattr(layer.self_attn, "_ng_pre"):
        del layer.self_attn._ng_pre
  return out.logits[:, -1].numpy()


@pytest.mark.parametrize("flows", ["last", "question"])
def test_window_knockout_equals_transformers_eager(model, flows):
  """Every flow and window centre: our shared-prefix sweep vs transformers with the edges
  blocked in that window's layers. NeXT's image span includes its newline tokens."""
  flows = FLOWS_TO_LAST if flows == "last" else FLOWS_TO_QUESTION
  items, conditions = _conditions(model, flows)
  ours = np.asarray(model.vlm.forward_from_prefix(model.batch, conditions).logits)  # [C, B, V]
  windows = all_windows(WINDOW, model.vlm.num_layers)
  real = np.asarray(model.batch.attention_mask)
  for (flow, centre), logits in zip(items, ours):
    keys = select(_selector(flows[flow]["source"], model), model.batch.roles)
    queries = select(_selector(flows[flow]["target"], model), model.batch.roles)
    blocked = TI.edges(queries, keys) & TI.causal_visible(model.batch)
    theirs = _torch_last_logits(model, blocked, [int(l) for l in windows[centre] if l >= 0])
    assert R.relative_error(logits, theirs, real[:, -1:].repeat(logits.shape[-1], 1)) < 1e-4, (
        flow, centre)
  if model.name == "llava_next":
    assert select("image_break", model.batch.roles).any()  # newlines are in the image span


@pytest.mark.parametrize("flows", ["last", "question"])
def test_shared_prefix_sweep_equals_the_naive_one(model, flows):
  """forward_from_prefix recomputes only the target's positions onward; the naive sweep runs a
  full forward per condition. Equal at the last position to float32 round-off."""
  flows = FLOWS_TO_LAST if flows == "last" else FLOWS_TO_QUESTION
  _, conditions = _conditions(model, flows)
  shared = model.vlm.forward_from_prefix(model.batch, conditions)
  naive = np.asarray(model.vlm.forward(model.batch, interventions=conditions).logits)[:, :, -1]
  np.testing.assert_allclose(np.asarray(shared.logits), naive, rtol=0, atol=2e-6 * np.abs(
      naive).max())
  clean = np.asarray(model.vlm.forward(model.batch).logits)[:, -1]
  np.testing.assert_allclose(np.asarray(shared.clean), clean, rtol=0, atol=2e-6 * np.abs(
      clean).max())
  if flows is FLOWS_TO_LAST:
    assert shared.start == model.batch.shape[1] - 1  # X->Last recomputes one position
  else:
    question = select("question", model.batch.roles)
    assert 0 < shared.start <= question.argmax(axis=1).min()


def test_a_window_larger_than_the_model_is_refused(model):
  from narrowgate_jax.analysis import window_layers

  with pytest.raises(ValueError, match="larger than the model"):
    window_layers(0, model.vlm.num_layers + 1, model.vlm.num_layers)


# ------------------------------------------------------------------- the runs, end to end

@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
  """A tiny LLaVA-1.5 whose tokenizer covers the synthetic GQA words, with a chat template."""
  import transformers

  from narrowgate_jax.data.gqa_synthetic import WORDS as GQA_WORDS

  words = tuple(dict.fromkeys(R.WORDS + GQA_WORDS + ("USER", "ASSISTANT")))
  specials = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
  vmap = {t: i for i, t in enumerate(specials + words)}
  tokenizer = R.word_tokenizer(vmap, specials, add_bos=True,
                               extra_special_tokens={"image_token": "<image>"})
  config = transformers.LlavaConfig(vision_config=NN.CLIP,
                                    text_config=R.tiny_llama(vocab_size=len(vmap) + 8,
                                                             max_position_embeddings=256),
                                    image_token_index=vmap["<image>"])
  hf_dir = tmp_path_factory.mktemp("gqa_model") / "hf"
  R.build(config, hf_dir)
  tokenizer.save_pretrained(hf_dir)
  transformers.LlavaImageProcessorPil(do_pad=True, **NN.CLIP_SIZE).save_pretrained(hf_dir)
  (hf_dir / "chat_template.jinja").write_text(NN.LLAVA_TEMPLATE)
  out = hf_dir.parent / "ng"
  from checkpoints_convert.convert import convert

  convert(str(hf_dir), str(out), progress=False)
  return str(out)


@pytest.fixture(scope="module")
def gqa_files(tmp_path_factory):
  from narrowgate_jax.data.gqa_synthetic import write_synthetic_gqa

  return write_synthetic_gqa(str(tmp_path_factory.mktemp("gqa")), num_questions=12, seed=0,
                             include_bad=True)


def _cm_config(name, model_dir, files, fmt, task, flows=None):
  import importlib

  module = importlib.import_module(f"configs.experiments.{name}")
  config = module.get_config(",".join(["local", task] + ([flows] if flows else [])))
  config.model.path = model_dir
  config.mesh.data, config.mesh.model = 1, 1
  config.batch_size = 2
  config.data.format = fmt
  config.data.images = files["images"]
  config.data.scene_graphs = files["scene_graphs"]
  if fmt == "gqa":
    config.data.questions = files["questions"]
  else:
    config.data.csv = files["csv"][task]
  if name == "cm_window_knockout":
    config.experiment_config.window = 2
    config.experiment_config.only_correct = False  # random weights answer nothing correctly
    config.experiment_config.bootstrap = 50
  return config


TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")


@pytest.mark.parametrize("fmt,task,flows", [
    (fmt, task, flows) for i, task in enumerate(TASKS) for flows in ("last", "question")
    for fmt in [("gqa", "gqa_csv")[(i + (flows == "question")) % 2]]])
def test_window_knockout_runs_end_to_end(gqa_model, gqa_files, fmt, task, flows, tmp_path):
  """Each input format and flow set: per-example records for every flow and window centre,
  metrics with bootstrap bands, the line plot and the report; the loader's bad questions
  skipped and counted."""
  import json
  import os

  from narrowgate_jax.runs import loop
  from narrowgate_jax.runs.records import RecordStore

  config = _cm_config("cm_window_knockout", gqa_model, gqa_files, fmt, task, flows)
  workdir = str(tmp_path / "work")
  metrics = loop.run(config, workdir, progress=False)
  records = RecordStore(os.path.join(workdir, "records.jsonl")).records()
  layers = 3
  flow_names = sorted(config.experiment_config.flows)
  assert len(records) == metrics["examples"] * (1 + len(flow_names) * layers)
  measured = [f for f, m in metrics["flows"].items() if m]
  assert measured == flow_names
  for m in metrics["flows"].values():
    assert len(m["mean"]) == layers and all(lo <= mu <= hi for lo, mu, hi in
                                            zip(m["low"], m["mean"], m["high"]))
  assert os.path.exists(os.path.join(workdir, "figures", "window_knockout.png"))
  assert "largest drop" in open(os.path.join(workdir, "report.md")).read()
  stored = json.load(open(os.path.join(workdir, "metrics.json")))
  if task == "ChooseAttr":  # the fixture's two bad ChooseAttr questions
    assert stored["data_skipped"] == {"box_outside_image": 1}  # bad-box: skipped by the loader
    # bad-noref has no boxes: skipped only where related / other patches are needed
    assert stored["skipped"] == ({"no object boxes": 1} if flows == "question" else {})
  else:
    assert not stored["skipped"] and "data_skipped" not in stored


def test_answer_formation_runs_end_to_end(gqa_model, gqa_files, tmp_path):
  import os

  from narrowgate_jax.runs import loop

  for task in ("QueryAttr", "ChooseRel"):
    config = _cm_config("cm_answer_formation", gqa_model, gqa_files, "gqa", task)
    metrics = loop.run(config, str(tmp_path / task), progress=False)
    assert metrics["layers"] == list(range(4))
    assert all(0 <= p <= 1 for p in metrics["p_lower"] + metrics["p_capitalised"])
    options = metrics["p_true_option"] + metrics["p_false_option"]
    if task == "ChooseRel":  # its questions name two options
      assert all(0 <= p <= 1 for p in options)
    else:
      assert all(p is None for p in options)
  assert os.path.exists(tmp_path / "ChooseRel" / "figures" / "answer_formation.png")
