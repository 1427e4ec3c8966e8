"""Peak memory of the in-scan attention flow on a long native sequence vs one layer's [H, T, T].

  python benchmarks/attention_flow_memory.py        # the defaults below, on all cores
  python benchmarks/attention_flow_memory.py --tokens 2048 --json /tmp/flow_memory.json
  python benchmarks/attention_flow_memory.py --hidden 256 --intermediate 704 --heads 16

What is built (nothing is downloaded, nothing is written to disk): the language model of
benchmarks/native.py's Chameleon (its `chameleon_parts`: hidden 1024, 8 layers, 16 heads, 8
key/value heads, MLP 2816, vocabulary 32000 with the VQ codes at the end; query/key norms, the
image tokens' logits suppressed), read into our DecoderConfig as `ng.load` reads a checkpoint's
(models/families.py) and initialised with `model.random_params` (seeded). Only the memory is
measured, so the weights need not match any checkpoint. The batch is an `ng.Batch` built
directly, a Chameleon prompt laid out as the study's: per example
  <s> <racm3:break> [image tokens] <eoss> [text tokens]
--tokens (4096) positions, --text_tokens (64) of them text after the end-of-image token, the rest
image tokens (seeded random VQ code ids); roles from `processing.roles.Role`.

What is measured, per --settings (our call is the public `vlm.forward(batch, capture=...)`, timed
up to `jax.block_until_ready`):
  logits       Capture(): the plain forward (attention in causal query blocks, no probabilities
               formed), the baseline: its [B, T, V] float32 logits alone are B*T*V*4 bytes.
  probability  Capture(received_from="text_after_image"): the Narrow Gate attention flow
               (PROTOCOLS.md §2(b)): per layer and head, the post-softmax attention each key
               receives from the text after the image, summed inside the layer scan
               (Output.received [L, B, N, S]); a layer's [B, N, T, S] probabilities exist only
               while that layer runs.
  value_norm   the same with received_weighting="value_norm" (each weight times ||W_O^h v_j^h||).
Two numbers each, against one layer's probabilities, B*H*T*T float32 bytes (H = --heads), and
the bound 4x that:
  peak RSS     the process's resident-set high-water mark during a warm call above its resident
               set just before it (benchmarks/forward.py's PeakRSS: /proc/self/clear_refs reset),
               max over --repeats calls after a warm-up call (trace + compile, excluded). Before
               every call the resident set is left to settle (JAX frees the previous call's
               buffers asynchronously; a call started at once reuses pages still resident and
               looks smaller than it is).
  XLA          the compiled program's own plan (`forward_fn.lower(...).compile()
               .memory_analysis()`, the same function and arguments vlm.forward runs): temporary
               buffers (temp_size_in_bytes) and outputs (output_size_in_bytes); the parameters and
               the batch are arguments, allocated before the call.
Also reported: how far each flow setting's peak RSS lies above the plain forward's (what the
flow itself adds), wall time per call, and a check that the flow is what it should be: with
probability weighting every query row sums to 1, so each layer's and head's received mass over
the keys equals the number of query positions (max relative deviation); value_norm: finite and
non-negative.

Run time on 2 cores at the defaults: about 15 s to build the model, then 10-35 s per forward
(the flow settings form every layer's probabilities; more while other processes share the cores)
and 5-20 s per extra compile for memory_analysis: about 2.5 minutes with --repeats 1. On this CPU
the measured peak RSS lies about 0.5 GiB (one logits array) above XLA's temp + output in every
setting, the plain forward included.

--threads N (default: every core this process may use) restricts the whole process to N cores
(CPU affinity before JAX starts). JAX runs on the CPU (JAX_PLATFORMS=cpu unless set otherwise).
Everything is float32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO_ROOT, os.path.join(REPO_ROOT, "tests")):
  if _path not in sys.path:
    sys.path.insert(0, _path)

from benchmarks.forward import (CompileTimes, PeakRSS, _status_kib, environment,  # noqa: E402
                                add_model_flags, add_run_flags, check_args, print_load_note,
                                start_process)
from benchmarks.native import chameleon_parts  # noqa: E402

SETTINGS = ("logits", "probability", "value_norm")
BOUND = 4  # the flow's peak must stay below this many layers' [B, H, T, T] float32
MIB = 1024.0 ** 2


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_model_flags(p)
  p.add_argument("--tokens", type=int, default=4096, help="sequence length T")
  p.add_argument("--text_tokens", type=int, default=64,
                 help="text tokens after the end-of-image token (the flow's queries)")
  p.add_argument("--batch", type=int, default=1, help="batch size B (identical layouts)")
  p.add_argument("--codebook", type=int, default=8192, help="VQ codes at the vocabulary's end")
  add_run_flags(p, SETTINGS)
  p.set_defaults(repeats=1)
  args = check_args(p, p.parse_args(argv), SETTINGS)
  args.family = "chameleon"  # native.py's chameleon_parts and vocabulary_map read these
  args.image_side, args.vq_channels, args.vq_blocks = 256, 64, 2
  if args.text_tokens < 1 or args.tokens - args.text_tokens < 4:
    p.error("--text_tokens must be at least 1 and leave at least one image token in --tokens")
  if args.codebook >= args.vocab - 64:
    p.error("--codebook must leave room for the text vocabulary")
  return args


# ------------------------------------------------------------------------------- model and batch


def build_model(args):
  """Our Chameleon language model from native.py's transformers config, random parameters."""
  import dataclasses

  from narrowgate_jax.model import VLM, random_params
  from narrowgate_jax.models.families import FAMILIES

  hf_config = chameleon_parts(args)[0]
  config = FAMILIES["chameleon"].decoder_config(hf_config)
  config = dataclasses.replace(config, max_positions=max(config.max_positions, args.tokens))
  return VLM(config, random_params(config, args.seed), name="chameleon (random)"), hf_config


def build_batch(args, hf_config):
  """<s> <racm3:break> [image] <eoss> [text] per example, as a Batch with its roles."""
  import numpy as np

  import narrowgate_jax as ng
  from narrowgate_jax.processing.roles import Role

  vmap = hf_config.vocabulary_map
  image = args.tokens - 3 - args.text_tokens
  rng = np.random.default_rng(args.seed)
  codes = sorted(v for k, v in vmap.items() if k.startswith("IMGIMG"))
  words = [v for k, v in vmap.items() if not k.startswith(("IMGIMG", "<"))]
  ids = np.concatenate([
      np.full((args.batch, 1), vmap["<s>"]), np.full((args.batch, 1), vmap["<racm3:break>"]),
      rng.choice(codes, (args.batch, image)), np.full((args.batch, 1), vmap["<eoss>"]),
      rng.choice(words, (args.batch, args.text_tokens))], axis=1).astype(np.int32)
  roles = np.concatenate([[Role.BOS, Role.IMAGE_START], [Role.IMAGE] * image, [Role.IMAGE_END],
                          [Role.TEXT] * args.text_tokens]).astype(np.int32)
  roles = np.broadcast_to(roles, ids.shape).copy()
  positions = np.broadcast_to(np.arange(args.tokens, dtype=np.int32), ids.shape).copy()
  return ng.Batch(input_ids=ids, positions=positions, roles=roles), image


def capture_of(name: str):
  import narrowgate_jax as ng

  if name == "logits":
    return ng.Capture()
  return ng.Capture(received_from="text_after_image", received_weighting=name)


# ------------------------------------------------------------------------------- measuring


def xla_memory(vlm, batch, capture) -> dict:
  """The compiled forward's memory plan (what vlm.forward runs: forward_fn with the same
  arguments), in bytes; {} where the backend gives none."""
  import jax

  from narrowgate_jax.model import forward_fn

  plan = capture.plan(batch, vlm.num_layers)
  placed = jax.tree.map(jax.numpy.asarray, batch)
  t0 = time.perf_counter()
  try:
    compiled = forward_fn.lower(vlm.params, placed, vlm._checked(None), plan, config=vlm.config,
                                dtype=vlm.dtype, mesh=None).compile()
    stats = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001  (an unsupported backend: report, do not fail)
    return {"error": f"{type(e).__name__}: {e}"}
  out = {"compile_s": time.perf_counter() - t0}
  for field in ("temp_size_in_bytes", "output_size_in_bytes", "argument_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
    value = getattr(stats, field, None)
    if value is not None:
      out[field] = int(value)
  return out


def flow_check(name: str, received, batch) -> dict:
  """probability: each layer's and head's received mass = the number of query positions (rows
  sum to 1); value_norm: finite and non-negative."""
  import numpy as np

  from narrowgate_jax.processing.roles import select

  if received is None:
    return {}
  received = np.asarray(received, np.float64)  # [L, B, N, S]
  out = {"received_shape": list(received.shape), "finite": bool(np.isfinite(received).all())}
  if name == "probability":
    queries = select("text_after_image", batch.roles).sum(axis=1)  # [B]
    total = received.sum(axis=-1)  # [L, B, N]
    out["row_sum_max_rel_dev"] = float(np.max(np.abs(total - queries[None, :, None])
                                              / queries[None, :, None]))
  else:
    out["non_negative"] = bool((received >= 0).all())
  return out


def settle(timeout_s: float = 10.0) -> None:
  """Waits until the resident set stops shrinking (JAX frees a call's buffers asynchronously:
  measured right after a call, the next call would reuse pages still resident and look smaller)."""
  gc.collect()
  t0, last, stable = time.perf_counter(), _status_kib("VmRSS"), 0
  while stable < 3 and time.perf_counter() - t0 < timeout_s:
    time.sleep(0.2)
    now = _status_kib("VmRSS")
    stable = stable + 1 if abs(now - last) < 1024 else 0
    last = now


def measure_setting(name: str, vlm, batch, repeats: int) -> dict:
  import jax

  capture = capture_of(name)

  def call():
    return jax.block_until_ready(vlm.forward(batch, capture=capture))

  result = {}
  settle()
  with CompileTimes() as compile_times, PeakRSS() as first_peak:
    t0 = time.perf_counter()
    out = call()
    result["first_call_s"] = time.perf_counter() - t0
  result.update(compile_times.seconds)
  result["first_call_peak_mib"] = first_peak.mib
  result["check"] = flow_check(name, out.received, batch)
  del out
  times, peaks = [], []
  for _ in range(repeats):
    settle()
    with PeakRSS() as peak:
      t0 = time.perf_counter()
      out = call()
      times.append(time.perf_counter() - t0)
    if peak.mib is not None:
      peaks.append(peak.mib)
    del out
  result["median_s"] = statistics.median(times)
  result["min_s"] = min(times)
  result["peak_rss_mib"] = max(peaks) if peaks else None
  result["xla"] = xla_memory(vlm, batch, capture)
  return result


# ------------------------------------------------------------------------------- reporting


def _fmt(x, digits: int = 0) -> str:
  return "-" if x is None else f"{x:,.{digits}f}"


def summarise(results: dict, layer_bytes: int) -> None:
  """Adds the ratios to one layer's probabilities and the verdicts to each setting."""
  layer_mib = layer_bytes / MIB
  for r in results.values():
    xla = r["xla"]
    r["xla_mib"] = None
    if "temp_size_in_bytes" in xla:
      r["xla_mib"] = (xla["temp_size_in_bytes"] + xla.get("output_size_in_bytes", 0)) / MIB
    r["rss_over_layer"] = None if r["peak_rss_mib"] is None else r["peak_rss_mib"] / layer_mib
    r["xla_over_layer"] = None if r["xla_mib"] is None else r["xla_mib"] / layer_mib
    measured = [v for v in (r["rss_over_layer"], r["xla_over_layer"]) if v is not None]
    r["below_bound"] = bool(measured) and max(measured) < BOUND
  base = results.get("logits", {}).get("peak_rss_mib")
  for name, r in results.items():
    if name != "logits" and base is not None and r["peak_rss_mib"] is not None:
      r["rss_above_logits_over_layer"] = (r["peak_rss_mib"] - base) / layer_mib


def _fmt_check(c: dict) -> str:
  if not c:
    return "-"
  parts = ["finite" if c["finite"] else "NOT FINITE"]
  if "row_sum_max_rel_dev" in c:
    parts.append(f"mass = query count (max rel dev {c['row_sum_max_rel_dev']:.1e})")
  if "non_negative" in c:
    parts.append("non-negative" if c["non_negative"] else "NEGATIVE")
  return ", ".join(parts)


def print_report(results: dict, meta: dict) -> None:
  print()
  print(f"attention flow memory: {meta['model']}; batch {meta['batch']} x {meta['tokens']} tokens "
        f"({meta['image_tokens']} image, {meta['text_tokens']} text after EOI), float32, "
        f"{meta['threads']} thread(s), {meta['repeats']} timed call(s) each")
  print(f"one layer's probabilities [B, H, T, T] float32 = {meta['batch']} x {meta['heads']} x "
        f"{meta['tokens']}^2 x 4 B = {meta['layer_mib']:,.0f} MiB; bound {BOUND}x = "
        f"{BOUND * meta['layer_mib']:,.0f} MiB. logits [B, T, V] float32 = "
        f"{meta['logits_mib']:,.0f} MiB")
  bound = f"< {BOUND}x"
  header = (f"{'setting':<12}| {'wall s':>7} | {'peak RSS MiB':>12} | {'/ layer':>7} | "
            f"{'XLA temp MiB':>12} | {'+ output':>8} | {'/ layer':>7} | {bound:>5} | check")
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    xla = r["xla"]
    temp = xla.get("temp_size_in_bytes")
    output = xla.get("output_size_in_bytes")
    flow = name != "logits"
    print(f"{name:<12}| {r['median_s']:>7.1f} | {_fmt(r['peak_rss_mib']):>12} | "
          f"{_fmt(r['rss_over_layer'], 2):>7} | {_fmt(None if temp is None else temp / MIB):>12} | "
          f"{_fmt(None if output is None else output / MIB):>8} | "
          f"{_fmt(r['xla_over_layer'], 2):>7} | "
          f"{('yes' if r['below_bound'] else 'NO') if flow else '':>5} | {_fmt_check(r['check'])}")
  print("peak RSS: the resident-set high-water mark during a warm vlm.forward above the resident "
        "set just before it (max over calls); XLA: the compiled forward's temporary buffers and "
        "its outputs (memory_analysis); / layer: either over one layer's [B, H, T, T] float32")
  above = [f"{n} {r['rss_above_logits_over_layer']:.2f}x" for n, r in results.items()
           if "rss_above_logits_over_layer" in r]
  if above:
    print("peak RSS above the plain forward's (logits), over one layer's [B, H, T, T]: "
          + ", ".join(above))
  for name, r in results.items():
    if "error" in r["xla"]:
      print(f"note: {name}: no XLA memory analysis ({r['xla']['error']})")
  first = ", ".join(f"{n} {_fmt(r['first_call_peak_mib'])} MiB ({r['first_call_s']:.0f} s)"
                    for n, r in results.items())
  print(f"first calls (trace + compile + run, excluded above): peak RSS {first}")
  print_load_note(meta)


# ------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = start_process(args.threads)

  import jax

  env = environment(args, threads, torch_side=False)
  t0 = time.perf_counter()
  vlm, hf_config = build_model(args)
  batch, image_tokens = build_batch(args, hf_config)
  n_params = sum(x.size for x in jax.tree.leaves(vlm.params))
  print(f"{vlm}, {n_params / 1e6:.1f}M parameters; built in {time.perf_counter() - t0:.1f}s; "
        f"batch {args.batch} x {args.tokens} tokens ({image_tokens} image, {args.text_tokens} "
        f"text after EOI)")

  layer_bytes = args.batch * args.heads * args.tokens * args.tokens * 4
  meta = {
      "model": (f"chameleon D={args.hidden} L={args.layers} N={args.heads} K={args.kv_heads} "
                f"F={args.intermediate} V={args.vocab}"),
      "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
      "parameters": int(n_params), "batch": args.batch, "tokens": args.tokens,
      "image_tokens": image_tokens, "text_tokens": args.text_tokens,
      "layer_bytes": layer_bytes, "layer_mib": layer_bytes / MIB, "bound": BOUND,
      "logits_mib": args.batch * args.tokens * args.vocab * 4 / MIB,
      **env,
  }
  results = {}
  meta["load_average"] = [os.getloadavg()[0]]
  for name in args.settings:
    t0 = time.perf_counter()
    results[name] = r = measure_setting(name, vlm, batch, args.repeats)
    print(f"  {name}: {r['median_s']:.1f} s, peak RSS {_fmt(r['peak_rss_mib'])} MiB, XLA temp "
          f"{_fmt(r['xla'].get('temp_size_in_bytes', 0) / MIB)} MiB "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])
  summarise(results, layer_bytes)

  print_report(results, meta)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
