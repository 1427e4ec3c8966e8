"""The non-native organism (a tiny LLaVA-1.5 on the shapes world), trained for a few steps.

What is checked: the trained trees are the converter's (the image side exactly
`nonnative_side(hf_cfg).shapes`, and together they load into transformers'
`LlavaForConditionalGeneration` and give its logits); the stage-2 loss, with features computed
from pixels inside it, equals the cross-entropy of an independently built in-memory VLM's
`forward(prepare(...))`; training's own step-0 losses are those loss functions on those batches;
the frozen language model leaves stage 2 bit-identical; the same seed trains the same params; the
side files load as transformers' LlavaProcessor and preprocess as our reader does.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import transformers
from PIL import Image

from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.model import VLM
from narrowgate_jax.models.decoder import param_shapes
from narrowgate_jax.models.families import FAMILIES, flat_shapes, state_from_params
from narrowgate_jax.models.nonnative import LlavaImages, nonnative_side
from narrowgate_jax.organisms import nonnative as organism
from narrowgate_jax.processing import anyres
from narrowgate_jax.processing.roles import Role

TINY = organism.NonNativeOrganismConfig(
    vision_hidden_size=32, vision_intermediate_size=64, vision_heads=2, hidden_size=32,
    intermediate_size=64, num_layers=2, num_heads=2, scenes_per_epoch=24, held_out=4,
    lm_steps=3, lm_batch_size=16, lm_warmup_steps=1, vision_steps=3, vision_batch_size=16,
    vision_warmup_steps=1, seed=3)
# Two VQA turns with questions of different lengths and a caption turn, over two pictures.
SCENES = (world.Scene("triangle", "blue", "left", "big"),
          world.Scene("cross", "red", "top", "small"))
TURNS = (organism.Turn(0, world.VQA_TEMPLATE.replace("{question}", "what is the shape ?"),
                       "triangle"),
         organism.Turn(1, world.VQA_TEMPLATE.replace("{question}",
                                                     "in which part of the picture is the shape ?"),
                       "top"),
         organism.Turn(1, world.CAPTION_PROMPT, world.caption(SCENES[1])))


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


@pytest.fixture(scope="module")
def trained():
  hf_cfg, lm_params, image_params, metrics = organism.train_organism(TINY, progress=False)
  return hf_cfg, lm_params, image_params, metrics


@pytest.fixture(scope="module")
def vlm(trained):
  """The organism built by hand from its parts, as `ng.load` would (not `organism.in_memory`)."""
  hf_cfg, lm_params, image_params, _ = trained
  tok = organism.tokenizer(hf_cfg)
  images = LlavaImages(hf_cfg, image_params, tok, organism.processor_config(TINY.image_size))
  return VLM(FAMILIES["llava"].decoder_config(hf_cfg), lm_params, tokenizer=tok, images=images)


def _pictures():
  return [world.render(s, TINY.image_size) for s in SCENES]


def test_config_checks():
  with pytest.raises(ValueError, match="patch_size"):
    organism.NonNativeOrganismConfig(image_size=32, patch_size=6)
  with pytest.raises(ValueError, match="heads"):
    organism.NonNativeOrganismConfig(vision_hidden_size=30, vision_heads=4)
  with pytest.raises(ValueError, match="held_out"):
    organism.NonNativeOrganismConfig(held_out=160)


def test_scene_split_and_held_out_questions():
  train, held = organism.scene_split(TINY)
  assert len(train) == TINY.scenes_per_epoch and len(held) == TINY.held_out
  assert len(set(held)) == TINY.held_out and not set(held) & set(train)
  questions = organism.held_out_questions(TINY)
  assert len(questions) == 4 * TINY.held_out
  for scene, attribute, question, answer in questions:
    assert scene in held and question in world.QUESTIONS[attribute]
    assert answer == scene.attributes()[attribute]


def test_language_texts():
  scenes = list(SCENES)
  texts = organism.language_texts(scenes, seed=0, shuffled_context=0.5)
  assert len(texts) == 5 * len(scenes)
  shuffled = 0
  for i, scene in enumerate(scenes):
    caption = world.caption(scene)
    assert texts[5 * i + 4] == "a picture of " + caption
    for attribute, text in zip(world.ATTRIBUTES, texts[5 * i:5 * i + 4]):
      words = text.split()
      context, rest = words[:len(caption.split())], " ".join(words[len(caption.split()):])
      assert sorted(context) == sorted(caption.split())
      shuffled += context != caption.split()
      question, answer = rest.rsplit(" ", 1)
      assert question in world.QUESTIONS[attribute] and answer == getattr(scene, attribute)
  assert 0 < shuffled < 4 * len(scenes)
  plain = organism.language_texts(scenes, seed=0, shuffled_context=0.0)
  assert all(t.startswith(world.caption(scenes[i // 5])) for i, t in enumerate(plain)
             if i % 5 != 4)


def test_trees_have_the_converter_shapes(trained):
  hf_cfg, lm_params, image_params, metrics = trained
  assert flat_shapes(image_params) == nonnative_side(hf_cfg).shapes
  decoder_config = FAMILIES["llava"].decoder_config(hf_cfg)
  assert flat_shapes(lm_params) == flat_shapes(param_shapes(decoder_config))
  assert {str(x.dtype) for x in jax.tree.leaves((lm_params, image_params))} == {"float32"}
  assert [r["step"] for r in metrics["vision"]] == [0, TINY.vision_steps - 1]
  # Training moved both trees away from their initialisation.
  fresh_lm = organism.init_language_model(decoder_config, TINY.seed)
  fresh_image = organism.init_image_params(hf_cfg, TINY.seed)
  assert not np.array_equal(lm_params["embed"]["embedding"], fresh_lm["embed"]["embedding"])
  for part in ("tower", "projector"):
    assert not _leaves_equal(image_params[part], fresh_image[part])


def test_recoloured_keeps_the_shape_and_avoids_world_colours():
  rng = np.random.default_rng(0)
  grey = np.asarray(world.BACKGROUND)
  avoid = np.asarray(list(world.COLOUR_RGB.values()) + [world.BACKGROUND])
  for scene in world.ALL_SCENES[::7]:
    true = world.render(scene, TINY.image_size)
    picture = organism.recoloured(true, rng)
    shape = np.any(true != grey, axis=-1)
    assert np.array_equal(np.any(picture != grey, axis=-1), shape)
    np.testing.assert_array_equal(picture[~shape], true[~shape])
    colours = np.unique(picture[shape], axis=0)
    assert len(colours) == 1
    assert np.min(np.max(np.abs(avoid - colours[0].astype(int)), axis=1)) >= 48


def test_batches_recolour_colour_free_rows_only(trained):
  hf_cfg, _, image_params, _ = trained
  vlm = organism.reader(hf_cfg, image_params, organism.tokenizer(hf_cfg), TINY.image_size)
  pictures, turns = organism.vision_turns(list(SCENES), TINY.image_size, seed=1)
  assert len(pictures) == len(SCENES) and len(turns) == 5 * len(SCENES)
  assert [t.attribute for t in turns[:5]] == [*world.ATTRIBUTES, None]
  rows = organism.vision_rows(vlm, pictures, turns)
  n = len(turns)
  plain = organism.batches(rows, n, seed=2)(0)
  batch_at = organism.batches(rows, n, seed=2, recolour=1.0, spec=vlm.images.spec)
  batch = batch_at(0)
  np.testing.assert_array_equal(batch["ids"], plain["ids"])  # the same rows, in the same order
  tok = vlm.tokenizer
  changed_rows = 0
  for i in range(n):
    words = tok.convert_ids_to_tokens(batch["targets"][i][batch["weights"][i] > 0][:-1].tolist())
    true = plain["pixels"][i]
    changed = np.any(batch["pixels"][i] != true, axis=-1)
    if len(words) > 1 or words[0] in world.COLOURS:  # a caption or a colour answer
      assert not changed.any()
      continue
    # Only the shape's pixels change, all of them (the grey background normalises to one value).
    background = np.all(true == true[0, 0], axis=-1)
    assert np.array_equal(changed, ~background)
    changed_rows += 1
  assert changed_rows == 3 * len(SCENES)
  np.testing.assert_array_equal(batch_at(0)["pixels"], batch["pixels"])  # a function of the step
  assert not np.array_equal(batch_at(n)["pixels"], batch["pixels"])
  with pytest.raises(ValueError, match="ClipImageSpec"):
    organism.batches(rows, n, seed=2, recolour=0.5)


def test_vision_rows_train_only_the_answer(trained):
  hf_cfg, _, image_params, _ = trained
  tok = organism.tokenizer(hf_cfg)
  rows = organism.vision_rows(organism.reader(hf_cfg, image_params, tok, TINY.image_size),
                              _pictures(), TURNS)
  eos = tok.eos_token_id
  for b, turn in enumerate(TURNS):
    words = turn.answer.split()
    trained_targets = rows.targets[b][rows.weights[b] > 0]
    assert tok.convert_ids_to_tokens(trained_targets[:-1].tolist()) == words
    assert trained_targets[-1] == eos
    image = rows.roles[b] == Role.IMAGE
    assert rows.slots[b][image].tolist() == list(range(TINY.image_tokens))
    assert np.all(rows.slots[b][~image] == -1)
  assert rows.picture.tolist() == [t.picture for t in TURNS]


def test_vision_loss_equals_the_inference_path(trained, vlm):
  """The loss of the training path (pixels -> tower -> projector -> scattered inside the loss)
  against the cross-entropy of the in-memory VLM on `prepare`d prompts with the answers."""
  hf_cfg, lm_params, image_params, _ = trained
  pictures = _pictures()
  rows = organism.vision_rows(organism.reader(hf_cfg, image_params, vlm.tokenizer,
                                              TINY.image_size), pictures, TURNS)
  batch = organism.batches(rows, len(TURNS), seed=0)(0)  # every row, in some order
  loss_fn = jax.jit(functools.partial(organism.vision_loss_fn, config=vlm.config,
                                      hf_cfg=hf_cfg))
  loss, metrics = loss_fn({"lm": lm_params, "image": image_params}, batch, None)

  prepared = vlm.prepare(images=[pictures[t.picture] for t in TURNS],
                         prompts=[f"{t.prompt} {t.answer} </s>" for t in TURNS])
  logits = np.asarray(vlm.forward(prepared).logits, np.float64)
  ids = np.asarray(prepared.input_ids)
  losses, hits = [], []
  for b, turn in enumerate(TURNS):
    n = len(turn.answer.split()) + 1  # the answer's words and </s>, at the end of the row
    row = logits[b, -n - 1:-1]
    log_probs = row - np.log(np.sum(np.exp(row - row.max(-1, keepdims=True)), -1,
                                    keepdims=True)) - row.max(-1, keepdims=True)
    losses += list(-log_probs[np.arange(n), ids[b, -n:]])
    hits += list(row.argmax(-1) == ids[b, -n:])
  np.testing.assert_allclose(float(loss), np.mean(losses), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(hits))


def test_training_losses_are_the_loss_functions(trained):
  """Step 0 of each stage: its logged loss is the loss function on that stage's first batch."""
  hf_cfg, lm_params, _, metrics = trained
  decoder_config = FAMILIES["llava"].decoder_config(hf_cfg)
  language = jax.jit(functools.partial(organism.language_loss_fn, config=decoder_config))
  loss, _ = language(organism.init_language_model(decoder_config, TINY.seed),
                     organism.language_batches(TINY, hf_cfg)(0), None)
  np.testing.assert_allclose(metrics["language_model"][0]["loss"], float(loss), rtol=1e-5)
  vision = jax.jit(functools.partial(organism.vision_loss_fn, config=decoder_config,
                                     hf_cfg=hf_cfg))
  start = {"lm": lm_params, "image": organism.init_image_params(hf_cfg, TINY.seed)}
  loss, _ = vision(start, organism.vision_batches(TINY, hf_cfg)(0), None)
  np.testing.assert_allclose(metrics["vision"][0]["loss"], float(loss), rtol=1e-5)


def test_stage_two_freezes_the_language_model_and_is_deterministic(trained):
  hf_cfg, lm_params, image_params, _ = trained
  before = jax.tree.map(np.array, lm_params)  # host copies: nothing can alias them
  result = organism.fit_vision(TINY, hf_cfg, lm_params, progress=False)
  assert _leaves_equal(result.params["lm"], before)
  assert _leaves_equal(result.params["image"], image_params)


def test_stage_one_is_deterministic(trained):
  hf_cfg, lm_params, _, _ = trained
  assert organism.hf_config(TINY).to_dict() == hf_cfg.to_dict()
  assert _leaves_equal(organism.train_language_model(TINY, hf_cfg, progress=False), lm_params)
  other = dataclasses.replace(TINY, seed=TINY.seed + 1)
  assert not _leaves_equal(organism.init_language_model(
      FAMILIES["llava"].decoder_config(hf_cfg), other.seed), lm_params)


def test_transformers_llava_gives_the_same_logits(trained, vlm):
  """The trees written under the converter's checkpoint names load into transformers' LLaVA
  (every tensor, nothing left over) and reproduce our logits."""
  torch = pytest.importorskip("torch")
  hf_cfg, lm_params, image_params, _ = trained
  model = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
  keys = set(model.state_dict())
  side = nonnative_side(hf_cfg, keys)
  state = state_from_params(FAMILIES["llava"].tensor_sources(vlm.config, keys), lm_params,
                            vlm.config.num_layers)
  state.update(state_from_params(side.sources, image_params, side.num_layers))
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                        strict=True)
  pictures = _pictures()
  prompts = [t.prompt for t in TURNS[:2]]
  batch = vlm.prepare(images=[pictures[t.picture] for t in TURNS[:2]], prompts=prompts)
  ours = np.asarray(vlm.forward(batch).logits)
  ids = np.where(np.asarray(batch.feature_mask), hf_cfg.image_token_id,
                 np.asarray(batch.input_ids))
  pixels = np.stack([anyres.llava_pixels(pictures[t.picture], vlm.images.spec)
                     for t in TURNS[:2]])
  with torch.no_grad():
    theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                   attention_mask=torch.as_tensor(np.asarray(batch.attention_mask),
                                                  dtype=torch.long),
                   position_ids=torch.as_tensor(np.asarray(batch.positions), dtype=torch.long),
                   pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
  real = np.asarray(batch.attention_mask)
  np.testing.assert_allclose(theirs[real], ours[real], atol=2e-4, rtol=1e-4)


def test_side_files_load_as_transformers_processor(trained, vlm, tmp_path):
  hf_cfg = trained[0]
  organism.write_side_files(str(tmp_path), hf_cfg, TINY.image_size)
  processor = transformers.LlavaProcessor.from_pretrained(str(tmp_path))
  picture = _pictures()[0]
  out = processor(images=[Image.fromarray(picture)], text=[TURNS[0].prompt], return_tensors="np")
  batch = vlm.prepare(images=[picture], prompts=[TURNS[0].prompt])
  expected = np.where(np.asarray(batch.feature_mask), hf_cfg.image_token_id,
                      np.asarray(batch.input_ids))
  np.testing.assert_array_equal(out["input_ids"], expected)
  assert int(np.sum(out["input_ids"] == hf_cfg.image_token_id)) == TINY.image_tokens
  # transformers' CLIP preprocessing gives the pixels training uses, bit for bit
  rows = organism.vision_rows(vlm, [picture], TURNS[:1])
  np.testing.assert_array_equal(out["pixel_values"][0].transpose(1, 2, 0), rows.pixels[0])
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tok(TURNS[0].prompt)["input_ids"] == organism.tokenizer(hf_cfg)(
      TURNS[0].prompt)["input_ids"]


def test_vqa_answers_and_accuracy(vlm, monkeypatch):
  questions = organism.held_out_questions(TINY)[:3]
  answers = organism.vqa_answers(vlm, questions, TINY.image_size)
  batch = vlm.prepare(images=[world.render(q[0], TINY.image_size) for q in questions],
                      prompts=["<image>" + q[2] for q in questions])
  texts = vlm.generate(batch, max_new_tokens=2).texts
  assert answers == [(text.split() or [""])[0] for text in texts]
  # Scoring: of each attribute's four questions, the first `right[attribute]` are answered.
  right = {"shape": 4, "colour": 3, "position": 1, "size": 0}
  questions = organism.held_out_questions(TINY)
  replies = []
  for scene, attribute, _, answer in questions:
    seen = sum(q[1] == attribute for q in questions[:len(replies)])
    replies.append(answer if seen < right[attribute] else "nothing")
  monkeypatch.setattr(organism, "vqa_answers", lambda *a, **k: replies)
  scores = organism.vqa_accuracy(vlm, questions, TINY.image_size)
  assert scores == {"shape": 1.0, "colour": 0.75, "position": 0.25, "size": 0.0, "all": 0.5}
