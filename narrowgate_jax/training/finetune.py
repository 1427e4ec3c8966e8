"""Masked fine-tuning (PROTOCOLS.md §2f): fine-tune a model with chosen attention edges cut.

  params, history = finetune(vlm, examples, edges=[("eoi", "text_after_image")],
                             config=FinetuneConfig(steps=300, lora_rank=8))

The study fine-tunes Chameleon with the [EOI] edges masked until the gate disappears; here any
loaded model (native or not) learns the answers of `examples` while the attention from `queries`
to `keys` (role selectors, as for `ng.knockout`) is blocked in every layer. Full fine-tuning or
LoRA on the attention kernels (`training.lora`), AdamW through `loop.train` (resumable, sharded:
parameters keep the mesh layout `ng.load(..., mesh=)` gives them, so a model that loads on a pod
slice fine-tunes there). The result is a parameter tree of the model's own layout (LoRA merged),
ready for `VLM(...)` or `checkpoints_convert.export`.

Only the decoder is tuned; a non-native model's image features come from `prepare` as in
inference, computed once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from narrowgate_jax.capture import CapturePlan
from narrowgate_jax.interventions import KNOCKOUT_MODES, Interventions, Knockout
from narrowgate_jax.models.decoder import Decoder
from narrowgate_jax.processing.roles import Role, Selector, select
from narrowgate_jax.training import lora, loop, rows

Edge = tuple[Selector, Selector]  # (keys, queries)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """How to fine-tune. lora_rank 0 tunes every decoder parameter; > 0 trains LoRA adapters of
  that rank on `lora_targets` (alpha `lora_alpha`) and merges them at the end."""

  steps: int = 200
  batch_size: int = 16
  learning_rate: float = 1e-4
  warmup_steps: int = 10
  weight_decay: float = 0.0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
  mode: str = "pre_softmax"
  seed: int = 0
  checkpoint_every: int = 100

  def __post_init__(self):
    if self.mode not in KNOCKOUT_MODES:
      raise ValueError(f"mode {self.mode!r}; expected one of {KNOCKOUT_MODES}")
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank {self.lora_rank} must be 0 (full fine-tuning) or positive")


# ------------------------------------------------------------------------------ the objective


def forward(params, config, batch: dict, interventions: Interventions,
            plan: CapturePlan = CapturePlan()) -> dict:
  """The decoder on a training batch (rows.Rows.take's dict) -> Decoder's output dict."""
  mask = batch["roles"] != Role.PAD
  return Decoder(config).apply({"params": params}, batch["ids"], batch["positions"], mask,
                               interventions, plan, batch.get("features"),
                               batch.get("feature_mask"))


def answer_loss(logits: jax.Array, batch: dict) -> jax.Array:
  """Mean cross-entropy of the learned next tokens: logits [B, T, V] float32."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"]
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def edge_masks(roles: np.ndarray, edges: Sequence[Edge]) -> tuple[np.ndarray, np.ndarray]:
  """(queries, keys) [B, R, T] bool: rule r blocks its queries from its keys. A row without one
  of them (a sequence with no text after its image) blocks nothing."""
  queries = np.stack([select(q, roles, what="edge queries", allow_empty=True) for _, q in edges],
                     axis=1)
  keys = np.stack([select(k, roles, what="edge keys", allow_empty=True) for k, _ in edges],
                  axis=1)
  return queries, keys


def blocked(batch: dict, num_layers: int, mode: str) -> Interventions:
  """The batch's edges (`queries`, `keys` [B, R, T]) cut in every layer."""
  rules = batch["queries"].shape[1]
  layers = jnp.broadcast_to(jnp.arange(num_layers, dtype=jnp.int32), (rules, num_layers))
  return Interventions(knockouts=(Knockout(
      layers=layers, queries=jnp.swapaxes(batch["queries"], 0, 1),
      keys=jnp.swapaxes(batch["keys"], 0, 1), mode=mode),))


def masked_loss(params, batch: dict, rng, *, config, mode: str):
  """Answer cross-entropy with the batch's edges blocked (loss_fn of `loop.train`)."""
  del rng  # no dropout
  out = forward(params, config, batch, blocked(batch, config.num_layers, mode))
  loss = answer_loss(out["logits"], batch)
  return loss, {"answer_loss": loss}


# -------------------------------------------------------------------------------- fine-tuning


def training_rows(vlm, examples: Sequence) -> rows.Rows:
  """Each example's prompt and images, then its answer and EOS to learn."""
  missing = [e.id for e in examples if not e.answer]
  if missing:
    raise ValueError(f"fine-tuning needs an answer for every example; none for {missing[:5]}")
  return rows.pack(rows.answer_rows(vlm, [e.prompt for e in examples],
                                    [list(e.images) for e in examples],
                                    [e.answer for e in examples]),
                   vlm.tokenizer.pad_token_id)


def finetune(vlm, examples: Sequence, edges: Sequence[Edge], config: FinetuneConfig,
             workdir: Optional[str] = None, progress: bool = True):
  """Fine-tunes `vlm`'s decoder on `examples` with `edges` blocked; returns (params in the
  model's layout, training history). `vlm.params` is left as it was."""
  if not edges:
    raise ValueError("no edges to mask: give (keys, queries) selector pairs, e.g. "
                     "[('eoi', 'text_after_image')]")
  data = training_rows(vlm, examples)
  queries, keys = edge_masks(data.roles, edges)
  batch_at = rows.epoch_batches(data, config.batch_size, config.seed,
                                extra={"queries": queries, "keys": keys})
  # Training learns answers only; suppressed logits (Chameleon's image tokens) stay suppressed.
  objective = functools.partial(masked_loss, config=vlm.config, mode=config.mode)
  train_config = loop.TrainConfig(steps=config.steps, learning_rate=config.learning_rate,
                                  warmup_steps=config.warmup_steps,
                                  weight_decay=config.weight_decay, seed=config.seed,
                                  checkpoint_every=config.checkpoint_every)
  shardings = None
  if vlm.mesh is not None:
    shardings = jax.tree.map(lambda x: x.sharding, vlm.params)
  if config.lora_rank == 0:
    result = loop.train(objective, vlm.params, batch_at, train_config, workdir,
                        mesh=vlm.mesh, param_sharding=shardings, progress=progress,
                        name="masked fine-tuning")
    return result.params, result.history
  adapters = lora.init_lora(vlm.params, config.lora_rank, config.lora_targets, config.seed)
  tree = lora.lora_tree(vlm.params, adapters)
  if shardings is not None:
    from narrowgate_jax.distributed import replicated

    shardings = lora.lora_tree(shardings, jax.tree.map(lambda _: replicated(vlm.mesh), adapters))
  result = loop.train(lora.lora_loss_fn(objective, config.lora_alpha), tree, batch_at,
                      train_config, workdir, trainable=lora.trainable_lora_mask(tree),
                      mesh=vlm.mesh, param_sharding=shardings, progress=progress,
                      name="masked fine-tuning (LoRA)")
  merged = lora.merge_lora(result.params[lora.BASE], result.params[lora.LORA], config.lora_alpha)
  return merged, result.history
