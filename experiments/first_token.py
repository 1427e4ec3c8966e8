"""First-token knockout: how attention knockouts change the probability of the answer's first token.

For every example: the clean forward, then every knockout condition of the config (all
conditions of one softmax mode stacked on the condition axis: one compiled call), read at the
last prompt position. Records, per example and condition: the probability of the reference
answer's first token, the model's own top token, and whether that token is the answer's.
Metrics per condition: mean probability, accuracy, and the mean relative change of the
probability against the clean run, (p_knock - p_clean) / p_clean (the Cross-modal study's
measure).

Conditions (config.experiment_config.conditions, name -> spec):
  keys, queries   token selectors ("eoi", "image", "question", "last", ...; lists allowed)
  layers          "all", "last:<w>" (the last w layers), "window:<centre>:<k>", or a list
  mode            "pre_softmax" (default) or "post_softmax"
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import narrowgate_jax as ng
from narrowgate_jax.processing.prompts import continuation_token
from narrowgate_jax.runs import report
from narrowgate_jax.runs.experiment import Experiment, register

CLEAN = "clean"


def layer_list(spec, num_layers: int) -> list[int]:
  """A condition's `layers` -> layer indices (see the module docstring)."""
  if isinstance(spec, str):
    if spec == "all":
      return list(range(num_layers))
    kind, *args = spec.split(":")
    if kind == "last" and len(args) == 1:
      return list(range(max(0, num_layers - int(args[0])), num_layers))
    if kind == "window" and len(args) == 2:
      centre, k = int(args[0]), int(args[1])
      return list(range(max(0, centre - k // 2), min(num_layers, centre + (k + 1) // 2)))
    raise ValueError(f"layers {spec!r}: expected 'all', 'last:<w>', 'window:<centre>:<k>' or a "
                     "list of layer indices")
  layers = [int(i) for i in spec]
  if any(not 0 <= i < num_layers for i in layers):
    raise ValueError(f"layers {layers} out of range for a {num_layers}-layer model")
  return layers


def _selector(value):
  """A config's selector (a name, or a list / tuple of names) as `ng.knockout` takes it."""
  return value if isinstance(value, str) else list(value)


@register
class FirstTokenKnockout(Experiment):
  name = "first_token_knockout"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.specs = dict(config.experiment_config.conditions)
    if CLEAN in self.specs:
      raise ValueError(f"condition name {CLEAN!r} is reserved for the run without knockout")

  def conditions(self, vlm) -> list[str]:
    for name, spec in self.specs.items():  # fail before any example is processed
      layer_list(spec.get("layers", "all"), vlm.num_layers)
    return [CLEAN] + sorted(self.specs)

  def _knockouts(self, vlm, batch, names: Sequence[str]):
    def one(spec):  # spec["keys"]: a ConfigDict's .keys is the dict method
      return vlm.knockout(batch, keys=_selector(spec["keys"]),
                          queries=_selector(spec.get("queries", "last")),
                          layers=layer_list(spec.get("layers", "all"), vlm.num_layers),
                          mode=spec.get("mode", "pre_softmax"))

    return ng.stack_conditions([one(self.specs[n]) for n in names])

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    n = len(examples)
    answers = np.asarray([continuation_token(vlm.tokenizer, ex.answer) for ex in examples])
    probs = {CLEAN: np.asarray(last_position_probs(vlm.forward(batch).logits))}
    by_mode: dict[str, list[str]] = {}
    for name in sorted(self.specs):
      by_mode.setdefault(self.specs[name].get("mode", "pre_softmax"), []).append(name)
    for names in by_mode.values():
      logits = vlm.forward(batch, interventions=self._knockouts(vlm, batch, names)).logits
      stacked = np.asarray(last_position_probs(logits))
      probs.update(zip(names, stacked))
    records = []
    for condition, p in probs.items():
      top = p[:n].argmax(-1)
      for b, example in enumerate(examples):
        records.append({"example": example.id, "condition": condition,
                        "p_answer": float(p[b, answers[b]]), "top_token": int(top[b]),
                        "answer_token": int(answers[b]), "correct": bool(top[b] == answers[b])})
    return records

  def metrics(self, records: Sequence[dict]) -> dict:
    clean = {r["example"]: r["p_answer"] for r in records if r["condition"] == CLEAN}
    out = {"records": len(records), "examples": len(clean), "conditions": {}}
    for condition in sorted({r["condition"] for r in records}):
      rows = [r for r in records if r["condition"] == condition]
      change = [(r["p_answer"] - clean[r["example"]]) / clean[r["example"]] for r in rows
                if clean.get(r["example"], 0) > 0]
      out["conditions"][condition] = {
          "mean_p_answer": float(np.mean([r["p_answer"] for r in rows])),
          "accuracy": float(np.mean([r["correct"] for r in rows])),
          "mean_relative_change_pct": float(100 * np.mean(change)) if change else None}
    return out

  def figures(self, records, metrics, directory) -> list[str]:
    rows = metrics["conditions"]
    names = list(rows)
    with report.figure(os.path.join(directory, "p_answer.png")) as (_, ax):
      ax.bar(names, [rows[n]["mean_p_answer"] for n in names], color="#4c72b0")
      ax.set_ylabel("mean p(answer's first token)")
      ax.set_title("first-token probability per condition")
      ax.tick_params(axis="x", rotation=30)
    return ["p_answer.png"]

  def report(self, metrics, figures) -> str:
    rows = [{"condition": n, **m} for n, m in metrics["conditions"].items()]
    return "## Per condition\n\n" + report.markdown_table(
        rows, ["condition", "mean_p_answer", "accuracy", "mean_relative_change_pct"])


def last_position_probs(logits) -> jax.Array:
  """[..., B, T, V] logits -> [..., B, V] probabilities at the last position (float32)."""
  return jax.nn.softmax(jnp.asarray(logits)[..., -1, :].astype(jnp.float32), axis=-1)
