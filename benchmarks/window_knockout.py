"""The cross-modal study's window-knockout sweep: ours against the reference protocol, side by side.

  python benchmarks/window_knockout.py              # the defaults below, on all cores
  python benchmarks/window_knockout.py --examples 2 --repeats 2 --json /tmp/window_knockout.json
  python benchmarks/window_knockout.py --settings last --layers 8   # the X->Last flows only

What is built (nothing is downloaded): a LLaVA-1.5-style model (CLIP-style tower, LLaVA's two-layer
GELU projector, Llama language model) instantiated in code with a seeded random init (norm
weights perturbed; tests/reference.py's `build`), written with `save_pretrained` together with a
word-level tokenizer (tests/reference.py's, over the prompts' words) and a LlavaImageProcessorPil,
converted with `checkpoints_convert.convert.convert` and loaded with `ng.load`, as a user's
checkpoint would be (benchmarks/nonnative.py's `llava_parts`). The transformers model that wrote the
checkpoint runs the reference protocol. By default:
  language model  hidden 1024, 16 layers, 16 heads, 8 key/value heads, MLP 2816, vocabulary 32000.
  vision tower    width 512, 6 layers, 8 heads, MLP 2048 (benchmarks/nonnative.py's: small, but
                  with CLIP-L/14-336's geometry): 336 x 336 pixels, patch 14 -> 576 image tokens
                  (feature layer -2, class token dropped), the image padded to a square.
The examples (--examples, default 1) are seeded random RGB images (320 x 280) with one seeded
random object box each (for the "related" / "other" image patches), and a prompt in a LLaVA-1.5
chat format, the study's instruction around a question of 13-15 tokens:
  "A chat between a curious human and an artificial intelligence assistant. USER: <image>\\n
   {question} \\nAnswer the question using a single word or phrase. ASSISTANT:"
-> 41-43 text tokens + 576 image tokens per prompt.

What is timed, per --settings (the flow sets: "all" = the six flows, "last" = Question->Last,
Image->Last, Last->Last, "question" = Image->Question, Related->Question, Other->Question), for
every window centre l = 0..L-1 of a --window (k = 9) layer window, pre-softmax, in all heads:
  ours   the whole study step for the batch of examples: vlm.prepare(images=..., prompts=...,
         questions=...) (pixels, the jitted tower and projector, the tokenizer), then
         experiments/cross_modal.py's `CrossModalWindows.run_batch` itself: the related patches
         (vlm.region), the knockouts grouped by target, one `vlm.forward_from_prefix` per target
         (each runs the clean prompt once, then every condition over the positions from the
         target's first one: X->Last flows the last position alone, X->Question flows from the
         question on, rounded down to a multiple of 16), and
         p(t*) of the clean argmax t* at the last position for every condition.
  torch  the reference protocol (PROTOCOLS.md §4): batch 1, one example after the other; per
         example LlavaProcessor(images=[image], text=[prompt]) once, one clean forward for t*, then
         for every flow and window centre one full forward (vision tower, projector and the
         whole prefill, all logits, `use_cache=False`) with the blocked edges set to the float32
         minimum in the eager attention mask of the window's layers (an attention function
         registered with transformers.AttentionInterface, its mask from eager_mask: the study's
         eager 4-D additive mask), and p(t*) = softmax of the last position's logits. That is
         1 + 16 x 6 = 97 forwards per example for L = 16 and all flows; --clean_per_flow runs
         the clean forward once per flow instead, as the study's code does (L + 1 per flow).
         Which positions a flow blocks (question tokens, the image span, related patches) is
         read once from our batch's roles and vlm.region, before the timing (the same sets on
         both sides; tests/test_cross_modal.py checks ours against transformers the same way).
The warm-up call is excluded: ours, the whole sweep (trace + compile + run); torch, one clean
forward per example (torch compiles nothing and every forward of its sweep has that shape, so a
whole warm-up sweep would only double the run time). Then --repeats timed calls alternate torch /
ours (benchmarks/forward.py's `measure`); the agreement is computed from the last timed call of
each side. Reported per setting: wall time per call (all --examples) and per example, ratio =
torch time / our time (> 1: ours is faster), the median process CPU time, our warm-up's trace +
lower and XLA compile time, peak memory per call, and the agreement: whether t* is the same on both
sides for every example, and max |p_ours - p_torch| over every condition and example (absolute,
and relative to p_torch), the largest difference of the study's relative change
(p_knock - p_base) / p_base x 100 in percentage points, and the largest relative change itself (the
knockouts do change p(t*)).

With --breakdown (the default), where our time goes, each part timed on its own (--repeats
calls, warm-up excluded): prepare; region (vlm.region over the batch, as run_batch calls it);
every target group's forward_from_prefix (its first recomputed position, suffix length and
condition count); a forward_from_prefix with one X->Last condition (the clean prefill plus one
position: the cost every group pays once); the rest of run_batch (building and stacking the
knockouts, reading p(t*), the records) as the remainder. And torch's single full forward and its
vision tower + projector alone (get_image_features), for the per-forward cost.

Run time at the defaults, on 2 cores shared with other work (load average about 5): about 20 s
to build, save, convert and load; one torch sweep of one example took 6-12 minutes (97 full
forwards of 4-7 s; a forward takes about 2 s on idle cores), ours 18-26 s; the whole run with
--repeats 1 and the breakdown 8-15 minutes. Torch's OpenMP threads suffer most when other
processes take the cores (its wall and CPU times vary by 2x from run to run there; ours by less).

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
from benchmarks.nonnative import EXTRA_WORDS, SPECIALS, _width_height, llava_parts  # noqa: E402

SETTINGS = ("all", "last", "question")
REFERENCE_ATTENTION = "ng_bench_window_knockout"
SYSTEM = "A chat between a curious human and an artificial intelligence assistant."
TEMPLATE = (SYSTEM + " USER: <image>\n{question} \nAnswer the question using a single word or "
            "phrase. ASSISTANT:")
QUESTIONS = ("is the animal in this picture a red cat or a green dog ?",
             "what colour is the animal in this picture : red or blue or green ?",
             "is the cat in the picture red or is the dog in the picture blue ?",
             "what is the shape in this picture and what colour is this shape ?")
ANSWER = "cat"  # run_batch reads each example's answer token (random weights answer nothing)
PROMPT_WORDS = ("USER", "ASSISTANT", "A", "chat", "between", "curious", "human", "and",
                "artificial", "intelligence", "assistant", "Answer")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_model_flags(p)
  p.add_argument("--examples", type=int, default=1,
                 help="examples (one image, one box, one prompt each) in our batch; torch runs "
                      "them one after the other")
  p.add_argument("--window", type=int, default=9, help="window size k (layers)")
  p.add_argument("--clean_per_flow", action="store_true",
                 help="torch: one clean forward per flow (the study's code: L + 1 per flow) "
                      "instead of one per example")
  p.add_argument("--image_size", default="320x280", metavar="WxH", help="the benchmark images")
  p.add_argument("--vision_hidden", type=int, default=512, help="vision tower width")
  p.add_argument("--vision_layers", type=int, default=6, help="vision tower layers")
  p.add_argument("--vision_heads", type=int, default=8, help="vision tower heads")
  p.add_argument("--vision_intermediate", type=int, default=2048, help="vision tower MLP width")
  p.add_argument("--image_side", type=int, default=336, help="the tower's input side S")
  p.add_argument("--patch", type=int, default=14, help="vision patch size")
  add_run_flags(p, SETTINGS)
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the parts of our sweep (and one torch forward) on their own")
  p.set_defaults(layers=16, repeats=1, settings="all")
  args = check_args(p, p.parse_args(argv), SETTINGS)
  args.image_size = _width_height(p, args.image_size)
  if args.examples < 1:
    p.error("--examples must be at least 1")
  if not 1 <= args.window <= args.layers:
    p.error("--window must be between 1 and --layers")
  if args.vision_hidden % args.vision_heads:
    p.error("--vision_heads must divide --vision_hidden")
  if args.image_side < args.patch:
    p.error("--image_side must be at least --patch")
  return args


# ------------------------------------------------------------------------------- the model


def build_tokenizer(args):
  """tests/reference.py's word-level tokenizer over the specials, the prompts' words and
  reference.WORDS (the model's vocabulary is larger; the other ids are never produced)."""
  import reference as R

  words = dict.fromkeys(SPECIALS + EXTRA_WORDS + PROMPT_WORDS + R.WORDS)
  vmap = {t: i for i, t in enumerate(words)}
  if len(vmap) > args.vocab:
    raise SystemExit(f"--vocab must be at least {len(vmap)} (the tokenizer's words)")
  tokenizer = R.word_tokenizer(vmap, SPECIALS, add_bos=True,
                               extra_special_tokens={"image_token": "<image>"})
  tokenizer.padding_side = "left"
  return tokenizer


def build_checkpoint(args, directory: str):
  """The seeded random LLaVA-1.5 (float32, norms perturbed), saved with its tokenizer and image
  processor; returns (torch model, processor)."""
  import reference as R

  tokenizer = build_tokenizer(args)
  config, image_processor, processor = llava_parts(args, tokenizer)
  model = R.build(config, directory, seed=args.seed)
  tokenizer.save_pretrained(directory)
  image_processor.save_pretrained(directory)
  return model, processor


def benchmark_examples(args) -> list:
  """Seeded random images, one seeded random box each (a quarter to a half of each side), and the
  prompts, as the study's examples."""
  import numpy as np
  from PIL import Image

  from narrowgate_jax.data import Example

  rng = np.random.default_rng(args.seed)
  width, height = args.image_size
  examples = []
  for i in range(args.examples):
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    w = int(rng.integers(max(1, width // 4), max(2, width // 2)))
    h = int(rng.integers(max(1, height // 4), max(2, height // 2)))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    question = QUESTIONS[i % len(QUESTIONS)]
    examples.append(Example(id=f"example-{i}", prompt=TEMPLATE.format(question=question),
                            images=(image,), question=question, answer=ANSWER,
                            meta={"boxes": [(x0, y0, x0 + w - 1, y0 + h - 1)]}))
  return examples


def flow_sets():
  from experiments.cross_modal import FLOWS_TO_LAST, FLOWS_TO_QUESTION

  return {"all": {**FLOWS_TO_LAST, **FLOWS_TO_QUESTION}, "last": dict(FLOWS_TO_LAST),
          "question": dict(FLOWS_TO_QUESTION)}


def experiment(flows: dict, window: int):
  """experiments/cross_modal.py's CrossModalWindows over `flows` (pre-softmax, window k)."""
  import ml_collections

  from experiments.cross_modal import CrossModalWindows

  config = ml_collections.ConfigDict()
  config.experiment_config = ml_collections.ConfigDict(dict(
      flows=flows, window=window, mode="pre_softmax", only_correct=False, bootstrap=10))
  return CrossModalWindows(config)


# ------------------------------------------------------------------------------- the reference


def register_reference_attention() -> None:
  """transformers' eager attention of the module's family, with `module._ng_blocked` [1, 1, T, S]
  (when set: this layer is in the window) set to the float32 minimum in its additive mask."""
  import torch
  import transformers
  from transformers.masking_utils import AttentionMaskInterface, eager_mask

  neg = torch.finfo(torch.float32).min

  def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    blocked = getattr(module, "_ng_blocked", None)
    if blocked is not None:
      attention_mask = attention_mask.masked_fill(blocked, neg)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)

  transformers.AttentionInterface.register(REFERENCE_ATTENTION, attention)
  AttentionMaskInterface.register(REFERENCE_ATTENTION, eager_mask)


def reference_rows(vlm, examples, flows: dict) -> list[dict]:
  """Per example, unpadded (batch 1): {flow: (queries [T], keys [T])} from our roles and
  vlm.region, and the prompt ids with the image positions holding the image token id."""
  import numpy as np

  from experiments.cross_modal import IMAGE_SPAN
  from narrowgate_jax.processing.roles import select

  rows = []
  for example in examples:
    batch = vlm.prepare(images=[example.images[0]], prompts=[example.prompt],
                        questions=[example.question])
    related = vlm.region(batch, [example.images[0]], [[example.meta["boxes"]]])
    other = select("image", batch.roles) & ~related
    named = {"related": related, "other": other, "image_span": IMAGE_SPAN}
    masks = {}
    for name, spec in flows.items():
      queries, keys = (select(named.get(spec[side], spec[side]), batch.roles)[0]
                       for side in ("target", "source"))
      masks[name] = (queries, keys)
    rows.append({"masks": masks, "ids": np.asarray(batch.input_ids)[0],
                 "feature_mask": np.asarray(batch.feature_mask)[0]})
  return rows


def torch_warmup(torch_model, processor, examples) -> None:
  """One clean full forward per example: torch's one-time costs, at the sweep's shapes."""
  import torch

  with torch.inference_mode():
    for example in examples:
      inputs = processor(images=[example.images[0]], text=[example.prompt], return_tensors="pt")
      torch_model(**inputs, use_cache=False)


def torch_sweep(torch_model, processor, examples, rows, flows: dict, windows, clean_per_flow):
  """The reference protocol over the examples; returns per example (t*, p_clean, {(flow, centre):
  p_knock}) and the processor's prompt ids."""
  import torch

  import reference as R

  layers = [layer.self_attn for layer in R.decoder_layers(torch_model)]
  out = []
  with torch.inference_mode():
    for example, row in zip(examples, rows):
      inputs = processor(images=[example.images[0]], text=[example.prompt], return_tensors="pt")

      def last_probs(inputs=inputs):
        logits = torch_model(**inputs, use_cache=False).logits[0, -1]
        return torch.softmax(logits.float(), dim=-1)

      top = None
      p_knock = {}
      for flow in sorted(flows):
        if top is None or clean_per_flow:
          clean = last_probs()
          top = int(clean.argmax())
          p_clean = float(clean[top])
        queries, keys = (torch.as_tensor(m) for m in row["masks"][flow])
        blocked = (queries[:, None] & keys[None, :])[None, None]  # [1, 1, T, S]
        for centre, window in enumerate(windows):
          window = [int(l) for l in window if l >= 0]
          try:
            for l in window:
              layers[l]._ng_blocked = blocked
            p_knock[(flow, centre)] = float(last_probs()[top])
          finally:
            for l in window:
              del layers[l]._ng_blocked
      out.append({"top": top, "p_clean": p_clean, "p_knock": p_knock,
                  "ids": inputs["input_ids"][0].numpy()})
  return out


# ------------------------------------------------------------------------------- agreement


def ours_by_example(records, examples) -> list[dict]:
  """run_batch's records -> per example (t*, p_clean, {(flow, centre): p_knock})."""
  out = {ex.id: {"p_knock": {}} for ex in examples}
  for r in records:
    entry = out[r["example"]]
    entry["top"], entry["p_clean"] = r["top_token"], r["p_base"]
    if "flow" in r:
      entry["p_knock"][(r["flow"], r["centre"])] = r["p_knock"]
  return [out[ex.id] for ex in examples]


def agreement(theirs: list[dict], ours: list[dict], rows, placeholder: int) -> dict:
  """t* equal everywhere; max |p_ours - p_torch| (absolute, relative to p_torch) over the clean
  and every knocked-out condition; the study's relative change compared; prompt ids equal."""
  import numpy as np

  worst_abs = worst_rel = worst_change = largest_change = 0.0
  within = True
  for t, o, row in zip(theirs, ours, rows):
    pairs = [(o["p_clean"], t["p_clean"])] + [(o["p_knock"][key], p)
                                              for key, p in t["p_knock"].items()]
    for p_ours, p_torch in pairs:
      diff = abs(p_ours - p_torch)
      rel = diff / max(abs(p_torch), 1e-30)
      worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
      within &= diff <= 1e-5 or rel <= 1e-4
    for key, p in t["p_knock"].items():
      change_t = (p - t["p_clean"]) / t["p_clean"] * 100
      change_o = (o["p_knock"][key] - o["p_clean"]) / o["p_clean"] * 100
      worst_change = max(worst_change, abs(change_o - change_t))
      largest_change = max(largest_change, abs(change_t))
  ids_equal = all(np.array_equal(np.where(row["feature_mask"], placeholder, row["ids"]), t["ids"])
                  for t, row in zip(theirs, rows))
  return {"top_equal": all(t["top"] == o["top"] for t, o in zip(theirs, ours)),
          "conditions": sum(1 + len(t["p_knock"]) for t in theirs),
          "p_max_abs": worst_abs, "p_max_rel": worst_rel, "p_within_tolerance": bool(within),
          "relative_change_max_diff_pp": worst_change, "relative_change_max_abs": largest_change,
          "prompt_ids_equal": bool(ids_equal)}


def _fmt_agreement(a: dict) -> str:
  return (f"t* {'equal' if a['top_equal'] else 'DIFFERS'}, p(t*) max abs {a['p_max_abs']:.1e} "
          f"rel {a['p_max_rel']:.1e} over {a['conditions']} conditions, rel. change max diff "
          f"{a['relative_change_max_diff_pp']:.1e} pp (largest change "
          f"{a['relative_change_max_abs']:.1f}%), prompt ids "
          + ("equal" if a["prompt_ids_equal"] else "DIFFER"))


def run_setting(name: str, args, vlm, torch_model, processor, examples) -> dict:
  """One flow set: the two sweeps timed side by side (benchmarks/forward.py's `measure`), the
  agreement from the last timed call of each side."""
  from narrowgate_jax.analysis import all_windows

  flows = flow_sets()[name]
  exp = experiment(flows, args.window)
  rows = reference_rows(vlm, examples, flows)
  windows = all_windows(args.window, vlm.num_layers)
  images = [ex.images[0] for ex in examples]
  prompts, questions = [ex.prompt for ex in examples], [ex.question for ex in examples]
  last = {}  # the latest timed outputs of each side

  def call_ours():
    batch = vlm.prepare(images=images, prompts=prompts, questions=questions)
    last["ours"] = exp.run_batch(vlm, batch, examples)
    return last["ours"]

  def call_torch():
    if "warm" not in last:  # measure's warm-up call: one clean forward per example
      last["warm"] = True
      return torch_warmup(torch_model, processor, examples)
    last["torch"] = torch_sweep(torch_model, processor, examples, rows, flows, windows,
                                args.clean_per_flow)
    return last["torch"]

  result = measure(call_torch, call_ours, None, args.repeats)
  result["agreement"] = agreement(last["torch"], ours_by_example(last["ours"], examples), rows,
                                  torch_model.config.image_token_id)
  result["flows"] = len(flows)
  result["torch_forwards"] = (len(flows) * (vlm.num_layers + 1) if args.clean_per_flow
                              else 1 + len(flows) * vlm.num_layers)
  return result


# ------------------------------------------------------------------------------- breakdown


def time_ours(call, repeats: int) -> dict:
  """Warm-up (excluded), then `repeats` timed calls: summary() of the wall times."""
  call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return summary(times)


def breakdown(args, vlm, examples, flows, torch_model, processor) -> dict:
  """Where our sweep spends its time (each part on its own), and torch's per-forward cost."""
  import jax
  import numpy as np
  import torch

  import narrowgate_jax as ng
  from narrowgate_jax.analysis import all_windows

  exp = experiment(flows, args.window)
  images = [ex.images[0] for ex in examples]
  prompts, questions = [ex.prompt for ex in examples], [ex.question for ex in examples]

  def prepare():
    return vlm.prepare(images=images, prompts=prompts, questions=questions)

  batch = prepare()
  parts = {"prepare": time_ours(prepare, args.repeats)}
  def region():  # as run_batch calls it: one example at a time
    return [vlm.region(jax.tree.map(lambda x, i=i: np.asarray(x)[i:i + 1], batch), [images[i]],
                       [[ex.meta["boxes"]]]) for i, ex in enumerate(examples)]

  parts["region"] = time_ours(region, args.repeats)
  # Each group's forward_from_prefix, recorded while run_batch runs (the same calls, timed).
  groups, public = {}, vlm.forward_from_prefix

  def timed(batch_, conditions, **kw):
    t0 = time.perf_counter()
    out = jax.block_until_ready(public(batch_, conditions, **kw))
    target = "last" if out.start == batch_.shape[1] - 1 else "question"
    groups.setdefault(target, {"times": [], "start": out.start,
                               "suffix": batch_.shape[1] - out.start,
                               "conditions": int(out.logits.shape[0])})
    groups[target]["times"].append(time.perf_counter() - t0)
    return out

  vlm.forward_from_prefix = timed
  try:
    whole = time_ours(lambda: exp.run_batch(vlm, batch, examples), args.repeats)
  finally:
    del vlm.forward_from_prefix
  for target in sorted(groups):
    g = groups[target]
    parts[f"to {target}"] = {**summary(g["times"][1:]), "start": g["start"],
                             "suffix": g["suffix"], "conditions": g["conditions"]}
  one = ng.stack_conditions([vlm.knockout(batch, keys="last", queries="last",
                                          layers=[int(l) for l in all_windows(
                                              args.window, vlm.num_layers)[0] if l >= 0])])
  parts["prefill+1"] = time_ours(lambda: jax.block_until_ready(vlm.forward_from_prefix(batch, one)),
                                 args.repeats)
  rest = whole["median_ms"] - parts["region"]["median_ms"] - sum(
      parts[f"to {t}"]["median_ms"] for t in groups)
  parts["run_batch"] = whole
  parts["rest of run_batch"] = {"median_ms": rest}

  inputs = processor(images=[images[0]], text=[prompts[0]], return_tensors="pt")
  with torch.inference_mode():
    torch_parts = {
        "full forward": time_ours(lambda: torch_model(**inputs, use_cache=False), args.repeats),
        "vision+proj": time_ours(lambda: torch_model.model.get_image_features(
            pixel_values=inputs["pixel_values"]), args.repeats)}
  return {"ours": parts, "torch": torch_parts}


# ------------------------------------------------------------------------------- reporting


def print_report(results: dict, parts: dict, meta: dict) -> None:
  print()
  print(f"window-knockout sweep: {meta['model']}; {meta['examples']} example(s) x "
        f"{meta['tokens']} tokens ({meta['image_tokens']} image, {meta['text_tokens']} text), "
        f"window k={meta['window']}, pre-softmax, float32, {meta['threads']} thread(s), "
        f"{meta['repeats']} timed call(s) each (median, min in parentheses)")
  print_timing_tables(results, "agreement with torch", lambda r: _fmt_agreement(r["agreement"]))
  print("one call = the whole sweep for every example (ours: one batch; torch: one example after "
        "the other). 1st call: the excluded warm-up (ours: the sweep, with its trace, lower and "
        "compile; torch: one clean forward per example). peak MiB: the resident-set high-water "
        "mark above the resident set before a timed call")
  print()
  header = (f"{'setting':<13}| {'flows':>5} | {'torch fwd':>9} | {'torch s/ex':>10} | "
            f"{'ours s/ex':>9} | {'ratio':>6}")
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    n = meta["examples"]
    print(f"{name:<13}| {r['flows']:>5} | {r['torch_forwards']:>9} | "
          f"{r['torch']['median_ms'] / n / 1e3:>10.2f} | "
          f"{r['ours']['median_ms'] / n / 1e3:>9.2f} | {r['ratio_median']:>5.1f}x")
  print("torch fwd: full forwards per example (vision tower + whole prefill each); s/ex: median "
        "seconds per example")
  if parts:
    ours, theirs = parts["ours"], parts["torch"]
    print()
    print("where our time goes (each part on its own, whole batch; median ms)")
    header = f"{'part':<18}| {'ms':>9} | {'share':>6} | what"
    print(header)
    print("-" * len(header))
    total = ours["prepare"]["median_ms"] + ours["run_batch"]["median_ms"]
    what = {"prepare": "pixels, tower + projector, tokenizer",
            "region": "vlm.region per example (related patches)",
            "prefill+1": "forward_from_prefix, 1 X->Last condition (clean prefill + 1 position)",
            "rest of run_batch": "knockouts built + stacked, p(t*), records"}
    for name in ["prepare", "region"] + [k for k in ours if k.startswith("to ")] + [
        "rest of run_batch", "prefill+1"]:
      r = ours[name]
      note = what.get(name) or (f"forward_from_prefix: {r['conditions']} conditions from "
                                f"position {r['start']} ({r['suffix']} position"
                                f"{'s' if r['suffix'] != 1 else ''} each)")
      share = "" if name == "prefill+1" else f"{100 * r['median_ms'] / total:>5.1f}%"
      print(f"{name:<18}| {r['median_ms']:>9.1f} | {share:>6} | {note}")
    print(f"{'torch':<18}| {theirs['full forward']['median_ms']:>9.1f} |        | one full forward "
          f"(batch 1), of which vision tower + projector "
          f"{theirs['vision+proj']['median_ms']:.1f} ms")
  print_load_note(meta)


# ------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = start_process(args.threads)

  import torch


  torch.set_num_threads(threads)
  env = environment(args, threads)

  (torch_model, processor), vlm, load_times = build_convert_load(
      lambda hf_dir: build_checkpoint(args, hf_dir), "ng_bench_window_knockout_")
  register_reference_attention()
  torch_model.set_attn_implementation({"text_config": REFERENCE_ATTENTION,
                                       "vision_config": "eager"})
  vision_params = sum(p.numel() for n, p in torch_model.named_parameters()
                      if "vision_tower" in n or "multi_modal_projector" in n)
  lm_params = sum(p.numel() for p in torch_model.parameters()) - vision_params
  print(f"{vlm}, LM {lm_params / 1e6:.1f}M parameters, vision tower + projector "
        f"{vision_params / 1e6:.1f}M; {load_times}")

  examples = benchmark_examples(args)
  all_rows = reference_rows(vlm, examples, flow_sets()["all"])
  real = [len(row["ids"]) for row in all_rows]
  image_tokens = int(all_rows[0]["feature_mask"].sum())
  meta = {
      "model": (f"LLaVA-1.5 (CLIP + Llama) D={args.hidden} L={args.layers} N={args.heads} "
                f"K={args.kv_heads} F={args.intermediate} V={args.vocab}, tower "
                f"{args.vision_hidden} wide x {args.vision_layers} layers, {args.vision_heads} "
                f"heads, MLP {args.vision_intermediate}, {args.image_side}px / patch {args.patch}"),
      "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
      "vision_hidden": args.vision_hidden, "vision_layers": args.vision_layers,
      "vision_heads": args.vision_heads, "vision_intermediate": args.vision_intermediate,
      "image_side": args.image_side, "patch": args.patch,
      "image": f"{args.image_size[0]}x{args.image_size[1]}",
      "lm_parameters": lm_params, "vision_parameters": vision_params,
      "examples": args.examples, "window": args.window, "clean_per_flow": args.clean_per_flow,
      "tokens": f"{min(real)}-{max(real)}" if min(real) != max(real) else str(real[0]),
      "image_tokens": image_tokens,
      "text_tokens": "/".join(str(n - image_tokens) for n in real),
      **env,
  }
  print(f"{args.examples} example(s): {meta['tokens']} tokens per prompt, {image_tokens} image "
        f"tokens, {meta['text_tokens']} text tokens; window k={args.window} over "
        f"{vlm.num_layers} centres")

  results = {}
  meta["load_average"] = [os.getloadavg()[0]]
  for name in args.settings:
    t0 = time.perf_counter()
    results[name] = r = run_setting(name, args, vlm, torch_model, processor, examples)
    print(f"  {name}: torch {r['torch']['median_ms'] / 1e3:.1f} s, ours "
          f"{r['ours']['median_ms'] / 1e3:.2f} s ({r['ratio_median']:.1f}x); "
          f"{_fmt_agreement(r['agreement'])} [{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])

  parts = {}
  if args.breakdown:
    t0 = time.perf_counter()
    parts = breakdown(args, vlm, examples, flow_sets()[args.settings[0]], torch_model, processor)
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
