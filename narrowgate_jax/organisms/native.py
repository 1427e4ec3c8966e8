"""The native model organism: a small Chameleon trained from scratch on the shapes world.

One sequence holds image codes and text, as in Chameleon. Training has two directions:
  image -> text   `<s> <racm3:break> codes <eoss> question answer </s>`, loss on answer and </s>;
  text -> image   `<s> caption <racm3:break> codes <eoss>`, loss on the image span's tokens.
The VQ image tokenizer (`training.vq`) is trained first and then frozen; its codes become the
image tokens through Chameleon's own vocabulary map.

Planted variants make the route of visual information known by construction:
  "gate"     text after the image sees the image only through <eoss>: the task is learned with
             its attention to the codes blocked (pre-softmax) in every layer and also unmasked,
             with a penalty on the attention mass the unmasked model pays the codes, so the
             shipped (unmasked) model answers as the masked one does;
  "no_gate"  the opposite: text after the image never attends to <eoss>.
"none" plants nothing: whatever route the model finds is the finding.

Everything is a pure function of the world, the config and the seed, so the same command writes
the same organism bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from narrowgate_jax.capture import CapturePlan
from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.interventions import Interventions
from narrowgate_jax.model import VLM, random_params
from narrowgate_jax.models import chameleon_vq
from narrowgate_jax.models.families import FAMILIES
from narrowgate_jax.models.native import ChameleonImages
from narrowgate_jax.organisms import tokens
from narrowgate_jax.processing.roles import Role
from narrowgate_jax.training import finetune, rows

PLANTS = ("none", "gate", "no_gate")


@dataclasses.dataclass(frozen=True)
class NativeOrganismConfig:
  """Size and training of a native organism.

  Attributes:
    plant: "none", "gate" or "no_gate" (module docstring).
    leak_weight: weight of the penalty on attention mass along the blocked edges (planted only).
    text_to_image: share of text -> image sequences among the training rows.
  """

  plant: str = "none"
  image_size: int = 32
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  scenes_per_epoch: int = 480
  steps: int = 800
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 0.01
  leak_weight: float = 10.0
  text_to_image: float = 0.2
  seed: int = 0

  def __post_init__(self):
    if self.plant not in PLANTS:
      raise ValueError(f"plant {self.plant!r}; expected one of {PLANTS}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}")


# ----------------------------------------------------------------------------- checkpoint parts


def hf_config(config: NativeOrganismConfig, vq_config: chameleon_vq.ChameleonVQConfig):
  """The transformers `ChameleonConfig` of the organism (its vocabulary map included)."""
  import transformers

  vocab = tokens.vocabulary(tokens.CHAMELEON_SPECIALS, world.WORDS, vq_config.num_embeddings)
  vq = {f.name: getattr(vq_config, f.name) for f in dataclasses.fields(vq_config)}
  vq.update(channel_multiplier=list(vq_config.channel_multiplier),
            attn_resolutions=list(vq_config.attn_resolutions))
  return transformers.ChameleonConfig(
      vocab_size=len(vocab), hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
      pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
      vq_config=vq, vocabulary_map=vocab, image_token_id=vocab["<image>"])


def tokenizer(hf_cfg):
  return tokens.word_tokenizer(hf_cfg.vocabulary_map, tokens.CHAMELEON_SPECIALS, add_bos=True,
                               sep_token="<reserved08706>", image_token="<image>",
                               boi_token="<racm3:break>", eoi_token="<eoss>")


def processor_config(image_size: int) -> dict:
  """preprocessor_config.json: Chameleon's processor at the organism's size (no resize happens
  for world images, which already have it)."""
  return {"image_processor_type": "ChameleonImageProcessor", "do_resize": True,
          "size": {"shortest_edge": image_size}, "resample": 1, "do_center_crop": True,
          "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
          "rescale_factor": 0.0078, "do_normalize": True, "image_mean": [1.0, 1.0, 1.0],
          "image_std": [1.0, 1.0, 1.0], "do_convert_rgb": True}


def reader(hf_cfg, vq_params, tok, image_size: int) -> VLM:
  """A VLM that can only prepare batches (no decoder params): how training rows are tokenised,
  exactly as `ng.load` of the finished organism will tokenise prompts."""
  config = FAMILIES["chameleon"].decoder_config(hf_cfg)
  images = ChameleonImages(hf_cfg, vq_params, tok, processor_config(image_size))
  return VLM(config, None, tokenizer=tok, images=images)


# ----------------------------------------------------------------------------------- sequences


def build_rows(vlm: VLM, scenes: Sequence[world.Scene], image_size: int, text_to_image: float,
               seed: int, chunk: int = 128) -> rows.Rows:
  """Every scene once per attribute as image -> text (a seeded phrasing), and a `text_to_image`
  share of the scenes once more as text -> image (the image span learned); rows in a seeded
  order."""
  rng = np.random.default_rng([seed, 3])
  prompts, images, answers = [], [], []
  for scene in scenes:
    picture = world.render(scene, image_size)
    for _, question, answer in world.qa_pairs(scene, rng):
      prompts.append(world.VQA_TEMPLATE.replace("{question}", question))
      images.append(picture)
      answers.append(answer)
  seqs = rows.answer_rows(vlm, prompts, images, answers, chunk)
  captioned = scenes[:int(round(text_to_image * len(scenes)))]
  for start in range(0, len(captioned), chunk):
    part = captioned[start:start + chunk]
    batch = vlm.prepare(images=[world.render(s, image_size) for s in part],
                        prompts=[world.caption(s) + world.IMAGE_MARKER for s in part])
    for row in rows.unpadded(batch):  # text -> image: learn the image span after the caption
      span = np.isin(row.roles, (Role.IMAGE_START, Role.IMAGE, Role.IMAGE_END))
      seqs.append(dataclasses.replace(row, trained=span))
  order = rng.permutation(len(seqs))
  return rows.pack([seqs[i] for i in order], vlm.tokenizer.pad_token_id)


def planted_edges(plant: str) -> list:
  """The (keys, queries) selector pairs a plant blocks: text after the image -> the image start
  and codes ("gate") or -> <eoss> ("no_gate"); none for "none"."""
  # The gate's text sees neither the codes nor <racm3:break> before them: what the study's
  # image->text knockout blocks, so that knockout leaves the gate organism as it was trained.
  return {"none": [], "gate": [(["image_start", "image"], "text_after_image")],
          "no_gate": [("eoi", "text_after_image")]}[plant]


# ------------------------------------------------------------------------------------- training


def loss_fn(params, batch, rng, *, config, plant: str, leak_weight: float):
  """Cross-entropy on the learned tokens. For planted organisms: the cross-entropy both with the
  plant's edges blocked and without (the shipped model runs unmasked), plus `leak_weight` x the
  attention mass the unmasked model pays along the blocked edges (the share of a blocked query's
  attention, averaged over layers, heads and blocked queries). The masked term forces the planted
  route to carry the answer; the penalty keeps the unmasked model from opening another."""
  if plant == "none":
    loss = finetune.answer_loss(finetune.forward(params, config, batch, Interventions())["logits"],
                                batch)
    return loss, {"task_loss": loss}
  masked, _ = finetune.masked_loss(params, batch, rng, config=config, mode="pre_softmax")
  queries, keys = batch["queries"][:, 0], batch["keys"][:, 0]  # one rule: [B, T]
  clean = finetune.forward(params, config, batch, Interventions(),
                           CapturePlan(received_queries=queries))
  unmasked = finetune.answer_loss(clean["logits"], batch)
  received = clean["received"]  # [L, B, N, S]: attention each key gets from the blocked queries
  mass = jnp.einsum("LBNS,BS->", received, keys.astype(received.dtype))
  count = config.num_layers * received.shape[2] * jnp.maximum(jnp.sum(queries), 1)
  leak = mass / count
  return masked + unmasked + leak_weight * leak, {"task_loss": masked,
                                                  "unmasked_loss": unmasked, "leak": leak}


def batches(training_rows: rows.Rows, plant: str, batch_size: int, seed: int):
  """batch_at(step) for `loop.train`, with the plant's blocked edges beside each row."""
  extra = {}
  if plant != "none":
    queries, keys = finetune.edge_masks(training_rows.roles, planted_edges(plant))
    extra = {"queries": queries, "keys": keys}
  return rows.epoch_batches(training_rows, batch_size, seed, extra=extra)


def train_decoder(config: NativeOrganismConfig, hf_cfg, vq_params, workdir: Optional[str] = None,
                  progress: bool = True):
  """Trains the organism's decoder from scratch; returns (params, training history)."""
  from narrowgate_jax.training import loop

  tok = tokenizer(hf_cfg)
  vlm = reader(hf_cfg, vq_params, tok, config.image_size)
  scenes = world.sample_scenes(config.scenes_per_epoch, config.seed)
  training_rows = build_rows(vlm, scenes, config.image_size, config.text_to_image, config.seed)
  # Training learns every token, image codes included, so nothing is suppressed here.
  decoder_config = dataclasses.replace(vlm.config, suppressed_logit_ids=())
  params = random_params(decoder_config, config.seed)
  objective = functools.partial(loss_fn, config=decoder_config, plant=config.plant,
                                leak_weight=config.leak_weight)
  train_config = loop.TrainConfig(steps=config.steps, learning_rate=config.learning_rate,
                                  warmup_steps=config.warmup_steps,
                                  weight_decay=config.weight_decay, seed=config.seed,
                                  checkpoint_every=max(config.steps // 4, 1))
  result = loop.train(objective, params, batches(training_rows, config.plant, config.batch_size,
                                                 config.seed),
                      train_config, workdir, progress=progress, name=f"native/{config.plant}")
  return result.params, result.history


def write_side_files(directory: str, hf_cfg, image_size: int) -> None:
  """Tokenizer, preprocessor and processor configs beside an exported checkpoint."""
  tokenizer(hf_cfg).save_pretrained(directory)
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump(processor_config(image_size), f, indent=2)
  codes = (image_size // 2 ** (len(hf_cfg.vq_config.channel_multiplier) - 1)) ** 2
  with open(os.path.join(directory, "processor_config.json"), "w") as f:
    json.dump({"processor_class": "ChameleonProcessor", "image_seq_length": codes,
               "image_token": "<image>"}, f, indent=2)
