"""The Narrow Gate knockout evaluation under generation: ours against the reference protocol.

  python benchmarks/knockout_eval.py                # the defaults below, on all cores
  python benchmarks/knockout_eval.py --examples 2 --repeats 2 --json /tmp/knockout_eval.json
  python benchmarks/knockout_eval.py --settings post_softmax,pre_softmax --no-breakdown

What is built (nothing is downloaded): benchmarks/native.py's Chameleon, with native.py's defaults
(its `build_checkpoint`: a seeded random init, norm weights perturbed, the codebook spread over
the encoder's own latents of the benchmark images so every image token id is decisive), saved
with its tokenizer and image processor, converted with `checkpoints_convert.convert.convert` and
loaded with `ng.load`. The transformers model that wrote the checkpoint runs the reference
protocol. By default:
  language model  hidden 1024, 8 layers, 16 heads, 8 key/value heads, MLP 2816, vocabulary 32000.
  VQ tokenizer    resolution 256, base channels 64 x (1, 2, 2, 4), 2 residual blocks per level,
                  8192 codes: 32 x 32 = 1024 image tokens per image.
The examples (--examples, default 3) are seeded random 320 x 280 RGB images with the study's VQA
prompt in Chameleon's text-completion mode (PROTOCOLS.md §2(d)), one short question each:
  "<image>{question}\\nAnswer the question using a single word or phrase. Answer:"
-> 1,045-1,048 tokens per prompt, 1,024 of them image tokens (different lengths: our batch is
left-padded).

The conditions (PROTOCOLS.md §2(d), experiments/narrow_gate.py's `NgKnockoutEval._knockout`
builds ours), in every layer and head, to the prompt and to every generated token:
  none          no knockout.
  eoi           keys [EOI], queries all.
  image_to_text keys image-start + image tokens (not EOI), queries the text after the image and
                the generated tokens.
  last_image    keys the last image token, queries all.
  all_image     keys every image token, queries all.
  random/0..R-1 keys --random_tokens (10) random image tokens (NgKnockoutEval's seeded draw per
                example and repeat), queries all; --random_draws (3) draws.
--settings picks the knockout semantics: post_softmax (the study's: probabilities zeroed after
the softmax, no renormalisation; the default) and/or pre_softmax (scores set to the minimum).
Every condition greedily generates --new_tokens (20) tokens with no end-of-sequence id, so both
sides produce exactly that many for every example and condition.

What is timed: one call = the whole evaluation, every example under every condition.
  ours   vlm.prepare(images=..., prompts=..., questions=...) for the batch of examples (pixels,
         the jitted VQ encoder, the tokenizer), then one `vlm.generate(batch, max_new_tokens,
         interventions=ng.stack_conditions([...every condition, "none" as ng.no_knockout...]),
         eos_id=None)`, as NgKnockoutEval.run_batch does: the clean prompt runs once; "none"
         is served by it; each other condition recomputes only the positions from the first one
         it changes (eoi, image_to_text, last_image: the last few dozen; all_image and the random
         draws: nearly the whole prompt), one call per group of conditions that start at the
         same place; then one decoding loop generates for every condition at once.
  torch  the reference protocol (PROTOCOLS.md §4): batch 1, one example after the other; per
         example the processor once (images=[image], text=[prompt]), then per condition one full
         `model.generate(**inputs)` (the VQ encoder on the pixels, the prefill, then cached
         decoding; greedy, do_sample=False, num_beams=1, max_new_tokens, no eos) with the knockout
         applied by an attention function registered with transformers.AttentionInterface (its
         mask from eager_mask): eager attention whose post-softmax probabilities (or pre-softmax
         scores) are cut for the blocked (query, key) edges, prompt queries and generated ones
         alike (with the KV cache, key j is absolute position j and the queries are the last
         q_len positions). 1 + 4 + R generations per example. The key and query sets are read
         from the processor's own input ids (image-start, image placeholder and end-of-image ids);
         only the random draws come from ours, and they are checked to lie on image tokens.
The warm-up call is excluded: ours, the whole evaluation (trace + compile + run); torch, one clean
generate of the first example (torch compiles nothing). Then --repeats timed calls alternate torch
/ ours (benchmarks/forward.py's `measure`); the agreement comes from the last timed call of each
side. Reported: wall time per call (all examples and conditions) and per example, ratio = torch
time / our time (> 1: ours is faster), the median process CPU time, our warm-up's trace + lower
and XLA compile time, peak memory per call, and the agreement: generated tokens equal per condition
and example (mismatches counted, with the first differing step), the knockout sets equal on both
sides, our prompt and image token ids equal to the processor's and get_image_tokens', and how
many (condition, example) pairs generate something other than "none" (the knockouts do act).

With --breakdown (the default), where the time goes, each part timed on its own (--repeats calls;
our calls were compiled by the evaluation's warm-up): ours prepare, the clean prompt pass, each
group's suffix passes (`generate.prompt_states_fn`) and the shared decoding loop; torch the
processor, get_image_tokens (the VQ encoder every full generate runs), one generate under the
[EOI] knockout, and its prompt forward alone (pixels to the last position's logits, the
reference attention). Also each condition's first edited position and its group's start.

Run time on 2 otherwise idle cores at the defaults: about 20 s to build, save, convert and load
(up to a minute on a busy machine); a torch evaluation of 3 examples (24 generations of about
3.5 s) takes about 85 s, ours about 20 s; with --repeats 1 and the breakdown, about 5 minutes in
all. Ours holds every condition's KV cache at once while decoding ([L, C, B, K, T + N, H]: about
1 GiB at the defaults, growing with --examples).

--threads N (default: every core this process may use) restricts the whole process to N cores
(CPU affinity before JAX starts) and calls torch.set_num_threads(N). JAX runs on the CPU
(JAX_PLATFORMS=cpu unless set otherwise). Everything is float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO_ROOT, os.path.join(REPO_ROOT, "tests")):
  if _path not in sys.path:
    sys.path.insert(0, _path)

from benchmarks.forward import (add_model_flags, add_run_flags, build_convert_load,  # noqa: E402
                                check_args, environment, measure, print_load_note,
                                print_timing_tables, start_process, summary)
from benchmarks.native import (IMAGE_SIZE, build_checkpoint, flat_image_tokens,  # noqa: E402
                               image_token_args)

SETTINGS = ("post_softmax", "pre_softmax")
REFERENCE_ATTENTION = "ng_bench_knockout_eval"
TEMPLATE = "<image>{question}\nAnswer the question using a single word or phrase. Answer:"
QUESTIONS = ("what is in the picture ?", "what colour is the animal in this picture ?",
             "is this a cat or a dog ?", "what shape is this ?")
KINDS = ("eoi", "image_to_text", "last_image", "all_image", "random")
# Chameleon's processor: <s> <racm3:break> [image tokens] <eoss> text.
IMAGE_START, IMAGE_END = "<racm3:break>", "<eoss>"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_model_flags(p)
  p.add_argument("--examples", type=int, default=3,
                 help="examples (one image, one prompt each) in our batch; torch runs them one "
                      "after the other")
  p.add_argument("--new_tokens", type=int, default=20, help="greedy tokens per generation")
  p.add_argument("--random_draws", type=int, default=3, help="random-key conditions (draws)")
  p.add_argument("--random_tokens", type=int, default=10, help="image tokens per random draw")
  p.add_argument("--codebook", type=int, default=8192, help="VQ codebook entries")
  p.add_argument("--vq_channels", type=int, default=64, help="VQ encoder base channels")
  p.add_argument("--vq_blocks", type=int, default=2, help="VQ residual blocks per level")
  p.add_argument("--image_side", type=int, default=256, help="resize + crop size")
  add_run_flags(p, SETTINGS)
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the parts of both evaluations on their own")
  p.set_defaults(repeats=1, settings="post_softmax")
  args = check_args(p, p.parse_args(argv), SETTINGS)
  args.family = "chameleon"  # native.py's build_checkpoint and vocabulary_map read it
  if args.examples < 1:
    p.error("--examples must be at least 1")
  if args.new_tokens < 1:
    p.error("--new_tokens must be at least 1")
  if args.random_draws < 0 or args.random_tokens < 1:
    p.error("--random_draws must be at least 0 and --random_tokens at least 1")
  if args.image_side % 8:
    p.error("--image_side must be a multiple of 8 (the VQ encoder downsamples 8x)")
  if args.random_tokens > (args.image_side // 8) ** 2:
    p.error("--random_tokens is more than the image tokens per image")
  return args


# ------------------------------------------------------------------------------- the inputs


def benchmark_examples(args) -> list:
  """Seeded random images and the study's VQA prompt around one question each."""
  import numpy as np
  from PIL import Image

  from narrowgate_jax.data import Example

  rng = np.random.default_rng(args.seed)
  width, height = IMAGE_SIZE
  examples = []
  for i in range(args.examples):
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    question = QUESTIONS[i % len(QUESTIONS)]
    examples.append(Example(id=f"example-{i}", prompt=TEMPLATE.format(question=question),
                            images=(image,), question=question, answers=("cat",)))
  return examples


def experiment(args, mode: str):
  """experiments/narrow_gate.py's NgKnockoutEval with the benchmark's conditions."""
  import ml_collections

  from experiments.narrow_gate import NgKnockoutEval

  config = ml_collections.ConfigDict()
  config.seed = args.seed
  kinds = [k for k in KINDS if k != "random" or args.random_draws > 0]
  config.experiment_config = ml_collections.ConfigDict(dict(
      task="vqa", conditions=kinds, layers="all", mode=mode, random_repeats=args.random_draws,
      random_tokens=args.random_tokens, max_new_tokens=args.new_tokens))
  return NgKnockoutEval(config)


# ------------------------------------------------------------------------------- the reference


def register_reference_attention() -> None:
  """Eager attention with `module._ng_knockout` = (mode, prompt queries [T] bool, generated
  queries bool, keys [T] bool) applied when set: the blocked edges' scores set to the float32
  minimum before the softmax (pre_softmax) or their probabilities zeroed after it (post_softmax,
  no renormalisation). Batch 1, no padding: with the KV cache, key j is absolute position j and
  the q_len queries are the last q_len positions; positions past the prompt are generated tokens,
  queries when the flag says so, never keys."""
  import torch
  import transformers
  from transformers.masking_utils import AttentionMaskInterface, eager_mask

  neg = torch.finfo(torch.float32).min

  def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    edit = getattr(module, "_ng_knockout", None)
    if edit is None:
      eager = sys.modules[type(module).__module__].eager_attention_forward
      return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                   **kw)
    mode, queries, generated, keys = edit
    t = keys.shape[0]
    q_len, kv_len = query.shape[2], key.shape[2]
    query_flags = torch.cat([queries, torch.full((kv_len - t,), generated)])[kv_len - q_len:]
    key_flags = torch.cat([keys, torch.zeros(kv_len - t, dtype=torch.bool)])
    blocked = query_flags[:, None] & key_flags[None, :]  # [q_len, kv_len]
    k = key.repeat_interleave(module.num_key_value_groups, dim=1)
    v = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
      scores = scores + attention_mask[..., :kv_len]
    if mode == "pre_softmax":
      scores = scores.masked_fill(blocked, neg)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mode == "post_softmax":
      probs = probs.masked_fill(blocked, 0.0)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs

  transformers.AttentionInterface.register(REFERENCE_ATTENTION, attention)
  # A custom attention name gets no mask unless one is registered for it: build eager's.
  AttentionMaskInterface.register(REFERENCE_ATTENTION, eager_mask)


def reference_sets(ids, tokenizer, placeholder: int, random_keys: list) -> dict:
  """One prompt's (unpadded) knockout sets from the processor's ids: {condition: (queries [T],
  generated queries, keys [T])}; `random_keys` holds each random draw's keys [T] (ours)."""
  import numpy as np

  start_id, end_id = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
  image = ids == placeholder
  image_start, eoi = ids == start_id, ids == end_id
  every = np.ones_like(image)
  last_image = np.zeros_like(image)
  last_image[np.flatnonzero(image)[-1]] = True
  after = np.arange(ids.size) > np.flatnonzero(eoi)[-1]
  sets = {"eoi": (every, True, eoi), "image_to_text": (after, True, image_start | image),
          "last_image": (every, True, last_image), "all_image": (every, True, image)}
  for r, keys in enumerate(random_keys):
    sets[f"random/{r}"] = (every, True, keys)
  return sets


def generation_config(torch_model, new_tokens: int):
  """Greedy, exactly `new_tokens` tokens (no end-of-sequence id), pad 0."""
  import copy

  config = copy.deepcopy(torch_model.generation_config)
  config.update(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=None,
                eos_token_id=None, pad_token_id=0, bos_token_id=None)
  return config


def torch_generate(torch_model, inputs, config, knockout=None):
  """One full generate (batch 1) under `knockout` (mode, queries, generated, keys) in every
  layer, or none -> the new tokens [N]."""
  import torch

  import reference as R

  layers = [layer.self_attn for layer in R.decoder_layers(torch_model)]
  if knockout is not None:
    mode, queries, generated, keys = knockout
    edit = (mode, torch.as_tensor(queries), bool(generated), torch.as_tensor(keys))
    for layer in layers:
      layer._ng_knockout = edit
  try:
    out = torch_model.generate(**inputs, generation_config=config)
  finally:
    for layer in layers:
      layer.__dict__.pop("_ng_knockout", None)
  return out[0, inputs["input_ids"].shape[1]:].numpy()


def torch_evaluation(torch_model, processor_call, examples, names, sets, mode, config):
  """The reference protocol: per example the processor once, then one generate per condition
  -> tokens [C, B, N]."""
  import numpy as np
  import torch

  out = np.zeros((len(names), len(examples), config.max_new_tokens), np.int64)
  with torch.inference_mode():
    for b, example in enumerate(examples):
      inputs = processor_call([example.images[0]], [example.prompt])
      for c, name in enumerate(names):
        knockout = None if name == "none" else (mode, *sets[b][name])
        new = torch_generate(torch_model, inputs, config, knockout)
        out[c, b, :new.size] = new
        out[c, b, new.size:] = -1  # a shorter generation (it should not happen) never agrees
  return out


# ------------------------------------------------------------------------------- agreement


def ours_sets(knockouts, names, batch) -> list[dict]:
  """Our knockouts (one rule each) -> per example {condition: (queries, generated, keys)}, the
  padding cut off."""
  import numpy as np

  real = np.asarray(batch.attention_mask)
  out = []
  for b in range(real.shape[0]):
    row = {}
    for name, ko in zip(names, knockouts):
      flags = np.asarray(ko.generated_flags())
      row[name] = (np.asarray(ko.queries)[0, b][real[b]], bool(flags[0]),
                   np.asarray(ko.keys)[0, b][real[b]])
    out.append(row)
  return out


def sets_agreement(theirs: list[dict], ours: list[dict], image_masks: list) -> bool:
  """Every condition's query and key sets equal on both sides (the random draws: on image
  tokens, since torch takes ours)."""
  import numpy as np

  for t_row, o_row, image in zip(theirs, ours, image_masks):
    for name, (queries, generated, keys) in t_row.items():
      o_queries, o_generated, o_keys = o_row[name]
      if name.startswith("random/") and keys[~image].any():
        return False
      if not (np.array_equal(queries, o_queries) and generated == o_generated
              and np.array_equal(keys, o_keys)):
        return False
  return True


def tokens_agreement(theirs, ours, names) -> dict:
  """Generated tokens [C, B, N] compared per condition and example."""
  import numpy as np

  equal = (theirs == ours).all(axis=-1)  # [C, B]
  mismatches = []
  for c, b in zip(*np.nonzero(~equal)):
    step = int(np.flatnonzero(theirs[c, b] != ours[c, b])[0])
    mismatches.append({"condition": names[c], "example": int(b), "first_step": step})
  changed = (theirs[1:] != theirs[:1]).any(axis=-1)  # [C - 1, B]: differs from "none"
  return {"pairs": int(equal.size), "tokens_equal": bool(equal.all()),
          "mismatched_pairs": len(mismatches), "mismatches": mismatches,
          "equal_by_condition": {n: int(equal[c].sum()) for c, n in enumerate(names)},
          "changed_vs_none": int(changed.sum()),
          "changed_by_condition": {n: int(changed[c].sum()) for c, n in enumerate(names[1:])}}


def ids_agreement(vlm, torch_model, processor_call, examples, batch) -> dict:
  """Our prompt ids (image positions back to the placeholder) and image token ids equal the
  processor's and get_image_tokens', per example (unpadded)."""
  import numpy as np
  import torch

  from benchmarks.native import image_positions

  placeholder = torch_model.model.vocabulary_mapping.image_token_id
  ids, real = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
  image = image_positions(batch.roles)
  prompt_equal = image_equal = True
  with torch.inference_mode():
    for b, example in enumerate(examples):
      inputs = processor_call([example.images[0]], [example.prompt])
      tokens = flat_image_tokens(torch_model.model.get_image_tokens(*image_token_args(inputs)))
      row = ids[b][real[b]]
      prompt_equal &= np.array_equal(np.where(image[b][real[b]], placeholder, row),
                                     inputs["input_ids"][0].numpy())
      image_equal &= np.array_equal(ids[b][image[b]], tokens)
  return {"prompt_ids_equal": bool(prompt_equal), "image_ids_equal": bool(image_equal)}


def _fmt_agreement(a: dict) -> str:
  tokens = (f"tokens equal in all {a['pairs']} (condition, example) pairs" if a["tokens_equal"]
            else f"tokens DIFFER in {a['mismatched_pairs']} of {a['pairs']} pairs (first at step "
                 f"{min(m['first_step'] for m in a['mismatches'])})")
  return (f"{tokens}; {a['changed_vs_none']} knocked-out pairs differ from none; knockout sets "
          + ("equal" if a["sets_equal"] else "DIFFER") + ", prompt ids "
          + ("equal" if a["prompt_ids_equal"] else "DIFFER") + ", image ids "
          + ("equal" if a["image_ids_equal"] else "DIFFER"))


# ------------------------------------------------------------------------------- breakdown


def timed(call, repeats: int, warm: bool = False) -> dict:
  """`repeats` timed calls (after one excluded warm-up call when `warm`): summary() of them."""
  if warm:
    call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return summary(times)


def breakdown(args, vlm, exp, examples, torch_model, processor_call, sets, config) -> dict:
  """Where each side's evaluation spends its time (each part on its own: our calls were compiled
  by the evaluation's warm-up, torch compiles nothing), and where each condition first changes
  the prompt."""
  import jax
  import numpy as np
  import torch

  import narrowgate_jax as ng
  import reference as R
  from narrowgate_jax.generate import (decode_conditions_fn, eos_array, prefill_fn,
                                       prompt_states_fn)
  from narrowgate_jax.interventions import Interventions, as_interventions
  from narrowgate_jax.model import _condition, _generation_start

  images = [ex.images[0] for ex in examples]
  prompts, questions = [ex.prompt for ex in examples], [ex.question for ex in examples]
  names = exp.conditions(vlm)
  mode = exp.config.experiment_config.mode

  def prepare():
    return vlm.prepare(images=images, prompts=prompts, questions=questions)

  batch = vlm._place(prepare())
  knockouts = [exp._knockout(vlm, batch, name, examples) for name in names]
  conditions = ng.stack_conditions(knockouts)
  starts = [_generation_start(batch, _condition(conditions, c)) for c in range(len(names))]
  static = dict(config=vlm.config, dtype=vlm.dtype)
  n, repeats = args.new_tokens, args.repeats
  run = lambda f: lambda: jax.block_until_ready(f())  # noqa: E731
  clean = jax.block_until_ready(prefill_fn(vlm.params, batch, Interventions(), **static))
  ours = {"prepare": timed(prepare, repeats),
          "clean prompt": timed(run(lambda: prefill_fn(vlm.params, batch, Interventions(),
                                                       **static)), repeats)}
  for start in sorted(set(starts) - {batch.shape[1]}):
    members = [c for c, s in enumerate(starts) if s == start]
    stacked = jax.tree.map(lambda x: np.asarray(x)[members], conditions.stacked)
    ours[f"suffix from {start}"] = timed(run(lambda: prompt_states_fn(
        vlm.params, batch, stacked, None if start == 0 else clean[1], start=start, **static)),
        repeats)
  c = len(names)
  logits = jax.numpy.broadcast_to(clean[0], (c,) + clean[0].shape)
  kv = jax.tree.map(lambda x: jax.numpy.repeat(x[:, None], c, axis=1), clean[1])
  ours[f"decode x{c}"] = timed(run(lambda: decode_conditions_fn(
      vlm.params, batch, logits, kv, conditions.stacked, jax.numpy.asarray(eos_array(None)),
      jax.numpy.int32(0), max_new_tokens=n, **static)), repeats, warm=True)
  inputs = processor_call([images[0]], [prompts[0]])
  layers = [layer.self_attn for layer in R.decoder_layers(torch_model)]
  queries, generated, keys = sets[0]["eoi"]
  edit = (mode, torch.as_tensor(queries), generated, torch.as_tensor(keys))

  def prompt_forward():
    for layer in layers:
      layer._ng_knockout = edit
    try:
      return torch_model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
      for layer in layers:
        layer.__dict__.pop("_ng_knockout", None)

  with torch.inference_mode():
    theirs = {
        "processor": timed(lambda: processor_call([images[0]], [prompts[0]]), repeats),
        "VQ encoder": timed(lambda: torch_model.model.get_image_tokens(
            *image_token_args(inputs)), repeats),
        "generate eoi": timed(lambda: torch_generate(torch_model, inputs, config,
                                                     (mode, queries, generated, keys)), repeats),
        "prompt forward": timed(prompt_forward, repeats),
    }
  first = {name: int(as_interventions(ko).first_edited_position().min())
           for name, ko in zip(names, knockouts)}
  return {"ours": ours, "torch": theirs, "conditions": len(names), "first_edited": first,
          "starts": dict(zip(names, map(int, starts))), "prompt_length": int(batch.shape[1])}


# ------------------------------------------------------------------------------- reporting


def print_report(results: dict, parts: dict, meta: dict) -> None:
  print()
  print(f"knockout evaluation: {meta['model']}; {meta['examples']} example(s) x {meta['tokens']} "
        f"prompt tokens ({meta['image_tokens']} image), {meta['conditions']} conditions x "
        f"{meta['new_tokens']} generated tokens, all layers, float32, {meta['threads']} "
        f"thread(s), {meta['repeats']} timed call(s) each (median, min in parentheses)")
  print_timing_tables(results, "agreement with torch", lambda r: _fmt_agreement(r["agreement"]))
  print("one call = the whole evaluation, every example under every condition (ours: one batch, "
        "1 generate call; torch: one full generate per example and condition). 1st call: the "
        "excluded warm-up (ours: the evaluation, with its trace, lower and compile; torch: one "
        "clean generate). peak MiB: the resident-set high-water mark above the resident set "
        "before a timed call")
  print()
  header = (f"{'setting':<13}| {'torch gens':>10} | {'torch s/ex':>10} | {'ours s/ex':>9} | "
            f"{'ratio':>6}")
  print(header)
  print("-" * len(header))
  n = meta["examples"]
  for name, r in results.items():
    print(f"{name:<13}| {r['torch_generations']:>10} | "
          f"{r['torch']['median_ms'] / n / 1e3:>10.2f} | {r['ours']['median_ms'] / n / 1e3:>9.2f}"
          f" | {r['ratio_median']:>5.1f}x")
  print("torch gens: full generate calls per evaluation; s/ex: median seconds per example")
  for name, r in results.items():
    a = r["agreement"]
    print()
    print(f"{name}: per condition ({n} example(s) each)")
    header = f"{'condition':<14}| {'tokens equal':>12} | {'differs from none':>17}"
    print(header)
    print("-" * len(header))
    for condition, equal in a["equal_by_condition"].items():
      changed = a["changed_by_condition"].get(condition)
      print(f"{condition:<14}| {equal:>8} / {n:<1} | "
            + ("-" if changed is None else f"{changed:>13} / {n}"))
    for m in a["mismatches"]:
      print(f"  mismatch: {m['condition']}, example {m['example']}, first at step "
            f"{m['first_step']}")
  if parts:
    ours, theirs = parts["ours"], parts["torch"]
    print()
    print(f"where the time goes (each part on its own; median ms; ours: the batch of {n} "
          f"example(s), torch: one example)")
    header = f"{'part':<22}| {'ms':>9} | what"
    print(header)
    print("-" * len(header))
    firsts = ", ".join(f"{k} {v}" for k, v in parts["first_edited"].items())
    groups = {}
    for name, start in parts["starts"].items():
      groups.setdefault(start, []).append(name)
    what = {"prepare": "ours: pixels, VQ encoder, tokenizer",
            "clean prompt": (f"ours: the clean prompt pass ({parts['prompt_length']} positions), "
                             f"shared by every condition (first edited: {firsts})"),
            f"decode x{parts['conditions']}": "ours: one decoding loop for every condition",
            "processor": "torch: the processor",
            "VQ encoder": "torch: get_image_tokens (inside every full generate)",
            "generate eoi": "torch: one full generate, [EOI] knockout",
            "prompt forward": "torch: its prompt pass alone (pixels to the last logits)"}
    for start, members in groups.items():
      what[f"suffix from {start}"] = f"ours: {', '.join(members)} from position {start}"
    for name, r in list(ours.items()) + list(theirs.items()):
      print(f"{name:<22}| {r['median_ms']:>9.1f} | {what[name]}")
    served = groups.get(parts["prompt_length"])
    if served:
      print(f"{', '.join(served)}: served by the clean prompt pass (no pass of their own)")
  print_load_note(meta)


def setting_calls(args, vlm, exp, examples, batch, torch_model, processor_call, config):
  """One setting's knockout sets on the torch side (checked against ours on `batch`), its two
  evaluations as calls for `measure`, and the dict their latest outputs go to."""
  import torch

  import narrowgate_jax as ng

  images = [ex.images[0] for ex in examples]
  prompts, questions = [ex.prompt for ex in examples], [ex.question for ex in examples]
  names = exp.conditions(vlm)
  mode = exp.config.experiment_config.mode
  placeholder = torch_model.model.vocabulary_mapping.image_token_id
  knockouts = [exp._knockout(vlm, batch, name, examples) for name in names[1:]]
  ours_rows = ours_sets(knockouts, names[1:], batch)
  image_masks, sets = [], []
  with torch.inference_mode():
    for b, example in enumerate(examples):
      row_ids = processor_call([example.images[0]], [example.prompt])["input_ids"][0].numpy()
      image_masks.append(row_ids == placeholder)
      random_keys = [ours_rows[b][n][2] for n in names if n.startswith("random/")]
      sets.append(reference_sets(row_ids, vlm.tokenizer, placeholder, random_keys))
  last = {"sets_equal": sets_agreement(sets, ours_rows, image_masks)}

  def call_ours():
    batch = vlm.prepare(images=images, prompts=prompts, questions=questions)
    conditions = ng.stack_conditions([exp._knockout(vlm, batch, name, examples)
                                      for name in names])
    out = vlm.generate(batch, max_new_tokens=args.new_tokens, interventions=conditions,
                       eos_id=None)
    last["ours"] = out.tokens
    return last["ours"]

  def call_torch():
    if "warm" not in last:  # measure's warm-up call: one clean generate
      last["warm"] = True
      with torch.inference_mode():
        inputs = processor_call([images[0]], [prompts[0]])
        return torch_generate(torch_model, inputs, config)
    last["torch"] = torch_evaluation(torch_model, processor_call, examples, names, sets, mode,
                                     config)
    return last["torch"]

  return sets, call_torch, call_ours, last


# ------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = start_process(args.threads)

  import numpy as np
  import torch

  from narrowgate_jax.processing.roles import select

  torch.set_num_threads(threads)
  env = environment(args, threads)

  examples = benchmark_examples(args)
  images = [ex.images[0] for ex in examples]
  prompts, questions = [ex.prompt for ex in examples], [ex.question for ex in examples]
  (torch_model, processor_call, _), vlm, load_times = build_convert_load(
      lambda hf_dir: build_checkpoint(args, hf_dir, images, prompts), "ng_bench_knockout_eval_")
  register_reference_attention()
  torch_model.set_attn_implementation(REFERENCE_ATTENTION)
  lm_params = sum(p.numel() for n, p in torch_model.named_parameters() if "vqmodel" not in n)
  print(f"{vlm}, LM {lm_params / 1e6:.1f}M parameters; {load_times}")

  config = generation_config(torch_model, args.new_tokens)
  batch0 = vlm.prepare(images=images, prompts=prompts, questions=questions)
  real = np.asarray(batch0.attention_mask)
  lengths = real.sum(axis=1)
  image_tokens = int(select("image", batch0.roles)[0].sum())
  ids = ids_agreement(vlm, torch_model, processor_call, examples, batch0)
  meta = {
      "model": (f"chameleon D={args.hidden} L={args.layers} N={args.heads} K={args.kv_heads} "
                f"F={args.intermediate} V={args.vocab}, VQ base {args.vq_channels} x (1,2,2,4), "
                f"{args.vq_blocks} blocks/level, {args.codebook} codes"),
      "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
      "codebook": args.codebook, "codebook_spread": args.codebook_used,
      "vq_channels": args.vq_channels, "vq_blocks": args.vq_blocks, "lm_parameters": lm_params,
      "examples": args.examples, "new_tokens": args.new_tokens,
      "random_draws": args.random_draws, "random_tokens": args.random_tokens,
      "conditions": len(experiment(args, "post_softmax").conditions(vlm)),
      "tokens": (f"{lengths.min()}-{lengths.max()}" if lengths.min() != lengths.max()
                 else str(lengths[0])),
      "image_tokens": image_tokens, "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}",
      **env,
  }
  print(f"{args.examples} example(s): {meta['tokens']} prompt tokens, {image_tokens} image tokens; "
        f"{meta['conditions']} conditions x {args.new_tokens} new tokens")

  results = {}
  parts = {}
  meta["load_average"] = [os.getloadavg()[0]]
  for mode in args.settings:
    exp = experiment(args, mode)
    names = exp.conditions(vlm)
    sets, call_torch, call_ours, last = setting_calls(args, vlm, exp, examples, batch0,
                                                      torch_model, processor_call, config)
    t0 = time.perf_counter()
    results[mode] = r = measure(call_torch, call_ours, None, args.repeats)
    r["agreement"] = {**tokens_agreement(last["torch"], last["ours"], names),
                      "sets_equal": last["sets_equal"], **ids}
    r["torch_generations"] = len(names) * args.examples
    r["conditions"] = names
    print(f"  {mode}: torch {r['torch']['median_ms'] / 1e3:.1f} s, ours "
          f"{r['ours']['median_ms'] / 1e3:.2f} s ({r['ratio_median']:.1f}x); "
          f"{_fmt_agreement(r['agreement'])} [{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])
    if args.breakdown and not parts:
      t0 = time.perf_counter()
      parts = breakdown(args, vlm, exp, examples, torch_model, processor_call, sets, config)
      print(f"  breakdown [{time.perf_counter() - t0:.0f}s]", flush=True)
      meta["load_average"].append(os.getloadavg()[0])

  print_report(results, parts, meta)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results, "breakdown": parts}, f, indent=2)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
