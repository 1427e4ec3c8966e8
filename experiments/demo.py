"""The built-in demo: every intercept point of the core on a small model made on the spot.

  python -m experiments.demo [--workdir=results/demo] [--seed=0]

No download: a small Llama-layout model is initialised from a seed, written as a converted
checkpoint (Orbax parameters, config, a word-level tokenizer built in code), and loaded back with
`ng.load`. On a batch of prompts it then
  1. captures the residual stream and the attention each position receives from the last token,
  2. knocks out attention to the first half of the prompt (pre- and post-softmax), in all layers
     and in windows of layers evaluated together on the condition axis,
  3. patches the last position's residual from one prompt into another and steers it,
and writes what it measured to <workdir>/demo.json and a short <workdir>/report.md.
With random weights the numbers show the machinery, not a finding about a trained model.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

import narrowgate_jax as ng
from narrowgate_jax import checkpoint
from narrowgate_jax.model import random_params

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "results/demo", "Where the checkpoint and the results go.")
flags.DEFINE_integer("seed", 0, "Seed of the model's random weights.")

WORDS = ("the a cat dog sat on mat red blue green big small what colour is shape circle square "
         "left right of above below picture shows there").split()
PROMPTS = ["the red cat sat on the mat", "what colour is the big square",
           "there is a small blue circle left of the dog"]
CONFIG = ng.DecoderConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=6,
                          num_heads=8, num_kv_heads=4, head_dim=16)


def word_tokenizer():
  """A word-level tokenizer in the transformers format, built in code."""
  import tokenizers
  import transformers

  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(  # BOS first, as Llama's does
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>",
                                              unk_token="<unk>")


def make_checkpoint(directory: str, seed: int) -> None:
  checkpoint.save_params(directory, random_params(CONFIG, seed))
  checkpoint.write_meta(directory, CONFIG, family="llama", dtype="float32",
                        source=f"random init, seed {seed}")
  word_tokenizer().save_pretrained(directory)


def rounded(x, digits: int = 4):
  """float32 values as short decimals for the report."""
  return np.round(np.asarray(x, np.float64), digits).tolist()


def kl_last(clean_logits, logits) -> np.ndarray:
  """KL(clean || edited) of the next-token distribution at the last position, per example."""
  p = jax.nn.log_softmax(clean_logits[:, -1])
  q = jax.nn.log_softmax(logits[..., -1, :])
  return np.asarray(jax.numpy.sum(np.exp(p) * (p - q), axis=-1))


def run(workdir: str, seed: int) -> dict:
  ckpt = os.path.join(workdir, "checkpoint")
  make_checkpoint(ckpt, seed)
  vlm = ng.load(ckpt)
  batch = vlm.prepare(prompts=PROMPTS)
  half = np.asarray(batch.positions) < np.asarray(batch.positions).max(1, keepdims=True) // 2
  first_half = half & np.asarray(batch.attention_mask)

  start = time.perf_counter()
  clean = vlm.forward(batch, capture=ng.Capture(resid=True, received_from="last"))
  resid_norm = np.linalg.norm(np.asarray(clean.resid)[:, :, -1], axis=-1).mean(axis=1)
  received_first_half = np.einsum("lbns,bs->l", np.asarray(clean.received), first_half) / (
      clean.received.shape[1] * clean.received.shape[2])

  results = {"model": repr(vlm), "prompts": PROMPTS,
             "resid_norm_last_position_per_layer": rounded(resid_norm, 3),
             "attention_from_last_to_first_half_per_layer": rounded(received_first_half)}

  for mode in ("pre_softmax", "post_softmax"):
    ko = vlm.knockout(batch, keys=first_half, queries="last", mode=mode)
    results[f"kl_knockout_first_half_all_layers_{mode}"] = rounded(
        kl_last(clean.logits, vlm.forward(batch, ko).logits), 5)

  windows = [list(range(s, min(s + 2, vlm.num_layers))) for s in range(vlm.num_layers)]
  sweep = ng.stack_conditions(
      [ng.knockout(batch, keys=first_half, queries="last", layers=w) for w in windows])
  swept = vlm.forward(batch, sweep)
  results["kl_window2_knockout_by_start_layer"] = rounded(
      kl_last(clean.logits, swept.logits).mean(axis=1), 5)

  donor_last = np.asarray(clean.resid)[:, 0, -1]  # [L+1, D]: prompt 0's last position
  layer = vlm.num_layers // 2
  patched = vlm.forward(batch, ng.patch(batch, at="last", values=donor_last[layer],
                                        layers=[layer], site="resid_pre"))
  results["patched_last_matches_donor_argmax"] = (
      np.asarray(patched.logits[:, -1]).argmax(-1) == np.asarray(clean.logits[0, -1]).argmax()
  ).tolist()
  direction = donor_last[layer] / np.linalg.norm(donor_last[layer])
  results["kl_steer_by_alpha"] = {
      str(alpha): rounded(kl_last(clean.logits, vlm.forward(batch, ng.steer(
          batch, at="last", vector=direction, layers=[layer], alpha=alpha)).logits
      ).mean(), 5) for alpha in (1.0, 4.0, 16.0)}
  results["seconds"] = round(time.perf_counter() - start, 2)
  return results


def report(results: dict) -> str:
  rows = "\n".join(f"| {k} | {v} |" for k, v in results.items() if k != "prompts")
  return ("# narrowgate-jax demo\n\nRandom weights: the table shows that every intercept point "
          "runs and where its numbers land, not a property of a trained model.\n\n"
          "| measurement | value |\n|---|---|\n" + rows + "\n")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every array it reads at INFO
  os.makedirs(FLAGS.workdir, exist_ok=True)
  results = run(FLAGS.workdir, FLAGS.seed)
  with open(os.path.join(FLAGS.workdir, "demo.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(FLAGS.workdir, "report.md"), "w") as f:
    f.write(report(results))
  print(report(results))
  print(f"wrote {FLAGS.workdir}/demo.json and report.md")


if __name__ == "__main__":
  app.run(main)
