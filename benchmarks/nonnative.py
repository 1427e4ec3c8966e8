"""Image-to-logits speed of non-native VLMs (LLaVA-1.5, LLaVA-OneVision): ours against transformers.

  python benchmarks/nonnative.py                    # LLaVA-1.5, the defaults below, on all cores
  python benchmarks/nonnative.py --family llava_onevision --repeats 2
  python benchmarks/nonnative.py --repeats 3 --json /tmp/nonnative.json
  python benchmarks/nonnative.py --vision_hidden 1024 --vision_layers 24 --vision_heads 16 \
      --vision_intermediate 4096                    # CLIP-L/14-336's real tower (slow on a CPU)

What is built (nothing is downloaded): a non-native VLM of --family is instantiated in code with a
seeded random init (norm weights perturbed, so a scale mix-up could not hide; tests/reference.py's
`build`), written with `save_pretrained` together with its tokenizer (a word-level one, built like
tests/reference.py's) and image processor, converted with `checkpoints_convert.convert.convert` and
loaded with `ng.load`, as a user's checkpoint would be. The transformers model that wrote the
checkpoint is the reference. By default:
  language model  hidden 1024, 8 layers, 16 heads, 8 key/value heads, MLP 2816, vocabulary 32000
                  (benchmarks/forward.py's): Llama for LLaVA-1.5, Qwen2 (q/k/v biases) for
                  OneVision.
  vision tower    width 512, 6 layers, 8 heads, MLP 2048, patch 14: the real towers (CLIP-L/14-336:
                  1024 wide, 24 layers; SigLIP-so400m/14-384: 1152 wide, 27 layers) take minutes
                  per image set on 2 cores; this keeps their token counts, which is what the
                  language model's time depends on. LLaVA-1.5: CLIP, 336 x 336 pixels -> 24 x 24 =
                  576 image tokens (feature layer -2, class token dropped), the image padded to a
                  square with the mean colour. OneVision: SigLIP, 384 x 384 per view with patch
                  14 (as SigLIP-so400m/14-384: the convolution drops the last 6 pixels) -> 27 x
                  27 = 729 tokens per view, AnyRes over the real anyres_max_9 pinpoints
                  (384 i x 384 j, i, j = 1..6) with unpadding and a learned newline per row.
  projector       LLaVA's two-layer GELU MLP.
The benchmark's images are seeded random RGB PIL images: 320 x 280 for LLaVA-1.5 (one view), 600 x
280 for OneVision, which picks the 384 x 768 pinpoint: a base view and 2 tiles (3 x 729 tower
tokens), unpadded to rows of 54 with a newline each.
--image_size WxH picks others (700x560: a 2 x 2 grid, 5 views).

What is timed, on a batch of --batch prompts "<image>What is in the picture? Answer:" (default 2
for LLaVA-1.5, 1 for OneVision, whose prompt is 4 times longer), one image each (torch runs under
`torch.inference_mode()` with `use_cache=False`; ours is timed up to `jax.block_until_ready`):
  prepare       ours:  vlm.prepare(images=..., prompts=...) -> a Batch whose `features` hold the
                       image embeddings: numpy/PIL preprocessing, the jitted tower and projector,
                       AnyRes packing, the tokenizer.
                torch: LLaVA: LlavaProcessor(images=..., text=...) (the image processor and the
                       tokenizer) + model.model.get_image_features(pixel_values);
                       OneVision: its image processor + get_image_features(pixel_values,
                       image_sizes) (which packs the AnyRes features with the newlines).
                       transformers' LlavaOnevisionProcessor needs torchvision (its video
                       processor), which is not installed: the OneVision torch side takes our
                       prompt ids (image positions holding the image token id), computed once,
                       and does no tokenization.
  logits        ours:  prepare + vlm.forward(batch).logits (Capture(): attention in causal query
                       blocks, no probabilities formed).
                torch: the same inputs + model(**inputs).logits (vision tower, projector and
                       language model inside the forward), "sdpa" attention everywhere.
  +resid+attn   ours:  prepare + vlm.forward(batch, capture=Capture(resid=True, attn=True)).
                torch: the same inputs + model(**inputs, output_hidden_states=True,
                       output_attentions=True) with attn_implementation="eager" in the language
                       model (needed for its probabilities); the vision tower stays on "sdpa".
Ours runs the vision tower only up to the feature layer it needs (LLaVA-1.5's -2: all but the last
layer); transformers runs them all and picks hidden_states[-2].
With --breakdown (the default), the three stages are also timed on their own, to show where the
time goes: pixels (ours: `processing.anyres`, numpy + PIL; torch: the image processor), vision
tower + projector (ours: the reader's jitted tower and projector on those pixels, and the AnyRes
packing; torch: get_image_features) and the language model (ours: vlm.forward on the prepared
batch; torch: model(inputs_embeds=...) with its own image features already in place).
The warm-up call (JAX: trace + compile + run; torch: the first call) is excluded. Then --repeats
timed calls alternate torch / ours. Reported, as in benchmarks/forward.py (whose helpers this
reuses): median and min wall time in ms, ratio = torch time / our time (> 1: ours is faster), the
median process CPU time per call, the time our warm-up spent tracing + lowering and in XLA's
compiler, peak memory per call, and the agreement: whether our prompt ids equal LlavaProcessor's
(image positions put back to the image token id), whether each image has as many tokens on both
sides, and max|ours - torch| / max|torch| of the image features against get_image_features, and of
the logits, residuals and attention probabilities over real positions.

Run time on 2 otherwise idle cores: about 15 s to build, save, convert and load, then the
warm-ups, and about 11 s (LLaVA-1.5) or 30 s (OneVision) per timed repeat of all three settings
and the breakdown: the default --repeats 5 takes about 1.5 minutes for LLaVA-1.5 and 4 minutes for
OneVision (--repeats 2: 2.5 minutes). Other processes on the cores slow both sides (torch more)
and by more than the differences measured here: see the load note under the tables.

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

from benchmarks.forward import (CompileTimes, add_model_flags, add_run_flags,  # noqa: E402
                                build_convert_load, check_args, environment, measure,
                                print_load_note, print_time_table, print_timing_tables,
                                relative_error, start_process)


SETTINGS = ("prepare", "logits", "+resid+attn")
STAGES = ("pixels", "vision+proj", "LM forward")
PROMPT = "<image>What is in the picture? Answer:"
EXTRA_WORDS = ("What", "Answer")  # the prompt's capitalised words, beyond tests/reference.WORDS
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>")
# Per family: the tower's input side, the benchmark images (width, height), prompts per batch.
FAMILY_DEFAULTS = {"llava": dict(image_side=336, image_size=(320, 280), batch=2),
                   "llava_onevision": dict(image_side=384, image_size=(600, 280), batch=1)}
# What get_image_features takes of the model inputs.
PIXEL_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--family", choices=tuple(FAMILY_DEFAULTS), default="llava")
  add_model_flags(p)
  p.add_argument("--batch", type=int, default=None,
                 help="prompts (each with one image) B; None: 2 (llava), 1 (llava_onevision)")
  p.add_argument("--image_size", default=None, metavar="WxH",
                 help="the benchmark images; None: 320x280 (llava), 600x280 (llava_onevision)")
  p.add_argument("--vision_hidden", type=int, default=512, help="vision tower width")
  p.add_argument("--vision_layers", type=int, default=6, help="vision tower layers")
  p.add_argument("--vision_heads", type=int, default=8, help="vision tower heads")
  p.add_argument("--vision_intermediate", type=int, default=2048, help="vision tower MLP width")
  p.add_argument("--image_side", type=int, default=None,
                 help="the tower's input side S (one view); None: 336 (llava), 384 (onevision)")
  p.add_argument("--patch", type=int, default=14, help="vision patch size")
  add_run_flags(p, SETTINGS)
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                 help="also time pixels / vision tower + projector / LM forward on their own")
  args = check_args(p, p.parse_args(argv), SETTINGS)
  defaults = FAMILY_DEFAULTS[args.family]
  args.batch = defaults["batch"] if args.batch is None else args.batch
  args.image_side = defaults["image_side"] if args.image_side is None else args.image_side
  args.image_size = (defaults["image_size"] if args.image_size is None
                     else _width_height(p, args.image_size))
  if args.batch < 1:
    p.error("--batch must be at least 1")
  if args.vision_hidden % args.vision_heads:
    p.error("--vision_heads must divide --vision_hidden")
  if args.image_side < args.patch:
    p.error("--image_side must be at least --patch")
  return args


def _width_height(p: argparse.ArgumentParser, text: str) -> tuple[int, int]:
  """"600x280" -> (600, 280)."""
  try:
    size = tuple(int(v) for v in text.lower().split("x"))
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    p.error(f"--image_size must be WIDTHxHEIGHT, e.g. 600x280; got {text!r}")
  return size


# ------------------------------------------------------------------------------- the models


def build_tokenizer(args):
  """tests/reference.py's word-level tokenizer over the specials, the prompt's words and
  reference.WORDS (the model's vocabulary is larger; the other ids are never produced)."""
  import reference as R

  vmap = {t: i for i, t in enumerate(SPECIALS + EXTRA_WORDS + R.WORDS)}
  if len(vmap) > args.vocab:
    raise SystemExit(f"--vocab must be at least {len(vmap)} (the tokenizer's words)")
  tokenizer = R.word_tokenizer(vmap, SPECIALS, add_bos=True,
                               extra_special_tokens={"image_token": "<image>"})
  tokenizer.padding_side = "left"
  return tokenizer


def _text_fields(args, max_positions: int) -> dict:
  return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads,
              num_key_value_heads=args.kv_heads, max_position_embeddings=max_positions,
              rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def _vision_fields(args, model_type: str) -> dict:
  return dict(model_type=model_type, hidden_size=args.vision_hidden,
              intermediate_size=args.vision_intermediate, num_hidden_layers=args.vision_layers,
              num_attention_heads=args.vision_heads, image_size=args.image_side,
              patch_size=args.patch)


def llava_parts(args, tokenizer):
  """(config, image processor, processor): LLaVA-1.5 (CLIP tower, Llama LM)."""
  import transformers

  side = args.image_side
  config = transformers.LlavaConfig(
      vision_config=_vision_fields(args, "clip_vision_model"),
      text_config=transformers.LlamaConfig(**_text_fields(args, 4096)),
      image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
  image_processor = transformers.LlavaImageProcessorPil(
      do_pad=True, size={"shortest_edge": side}, crop_size={"height": side, "width": side})
  processor = transformers.LlavaProcessor(image_processor, tokenizer, patch_size=args.patch,
                                          vision_feature_select_strategy="default",
                                          num_additional_image_tokens=1)
  return config, image_processor, processor


def onevision_pinpoints(side: int) -> list[list[int]]:
  """anyres_max_9's grid (384 i x 384 j, i, j = 1..6 in the real model) for a tower side."""
  return [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)]


def onevision_parts(args, tokenizer):
  """(config, image processor, None): LLaVA-OneVision (SigLIP tower, Qwen2 LM); transformers'
  processor cannot be built here (it needs torchvision)."""
  import transformers

  side = args.image_side
  pinpoints = onevision_pinpoints(side)
  config = transformers.LlavaOnevisionConfig(
      vision_config=_vision_fields(args, "siglip_vision_model"),
      text_config=transformers.Qwen2Config(**_text_fields(args, 32768)),
      image_grid_pinpoints=pinpoints, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
  image_processor = transformers.LlavaOnevisionImageProcessorPil(
      size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
  return config, image_processor, None


def build_checkpoint(args, directory: str):
  """The seeded random model (tests/reference.py's `build`: float32, norms perturbed), saved with
  its tokenizer and image processor; returns (torch model, image processor, processor or None)."""
  import reference as R

  tokenizer = build_tokenizer(args)
  parts = llava_parts if args.family == "llava" else onevision_parts
  config, image_processor, processor = parts(args, tokenizer)
  model = R.build(config, directory, seed=args.seed)
  model.set_attn_implementation("sdpa")
  tokenizer.save_pretrained(directory)
  image_processor.save_pretrained(directory)
  return model, image_processor, processor


def benchmark_inputs(args):
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(args.seed)
  width, height = args.image_size
  images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for _ in range(args.batch)]
  return images, [PROMPT] * args.batch


def placeholder_ids(batch, placeholder: int):
  """Our prompt ids with every image position (features and newlines) holding the image token
  id: what transformers' processor produces."""
  import numpy as np

  return np.where(np.asarray(batch.feature_mask), placeholder, np.asarray(batch.input_ids))


def torch_inputs_call(processor, image_processor, images, prompts, batch, placeholder: int):
  """A call that turns the images and prompts into the transformers model's inputs: LLaVA's
  processor; for OneVision its image processor, with our prompt ids (computed once)."""
  import numpy as np
  import torch

  if processor is not None:
    return lambda: processor(images=images, text=prompts, padding=True, return_tensors="pt")
  ids = torch.as_tensor(placeholder_ids(batch, placeholder), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)

  def call():
    inputs = dict(image_processor(images, return_tensors="pt"))
    inputs.update(input_ids=ids, attention_mask=mask)
    return inputs

  return call


def image_features(torch_model, inputs) -> list:
  """transformers' image embeddings, one [N_i, D] per image (OneVision: packed, with newlines)."""
  pixels = {k: inputs[k] for k in PIXEL_KEYS if k in inputs}
  return list(torch_model.model.get_image_features(**pixels).pooler_output)


# ------------------------------------------------------------------------------ agreement


def features_agreement(batch, theirs: list) -> dict:
  """Image tokens per prompt on both sides, and our features vs get_image_features'."""
  import numpy as np

  mask = np.asarray(batch.feature_mask)
  ours_counts = mask.sum(axis=1).tolist()
  theirs_counts = [int(f.shape[0]) for f in theirs]
  out = {"image_tokens": ours_counts, "image_tokens_equal": ours_counts == theirs_counts}
  if out["image_tokens_equal"]:
    out["features"] = relative_error(np.asarray(batch.features)[mask],
                                     np.concatenate([f.float().numpy() for f in theirs]))
  return out


def ids_agreement(batch, inputs, placeholder: int) -> dict:
  import numpy as np

  ours, theirs = placeholder_ids(batch, placeholder), inputs["input_ids"].numpy()
  return {"prompt_ids_equal": ours.shape == theirs.shape and bool(np.array_equal(ours, theirs))}


def layerwise_relative_error(ours, theirs, rows) -> float:
  """relative_error of attention probabilities [B, H, T, T] per layer, over the query rows where
  `rows` [B, T], one layer at a time (a 2,000-token prompt's [L, B, H, T, T] is gigabytes:
  float64 copies of all of it at once would not fit in memory)."""
  import numpy as np

  worst = scale = 0.0
  for o, t in zip(ours, theirs):
    o = np.moveaxis(np.asarray(o), 2, 1)[rows].astype(np.float64)
    t = np.moveaxis(t.float().numpy(), 2, 1)[rows].astype(np.float64)
    worst = max(worst, float(np.max(np.abs(o - t))))
    scale = max(scale, float(np.max(np.abs(t))))
  return worst / max(scale, 1e-30)


def output_agreement(out_o, out_t, real) -> dict:
  """Logits, residuals (ours 0..L-1: transformers' last hidden state is after the final norm,
  ours before it) and attention over the real positions `real` [B, T]."""
  import numpy as np

  errors = {"logits": relative_error(np.asarray(out_o.logits)[real],
                                     out_t.logits.float().numpy()[real])}
  if out_o.resid is not None:
    hidden = np.stack([h.float().numpy() for h in out_t.hidden_states[:-1]])
    errors["resid"] = relative_error(np.asarray(out_o.resid)[:-1][:, real], hidden[:, real])
  if out_o.attn is not None:
    errors["attn"] = layerwise_relative_error(np.asarray(out_o.attn), out_t.attentions, real)
  return errors


# ------------------------------------------------------------------------------- reporting


def _fmt_agreement(a: dict) -> str:
  parts = []
  if "prompt_ids_equal" in a:
    parts.append("prompt ids " + ("equal" if a["prompt_ids_equal"] else "DIFFER"))
  if "image_tokens_equal" in a:
    counts = "/".join(str(n) for n in a["image_tokens"])
    parts.append(f"image tokens ({counts}) " + ("equal" if a["image_tokens_equal"] else "DIFFER"))
  for key in ("pixels", "features", "logits", "resid", "attn"):
    if key in a:
      parts.append(f"{key} {a[key]:.1e}")
  return ", ".join(parts)


def print_report(results: dict, stages: dict, meta: dict) -> None:
  print()
  print(f"non-native image-to-logits: {meta['model']}; batch {meta['batch']} x {meta['image']} "
        f"image + prompt = {meta['tokens']} tokens ({meta['image_tokens']} image tokens, "
        f"{meta['views']} view(s) per image), float32, {meta['threads']} thread(s), "
        f"{meta['repeats']} timed calls each (median, min in parentheses)")
  print_timing_tables(results, "agreement with torch (max rel err)",
                      lambda r: _fmt_agreement(r["agreement"]))
  compile_s = meta["first_prepare_compile"]
  print(f"1st call: the excluded warm-up (ours includes the forward's trace, lower and compile; "
        f"the tower's and projector's were in the first prepare before these: "
        f"{meta['first_prepare_s']:.1f}s, of which trace + lower "
        f"{compile_s['trace_s'] + compile_s['lower_s']:.1f}s, XLA compile "
        f"{compile_s['compile_s']:.1f}s). peak MiB: the resident-set high-water mark above the "
        "resident set before a timed call (max over calls)")
  if stages:
    print()
    print("where the time goes: each stage timed on its own (same batch)")
    print_time_table("stage", stages)
    print("pixels: ours processing.anyres (numpy + PIL), torch the image processor; vision+proj: "
          "ours jitted tower + projector (+ AnyRes packing; compile excluded), torch "
          "get_image_features; LM forward: logits from the prompt with the image features in place")
    header = f"{'stage':<13}| {'trace+lower s':>13} | {'XLA compile s':>13} | agreement"
    print(header)
    print("-" * len(header))
    for name, r in stages.items():
      o = r["ours"]
      print(f"{name:<13}| {o['trace_s'] + o['lower_s']:>13.2f} | {o['compile_s']:>13.2f} | "
            f"{_fmt_agreement(r['agreement']) or '-'}")
  print_load_note(meta)


# ------------------------------------------------------------------------------- the stages


def time_stages(args, vlm, torch_model, image_processor, images, torch_inputs, placeholder,
                meta) -> dict:
  """pixels / vision tower + projector / LM forward, each timed on its own."""
  import jax
  import numpy as np
  import torch

  from narrowgate_jax.models import anyres as pack
  from narrowgate_jax.processing import anyres
  from narrowgate_jax.processing.images import load_image

  side = vlm.images
  onevision = args.family == "llava_onevision"
  rgb = [load_image(x, index=n) for n, x in enumerate(images)]
  batch = vlm.prepare(images=images, prompts=[PROMPT] * len(images))
  with torch.inference_mode():
    inputs = torch_inputs()
    theirs_features = image_features(torch_model, inputs)

  def ours_pixels():  # one [V, S, S, 3] per image
    if onevision:
      return [anyres.anyres_views(x, side.spec) for x in rgb]
    return [anyres.llava_pixels(x, side.spec)[None] for x in rgb]

  def torch_pixels():
    return image_processor(images, return_tensors="pt")

  def check_pixels(theirs, ours):
    theirs = theirs["pixel_values"].numpy()
    theirs = theirs[:, None] if theirs.ndim == 4 else theirs  # LLaVA: one view per image
    theirs = np.concatenate([t[:len(o)] for t, o in zip(theirs, ours)])  # OneVision pads views
    return {"pixels": relative_error(np.concatenate(ours), np.moveaxis(theirs, 1, -1))}

  views = ours_pixels()
  aspect = getattr(side.hf_config, "vision_aspect_ratio", None)  # OneVision's anyres_max_9

  def ours_vision():
    # The image reader's own tower and projector calls (as in its `spans`), then AnyRes packing.
    features = side._project(side._tower_features(np.concatenate(views)))
    if not onevision:
      return list(features)
    packed, start = [], 0
    for image, v in zip(rgb, views):
      layout = anyres.anyres_layout(image.height, image.width, side.spec, side.tower.grid_side,
                                    args.family, vision_aspect_ratio=aspect)
      packed.append(np.asarray(pack.pack_features(features[start:start + len(v)], layout,
                                                  side.params["newline"])))
      start += len(v)
    return packed

  def torch_vision():
    with torch.inference_mode():
      return image_features(torch_model, inputs)

  def check_vision(theirs, ours):
    return {"features": relative_error(np.concatenate(ours),
                                       np.concatenate([f.float().numpy() for f in theirs]))}

  with torch.inference_mode():
    ids = torch.as_tensor(placeholder_ids(batch, placeholder), dtype=torch.long)
    embeds = torch_model.get_input_embeddings()(ids)
    embeds[ids == placeholder] = torch.cat(theirs_features).to(embeds.dtype)
  mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)

  def torch_lm():
    with torch.inference_mode():
      return torch_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)

  def ours_lm():
    return jax.block_until_ready(vlm.forward(batch))

  def check_lm(theirs, ours):
    return output_agreement(ours, theirs, np.asarray(batch.attention_mask))

  calls = {"pixels": (torch_pixels, ours_pixels, check_pixels),
           "vision+proj": (torch_vision, ours_vision, check_vision),
           "LM forward": (torch_lm, ours_lm, check_lm)}
  stages = {}
  for name in STAGES:
    t0 = time.perf_counter()
    call_torch, call_ours, check = calls[name]
    stages[name] = r = measure(call_torch, call_ours, check, args.repeats)
    print(f"  stage {name}: torch {r['torch']['median_ms']:.1f} ms, ours "
          f"{r['ours']['median_ms']:.1f} ms ({r['ratio_median']:.2f}x); "
          f"{_fmt_agreement(r['agreement'])} [{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])
  return stages


# ------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = start_process(args.threads)

  import jax
  import numpy as np
  import torch

  import narrowgate_jax as ng

  torch.set_num_threads(threads)
  env = environment(args, threads)

  images, prompts = benchmark_inputs(args)
  (torch_model, image_processor, processor), vlm, load_times = build_convert_load(
      lambda hf_dir: build_checkpoint(args, hf_dir), "ng_bench_nonnative_")
  vision_params = sum(p.numel() for n, p in torch_model.named_parameters()
                      if "vision_tower" in n or "multi_modal_projector" in n)
  lm_params = sum(p.numel() for p in torch_model.parameters()) - vision_params
  print(f"{vlm}, LM {lm_params / 1e6:.1f}M parameters, vision tower + projector "
        f"{vision_params / 1e6:.1f}M; {load_times}")

  placeholder = torch_model.config.image_token_id
  # The first prepare compiles the tower and projector; it comes before the timed settings
  # because OneVision's torch side takes its prompt ids.
  with CompileTimes() as first_compile:
    t0 = time.perf_counter()
    batch0 = vlm.prepare(images=images, prompts=prompts)
    first_prepare_s = time.perf_counter() - t0
  torch_inputs = torch_inputs_call(processor, image_processor, images, prompts, batch0,
                                   placeholder)
  pixel_values = torch_inputs()["pixel_values"]
  family = {"llava": "LLaVA-1.5 (CLIP + Llama)", "llava_onevision": "OneVision (SigLIP + Qwen2)"}
  meta = {
      "family": args.family,
      "model": (f"{family[args.family]} D={args.hidden} L={args.layers} N={args.heads} "
                f"K={args.kv_heads} F={args.intermediate} V={args.vocab}, tower "
                f"{args.vision_hidden} wide x {args.vision_layers} layers, {args.vision_heads} "
                f"heads, MLP {args.vision_intermediate}, {args.image_side}px / patch {args.patch}"),
      "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
      "vision_hidden": args.vision_hidden, "vision_layers": args.vision_layers,
      "vision_heads": args.vision_heads, "vision_intermediate": args.vision_intermediate,
      "image_side": args.image_side, "patch": args.patch,
      "lm_parameters": lm_params, "vision_parameters": vision_params,
      "batch": args.batch, "image": f"{args.image_size[0]}x{args.image_size[1]}",
      "pixel_values": list(pixel_values.shape),
      "views": int(pixel_values.shape[1]) if pixel_values.ndim == 5 else 1,
      "first_prepare_s": first_prepare_s, "first_prepare_compile": first_compile.seconds,
      "tokens": int(batch0.shape[1]),
      "image_tokens": int(np.asarray(batch0.feature_mask)[0].sum()),
      **env,
  }
  print(f"pixel values {meta['pixel_values']}, {meta['tokens']} tokens per prompt of which "
        f"{meta['image_tokens']} image tokens; our first prepare {first_prepare_s:.1f}s (trace + "
        f"lower {first_compile.seconds['trace_s'] + first_compile.seconds['lower_s']:.1f}s, XLA "
        f"compile {first_compile.seconds['compile_s']:.1f}s)")

  # ------------------------------------------------------------------------ the three settings

  def torch_prepare():
    with torch.inference_mode():
      inputs = torch_inputs()
      return inputs, image_features(torch_model, inputs)

  def ours_prepare():
    return vlm.prepare(images=images, prompts=prompts)

  def check_prepare(theirs, batch):
    inputs, features = theirs
    out = ids_agreement(batch, inputs, placeholder) if processor is not None else {}
    out.update(features_agreement(batch, features))
    return out

  def torch_forward(**kwargs):
    def call():
      with torch.inference_mode():
        inputs = torch_inputs()
        return inputs, torch_model(**inputs, use_cache=False, **kwargs)
    return call

  def ours_forward(capture):
    def call():
      batch = vlm.prepare(images=images, prompts=prompts)
      return batch, jax.block_until_ready(vlm.forward(batch, capture=capture))
    return call

  def check_forward(theirs, ours):
    (inputs, out_t), (batch, out_o) = theirs, ours
    out = ids_agreement(batch, inputs, placeholder) if processor is not None else {}
    out.update(output_agreement(out_o, out_t, np.asarray(batch.attention_mask)))
    return out

  calls = {
      "prepare": (torch_prepare, ours_prepare, check_prepare),
      "logits": (torch_forward(), ours_forward(ng.Capture()), check_forward),
      "+resid+attn": (torch_forward(output_hidden_states=True, output_attentions=True),
                      ours_forward(ng.Capture(resid=True, attn=True)), check_forward),
  }
  # Only the language model's probabilities are asked for: its attention alone goes eager.
  eager_lm = {"text_config": "eager", "vision_config": "sdpa"}
  results = {}
  meta["load_average"] = [os.getloadavg()[0]]
  for name in args.settings:
    t0 = time.perf_counter()
    torch_model.set_attn_implementation(eager_lm if name == "+resid+attn" else "sdpa")
    call_torch, call_ours, check = calls[name]
    results[name] = r = measure(call_torch, call_ours, check, args.repeats)
    torch_model.set_attn_implementation("sdpa")
    print(f"  {name}: torch {r['torch']['median_ms']:.1f} ms, ours {r['ours']['median_ms']:.1f} ms"
          f" ({r['ratio_median']:.2f}x); {_fmt_agreement(r['agreement'])} "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])

  stages = {}
  if args.breakdown:
    stages = time_stages(args, vlm, torch_model, image_processor, images, torch_inputs,
                         placeholder, meta)

  print_report(results, stages, meta)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results, "stages": stages}, f, indent=2)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
