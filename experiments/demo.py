"""The built-in demo: the Narrow Gate suite and a window-knockout sweep on the model organisms.

  python -m experiments.demo [--workdir=results/demo] [--organisms=organisms] [--examples=32]

No download. The organisms are small VLMs trained on a synthetic world of coloured shapes and
shipped in organisms/ (rebuild them with `python -m experiments.build_organisms`):
  chameleon_gate      native; text after the image was trained to see it only through <eoss>
  chameleon_no_gate   native; text after the image was trained never to see <eoss>
  chameleon           native; nothing planted
  llava               non-native (LLaVA architecture): no end-of-image token at all
The demo writes world data (questions about the shape's size, and captions), then runs on each
organism, through the same runner as every study config: knockout evaluation (Table 1),
attention flow (Fig. 3), neighbourhood overlap (Fig. 4), activation patching at EOI (Fig. 5),
the modality gap (Fig. 2) and the cross-modal window knockout. Every run is a normal workdir
(config.json, records, metrics, figures, report.md) under <workdir>/runs/<organism>/<experiment>;
<workdir>/report.md puts the organisms side by side. On the planted organisms the analyses should
find what was planted: that is what the demo shows.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import ml_collections
import numpy as np
from absl import app, flags, logging

from configs.experiments import (cm_window_knockout, ng_attention_flow, ng_knockout,
                                 ng_modality_gap, ng_overlap, ng_patching)
from experiments import cross_modal, narrow_gate  # noqa: F401  (registers the experiments)
from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.runs import loop, report

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "results/demo", "Where the data, the runs and the report go.")
flags.DEFINE_string("organisms", "organisms", "The directory of the shipped organisms.")
flags.DEFINE_integer("examples", 32, "Examples per dataset (a multiple of 8 keeps classes even).")
flags.DEFINE_list("only", [], "Run only these organisms (default: all found).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORGANISMS = {
    "chameleon_gate": "native, gate planted",
    "chameleon_no_gate": "native, gate blocked",
    "chameleon": "native, nothing planted",
    "llava": "non-native (LLaVA), no EOI token",
}
NATIVE = ("chameleon_gate", "chameleon_no_gate", "chameleon")
KNOCKOUTS_NATIVE = ["eoi", "image_to_text", "last_image", "random"]
KNOCKOUTS_NONNATIVE = ["image_to_text", "last_image", "random"]
# What the questions ask: the attribute every organism answers (the gate organism, whose text
# sees the image through one token, learned size perfectly and colour only half-way).
ATTRIBUTE = "size"
CHANCE = 1 / len(world.VALUES[ATTRIBUTE])


def write_data(directory: str, examples: int, seed: int = 0) -> dict[str, str]:
  """The world datasets the runs read: name -> directory. Size questions serve every analysis
  that needs classes (the size is the class, its word the class token); captions the modality
  gap."""
  sets = {"vqa": dict(task="vqa", attribute=ATTRIBUTE), "caption": dict(task="caption")}
  out = {}
  for offset, (name, kw) in enumerate(sets.items()):
    out[name] = os.path.join(directory, name)
    world.write_world(out[name], examples, seed + offset, **kw)
  return out


def on_organism(config: ml_collections.ConfigDict, organism_dir: str, data_dir: str,
                batch_size: int = 8) -> ml_collections.ConfigDict:
  """A study config pointed at an organism and a world dataset, sized for a laptop."""
  config.model.path = organism_dir
  config.model.dtype = "float32"
  config.model.chat = False
  config.data = ml_collections.ConfigDict(dict(format="jsonl", path=data_dir, limit=0))
  config.batch_size = batch_size
  config.buckets = (96,)  # every organism prompt fits: one compiled length per run
  return config


def run_configs(organism: str, organism_dir: str, data: dict[str, str]) -> dict:
  """{experiment name: config} for one organism (EOI-specific analyses only where there is one)."""
  native = organism in NATIVE
  knockout = on_organism(ng_knockout.get_config("local,vqa"), organism_dir, data["vqa"])
  knockout.experiment_config.update(
      conditions=KNOCKOUTS_NATIVE if native else KNOCKOUTS_NONNATIVE, random_tokens=8,
      random_repeats=2, max_new_tokens=2)
  flow = on_organism(ng_attention_flow.get_config("local"), organism_dir, data["vqa"])
  windows = on_organism(cm_window_knockout.get_config("local,,last"), organism_dir, data["vqa"], 1)
  windows.experiment_config.update(window=3, bootstrap=200)
  configs = {"knockout": knockout, "attention_flow": flow, "window_knockout": windows}
  gap = on_organism(ng_modality_gap.get_config("local"), organism_dir, data["caption"], 4)
  # ADP sized for a few dozen points per layer (2 per example; the study's maxk=128 needs 65+
  # examples): 8 neighbours, GRIDE to rank 8 at scale 1, density from 4. The world's images are
  # shown as the organisms were trained on them (no 256 x 256 resize first).
  gap.experiment_config.update(resize=0, maxk=8, gride_range_max=8, gride_scale=1,
                               density_k=4)
  configs["modality_gap"] = gap
  if native:
    overlap = on_organism(ng_overlap.get_config("local"), organism_dir, data["vqa"])
    overlap.experiment_config.k = 4
    patching = on_organism(ng_patching.get_config("local"), organism_dir, data["vqa"], 4)
    patching.experiment_config.site = "attn_in"
    configs.update(overlap=overlap, patching=patching)
  return configs


def summarise(metrics: dict[str, dict]) -> dict:
  """The headline numbers of one organism's runs."""
  scores = metrics["knockout"]["scores"]
  out = {"accuracy": scores.get("none"), "eoi_knockout": scores.get("eoi"),
         "image_to_text_knockout": scores.get("image_to_text"),
         "last_image_knockout": scores.get("last_image"),
         "random_knockout": metrics["knockout"].get("random", {}).get("mean")}
  shares = metrics["attention_flow"]["shares"]
  out["eoi_share"] = float(np.mean(shares["eoi"]))
  if "patching" in metrics:
    out["patching_flip"] = max(metrics["patching"]["flip_accuracy"])
  return out


def comparison_figures(summaries: dict[str, dict], flows: dict[str, dict],
                       directory: str) -> list[str]:
  """Knockout accuracy per organism and condition; EOI's share of the text's attention per layer."""
  conditions = [("accuracy", "none"), ("eoi_knockout", "[EOI]"),
                ("image_to_text_knockout", "image→text"), ("last_image_knockout", "last image"),
                ("random_knockout", "random image tokens")]
  names = list(summaries)
  width = 0.8 / len(conditions)
  with report.figure(os.path.join(directory, "knockout_by_organism.png"), 6.4, 3.2) as (_, ax):
    for i, (key, label) in enumerate(conditions):
      values = [summaries[n].get(key) for n in names]
      xs = [j + (i - len(conditions) / 2 + 0.5) * width for j in range(len(names))]
      bars = ax.bar([x for x, v in zip(xs, values) if v is not None],
                    [v for v in values if v is not None], width, label=label)
      ax.bar_label(bars, fmt="%.2f", fontsize=5, rotation=90, padding=2)  # a 0 still shows
    ax.axhline(CHANCE, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set_ylabel(f"VQA accuracy ({ATTRIBUTE} questions)")
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.15))
  with report.figure(os.path.join(directory, "eoi_share_by_organism.png")) as (_, ax):
    for name, shares in flows.items():
      ax.plot(range(len(shares["eoi"])), shares["eoi"], marker="o", label=name.replace("_", " "))
    report.layer_axis(ax)
    ax.set_ylabel("EOI's share of the text's attention\nto the image span")
    ax.set_ylim(0, 1.05)
    ax.legend()
  return ["knockout_by_organism.png", "eoi_share_by_organism.png"]


def write_report(workdir: str, summaries: dict, figures: list[str], runs: dict,
                 seconds: float) -> str:
  columns = ["organism", "kind", "accuracy", "eoi_knockout", "image_to_text_knockout",
             "last_image_knockout", "random_knockout", "eoi_share", "patching_flip"]
  rows = [{"organism": n, "kind": ORGANISMS[n],
           **{k: "—" if v is None else v for k, v in s.items()}} for n, s in summaries.items()]
  intro = ("Small VLMs trained on a synthetic world of coloured shapes (organisms/). On the "
           "planted organisms the route of visual information is known: the analyses should find "
           f"it. Accuracies are VQA accuracy on {ATTRIBUTE} questions (chance {CHANCE:.2f}); "
           "knockouts are post-softmax in all layers; eoi_share is "
           "EOI's mean share of the attention the text after the image pays the image span; "
           "patching_flip is the best flip accuracy of EOI attention-input patching between "
           f"{ATTRIBUTE} classes.")
  lines = ["# narrowgate-jax demo: the Narrow Gate suite on model organisms", "", intro, "",
           report.markdown_table(rows, columns), ""]
  lines += [f"![{f}](figures/{f})" for f in figures]
  lines += ["", "## Every run", ""]
  for organism, experiments in runs.items():
    links = ", ".join(f"[{e}](runs/{organism}/{e}/report.md)" for e in experiments)
    lines.append(f"- {organism}: {links}")
  lines += ["", f"Total time: {seconds:.0f} s."]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def run(workdir: str, organisms_dir: str, examples: int = 32, only=(),
        progress: bool = True) -> dict:
  """Runs the demo; returns {organism: summary}. Resumes runs already in `workdir`."""
  start = time.time()
  available = [n for n in ORGANISMS
               if os.path.exists(os.path.join(organisms_dir, n, "config.json"))]
  chosen = [n for n in available if not only or n in only]
  if not chosen:
    raise FileNotFoundError(f"no organism in {organisms_dir} (expected some of "
                            f"{list(ORGANISMS)}); build them with "
                            "python -m experiments.build_organisms")
  data = write_data(os.path.join(workdir, "data"), examples)
  summaries, flows, runs = {}, {}, {}
  for organism in chosen:
    metrics = {}
    for name, config in run_configs(organism, os.path.join(organisms_dir, organism),
                                    data).items():
      if progress:
        print(f"{organism}: {name}", flush=True)
      metrics[name] = loop.run(config, os.path.join(workdir, "runs", organism, name),
                               progress=progress)
    summaries[organism] = summarise(metrics)
    flows[organism] = metrics["attention_flow"]["shares"]
    runs[organism] = list(metrics)
  figures_dir = os.path.join(workdir, "figures")
  os.makedirs(figures_dir, exist_ok=True)
  figures = comparison_figures(summaries, flows, figures_dir)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summaries, f, indent=2)
  write_report(workdir, summaries, figures, runs, time.time() - start)
  return summaries


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every array it reads at INFO
  organisms: Optional[str] = FLAGS.organisms
  if not os.path.isabs(organisms) and not os.path.exists(organisms):
    organisms = os.path.join(REPO, organisms)  # run from anywhere: the shipped organisms
  summaries = run(FLAGS.workdir, organisms, FLAGS.examples, FLAGS.only)
  print(json.dumps(summaries, indent=2))
  print(f"wrote {os.path.join(FLAGS.workdir, 'report.md')}")


if __name__ == "__main__":
  app.run(main)
