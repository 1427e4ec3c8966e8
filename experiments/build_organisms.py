"""Trains the model organisms and writes them as transformers checkpoints under organisms/.

  python -m experiments.build_organisms [--out=organisms] [--workdir=results/organism_training] \
      [--only=chameleon_gate,llava]

Organisms (all trained on `data.shapes_world`, 32 px images):
  chameleon           native (Chameleon architecture), nothing planted
  chameleon_gate      native, text after the image sees it only through <eoss> (a gate)
  chameleon_no_gate   native, text after the image never sees <eoss> (no gate)
  llava               non-native (LLaVA architecture): a text LM, then a vision tower + projector
The three Chameleon organisms share one VQ image tokenizer, trained first.

Each organism is a directory with model.safetensors, config.json, the tokenizer and the
processor configs, loadable by `ng.load` and by transformers' own classes. Every step is a pure
function of the seeds in the configs below, and the workdir holds resumable training state, so
an interrupted build continues where it stopped. On the same kind of machine, with the same
device count (plain CPU: one device; `XLA_FLAGS=--xla_force_host_platform_device_count` changes
how XLA splits sums), the command reproduces the shipped files bit for bit; MANIFEST.json lists
their SHA-256 so a rebuild can be compared (another CPU family may round float32 sums
differently).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.organisms import native
from narrowgate_jax.training import vq

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "organisms", "Where the organisms' checkpoints are written.")
flags.DEFINE_string("workdir", "results/organism_training", "Resumable training state.")
flags.DEFINE_list("only", [], "Build only these organisms (default: all).")
flags.DEFINE_bool("progress", True, "Show progress bars.")

IMAGE_SIZE = 32
SEED = 0
NATIVE = {"chameleon": "none", "chameleon_gate": "gate", "chameleon_no_gate": "no_gate"}
NAMES = (*NATIVE, "llava")
MANIFEST = "MANIFEST.json"


def vq_images() -> np.ndarray:
  """Every scene of the world on each background grey: [N, 32, 32, 3] uint8."""
  return np.concatenate([world.render_batch(world.ALL_SCENES, IMAGE_SIZE, background=grey)
                         for grey in world.BACKGROUNDS])


def train_vq(workdir: str, progress: bool) -> tuple:
  config = vq.organism_vq_config(IMAGE_SIZE)
  params, metrics = vq.train_tokenizer(vq_images(), config, vq.VQTrainConfig(seed=SEED),
                                       os.path.join(workdir, "vq"), progress=progress)
  return config, params, {k: v for k, v in metrics.items() if k != "history"}


def build_native(name: str, vq_config, vq_params, out: str, workdir: str, progress: bool) -> dict:
  from checkpoints_convert.export import export

  config = native.NativeOrganismConfig(plant=NATIVE[name], image_size=IMAGE_SIZE, seed=SEED)
  hf_cfg = native.hf_config(config, vq_config)
  params, history = native.train_decoder(config, hf_cfg, vq_params,
                                         os.path.join(workdir, name), progress=progress)
  directory = os.path.join(out, name)
  os.makedirs(directory, exist_ok=True)
  native.write_side_files(directory, hf_cfg, IMAGE_SIZE)
  export(directory, params, hf_config=hf_cfg, image_params=vq_params, overwrite=True)
  return {"config": dataclasses.asdict(config), "final": history[-1] if history else None}


def build_llava(out: str, workdir: str, progress: bool) -> dict:
  from checkpoints_convert.export import export
  from narrowgate_jax.organisms import nonnative

  config = nonnative.NonNativeOrganismConfig(image_size=IMAGE_SIZE, seed=SEED)
  hf_cfg, lm_params, image_params, metrics = nonnative.train_organism(
      config, os.path.join(workdir, "llava"), progress=progress)
  directory = os.path.join(out, "llava")
  os.makedirs(directory, exist_ok=True)
  nonnative.write_side_files(directory, hf_cfg, IMAGE_SIZE)
  export(directory, lm_params, hf_config=hf_cfg, image_params=image_params, overwrite=True)
  stages = ("language_model", "vision")
  return {"config": dataclasses.asdict(config),
          "final": {s: metrics[s][-1] if metrics[s] else None for s in stages},
          "stage_seconds": {s: round(metrics["seconds"][s], 1) for s in stages}}


def file_hashes(directory: str) -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      out[name] = hashlib.sha256(f.read()).hexdigest()
  return out


def build(out: str, workdir: str, only=(), progress: bool = True) -> dict:
  """Builds the organisms named in `only` (all when empty); returns and writes the manifest."""
  unknown = sorted(set(only) - set(NAMES))
  if unknown:
    raise ValueError(f"unknown organism(s) {unknown}; expected some of {list(NAMES)}")
  chosen = [n for n in NAMES if not only or n in only]
  os.makedirs(out, exist_ok=True)
  vq_config = vq_params = None
  if any(n in NATIVE for n in chosen):
    start = time.time()
    vq_config, vq_params, vq_metrics = train_vq(workdir, progress)
    record(out, "vq_tokenizer", {"metrics": vq_metrics, "seconds": round(time.time() - start, 1)})
  for name in chosen:
    start = time.time()
    if name in NATIVE:
      info = build_native(name, vq_config, vq_params, out, workdir, progress)
    else:
      info = build_llava(out, workdir, progress)
    info.update(seconds=round(time.time() - start, 1), files=file_hashes(os.path.join(out, name)))
    record(out, "organisms", {name: info})
  return json.load(open(os.path.join(out, MANIFEST)))


def record(out: str, key: str, value: dict) -> None:
  """Merges `value` into the manifest's `key` (read again first: a build of other organisms may
  have written it meanwhile)."""
  path = os.path.join(out, MANIFEST)
  manifest = json.load(open(path)) if os.path.exists(path) else {"organisms": {}}
  manifest.update(command="python -m experiments.build_organisms", seed=SEED,
                  image_size=IMAGE_SIZE)
  manifest[key] = {**manifest.get(key, {}), **value} if key == "organisms" else value
  with open(path, "w") as f:
    json.dump(manifest, f, indent=2, default=float)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every checkpoint step at INFO
  manifest = build(FLAGS.out, FLAGS.workdir, FLAGS.only, FLAGS.progress)
  for name, info in manifest["organisms"].items():
    print(f"{name}: {os.path.join(FLAGS.out, name)} ({info['seconds']} s)")


if __name__ == "__main__":
  app.run(main)
