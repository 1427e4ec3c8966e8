"""The Cross-modal Information Flow study (PROTOCOLS.md §3): window attention knockout over flows,
and answer formation by the logit lens at the last position.

cross_modal_windows: for every example, the model's own greedy first answer token t* on the clean
run, then for every flow (source -> target token sets) and every window of k layers centred on
each layer, the probability of t* with attention from the target rows to the source columns
blocked (pre-softmax by default, all heads) in that window. Records: per example, flow and centre,
p_base(t*), p_knock(t*) and the relative change (p_knock - p_base) / p_base x 100, and whether
the model answered the example correctly (t* is the answer's first token). Metrics: per flow and
centre, the mean relative change over correctly answered examples with a bootstrap 95% band;
one line plot per flow set, as the study drew them.

All windows of all flows that share a target run as one stacked call that computes the prompt
once and recomputes only the target's positions onward (`VLM.forward_from_prefix`): for X->Last
flows, one position per condition.

answer_formation: the last prompt position's residual after every layer, projected with the
unembedding (final norm optional), and the probability of the answer's first token in lower case
and capitalised (and of the two options of a "Choose" question, when its example names them in
meta["options"]).

Flows (config.experiment_config.flows, name -> dict(source=..., target=...)) take token selectors
plus two names resolved from the example's object boxes (meta["boxes"], through
`vlm.region`): "related" (image tokens whose patch shows part of a box) and "other" (image tokens
that do not; newlines excluded). "image_span" is every image token: patches and newlines/row
breaks. An example without boxes, or whose boxes cover no patch, is skipped (and counted) when
a flow needs them.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import narrowgate_jax as ng
from narrowgate_jax.analysis import (NO_TOKEN, all_windows, bootstrap_band,
                                     first_token_probability, logit_lens, relative_change,
                                     token_trajectories, window_layers)
from narrowgate_jax.processing.prompts import continuation_token
from narrowgate_jax.processing.roles import select
from narrowgate_jax.runs import report
from narrowgate_jax.runs.experiment import Experiment, register

IMAGE_SPAN = ["image", "image_break"]
BOX_SELECTORS = ("related", "other")
CLEAN = "clean"

FLOWS_TO_LAST = dict(question_to_last=dict(source="question", target="last"),
                     image_to_last=dict(source="image_span", target="last"),
                     last_to_last=dict(source="last", target="last"))
FLOWS_TO_QUESTION = dict(image_to_question=dict(source="image_span", target="question"),
                         related_to_question=dict(source="related", target="question"),
                         other_to_question=dict(source="other", target="question"))


def _needs_boxes(flows: dict) -> bool:
  return any(f["source"] in BOX_SELECTORS or f["target"] in BOX_SELECTORS
             for f in flows.values())


def _box_masks(vlm, batch, examples) -> tuple[np.ndarray, np.ndarray, list]:
  """(related [B, T], other [B, T], skip reason or None per example)."""
  b, t = batch.shape
  related, reasons = np.zeros((b, t), bool), []
  image = select("image", batch.roles)
  for i, example in enumerate(examples):
    boxes = example.meta.get("boxes") or []
    if not boxes:
      reasons.append("no object boxes")
      continue
    row = vlm.region(_row(batch, i), [list(example.images)], [[boxes]])[0]
    if not row.any():
      reasons.append("boxes cover no image patch")
      continue
    related[i] = row
    reasons.append(None)
  other = image & ~related
  return related, other, reasons


def _row(batch, i):
  """Example i of a batch, as a batch of one."""
  return jax.tree.map(lambda x: np.asarray(x)[i:i + 1], batch)


@register
class CrossModalWindows(Experiment):
  name = "cross_modal_windows"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    cfg = config.experiment_config
    self.flows = {name: dict(spec) for name, spec in cfg.flows.items()}
    self.window = int(cfg.window)
    self.mode = cfg.get("mode", "pre_softmax")
    self.bootstrap = int(cfg.get("bootstrap", 1000))
    self.only_correct = bool(cfg.get("only_correct", True))

  def conditions(self, vlm) -> list[str]:
    window_layers(0, self.window, vlm.num_layers)  # a window larger than the model: refuse now
    return [CLEAN] + [self._name(f, c) for f in sorted(self.flows)
                      for c in range(vlm.num_layers)]

  @staticmethod
  def _name(flow: str, centre: int) -> str:
    return f"{flow}/{centre:03d}"

  def prompts(self, example):
    return example.prompt, example.question

  def _selector(self, name, related, other, rows):
    if name == "related":
      return related[rows]
    if name == "other":
      return other[rows]
    return IMAGE_SPAN if name == "image_span" else name

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    n, num_layers = len(examples), vlm.num_layers
    related = other = None
    reasons = [None] * n
    if _needs_boxes(self.flows):
      related, other, reasons = _box_masks(vlm, batch, examples)
    # Rows of skipped examples borrow a kept row's masks so every selector matches something.
    donor = next((i for i in range(n) if reasons[i] is None), None)
    if related is not None and donor is None:  # nothing in this batch can be measured
      return self._skipped_records(examples, reasons, num_layers)
    if related is not None:
      for i in range(batch.shape[0]):
        if i >= n or reasons[i] is not None:
          related[i], other[i] = related[donor], other[donor]
    answers = np.asarray([continuation_token(vlm.tokenizer, ex.answer) for ex in examples])
    windows = all_windows(self.window, num_layers)  # [L, M]
    # Flows with the same target share a prefix: one stacked call each.
    by_target: dict[str, list[tuple[str, int]]] = {}
    for flow in sorted(self.flows):
      by_target.setdefault(self.flows[flow]["target"], []).extend(
          (flow, c) for c in range(num_layers))
    rows = np.arange(batch.shape[0])
    clean, p_knock = None, {}
    for target, items in by_target.items():
      conditions = ng.stack_conditions([
          vlm.knockout(batch, keys=self._selector(self.flows[f]["source"], related, other, rows),
                       queries=self._selector(target, related, other, rows),
                       layers=[int(l) for l in windows[c] if l >= 0], mode=self.mode)
          for f, c in items])
      out = vlm.forward_from_prefix(batch, conditions)
      if clean is None:
        clean = np.asarray(out.clean)
        top = clean.argmax(-1)  # t*: the model's own first answer token, per row
      p = np.asarray(first_token_probability(out.logits, jnp.asarray(top)[None]))  # [C, B]
      p_knock.update(zip(items, p))
    p_base = np.asarray(first_token_probability(jnp.asarray(clean), jnp.asarray(top)))
    records = []
    for i, example in enumerate(examples):
      base = {"example": example.id, "answer_token": int(answers[i]), "top_token": int(top[i]),
              "correct": bool(top[i] == answers[i]), "skipped": reasons[i]}
      records.append({**base, "condition": CLEAN, "p_base": float(p_base[i])})
      for (flow, centre), p in p_knock.items():
        records.append({**base, "condition": self._name(flow, centre), "flow": flow,
                        "centre": centre, "p_base": float(p_base[i]), "p_knock": float(p[i]),
                        "relative_change": float(relative_change(p[i], p_base[i]))})
    return records

  def _skipped_records(self, examples, reasons, num_layers) -> list[dict]:
    out = []
    for i, example in enumerate(examples):
      base = {"example": example.id, "skipped": reasons[i], "correct": False}
      out.append({**base, "condition": CLEAN})
      out += [{**base, "condition": self._name(f, c), "flow": f, "centre": c}
              for f in sorted(self.flows) for c in range(num_layers)]
    return out

  def metrics(self, records: Sequence[dict]) -> dict:
    clean = [r for r in records if r["condition"] == CLEAN]
    skipped: dict[str, int] = {}
    for r in clean:
      if r.get("skipped"):
        skipped[r["skipped"]] = skipped.get(r["skipped"], 0) + 1
    measured = [r for r in clean if not r.get("skipped")]
    correct = {r["example"] for r in measured if r["correct"]}
    kept = correct if self.only_correct else {r["example"] for r in measured}
    out = {"records": len(records), "examples": len(clean), "correct": len(correct),
           "kept": len(kept), "only_correct": self.only_correct,
           "accuracy": len(correct) / max(1, len(measured)),
           "skipped": skipped, "window": self.window, "flows": {}}
    for flow in sorted(self.flows):
      rows = [r for r in records if r.get("flow") == flow and r["example"] in kept]
      if not rows:
        out["flows"][flow] = None
        continue
      centres = sorted({r["centre"] for r in rows})
      examples = sorted({r["example"] for r in rows})
      table = np.full((len(examples), len(centres)), np.nan)
      index = {e: i for i, e in enumerate(examples)}
      for r in rows:
        table[index[r["example"]], r["centre"]] = r["relative_change"]
      mean, low, high = bootstrap_band(table, num_resamples=self.bootstrap)
      out["flows"][flow] = {"centre": centres, "mean": np.asarray(mean).tolist(),
                            "low": np.asarray(low).tolist(), "high": np.asarray(high).tolist()}
    return out

  def figures(self, records, metrics, directory) -> list[str]:
    flows = {f: m for f, m in metrics["flows"].items() if m}
    if not flows:
      return []
    with report.figure(os.path.join(directory, "window_knockout.png"), width=5.5) as (_, ax):
      for flow, m in flows.items():
        line, = ax.plot(m["centre"], m["mean"], label=flow.replace("_", " "))
        ax.fill_between(m["centre"], m["low"], m["high"], color=line.get_color(), alpha=0.2)
      ax.axhline(0, color="black", linewidth=0.6)
      report.layer_axis(ax, f"layer (centre of a {metrics['window']}-layer window)")
      ax.set_ylabel("change in p(answer) (%)")
      ax.legend()
    return ["window_knockout.png"]

  def report(self, metrics, figures) -> str:
    rows = []
    for flow, m in metrics["flows"].items():
      if m:
        worst = int(np.argmin(m["mean"]))
        rows.append({"flow": flow, "largest drop (%)": m["mean"][worst],
                     "at layer": m["centre"][worst]})
    kept = "answered correctly" if metrics["only_correct"] else "measured"
    return (f"{metrics['kept']} of {metrics['examples']} examples kept ({kept}; accuracy "
            f"{metrics['accuracy']:.3f}); skipped: {metrics['skipped'] or 'none'}.\n\n"
            + report.markdown_table(rows, ["flow", "largest drop (%)", "at layer"]))


def _finite(value) -> float | None:
  """A probability for a record; None where there was no candidate token (NaN)."""
  return None if np.isnan(value) else float(value)


@register
class AnswerFormation(Experiment):
  name = "answer_formation"

  def conditions(self, vlm) -> list[str]:
    return [f"layer/{l:03d}" for l in range(vlm.num_layers + 1)]

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    final_norm = bool(self.config.experiment_config.get("final_norm", True))
    out = vlm.forward(batch, capture=ng.Capture(resid=True, resid_at="last"))
    resid = jnp.asarray(out.resid)[:, :, 0]  # [L+1, B, D]
    probs = logit_lens(resid, vlm.unembed, vlm.final_norm if final_norm else None)
    names = ["lower", "capitalised", "true_option", "false_option"]
    tokens = np.full((batch.shape[0], len(names)), NO_TOKEN, np.int64)  # fillers: NaN rows
    for i, ex in enumerate(examples):
      tokens[i, 0] = continuation_token(vlm.tokenizer, ex.answer.lower())
      tokens[i, 1] = continuation_token(vlm.tokenizer, ex.answer[:1].upper() + ex.answer[1:])
      options = ex.meta.get("options")  # Choose questions: [the answer, the other option]
      if options:
        tokens[i, 2:] = [continuation_token(vlm.tokenizer, o) for o in options[:2]]
    traj = np.asarray(token_trajectories(probs, jnp.asarray(tokens)))  # [L+1, B, K]
    records = []
    for i, example in enumerate(examples):
      for layer in range(traj.shape[0]):
        records.append({"example": example.id, "condition": f"layer/{layer:03d}",
                        "layer": layer, **{f"p_{k}": _finite(traj[layer, i, j])
                                           for j, k in enumerate(names)}})
    return records

  def metrics(self, records: Sequence[dict]) -> dict:
    layers = sorted({r["layer"] for r in records})
    out = {"records": len(records), "layers": layers}
    for key in ("p_lower", "p_capitalised", "p_true_option", "p_false_option"):
      means = [[r[key] for r in records if r["layer"] == l and r[key] is not None]
               for l in layers]
      out[key] = [float(np.mean(m)) if m else None for m in means]
    return out

  def figures(self, records, metrics, directory) -> list[str]:
    with report.figure(os.path.join(directory, "answer_formation.png")) as (_, ax):
      ax.plot(metrics["layers"], metrics["p_lower"], label="answer (lower case)")
      ax.plot(metrics["layers"], metrics["p_capitalised"], label="Answer (capitalised)")
      if metrics["p_true_option"][0] is not None:  # Choose questions
        ax.plot(metrics["layers"], metrics["p_true_option"], "--", label="true option")
        ax.plot(metrics["layers"], metrics["p_false_option"], ":", label="false option")
      report.layer_axis(ax)
      ax.set_ylabel("p(first answer token) at the last position")
      ax.legend()
    return ["answer_formation.png"]
