"""The Narrow Gate study's experiments (PROTOCOLS.md §2) on any supported model.

ng_attention_flow (Fig. 3): the attention text after the image pays to each part of the image
  span, per layer: EOI, the last image token, user-named "hot" positions, the other image
  tokens; computed inside the layer scan (`Capture.received_from`), post-softmax weights or
  value-norm weighted (`weighting`).
ng_knockout_eval (Table 1): greedy generation under knockout conditions (none, [EOI],
  image->text, k random image tokens repeated, last image token, all image tokens), in all
  layers or the last w (`layers`), post- or pre-softmax; scored by the official VQA accuracy
  ("vqa") or CIDEr-D over the evaluated subset ("caption"). Every condition shares the prompt
  up to the first position it changes (`VLM.generate(share_prefix=True)`).
ng_overlap (Fig. 4): the last layers' residuals at probe positions (EOI, the last image token,
  the mean of the image tokens) stored per example; the neighbourhood overlap chi with the class
  labels per layer is computed from all of them at the end.
"""

from __future__ import annotations

import inspect
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import narrowgate_jax as ng
from narrowgate_jax.analysis import category_sums, flow_shares, modality_homogeneity
from narrowgate_jax.evaluation.cider import cider_d
from narrowgate_jax.evaluation.vqa import extract_answer, vqa_accuracy
from narrowgate_jax.processing.prompts import continuation_token
from narrowgate_jax.processing.roles import Role, select
from narrowgate_jax.runs import report
from narrowgate_jax.runs.arrays import ARRAYS
from narrowgate_jax.runs.experiment import Experiment, register

NONE = "none"


# ------------------------------------------------------------------------------ attention flow


def hot_masks(roles: np.ndarray, hot: dict) -> dict[str, np.ndarray]:
  """{name: [index, ...]} image-token indices (0 = the first image token, -1 the last) ->
  {name: [B, T] bool} masks."""
  image = select("image", roles)
  out = {}
  for name, indices in hot.items():
    mask = np.zeros_like(image)
    for b in range(image.shape[0]):
      positions = np.flatnonzero(image[b])
      mask[b, positions[[int(i) for i in indices]]] = True
    out[name] = mask
  return out


@register
class NgAttentionFlow(Experiment):
  name = "ng_attention_flow"

  def conditions(self, vlm) -> list[str]:
    return ["flow"]

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    cfg = self.config.experiment_config
    capture = ng.Capture(received_from="text_after_image",
                         received_weighting=cfg.get("weighting", "probability"))
    received = np.asarray(vlm.forward(batch, capture=capture).received)  # [L, B, N, S]
    roles = np.asarray(batch.roles)
    sums = category_sums(received, roles, hot_masks(roles, dict(cfg.get("hot", {}))))
    return [{"example": ex.id, "condition": "flow",
             **{name: v[:, b].tolist() for name, v in sums.items()}}
            for b, ex in enumerate(examples)]

  def metrics(self, records: Sequence[dict]) -> dict:
    names = [k for k in records[0] if k not in ("example", "condition")]
    sums = {n: np.asarray([r[n] for r in records]).T for n in names}  # [L, examples]
    shares = flow_shares(sums)
    return {"records": len(records), "examples": len(records),
            "shares": {n: v.tolist() for n, v in shares.items()}}

  def figures(self, records, metrics, directory) -> list[str]:
    with report.figure(os.path.join(directory, "attention_flow.png")) as (_, ax):
      for name, share in metrics["shares"].items():
        ax.plot(range(len(share)), share, label=name.replace("_", " "))
      report.layer_axis(ax)
      ax.set_ylabel("share of attention to the image span")
      ax.set_ylim(0, 1)
      ax.legend()
    return ["attention_flow.png"]

  def report(self, metrics, figures) -> str:
    rows = [{"category": n, "first layer": s[0], "max": max(s), "last layer": s[-1]}
            for n, s in metrics["shares"].items()]
    return "## Share of the text's attention to the image span\n\n" + report.markdown_table(
        rows, ["category", "first layer", "max", "last layer"])


# ------------------------------------------------------------------------------- knockout eval


def _layers(spec, num_layers: int) -> list[int]:
  """"all", or "last:<w>" (the last w layers: the progressive knockout)."""
  if spec == "all":
    return list(range(num_layers))
  kind, _, w = str(spec).partition(":")
  if kind != "last" or not w.isdigit():
    raise ValueError(f"layers {spec!r}: expected 'all' or 'last:<w>'")
  return list(range(max(0, num_layers - int(w)), num_layers))


@register
class NgKnockoutEval(Experiment):
  """Conditions: config.experiment_config.conditions, a list of names among "eoi",
  "image_to_text", "random" (`random_tokens` image tokens, `random_repeats` draws, seeded per
  example), "last_image", "all_image"; "none" is always run."""

  name = "ng_knockout_eval"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    cfg = config.experiment_config
    self.task = cfg.task
    if self.task not in ("vqa", "caption"):
      raise ValueError(f"experiment_config.task {self.task!r}; expected 'vqa' or 'caption'")
    self.kinds = list(cfg.conditions)
    self.repeats = int(cfg.get("random_repeats", 5))

  def conditions(self, vlm) -> list[str]:
    _layers(self.config.experiment_config.layers, vlm.num_layers)
    names = [NONE]
    for kind in self.kinds:
      names += ([f"random/{r}" for r in range(self.repeats)] if kind == "random" else [kind])
    return names

  def _knockout(self, vlm, batch, name: str, examples, layers=None):
    cfg = self.config.experiment_config
    layers = _layers(cfg.layers if layers is None else layers, vlm.num_layers)
    mode = cfg.get("mode", "post_softmax")
    roles = np.asarray(batch.roles)
    if name == NONE:
      return ng.no_knockout(batch, mode=mode)
    if name == "eoi":
      keys, queries = "eoi", "all"
    elif name == "image_to_text":  # image-start + image tokens, not EOI -> text and generated
      keys, queries = ["image_start", "image"], "text_after_image"
    elif name == "last_image":
      keys, queries = "last_image", "all"
    elif name == "all_image":
      keys, queries = ["image", "image_break"], "all"
    elif name.startswith("random/"):
      keys, queries = self._random_keys(roles, int(name.split("/")[1]), examples), "all"
    else:
      raise ValueError(f"unknown knockout condition {name!r}")
    return vlm.knockout(batch, keys=keys, queries=queries, layers=layers, mode=mode)

  def _random_keys(self, roles, repeat: int, examples) -> np.ndarray:
    """k random image tokens per row, seeded by (config seed, example id, repeat)."""
    image = select("image", roles)
    k = int(self.config.experiment_config.get("random_tokens", 10))
    keys = np.zeros_like(image)
    for b in range(image.shape[0]):
      example = examples[min(b, len(examples) - 1)].id  # filler rows copy the last example
      seed = [int(self.config.seed), repeat] + list(str(example).encode())
      positions = np.flatnonzero(image[b])
      chosen = np.random.default_rng(seed).choice(positions, min(k, positions.size),
                                                  replace=False)
      keys[b, chosen] = True
    return keys

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    cfg = self.config.experiment_config
    tokens = int(cfg.get("max_new_tokens", 20 if self.task == "vqa" else 60))
    names = self.conditions(vlm)
    # "none" rides in the same call as an empty knockout: it is served by the clean prompt pass
    # that every condition's shared prefix comes from, and decodes in the same loop.
    conditions = ng.stack_conditions([self._knockout(vlm, batch, n, examples) for n in names])
    out = vlm.generate(batch, max_new_tokens=tokens, interventions=conditions)
    texts = dict(zip(names, out.texts))
    records = []
    for condition, rows in texts.items():
      for b, example in enumerate(examples):
        record = {"example": example.id, "condition": condition, "text": rows[b]}
        if self.task == "vqa":
          record["answer"] = extract_answer(rows[b])
          record["accuracy"] = vqa_accuracy(
              record["answer"], example.answers,
              normalize_unanimous=bool(cfg.get("normalize_unanimous", False)))
        records.append(record)
    return records

  def metrics(self, records: Sequence[dict]) -> dict:
    by_condition: dict[str, list] = {}
    for r in records:
      by_condition.setdefault(r["condition"], []).append(r)
    scores = {}
    for condition, rows in sorted(by_condition.items()):
      if self.task == "vqa":
        scores[condition] = float(np.mean([r["accuracy"] for r in rows]))
      else:
        candidates = {r["example"]: r["text"] for r in rows}
        references = self._references()
        scores[condition] = cider_d(candidates, {k: references[k] for k in candidates})[0]
    out = {"records": len(records), "task": self.task, "scores": scores}
    random = [v for k, v in scores.items() if k.startswith("random/")]
    if random:
      out["random"] = {"mean": float(np.mean(random)), "std": float(np.std(random))}
    return out

  def _references(self) -> dict:
    from narrowgate_jax.runs.loop import load_data

    dataset = load_data(self.config.data)
    return {dataset[i].id: list(dataset[i].answers) for i in range(len(dataset))}

  def figures(self, records, metrics, directory) -> list[str]:
    names = [n for n in metrics["scores"] if not n.startswith("random/")]
    values = [metrics["scores"][n] for n in names]
    errors = [0.0] * len(names)
    if "random" in metrics:
      names.append("random")
      values.append(metrics["random"]["mean"])
      errors.append(metrics["random"]["std"])
    with report.figure(os.path.join(directory, "knockout.png")) as (_, ax):
      ax.bar(names, values, yerr=errors, color="#55a868", capsize=3)
      ax.set_ylabel("VQA accuracy" if self.task == "vqa" else "CIDEr-D")
      ax.tick_params(axis="x", rotation=30)
    return ["knockout.png"]

  def report(self, metrics, figures) -> str:
    rows = [{"condition": n, "score": v} for n, v in metrics["scores"].items()
            if not n.startswith("random/")]
    if "random" in metrics:
      rows.append({"condition": "random (mean ± std)",
                   "score": f"{metrics['random']['mean']:.4g} ± {metrics['random']['std']:.2g}"})
    return "## Score per condition\n\n" + report.markdown_table(rows, ["condition", "score"])


@register
class NgKnockoutOverlap(NgKnockoutEval):
  """Table 1's ImageNet column and the progressive knockout: the neighbourhood overlap chi (with
  the class labels) of the last layer's output at the last prompt position, clean and under
  each knockout in the last w layers for every w of `widths` ("all": every layer)."""

  name = "ng_knockout_overlap"

  def __init__(self, config: ml_collections.ConfigDict):
    Experiment.__init__(self, config)
    cfg = config.experiment_config
    self.task = "overlap"
    self.kinds = list(cfg.conditions)
    self.repeats = int(cfg.get("random_repeats", 1))
    self.widths = [str(w) for w in cfg.widths]

  def _spec(self, width: str) -> str:
    return "all" if width == "all" else f"last:{width}"

  def conditions(self, vlm) -> list[str]:
    for width in self.widths:
      _layers(self._spec(width), vlm.num_layers)
    kinds = [k for kind in self.kinds for k in (
        [f"random/{r}" for r in range(self.repeats)] if kind == "random" else [kind])]
    return [NONE] + [f"{k}@{w}" for k in kinds for w in self.widths]

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    names = self.conditions(vlm)[1:]
    capture = ng.Capture(resid_at="last")
    vectors = {NONE: np.asarray(vlm.forward(batch, capture=capture).resid)[-1, :, 0]}
    if names:
      conditions = ng.stack_conditions([
          self._knockout(vlm, batch, n.split("@")[0], examples, self._spec(n.split("@")[1]))
          for n in names])
      resid = np.asarray(vlm.forward(batch, interventions=conditions, capture=capture).resid)
      vectors.update(zip(names, resid[:, -1, :, 0]))  # [C, L+1, B, 1, D] -> last layer
    return [{"example": ex.id, "condition": c, "label": ex.label,
             ARRAYS: {"last": np.asarray(v[b], np.float16)}}
            for c, v in vectors.items() for b, ex in enumerate(examples)]

  def metrics(self, records: Sequence[dict]) -> dict:
    from narrowgate_jax.analysis import neighbourhood_overlap

    k = int(self.config.experiment_config.get("k", 30))
    chi = {}
    for condition in sorted({r["condition"] for r in records}):
      rows = [r for r in records if r["condition"] == condition]
      x = self.arrays(rows, "last").astype(np.float32)
      chi[condition] = float(neighbourhood_overlap(jnp.asarray(x),
                                                   np.asarray([str(r["label"]) for r in rows]),
                                                   k=k))
    return {"records": len(records), "k": k, "chi": chi}

  def figures(self, records, metrics, directory) -> list[str]:
    names = list(metrics["chi"])
    with report.figure(os.path.join(directory, "knockout_overlap.png"), width=6) as (_, ax):
      ax.bar(names, [metrics["chi"][n] for n in names], color="#8172b2")
      ax.set_ylabel(f"chi at the last layer, last token (k={metrics['k']})")
      ax.tick_params(axis="x", rotation=45)
    return ["knockout_overlap.png"]

  def report(self, metrics, figures) -> str:
    rows = [{"condition": n, "chi": v} for n, v in metrics["chi"].items()]
    return "## Overlap with the labels under knockout\n\n" + report.markdown_table(
        rows, ["condition", "chi"])


# ------------------------------------------------------------------------------------ overlap


PROBES = ("eoi", "last_image", "image_mean")


@register
class NgOverlap(Experiment):
  """Residuals (outputs of the layers in `layers`, default all) at the probe positions, stored
  per example as float16; chi per layer and probe with k neighbours at the end."""

  name = "ng_overlap"

  def conditions(self, vlm) -> list[str]:
    return ["residuals"]

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    out = vlm.forward(batch, capture=ng.Capture(resid=True))
    resid = jnp.asarray(out.resid)  # [L+1, B, T, D]
    roles = np.asarray(batch.roles)
    image = jnp.asarray(select("image", roles), resid.dtype)
    vectors = {
        "eoi": _at(resid, select("eoi", roles)),
        "last_image": _at(resid, select("last_image", roles)),
        "image_mean": jnp.einsum("LBTD,BT->LBD", resid, image) / image.sum(1)[None, :, None],
    }
    stacked = np.stack([np.asarray(vectors[p], np.float16) for p in PROBES], axis=1)  # [L+1,P,B,D]
    return [{"example": ex.id, "condition": "residuals", "label": ex.label,
             ARRAYS: {"resid": stacked[:, :, b]}} for b, ex in enumerate(examples)]

  def metrics(self, records: Sequence[dict]) -> dict:
    from narrowgate_jax.analysis import neighbourhood_overlap

    k = int(self.config.experiment_config.get("k", 30))
    labels = np.asarray([hash(str(r["label"])) % (2**31) for r in records])
    resid = self.arrays(records, "resid").astype(np.float32)  # [n, L+1, P, D]
    chi = {p: [float(neighbourhood_overlap(jnp.asarray(resid[:, l, i]), jnp.asarray(labels),
                                           k=k)) for l in range(resid.shape[1])]
           for i, p in enumerate(PROBES)}
    return {"records": len(records), "k": k, "chi": chi}

  def figures(self, records, metrics, directory) -> list[str]:
    with report.figure(os.path.join(directory, "overlap.png")) as (_, ax):
      for probe, chi in metrics["chi"].items():
        ax.plot(range(len(chi)), chi, label=probe.replace("_", " "))
      report.layer_axis(ax, "layer (0: embeddings)")
      ax.set_ylabel(f"neighbourhood overlap with labels (k={metrics['k']})")
      ax.legend()
    return ["overlap.png"]


def _at(resid, mask: np.ndarray):
  """resid [L+1, B, T, D] at the one position per row `mask` [B, T] marks -> [L+1, B, D] (the
  last marked one where there are several, as the last of Emu3's two end tokens)."""
  index = jnp.asarray(mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1))
  return resid[:, jnp.arange(mask.shape[0]), index]


# ---------------------------------------------------------------------------- modality gap


@register
class NgModalityGap(Experiment):
  """Each example read twice (PROTOCOLS §2(a)): the image then its captions (one random text
  token, BOS excluded, is the text vector) and the captions then the image (one random image
  token is the image vector); every layer's output before the final norm, stored per example.
  Images are resized to `resize` x `resize` first (the study's 256; 0 keeps them as they are).
  Metrics: quantiles of the cosine similarity of all image x text pairs per layer (signed or
  absolute: `absolute`), and the ADP modality homogeneity per layer (`analysis.adp`, settings
  `maxk`, `gride_range_max`, `gride_scale`, `density_k`, `z`; it needs more than maxk points,
  i.e. 2 x examples > maxk)."""

  name = "ng_modality_gap"
  ADP = ("maxk", "gride_range_max", "gride_scale", "density_k", "z")  # config fields

  def __init__(self, config):
    super().__init__(config)
    limit = int(config.get("data", {}).get("limit", 0) or 0)
    if limit:  # fail before the forward passes where the example count is known up front
      self._check_points(limit, limit)

  def _adp(self) -> dict:
    cfg = self.config.experiment_config
    # Unset fields take `modality_homogeneity`'s defaults: the study's values (PROTOCOLS §2(a)).
    defaults = inspect.signature(modality_homogeneity).parameters
    return {name: type(defaults[name].default)(cfg.get(name, defaults[name].default))
            for name in self.ADP}

  def _check_points(self, images: int, texts: int) -> None:
    maxk = self._adp()["maxk"]
    if images + texts <= maxk:
      raise ValueError(
          f"ng_modality_gap: the ADP homogeneity clusters each layer's {images} image and "
          f"{texts} text vectors ({images + texts} points) with maxk={maxk} neighbours, which "
          f"needs more than {maxk} points: run on more than {maxk // 2} examples or lower "
          "experiment_config.maxk (keeping gride_range_max and density_k ≤ maxk)")

  def conditions(self, vlm) -> list[str]:
    return ["vectors"]

  def _images(self, example) -> list:
    """The example's images as the model sees them: resized to `resize` x `resize` with PIL's
    bilinear filter (torchvision's default, which the study's resize used), or unchanged."""
    size = int(self.config.experiment_config.get("resize", 0))
    if size <= 0:
      return list(example.images)
    from PIL import Image

    from narrowgate_jax.processing.images import load_image

    return [load_image(image, i).resize((size, size), Image.BILINEAR)
            for i, image in enumerate(example.images)]

  def prepare(self, vlm, example, chat: bool = False):
    captions = " ".join(example.answers[:5])
    return vlm.prepare(images=[self._images(example)] * 2,
                       prompts=["<image>" + captions, captions + " <image>"], chat=chat)

  def _positions(self, roles: np.ndarray, examples) -> np.ndarray:
    """[B, T] bool: one random text token in each image-first row, one random image token in
    each captions-first row (rows 2i and 2i + 1 belong to example i; fillers copy the last)."""
    mask = np.zeros(roles.shape, bool)
    text, image = roles == Role.TEXT, select("image", roles)  # caption words (not BOS)
    for row in range(roles.shape[0]):
      example = examples[min(row // 2, len(examples) - 1)].id
      rng = np.random.default_rng([int(self.config.seed), row % 2] + list(str(example).encode()))
      candidates = np.flatnonzero(text[row] if row % 2 == 0 else image[row])
      mask[row, rng.choice(candidates)] = True
    return mask

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    positions = self._positions(np.asarray(batch.roles), examples)
    out = vlm.forward(batch, capture=ng.Capture(resid_at=positions))
    vectors = np.asarray(out.resid, np.float16)[:, :, 0]  # [L+1, rows, D]
    return [{"example": ex.id, "condition": "vectors",
             ARRAYS: {"text": vectors[1:, 2 * i], "image": vectors[1:, 2 * i + 1]}}
            for i, ex in enumerate(examples)]

  def metrics(self, records: Sequence[dict]) -> dict:
    from narrowgate_jax.analysis import cosine_quantiles

    cfg = self.config.experiment_config
    image = self.arrays(records, "image").astype(np.float32).transpose(1, 0, 2)  # [L, N, D]
    text = self.arrays(records, "text").astype(np.float32).transpose(1, 0, 2)
    quantiles = cosine_quantiles(image, text, absolute=bool(cfg.get("absolute", True)))
    out = {"records": len(records), "layers": image.shape[0],
           "cosine": {"q25": quantiles[:, 0].tolist(), "median": quantiles[:, 1].tolist(),
                      "q75": quantiles[:, 2].tolist()}}
    self._check_points(image.shape[1], text.shape[1])
    adp = self._adp()
    labels = np.r_[np.zeros(image.shape[1]), np.ones(text.shape[1])]
    out["homogeneity"] = [float(modality_homogeneity(np.concatenate([i, t]), labels, **adp))
                          for i, t in zip(image, text)]
    out["adp"] = adp
    return out

  def figures(self, records, metrics, directory) -> list[str]:
    cos = metrics["cosine"]
    layers = range(1, metrics["layers"] + 1)
    with report.figure(os.path.join(directory, "modality_gap.png")) as (_, ax):
      line, = ax.plot(layers, cos["median"], label="image x text cosine (median)")
      ax.fill_between(layers, cos["q25"], cos["q75"], color=line.get_color(), alpha=0.2)
      if metrics.get("homogeneity"):
        ax.plot(layers, metrics["homogeneity"], label="ADP homogeneity")
      report.layer_axis(ax)
      ax.legend()
    return ["modality_gap.png"]


# -------------------------------------------------------------------------------- patching


def _partners(dataset) -> dict[str, object]:
  """Example id -> its partner: the i-th image of class A pairs with the i-th of class B, for
  consecutive classes (A, B) in label order (an odd class out is left without a partner)."""
  by_class: dict = {}
  for i in range(len(dataset)):
    by_class.setdefault(dataset[i].label, []).append(dataset[i])
  classes = sorted(by_class, key=str)
  out = {}
  for a, b in zip(classes[0::2], classes[1::2]):
    for x, y in zip(by_class[a], by_class[b]):
      out[x.id], out[y.id] = y, x
  return out


@register
class NgPatching(Experiment):
  """Activation patching at EOI (PROTOCOLS §2(e)): each example is the recipient, its partner (the
  same-index image of the paired class) the source. For every layer l, one of the study's two
  variants (experiment_config.site):
    "resid_pre": the input of decoder layer l at the recipient's EOI is replaced by the source's
      (one layer at a time);
    "attn_in": the self-attention input at EOI is replaced by the source's in every layer from l
      to the last (what later text positions read from EOI, all the way up).
  Metrics per layer: the similarity sum_v min(p, q) of the patched recipient's next-token
  distribution to the clean source's (baseline: clean recipient vs clean source) and the flip
  accuracy of logit(recipient class) - logit(source class)."""

  name = "ng_patching"
  SITES = ("resid_pre", "attn_in")

  def __init__(self, config):
    super().__init__(config)
    from narrowgate_jax.runs.loop import load_data

    self.site = config.experiment_config.get("site", "resid_pre")
    if self.site not in self.SITES:
      raise ValueError(f"experiment_config.site {self.site!r}; expected one of {self.SITES}")
    self.partners = _partners(load_data(config.data))

  def conditions(self, vlm) -> list[str]:
    return ["clean"] + [f"patch/{l:03d}" for l in range(vlm.num_layers)]

  def keep(self, example) -> bool:
    return example.id in self.partners  # an unpaired class's images have no source

  def prepare(self, vlm, example, chat: bool = False):
    source = self.partners[example.id]
    return vlm.prepare(images=[list(example.images), list(source.images)],
                       prompts=[example.prompt, source.prompt], chat=chat)

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    from narrowgate_jax.analysis import distribution_similarity

    clean = vlm.forward(batch, capture=ng.Capture(resid_at="eoi",
                                                   attn_in=self.site == "attn_in"))
    rows = batch.shape[0]
    donor = np.arange(rows) ^ 1  # recipient row 2i takes row 2i + 1's activations, and back
    num_layers = vlm.num_layers
    if self.site == "resid_pre":
      resid = np.asarray(clean.resid)  # [L+1, rows, P, D]: the input of every layer at EOI
      conditions = [ng.patch(batch, at="eoi", values=resid[l:l + 1, donor], layers=[l])
                    for l in range(num_layers)]
    else:
      attn_in = np.asarray(clean.attn_in)  # [L, rows, P, D]
      conditions = [ng.patch(batch, at="eoi", values=attn_in[l:, donor],
                             layers=range(l, num_layers), site="attn_in")
                    for l in range(num_layers)]
    conditions = ng.stack_conditions(conditions)
    patched = np.asarray(vlm.forward_from_prefix(batch, conditions).logits)  # [L, rows, V]
    logits = np.asarray(clean.logits)[:, -1]  # [rows, V]
    p = np.asarray(_softmax(logits))
    p_patched = np.asarray(_softmax(patched))
    records = []
    for i, example in enumerate(examples):
      r, s = 2 * i, 2 * i + 1
      mine = continuation_token(vlm.tokenizer, example.answer)
      theirs = continuation_token(vlm.tokenizer, self.partners[example.id].answer)
      base = {"example": example.id, "recipient_token": mine, "source_token": theirs,
              "clean_difference": float(logits[r, mine] - logits[r, theirs])}
      records.append({**base, "condition": "clean", "similarity": float(
          distribution_similarity(p[r], p[s]))})
      for l in range(vlm.num_layers):
        records.append({**base, "condition": f"patch/{l:03d}", "layer": l,
                        "similarity": float(distribution_similarity(p_patched[l, r], p[s])),
                        "difference": float(patched[l, r, mine] - patched[l, r, theirs])})
    return records

  def metrics(self, records: Sequence[dict]) -> dict:
    clean = [r for r in records if r["condition"] == "clean"]
    layers = sorted({r["layer"] for r in records if "layer" in r})
    out = {"records": len(records), "pairs": len(clean),
           "baseline_similarity": float(np.mean([r["similarity"] for r in clean])),
           "similarity": [], "flip_accuracy": []}
    for l in layers:
      rows = [r for r in records if r.get("layer") == l]
      out["similarity"].append(float(np.mean([r["similarity"] for r in rows])))
      out["flip_accuracy"].append(float(np.mean(
          [np.sign(r["difference"]) != np.sign(r["clean_difference"]) for r in rows])))
    return out

  def figures(self, records, metrics, directory) -> list[str]:
    layers = range(len(metrics["similarity"]))
    with report.figure(os.path.join(directory, "patching.png")) as (_, ax):
      ax.plot(layers, metrics["similarity"], label="similarity to the source")
      ax.plot(layers, metrics["flip_accuracy"], label="flip accuracy")
      ax.axhline(metrics["baseline_similarity"], color="grey", linestyle=":",
                 label="clean recipient vs source")
      report.layer_axis(ax, "patched layer (EOI, residual stream)" if self.site == "resid_pre"
                        else "first patched layer (EOI, attention input, to the last layer)")
      ax.set_ylim(0, 1)
      ax.legend()
    return ["patching.png"]


def _softmax(logits) -> np.ndarray:
  """Softmax over the last axis in float32."""
  return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


@register
class NgSteering(NgPatching):
  """Steering at EOI (PROTOCOLS §2(e), "the natural generalisation"): the recipient's EOI input
  to layer `layer` gets alpha * (mean_B - mean_A) added, mean_X the class mean of that
  activation over the dataset (A the recipient's class, B its partner's), for every alpha of
  `alphas` (at `layer`, or at `depth` as a fraction of the model's depth). The class means come
  from one pass over the dataset before the first batch.
  Metrics per alpha: the fraction of recipients whose logit(B class) - logit(A class) turned
  positive, and the similarity to the clean source distribution."""

  name = "ng_steering"

  def __init__(self, config):
    super().__init__(config)
    self.means = None

  def _layer(self, vlm) -> int:
    """`layer` when set (>= 0), else `depth` (a fraction of the model's depth)."""
    cfg = self.config.experiment_config
    layer = int(cfg.get("layer", -1))
    index = layer if layer >= 0 else int(round(float(cfg.depth) * vlm.num_layers))
    if not 0 <= index < vlm.num_layers:
      raise ValueError(f"steering layer {index} is outside the model's {vlm.num_layers} layers "
                       f"(experiment_config.layer / depth)")
    return index

  def conditions(self, vlm) -> list[str]:
    layer = self._layer(vlm)
    if self.means is None:
      self.means = self._class_means(vlm, layer)
    return ["clean"] + [f"alpha/{float(a):g}" for a in self.config.experiment_config.alphas]

  def _class_means(self, vlm, layer: int) -> dict:
    """Class label -> mean EOI input of `layer` over that class's examples."""
    from narrowgate_jax.runs.loop import load_data

    dataset = load_data(self.config.data)
    sums, counts = {}, {}
    for start in range(0, len(dataset), 8):
      chunk = [dataset[i] for i in range(start, min(start + 8, len(dataset)))]
      batch = vlm.prepare(images=[list(e.images) for e in chunk], prompts=[e.prompt for e in chunk])
      resid = np.asarray(vlm.forward(batch, capture=ng.Capture(resid_at="eoi")).resid)
      for b, example in enumerate(chunk):
        vector = resid[layer, b, -1].astype(np.float64)  # the (last) EOI position
        sums[example.label] = sums.get(example.label, 0) + vector
        counts[example.label] = counts.get(example.label, 0) + 1
    return {label: sums[label] / counts[label] for label in sums}

  def prepare(self, vlm, example, chat: bool = False):
    source = self.partners[example.id]
    return vlm.prepare(images=[list(example.images), list(source.images)],
                       prompts=[example.prompt, source.prompt], chat=chat)

  def run_batch(self, vlm, batch, examples) -> list[dict]:
    from narrowgate_jax.analysis import distribution_similarity

    layer = self._layer(vlm)
    rows = batch.shape[0]
    directions = np.zeros((rows, vlm.config.hidden_size), np.float32)
    for i, example in enumerate(examples):
      a, b = example.label, self.partners[example.id].label
      directions[2 * i] = self.means[b] - self.means[a]
    alphas = [float(a) for a in self.config.experiment_config.alphas]
    conditions = ng.stack_conditions([
        ng.patch(batch, at="eoi", values=alpha * directions[None], layers=[layer], add=True)
        for alpha in alphas])
    clean = np.asarray(vlm.forward(batch).logits)[:, -1]
    steered = np.asarray(vlm.forward_from_prefix(batch, conditions).logits)  # [C, rows, V]
    p, p_steered = _softmax(clean), _softmax(steered)
    records = []
    for i, example in enumerate(examples):
      r, s = 2 * i, 2 * i + 1
      mine = continuation_token(vlm.tokenizer, example.answer)
      theirs = continuation_token(vlm.tokenizer, self.partners[example.id].answer)
      base = {"example": example.id, "clean_difference": float(clean[r, theirs] - clean[r, mine])}
      records.append({**base, "condition": "clean",
                      "similarity": float(distribution_similarity(p[r], p[s]))})
      for c, alpha in enumerate(alphas):
        records.append({**base, "condition": f"alpha/{alpha:g}", "alpha": alpha,
                        "difference": float(steered[c, r, theirs] - steered[c, r, mine]),
                        "similarity": float(distribution_similarity(p_steered[c, r], p[s]))})
    return records

  def metrics(self, records: Sequence[dict]) -> dict:
    alphas = sorted({r["alpha"] for r in records if "alpha" in r})
    out = {"records": len(records), "alphas": alphas, "towards_source": [], "similarity": []}
    for alpha in alphas:
      rows = [r for r in records if r.get("alpha") == alpha]
      out["towards_source"].append(float(np.mean([r["difference"] > 0 for r in rows])))
      out["similarity"].append(float(np.mean([r["similarity"] for r in rows])))
    return out

  def figures(self, records, metrics, directory) -> list[str]:
    with report.figure(os.path.join(directory, "steering.png")) as (_, ax):
      ax.plot(metrics["alphas"], metrics["towards_source"], marker="o",
              label="logit(B) > logit(A)")
      ax.plot(metrics["alphas"], metrics["similarity"], marker="s", label="similarity to B")
      ax.set_xlabel("alpha (steering strength)")
      ax.set_ylim(0, 1)
      ax.legend()
    return ["steering.png"]
