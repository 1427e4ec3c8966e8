"""Forward-pass speed of our jitted decoder against transformers' PyTorch forward, side by side.

  python benchmarks/forward.py                      # the defaults below, on all cores
  python benchmarks/forward.py --repeats 3 --json /tmp/forward.json
  python benchmarks/forward.py --dtype bfloat16 --threads 1 --kv_heads 16

What is built: a Llama checkpoint (by default hidden 1024, 8 layers, 16 heads, 8 key/value heads,
MLP 2816, vocabulary 32000) is instantiated in code with a seeded random init (nothing is
downloaded), written with `save_pretrained` into a temporary directory, converted with
`checkpoints_convert.convert.convert` and loaded with `ng.load`. The transformers model that wrote
the checkpoint is the reference. Both run in the same process on the CPU, on the same token ids
([batch, tokens], no padding), in --dtype.

What is timed, per setting (our call is the public `vlm.forward(batch, capture=...)`; torch runs
under `torch.inference_mode()` with `use_cache=False`, all logits kept):
  logits        ours: Capture() -> attention in causal query blocks, no probabilities formed
                (`models/attention.py`).
                torch: the default "sdpa" attention.
  +resid        ours: Capture(resid=True) -> Output.resid [L+1, B, T, D].
                torch: sdpa, output_hidden_states=True.
  +resid+attn   ours: Capture(resid=True, attn=True) -> also Output.attn [L, B, N, T, T].
                torch: attn_implementation="eager", output_attentions=True,
                output_hidden_states=True.
The warm-up call (JAX: trace + compile + run; torch: the first call) is excluded. Then --repeats
timed calls alternate torch / ours; ours is timed up to `jax.block_until_ready` on every output.
Reported: median and min wall time in ms, ratio = torch time / our time (> 1: ours is faster),
the median process CPU time per call (all threads; steadier than wall time when other processes
share the cores),
the time our warm-up call spent tracing + lowering and in XLA's compiler (jax.monitoring events),
peak memory per call (the process's resident-set high-water mark above its resident set just
before the call, reset through /proc/self/clear_refs), and the maximum relative error
max|ours - torch| / max|torch| of the logits (and of the captured residuals and attention
probabilities) in each setting, so the timed computations are known to compute the same thing.

--threads N (default: every core this process may use) restricts the whole process to N cores
(CPU affinity, set before JAX starts, so XLA's thread pool has N threads) and calls
torch.set_num_threads(N). JAX runs on the CPU (JAX_PLATFORMS=cpu unless set otherwise), since
torch here is the CPU build: the comparison is on the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

SETTINGS = ("logits", "+resid", "+resid+attn")


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """The language model's size (a Llama layout); shared with benchmarks/native.py."""
  p.add_argument("--hidden", type=int, default=1024, help="language model width D")
  p.add_argument("--layers", type=int, default=8, help="decoder layers L")
  p.add_argument("--heads", type=int, default=16, help="query heads N")
  p.add_argument("--kv_heads", type=int, default=8, help="key/value heads K")
  p.add_argument("--intermediate", type=int, default=2816, help="MLP width F")
  p.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")


def add_run_flags(p: argparse.ArgumentParser, settings: tuple[str, ...]) -> None:
  """Repeats, cores, the settings to time, seed and JSON output; shared with native.py."""
  p.add_argument("--repeats", type=int, default=5, help="timed calls per setting and side")
  p.add_argument("--threads", type=int, default=None,
                 help="cores for both sides (torch.set_num_threads + CPU affinity); default all")
  p.add_argument("--settings", default=",".join(settings),
                 help="comma-separated subset of " + ",".join(settings))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace,
               settings: tuple[str, ...]) -> argparse.Namespace:
  """Splits --settings and refuses what add_model_flags / add_run_flags cannot run."""
  args.settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
  unknown = [s for s in args.settings if s not in settings]
  if unknown:
    p.error(f"unknown setting {unknown[0]!r}; choose from {', '.join(settings)}")
  if args.repeats < 1:
    p.error("--repeats must be at least 1")
  if args.heads % args.kv_heads or args.hidden % args.heads:
    p.error("--heads must divide --hidden and be a multiple of --kv_heads")
  return args


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_model_flags(p)
  p.add_argument("--tokens", type=int, default=1024, help="sequence length T")
  p.add_argument("--batch", type=int, default=1, help="batch size B")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  add_run_flags(p, SETTINGS)
  return check_args(p, p.parse_args(argv), SETTINGS)


def restrict_cores(threads: int | None) -> int:
  """Pins this process to `threads` of its allowed cores (before JAX starts); returns the count."""
  allowed = sorted(os.sched_getaffinity(0))
  if threads is None or threads >= len(allowed):
    return len(allowed)
  if threads < 1:
    raise SystemExit("--threads must be at least 1")
  os.sched_setaffinity(0, allowed[:threads])
  return threads


# ------------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


class PeakRSS:
  """Resident-set high-water mark during a block, above the resident set at its start (MiB).

  None where /proc/self/clear_refs cannot reset the mark (not Linux, or not permitted).
  """

  def __enter__(self):
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.start = _status_kib("VmRSS")
    except OSError:
      self.start = None
    return self

  def __exit__(self, *exc):
    self.mib = None
    if self.start is not None and self.start >= 0:
      self.mib = max(_status_kib("VmHWM") - self.start, 0) / 1024.0
    return False


class CompileTimes:
  """Seconds JAX spends tracing, lowering and compiling (jax.monitoring events) inside a block."""

  EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
            "/jax/core/compile/backend_compile_duration": "compile_s"}

  def __enter__(self):
    import jax.monitoring

    self.seconds = {name: 0.0 for name in self.EVENTS.values()}
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event, duration, **kwargs):
    del kwargs
    if event in self.EVENTS:
      self.seconds[self.EVENTS[event]] += duration

  def __exit__(self, *exc):
    import jax.monitoring

    jax.monitoring.unregister_event_duration_listener(self._listen)
    return False


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs| (the norm the parity tests use)."""
  import numpy as np

  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-30))


def summary(times_s: list[float]) -> dict:
  ms = [t * 1e3 for t in times_s]
  return {"median_ms": statistics.median(ms), "min_ms": min(ms), "times_ms": ms}


# ------------------------------------------------------------------------------- the models


def build_checkpoint(args, directory: str):
  """A seeded random Llama in float32, saved with save_pretrained; returns the torch model."""
  import torch
  import transformers

  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.tokens),
      rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
      eos_token_id=2)
  torch.manual_seed(args.seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
  model = model.float().eval()
  # Norm weights start at exactly 1; perturb them so a scale mix-up could not hide.
  gen = torch.Generator().manual_seed(args.seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(directory)
  return model


def token_ids(args) -> list[list[int]]:
  import numpy as np

  rng = np.random.default_rng(args.seed)
  return [[1] + rng.integers(3, args.vocab, size=args.tokens - 1).tolist()
          for _ in range(args.batch)]


# ------------------------------------------------------------------------------- one setting


def measure(call_torch, call_ours, check, repeats: int) -> dict:
  """Warm-up calls (excluded; their outputs go to `check`, which returns the agreement; JAX
  reports its tracing, lowering and XLA compile time through jax.monitoring), then `repeats`
  timed calls alternating torch / ours. Returns per side: first call, median / min wall time,
  median CPU time, peak RSS; and the ratios torch / ours."""
  result = {"torch": {}, "ours": {}}
  t0 = time.perf_counter()
  theirs = call_torch()
  result["torch"]["first_call_ms"] = (time.perf_counter() - t0) * 1e3
  with CompileTimes() as compile_times:
    t0 = time.perf_counter()
    ours = call_ours()
    result["ours"]["first_call_ms"] = (time.perf_counter() - t0) * 1e3
  result["ours"].update(compile_times.seconds)
  result["agreement"] = check(theirs, ours) if check is not None else {}
  del theirs, ours

  times = {"torch": [], "ours": []}
  cpu_times = {"torch": [], "ours": []}
  peaks = {"torch": [], "ours": []}
  for _ in range(repeats):
    for side, call in (("torch", call_torch), ("ours", call_ours)):
      out = None  # noqa: F841  (the previous output is freed before the next call)
      with PeakRSS() as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        out = call()
        times[side].append(time.perf_counter() - t0)
        cpu_times[side].append(time.process_time() - c0)
      if peak.mib is not None:
        peaks[side].append(peak.mib)
      del out
  for side in ("torch", "ours"):
    result[side].update(summary(times[side]))
    result[side]["cpu_median_ms"] = statistics.median(cpu_times[side]) * 1e3
    result[side]["peak_rss_mib"] = max(peaks[side]) if peaks[side] else None
  result["ratio_median"] = result["torch"]["median_ms"] / result["ours"]["median_ms"]
  result["ratio_min"] = result["torch"]["min_ms"] / result["ours"]["min_ms"]
  result["ratio_cpu"] = result["torch"]["cpu_median_ms"] / result["ours"]["cpu_median_ms"]
  return result


def run_setting(name: str, vlm, batch, torch_model, torch_ids, torch_mask, args) -> dict:
  import jax
  import numpy as np
  import torch

  import narrowgate_jax as ng

  capture = {"logits": ng.Capture(), "+resid": ng.Capture(resid=True),
             "+resid+attn": ng.Capture(resid=True, attn=True)}[name]
  torch_kwargs = {"logits": {}, "+resid": {"output_hidden_states": True},
                  "+resid+attn": {"output_hidden_states": True, "output_attentions": True}}[name]
  torch_model.set_attn_implementation("eager" if name == "+resid+attn" else "sdpa")

  def call_torch():
    with torch.inference_mode():
      return torch_model(input_ids=torch_ids, attention_mask=torch_mask, use_cache=False,
                         **torch_kwargs)

  def call_ours():
    return jax.block_until_ready(vlm.forward(batch, capture=capture))

  def agreement(theirs, ours) -> dict:
    errors = {"logits": relative_error(ours.logits, theirs.logits.float().numpy())}
    if ours.resid is not None:
      # transformers' last hidden state is after the final norm; ours is before it: 0..L-1.
      hidden = np.stack([h.float().numpy() for h in theirs.hidden_states[:-1]])
      errors["resid"] = relative_error(np.asarray(ours.resid)[:-1], hidden)
    if ours.attn is not None:
      errors["attn"] = relative_error(ours.attn, np.stack([a.float().numpy()
                                                           for a in theirs.attentions]))
    return errors

  result = measure(call_torch, call_ours, agreement, args.repeats)
  result["max_rel_error"] = result.pop("agreement")
  torch_model.set_attn_implementation("sdpa")
  return result


# ------------------------------------------------------------------------------- reporting


def _fmt_mib(x) -> str:
  return "-" if x is None else f"{x:,.0f}"


def print_time_table(title: str, results: dict) -> None:
  """setting | torch ms | ours ms | ratio, median with min in parentheses."""
  header = f"{title:<13}| {'torch ms':>19} | {'ours ms':>19} | {'ratio':>14}"
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    t, o = r["torch"], r["ours"]
    print(f"{name:<13}| {t['median_ms']:>9.1f} ({t['min_ms']:>7.1f}) | "
          f"{o['median_ms']:>9.1f} ({o['min_ms']:>7.1f}) | "
          f"{r['ratio_median']:>5.2f}x ({r['ratio_min']:.2f}x)")


def print_timing_tables(results: dict, last_column: str, describe) -> None:
  """The wall-time, CPU-time and compile/memory tables; `describe(result)` fills the last column
  of the third (how far the two implementations agree)."""
  print_time_table("setting", results)
  print("ratio = torch time / our time (> 1: ours is faster)")
  print()
  header = f"{'setting':<13}| {'torch CPU ms':>12} | {'ours CPU ms':>11} | {'ratio':>6}"
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    print(f"{name:<13}| {r['torch']['cpu_median_ms']:>12.0f} | {r['ours']['cpu_median_ms']:>11.0f}"
          f" | {r['ratio_cpu']:>5.2f}x")
  print("CPU ms: median process CPU time per call, all threads (less sensitive to other processes "
        "on the machine than wall time; counts spin-waiting threads too)")
  print()
  header = (f"{'setting':<13}| {'trace+lower s':>13} | {'XLA compile s':>13} | "
            f"{'1st call ms torch':>17} | {'ours':>8} | {'peak MiB torch':>14} | {'ours':>6} | "
            + last_column)
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    t, o = r["torch"], r["ours"]
    print(f"{name:<13}| {o['trace_s'] + o['lower_s']:>13.2f} | {o['compile_s']:>13.2f} | "
          f"{t['first_call_ms']:>17.0f} | {o['first_call_ms']:>8.0f} | "
          f"{_fmt_mib(t['peak_rss_mib']):>14} | {_fmt_mib(o['peak_rss_mib']):>6} | {describe(r)}")


def print_report(results: dict, meta: dict) -> None:
  print()
  print(f"forward: {meta['model']}; batch {meta['batch']} x {meta['tokens']} tokens, "
        f"{meta['dtype']}, {meta['threads']} thread(s), {meta['repeats']} timed calls each "
        f"(median, min in parentheses)")
  print_timing_tables(results, "max rel err vs torch", lambda r: ", ".join(
      f"{k} {v:.1e}" for k, v in r["max_rel_error"].items()))
  print("1st call: the excluded warm-up (ours includes trace, lower and compile). peak MiB: the "
        "resident-set high-water mark above the resident set before a timed call (max over calls)")
  print_load_note(meta)


def print_load_note(meta: dict) -> None:
  load = meta["load_average"]
  if max(load) > meta["cores"] + 0.5:
    print(f"note: the 1-minute load average reached {max(load):.1f} on this {meta['cores']}-core "
          "machine while this ran: other processes competed for the cores, so the mins are the "
          "steadier numbers")


def environment(args, threads: int, torch_side: bool = True) -> dict:
  """What every benchmark's JSON records about the run and the machine; prints the versions.
  torch_side: the script also runs transformers (its versions are recorded too)."""
  import jax

  env = {"threads": threads, "repeats": args.repeats, "seed": args.seed,
         "cores": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend()}
  line = f"jax {jax.__version__} ({jax.default_backend()})"
  if torch_side:
    import torch
    import transformers

    env.update(torch=torch.__version__, transformers=transformers.__version__)
    line += f", torch {torch.__version__}, transformers {transformers.__version__}"
  env.update(python=platform.python_version(), cpu=platform.processor() or platform.machine())
  print(f"{line}; {threads} thread(s)")
  return env


def build_convert_load(build, prefix: str, **load_kwargs):
  """A checkpoint written by `build(hf_dir)`, converted (float32) and loaded with `ng.load`, in a
  temporary directory. Returns (what `build` returned, the VLM, "build+save ..s, convert ..s,
  load ..s")."""
  import narrowgate_jax as ng
  from checkpoints_convert.convert import convert

  with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
    hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "converted")
    t0 = time.perf_counter()
    built = build(hf_dir)
    t1 = time.perf_counter()
    convert(hf_dir, out_dir, dtype="float32", progress=False)
    t2 = time.perf_counter()
    vlm = ng.load(out_dir, **load_kwargs)
    t3 = time.perf_counter()
  return built, vlm, f"build+save {t1 - t0:.1f}s, convert {t2 - t1:.1f}s, load {t3 - t2:.1f}s"


def start_process(threads: int | None) -> int:
  """Pins the process to `threads` cores and keeps JAX on the CPU and the hub offline; call
  before jax, torch or transformers are imported. Returns the number of cores used."""
  threads = restrict_cores(threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  return threads


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = start_process(args.threads)

  import numpy as np
  import torch


  torch.set_num_threads(threads)
  meta = {
      "model": (f"Llama D={args.hidden} L={args.layers} N={args.heads} K={args.kv_heads} "
                f"F={args.intermediate} V={args.vocab}"),
      "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
      "batch": args.batch, "tokens": args.tokens, "dtype": args.dtype,
      **environment(args, threads),
  }
  torch_model, vlm, load_times = build_convert_load(lambda d: build_checkpoint(args, d),
                                                    "ng_bench_", dtype=args.dtype)
  n_params = sum(p.numel() for p in torch_model.parameters())
  meta["parameters"] = n_params
  print(f"{vlm}, {n_params / 1e6:.1f}M parameters; {load_times}")
  if args.dtype == "bfloat16":
    torch_model = torch_model.to(torch.bfloat16)

  ids = token_ids(args)
  batch = vlm.prepare(token_ids=ids)
  torch_ids = torch.as_tensor(np.asarray(batch.input_ids), dtype=torch.long)
  torch_mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)

  results = {}
  meta["load_average"] = [os.getloadavg()[0]]
  for name in args.settings:
    t0 = time.perf_counter()
    results[name] = run_setting(name, vlm, batch, torch_model, torch_ids, torch_mask, args)
    r = results[name]
    print(f"  {name}: torch {r['torch']['median_ms']:.1f} ms, ours {r['ours']['median_ms']:.1f} ms"
          f" ({r['ratio_median']:.2f}x), logits rel err {r['max_rel_error']['logits']:.1e} "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])

  print_report(results, meta)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
