"""The non-native model organism: a tiny LLaVA-1.5 trained on the shapes world.

The architecture is LLaVA-1.5's: a CLIP vision tower, read at `vision_feature_layer` with its
class token dropped ("default"), a two-layer GELU projector, and a Llama language model. Each
"<image>" becomes P = (image_size / patch_size)^2 placeholder tokens whose input embeddings are the
projected patch features, as transformers' `LlavaForConditionalGeneration` builds them.

Training has two stages, as LLaVA's (its feature-alignment stage is the second one here):
  1. language model  the Llama alone, from scratch, on the world's text (no images):
                     `<s> caption question answer </s>` (the caption's words shuffled half the
                     time) and `<s> a picture of caption </s>`, loss on every token after <s>;
  2. vision          the tower and projector from a seed, the language model frozen:
                     `<s> <image>^P question` -> `answer </s>` and `<s> <image>^P a picture of` ->
                     `caption </s>`, loss on those tokens only.
In stage 2 the features are computed inside the loss (tower -> projector on the pixels, scattered
over the placeholders as the decoder does for a prepared batch), so they are differentiable. The
world's pictures are CLIP-preprocessed once, by the function `vlm.prepare` calls (recoloured ones,
below, by the same function when their batch is drawn). The language model never learns from
images, so all it knows of a picture comes through the projected patches.

A seeded set of `held_out` scenes (attribute combinations) is kept out of both stages;
`held_out_questions` asks about those scenes, so VQA on them measures generalisation, not recall.
The world has few pictures (160 scenes), and a tower trained on them learns each (colour,
position, size) combination's shapes by heart, which fails on unseen combinations. So in stage 2 a
shape, position or size question (whose answer does not depend on the colour) shows, with chance
`recolour`, its picture with the shape painted in a fresh random colour that is none of the
world's (`recoloured`): reading those answers then cannot lean on the colour.

The parameter trees are the converter's: the language model's is `Decoder`'s, the image side's is
{"tower": ..., "projector": ...} exactly as `models.nonnative.nonnative_side(hf_cfg).shapes` lists,
so exporting it with the converter's tables gives a transformers LLaVA checkpoint. Everything is a
pure function of the world, the config and the seed: the same config trains the same organism bit
for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.interventions import Interventions
from narrowgate_jax.model import VLM, random_params
from narrowgate_jax.models import projectors, vit
from narrowgate_jax.models.families import FAMILIES
from narrowgate_jax.models.nonnative import LlavaImages
from narrowgate_jax.organisms import tokens
from narrowgate_jax.processing import anyres
from narrowgate_jax.processing.images import CLIP_MEAN, CLIP_STD
from narrowgate_jax.processing.prompts import IMAGE_MARKER
from narrowgate_jax.processing.roles import Role
from narrowgate_jax.training import finetune, rows

# The caption task's prompt without its image: the language model learns captions in these words.
CAPTION_WORDS = world.CAPTION_PROMPT.replace(IMAGE_MARKER, "").strip()
_HELD_OUT_STREAM = 5  # seed stream of the held-out scenes (apart from the training scenes')
# Attributes whose answer does not depend on the shape's colour: their turns may be recoloured.
COLOUR_FREE = ("shape", "position", "size")
RECOLOUR_MARGIN = 48  # how far (max over channels) a recoloured shape is from the world's colours


@dataclasses.dataclass(frozen=True)
class NonNativeOrganismConfig:
  """Size and training of a non-native organism.

  Attributes:
    image_size, patch_size: the tower's input side and patch side (P = (image_size /
      patch_size)^2 image tokens per picture).
    vision_*: the CLIP tower's width, MLP width, depth and heads.
    vision_feature_layer: the tower's hidden state the projector reads. LLaVA-1.5 reads -2 of a
      24-layer tower; a 2-layer tower would then leave its last layer unused, so -1.
    hidden_size, intermediate_size, num_layers, num_heads: the Llama language model.
    scenes_per_epoch: training scenes per stage (cycles through the non-held-out scenes).
    held_out: scenes never shown in training (`scene_split`).
    shuffled_context: the chance that a stage-1 question's context caption has its words
      shuffled (`language_texts`).
    recolour: the chance that a stage-2 shape, position or size question shows its picture with
      the shape recoloured (`batches`; see the module docstring).
    lm_*: stage 1 (language model) optimisation; vision_steps, vision_batch_size,
      vision_learning_rate, vision_warmup_steps: stage 2 (tower and projector).
  """

  image_size: int = 32
  patch_size: int = 8
  vision_hidden_size: int = 64
  vision_intermediate_size: int = 128
  vision_layers: int = 2
  vision_heads: int = 4
  vision_feature_layer: int = -1
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  scenes_per_epoch: int = 540
  held_out: int = 25
  shuffled_context: float = 0.5
  recolour: float = 0.5
  lm_steps: int = 200
  lm_batch_size: int = 64
  lm_learning_rate: float = 3e-3
  lm_warmup_steps: int = 40
  vision_steps: int = 1000
  vision_batch_size: int = 64
  vision_learning_rate: float = 3e-3
  vision_warmup_steps: int = 40
  weight_decay: float = 0.01
  seed: int = 0

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    for width, heads in ((self.hidden_size, self.num_heads),
                         (self.vision_hidden_size, self.vision_heads)):
      if width % heads:
        raise ValueError(f"width {width} is not a multiple of its {heads} heads")
    if not 0 <= self.held_out < len(world.ALL_SCENES):
      raise ValueError(f"held_out={self.held_out}: the world has {len(world.ALL_SCENES)} scenes")

  @property
  def image_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------- checkpoint parts


def hf_config(config: NonNativeOrganismConfig):
  """The transformers `LlavaConfig` of the organism (CLIP tower, Llama language model)."""
  import transformers

  vocab = tokens.vocabulary(tokens.LLAMA_SPECIALS, world.WORDS)
  vision = transformers.CLIPVisionConfig(
      hidden_size=config.vision_hidden_size, intermediate_size=config.vision_intermediate_size,
      num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
      image_size=config.image_size, patch_size=config.patch_size,
      projection_dim=config.hidden_size, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = transformers.LlamaConfig(
      vocab_size=len(vocab), hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
      pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
  return transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
      image_seq_length=config.image_tokens, projector_hidden_act="gelu",
      vision_feature_select_strategy="default", vision_feature_layer=config.vision_feature_layer,
      multimodal_projector_bias=True, tie_word_embeddings=False)


def tokenizer(hf_cfg):
  """The organism's word-level tokenizer (Llama's specials, then the world's words)."""
  vocab = tokens.vocabulary(tokens.LLAMA_SPECIALS, world.WORDS)
  if len(vocab) != hf_cfg.text_config.vocab_size:
    raise ValueError(f"hf_cfg has vocab_size {hf_cfg.text_config.vocab_size}, the organism's "
                     f"vocabulary {len(vocab)}")
  return tokens.word_tokenizer(vocab, tokens.LLAMA_SPECIALS, add_bos=True, image_token="<image>")


def processor_config(image_size: int) -> dict:
  """preprocessor_config.json: llava-hf's LLaVA-1.5 CLIP preprocessing at the organism's size
  (shortest edge and centre crop at image_size, bicubic, CLIP mean and std). A world image
  already has that size, so resize and crop leave its pixels as they are."""
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
          "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
          "image_std": list(CLIP_STD), "do_convert_rgb": True}


def _processor_arguments(hf_cfg) -> dict:
  """processor_config.json: what transformers' LlavaProcessor needs to expand "<image>" into
  image_seq_length placeholders: (image_size / patch_size)^2 patches, plus the class token
  (num_additional_image_tokens), minus it again for the "default" select strategy."""
  vision = hf_cfg.vision_config
  return {"processor_class": "LlavaProcessor", "patch_size": vision.patch_size,
          "vision_feature_select_strategy": hf_cfg.vision_feature_select_strategy,
          "num_additional_image_tokens": 1, "image_token": "<image>",
          "image_seq_length": hf_cfg.image_seq_length}


def write_side_files(directory: str, hf_cfg, image_size: int) -> None:
  """Tokenizer, preprocessor and processor configs beside an exported checkpoint, so that
  `ng.load` and transformers' `LlavaProcessor.from_pretrained` both read the directory."""
  tokenizer(hf_cfg).save_pretrained(directory)
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump(processor_config(image_size), f, indent=2)
  with open(os.path.join(directory, "processor_config.json"), "w") as f:
    json.dump(_processor_arguments(hf_cfg), f, indent=2)


def in_memory(hf_cfg, lm_params, image_params, image_size: int, tok=None) -> VLM:
  """The organism as a loaded VLM, without writing a checkpoint (`ng.load`'s reader and
  decoder config)."""
  tok = tok if tok is not None else tokenizer(hf_cfg)
  config = FAMILIES["llava"].decoder_config(hf_cfg)
  images = LlavaImages(hf_cfg, image_params, tok, processor_config(image_size))
  return VLM(config, lm_params, tokenizer=tok, images=images, name="nonnative_organism")


def reader(hf_cfg, image_params, tok, image_size: int) -> VLM:
  """A VLM that can only prepare batches (no language-model params): how training rows are
  tokenised, exactly as `ng.load` of the finished organism will tokenise prompts. image_params
  may be None when only text is prepared."""
  return in_memory(hf_cfg, None, image_params, image_size, tok)


def init_image_params(hf_cfg, seed: int) -> dict:
  """Fresh {"tower": ..., "projector": ...} (flax's initialisers, float32)."""
  return _init_image_params(vit.ViTConfig.from_hf(hf_cfg.vision_config),
                            projectors.MLPProjectorConfig.from_hf(hf_cfg), seed)


# Jitted: run eagerly, every initialiser would compile on its own (seconds on a CPU).
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_image_params(tower: vit.ViTConfig, projector: projectors.MLPProjectorConfig,
                       seed: int) -> dict:
  key = jax.random.key(seed)
  pixels = jnp.zeros((1, tower.image_size, tower.image_size, tower.num_channels), jnp.float32)
  features = jnp.zeros((1, 1, projector.in_features), jnp.float32)
  return {"tower": vit.VisionTransformer(tower).init(jax.random.fold_in(key, 0), pixels,
                                                     tower.num_layers)["params"],
          "projector": projectors.MLPProjector(projector).init(jax.random.fold_in(key, 1),
                                                               features)["params"]}


def init_language_model(decoder_config, seed: int) -> dict:
  """`model.random_params`, compiled as one program."""
  return jax.jit(random_params, static_argnums=(0, 1))(decoder_config, seed)


def _feature_layer(hf_cfg):
  layer = hf_cfg.vision_feature_layer
  return tuple(layer) if isinstance(layer, (list, tuple)) else int(layer)


def image_features(image_params, hf_cfg, pixels: jax.Array) -> jax.Array:
  """pixels [B, R, R, 3] (CLIP-normalised) -> projected features [B, P, D] float32: what
  `LlavaImages.spans` computes, differentiable in `image_params`."""
  tower = vit.ViTConfig.from_hf(hf_cfg.vision_config)
  hidden = vit.vit_features(image_params["tower"], tower, pixels, _feature_layer(hf_cfg))
  if hf_cfg.vision_feature_select_strategy == "default":
    hidden = hidden[:, 1:]  # the class token is not an image token
  return projectors.project(image_params["projector"], projectors.MLPProjectorConfig.from_hf(
      hf_cfg), hidden)


# --------------------------------------------------------------------------------------- scenes


def scene_split(config: NonNativeOrganismConfig) -> tuple[list[world.Scene], list[world.Scene]]:
  """(training scenes [scenes_per_epoch], held-out scenes [held_out]).

  The held-out scenes are a prefix of a seeded balanced cycle (distinct, every attribute value
  near-equally often); the training scenes cycle through all the others in seeded orders.
  """
  # sample_scenes takes an int seed: one far from the training scenes' (config.seed)
  held = world.sample_scenes(config.held_out, config.seed + _HELD_OUT_STREAM * 7919)
  kept = len(world.ALL_SCENES) - len(held)
  cycles = -(-config.scenes_per_epoch // kept)
  held_set = set(held)
  pool = [s for s in world.sample_scenes(cycles * len(world.ALL_SCENES), config.seed)
          if s not in held_set]
  return pool[:config.scenes_per_epoch], held


def held_out_questions(config: NonNativeOrganismConfig) -> list[tuple[world.Scene, str, str, str]]:
  """(scene, attribute, question, answer) for every attribute of every held-out scene, each in a
  seeded phrasing: 4 x held_out questions."""
  rng = np.random.default_rng([config.seed, _HELD_OUT_STREAM])
  return [(scene, *pair) for scene in scene_split(config)[1] for pair in world.qa_pairs(scene, rng)]


# ----------------------------------------------------------------------------------- sequences


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageRows(rows.Rows):
  """Rows with one picture each. slots [N, T] int32: which of the picture's P features a position
  takes (-1: the token's own embedding); picture [N] int32: the row's index into pixels
  [M, R, R, 3] float32, the CLIP-preprocessed pictures, and raw [M, R, R, 3] uint8, the pictures
  themselves; colour_free [N] bool: the row's answer does not depend on the shape's colour."""

  slots: np.ndarray
  picture: np.ndarray
  pixels: np.ndarray
  raw: np.ndarray
  colour_free: np.ndarray


@dataclasses.dataclass(frozen=True)
class Turn:
  """One image-to-text row: pictures[picture] with `prompt` (one "<image>"), then `answer`;
  attribute: what a VQA turn asks about (None for a caption)."""

  picture: int
  prompt: str
  answer: str
  attribute: Optional[str] = None


def _right_aligned(values: Sequence[np.ndarray], width: int, fill, dtype) -> np.ndarray:
  """Per-row arrays [t_b] -> [N, width], each ending at the last column (left padding)."""
  out = np.full((len(values), width), fill, dtype)
  for b, row in enumerate(values):
    out[b, width - len(row):] = row
  return out


def language_texts(scenes: Sequence[world.Scene], seed: int,
                   shuffled_context: float = 0.5) -> list[str]:
  """Per scene: "context question answer" for each attribute (seeded phrasings), then "a picture
  of caption". The context is the caption, its words shuffled with chance `shuffled_context`.

  The context before each question is the text stand-in for the picture: answering from it
  teaches the language model to read an answer out of its context, the skill a LLaVA language
  model brings from pretraining and that stage 2 relies on (with "question answer" alone, the
  answer is unpredictable from the text and nothing would be learnt about reading it). Shuffled
  contexts make it find the answer by what the words are rather than by where they stand, which
  is how it must read the patch embeddings, which have no word order.
  """
  rng = np.random.default_rng([seed, 1])
  texts = []
  for scene in scenes:
    described = world.caption(scene)
    for _, question, answer in world.qa_pairs(scene, rng):
      words = described.split()
      context = " ".join(rng.permutation(words)) if rng.random() < shuffled_context else described
      texts.append(f"{context} {question} {answer}")
    texts.append(f"{CAPTION_WORDS} {described}")
  return texts


def language_rows(vlm: VLM, texts: Sequence[str], chunk: int = 256) -> rows.Rows:
  """`<s> text </s>` per text, in order; every token after <s> is trained."""
  eos = vlm.tokenizer.eos_token_id
  seqs = []
  for start in range(0, len(texts), chunk):
    for row in rows.unpadded(vlm.prepare(prompts=texts[start:start + chunk])):
      row = rows.with_answer(row, [eos])
      seqs.append(dataclasses.replace(row, trained=row.roles != Role.BOS))
  return rows.pack(seqs, vlm.tokenizer.pad_token_id)


def vision_turns(scenes: Sequence[world.Scene], image_size: int,
                 seed: int) -> tuple[list[np.ndarray], list[Turn]]:
  """(pictures uint8 [R, R, 3], turns): picture i = scenes[i]; per scene, a VQA turn per
  attribute (seeded phrasings), then the caption turn."""
  rng = np.random.default_rng([seed, 2])
  pictures, turns = [], []
  for i, scene in enumerate(scenes):
    pictures.append(world.render(scene, image_size))
    turns += [Turn(i, world.VQA_TEMPLATE.replace("{question}", question), answer, attribute)
              for attribute, question, answer in world.qa_pairs(scene, rng)]
    turns.append(Turn(i, world.CAPTION_PROMPT, world.caption(scene)))
  return pictures, turns


def vision_rows(vlm: VLM, pictures: Sequence[np.ndarray], turns: Sequence[Turn],
                chunk: int = 1024) -> ImageRows:
  """`<s> <image>^P prompt` -> `answer </s>` per turn, in order; only answer and </s> trained.

  pictures: uint8 [R, R, 3] each. Tokens and roles come from `vlm.prepare` (its features are not
  kept: training recomputes them from `pixels`, preprocessed by the reader's own function).
  """
  tok = vlm.tokenizer
  seqs, slots = [], []
  for start in range(0, len(turns), chunk):
    part = turns[start:start + chunk]
    batch = vlm.prepare(images=[pictures[t.picture] for t in part],
                        prompts=[t.prompt for t in part])
    for row, turn in zip(rows.unpadded(batch), part):
      answer = tok(turn.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
      # the k-th placeholder takes feature k, as `tokenize_prompt` fills them in order
      mask = np.concatenate([row.feature_mask, np.zeros(len(answer), bool)])
      slots.append(np.where(mask, np.cumsum(mask) - 1, -1))
      seqs.append(rows.with_answer(dataclasses.replace(row, features=None, feature_mask=None),
                                   answer))
  packed = rows.pack(seqs, tok.pad_token_id)
  pixels = np.stack([anyres.llava_pixels(p, vlm.images.spec) for p in pictures])
  return ImageRows(**{f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)},
                   slots=_right_aligned(slots, packed.ids.shape[1], -1, np.int32),
                   picture=np.asarray([t.picture for t in turns], np.int32), pixels=pixels,
                   raw=np.stack(pictures),
                   colour_free=np.asarray([t.attribute in COLOUR_FREE for t in turns]))


def recoloured(picture: np.ndarray, rng: np.random.Generator,
               background: Sequence[int] = world.BACKGROUND) -> np.ndarray:
  """The picture [R, R, 3] uint8 with its shape in a random colour that is neither a world colour
  nor the grey: each of those differs from it by at least RECOLOUR_MARGIN in some channel."""
  avoid = np.asarray([background, *world.COLOUR_RGB.values()], np.int64)
  while True:
    colour = rng.integers(0, 256, 3)
    if np.min(np.max(np.abs(avoid - colour), axis=1)) >= RECOLOUR_MARGIN:
      break
  out = picture.copy()
  # PIL draws without anti-aliasing: a pixel is the shape's iff it is not the background's.
  out[np.any(picture != np.asarray(background, picture.dtype), axis=-1)] = colour
  return out


def batches(training_rows: rows.Rows, batch_size: int, seed: int, recolour: float = 0.0,
            spec: Optional[anyres.ClipImageSpec] = None):
  """batch_at(step): rows of a seeded epoch-wise permutation (`rows.epoch_batches`); image rows
  also carry their slots and pixels [B, R, R, 3].

  recolour: the chance that a colour-free row (`ImageRows.colour_free`) of a batch shows its
  picture `recoloured` (a fresh colour each time, seeded by the step), preprocessed by `spec`
  (the reader's, `vlm.images.spec`) as `prepare` would preprocess that picture.
  """
  images = isinstance(training_rows, ImageRows)
  if recolour and (spec is None or not images):
    raise ValueError("recolouring needs image rows and the reader's ClipImageSpec")
  if not images:
    return rows.epoch_batches(training_rows, batch_size, seed)
  index = np.arange(len(training_rows))
  picked = rows.epoch_batches(training_rows, batch_size, seed, extra={
      "slots": training_rows.slots, "row": index})

  def batch_at(step: int) -> dict:
    batch = picked(step)
    chosen = batch.pop("row")
    pictures = training_rows.picture[chosen]
    pixels = training_rows.pixels[pictures]  # a copy: recolouring does not touch the rows
    rng = np.random.default_rng([seed, 5, step])
    for i, row in enumerate(chosen):
      if training_rows.colour_free[row] and rng.random() < recolour:
        pixels[i] = anyres.llava_pixels(recoloured(training_rows.raw[pictures[i]], rng), spec)
    return {**batch, "pixels": pixels}

  return batch_at


# ------------------------------------------------------------------------------------- training


def _objective(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """Mean cross-entropy over the trained tokens, and their greedy accuracy."""
  weights = batch["weights"]
  hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(weights.dtype)
  accuracy = jnp.sum(hits * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return finetune.answer_loss(logits, batch), {"accuracy": accuracy}


def language_loss_fn(params, batch, rng, *, config):
  """Stage 1: next-token cross-entropy of the language model on text rows."""
  del rng  # no dropout
  return _objective(finetune.forward(params, config, batch, Interventions())["logits"], batch)


def scatter_features(features: jax.Array, slots: jax.Array) -> jax.Array:
  """features [B, P, D], slots [B, T] -> [B, T, D]: position t takes feature slots[b, t] (rows
  where slots is -1 hold feature 0, which the decoder's feature mask ignores)."""
  return jnp.take_along_axis(features, jnp.maximum(slots, 0)[:, :, None], axis=1)


def vision_loss_fn(params, batch, rng, *, config, hf_cfg):
  """Stage 2: params {"lm", "image"}; the features come from the pixels here, so the loss is
  differentiable in the image params, and replace the placeholders' embeddings in the decoder
  as a prepared batch's `features` / `feature_mask` do."""
  del rng  # no dropout
  features = scatter_features(image_features(params["image"], hf_cfg, batch["pixels"]),
                              batch["slots"])
  with_features = {**batch, "features": features, "feature_mask": batch["slots"] >= 0}
  out = finetune.forward(params["lm"], config, with_features, Interventions())
  return _objective(out["logits"], batch)


def _train_config(config: NonNativeOrganismConfig, stage: str):
  from narrowgate_jax.training import loop

  steps = getattr(config, f"{stage}_steps")
  return loop.TrainConfig(steps=steps, learning_rate=getattr(config, f"{stage}_learning_rate"),
                          warmup_steps=getattr(config, f"{stage}_warmup_steps"),
                          weight_decay=config.weight_decay, seed=config.seed,
                          checkpoint_every=max(steps // 4, 1))


def _stage_dir(workdir: Optional[str], stage: str) -> Optional[str]:
  return None if workdir is None else os.path.join(workdir, stage)


def language_batches(config: NonNativeOrganismConfig, hf_cfg):
  """Stage 1's batch_at(step), over the training scenes' texts."""
  vlm = reader(hf_cfg, None, tokenizer(hf_cfg), config.image_size)
  texts = language_rows(vlm, language_texts(scene_split(config)[0], config.seed,
                                            config.shuffled_context))
  return batches(texts, config.lm_batch_size, config.seed)


def vision_batches(config: NonNativeOrganismConfig, hf_cfg):
  """Stage 2's batch_at(step), over the training scenes' pictures and turns."""
  # The reader's image params only feed features that `vision_rows` drops.
  vlm = reader(hf_cfg, init_image_params(hf_cfg, config.seed), tokenizer(hf_cfg),
               config.image_size)
  pictures, turns = vision_turns(scene_split(config)[0], config.image_size, config.seed)
  image_rows = vision_rows(vlm, pictures, turns)
  return batches(image_rows, config.vision_batch_size, config.seed + 1, config.recolour,
                 vlm.images.spec)


def fit_language_model(config: NonNativeOrganismConfig, hf_cfg, workdir: Optional[str] = None,
                       progress: bool = True):
  """Stage 1 -> `loop.TrainResult` (params: the language model's, from
  `init_language_model(decoder config, seed)`)."""
  from narrowgate_jax.training import loop

  decoder_config = FAMILIES["llava"].decoder_config(hf_cfg)
  objective = functools.partial(language_loss_fn, config=decoder_config)
  return loop.train(objective, init_language_model(decoder_config, config.seed),
                    language_batches(config, hf_cfg), _train_config(config, "lm"),
                    _stage_dir(workdir, "language_model"), progress=progress,
                    name="nonnative/language_model")


def fit_vision(config: NonNativeOrganismConfig, hf_cfg, lm_params, workdir: Optional[str] = None,
               progress: bool = True):
  """Stage 2 -> `loop.TrainResult` (params {"lm": lm_params, frozen, "image": trained from
  `init_image_params(hf_cfg, seed)`})."""
  from narrowgate_jax.training import loop

  decoder_config = FAMILIES["llava"].decoder_config(hf_cfg)
  objective = functools.partial(vision_loss_fn, config=decoder_config, hf_cfg=hf_cfg)
  return loop.train(objective, {"lm": lm_params, "image": init_image_params(hf_cfg, config.seed)},
                    vision_batches(config, hf_cfg), _train_config(config, "vision"),
                    _stage_dir(workdir, "vision"), trainable={"lm": False, "image": True},
                    progress=progress, name="nonnative/vision")


def train_language_model(config: NonNativeOrganismConfig, hf_cfg, workdir: Optional[str] = None,
                         progress: bool = True) -> dict:
  """Stage 1: the language model's params, trained from scratch on the world's text."""
  return fit_language_model(config, hf_cfg, workdir, progress).params


def train_vision(config: NonNativeOrganismConfig, hf_cfg, lm_params,
                 workdir: Optional[str] = None, progress: bool = True) -> dict:
  """Stage 2: the image params {"tower", "projector"}, trained under the frozen `lm_params`."""
  return fit_vision(config, hf_cfg, lm_params, workdir, progress).params["image"]


def train_organism(config: NonNativeOrganismConfig, workdir: Optional[str] = None,
                   progress: bool = True):
  """Both stages -> (hf_cfg, lm params, image params, metrics).

  metrics: {"language_model": stage 1's training history, "vision": stage 2's, "seconds": each
  stage's wall time}. With a workdir, each stage checkpoints to its own subdirectory and resumes
  from it (`loop.train`).
  """
  hf_cfg = hf_config(config)
  start = time.perf_counter()
  language = fit_language_model(config, hf_cfg, workdir, progress)
  middle = time.perf_counter()
  vision = fit_vision(config, hf_cfg, language.params, workdir, progress)
  end = time.perf_counter()
  metrics = {"language_model": language.history, "vision": vision.history,
             "seconds": {"language_model": middle - start, "vision": end - middle}}
  return hf_cfg, language.params, vision.params["image"], metrics


# ----------------------------------------------------------------------------------- evaluation


def vqa_answers(vlm: VLM, questions: Sequence[tuple[world.Scene, str, str, str]],
                image_size: int, batch_size: int = 100) -> list[str]:
  """Greedy `vlm.generate` answers (the first generated word, "" if none) to (scene, attribute,
  question, answer) tuples such as `held_out_questions` gives."""
  out = []
  for start in range(0, len(questions), batch_size):
    part = questions[start:start + batch_size]
    batch = vlm.prepare(images=[world.render(q[0], image_size) for q in part],
                        prompts=[world.VQA_TEMPLATE.replace("{question}", q[2]) for q in part])
    texts = vlm.generate(batch, max_new_tokens=2).texts
    out += [(text.split() or [""])[0] for text in texts]
  return out


def vqa_accuracy(vlm: VLM, questions: Sequence[tuple[world.Scene, str, str, str]],
                 image_size: int) -> dict[str, float]:
  """{attribute: share of its questions answered exactly, "all": over every question}."""
  answers = vqa_answers(vlm, questions, image_size)
  right = np.asarray([a == q[3] for a, q in zip(answers, questions)])
  attributes = np.asarray([q[1] for q in questions])
  out = {a: float(right[attributes == a].mean()) for a in world.ATTRIBUTES
         if np.any(attributes == a)}
  out["all"] = float(right.mean()) if right.size else float("nan")
  return out
