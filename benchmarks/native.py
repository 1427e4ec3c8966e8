"""Image-to-logits speed of a native VLM (Chameleon, Emu3): ours against transformers, side by side.

  python benchmarks/native.py                       # Chameleon, the defaults below, on all cores
  python benchmarks/native.py --family emu3
  python benchmarks/native.py --repeats 3 --json /tmp/native.json
  python benchmarks/native.py --family emu3 --threads 1 --settings prepare,logits --no-breakdown

What is built (nothing is downloaded): a native VLM of --family is instantiated in code with a
seeded random init (norm weights perturbed, so a scale mix-up could not hide), written with
`save_pretrained` together with its tokenizer and image processor, converted with
`checkpoints_convert.convert.convert` and loaded with `ng.load`, as a user's checkpoint would be.
The transformers model that wrote the checkpoint is the reference. By default:
  language model  hidden 1024, 8 layers, 16 heads, 8 key/value heads, MLP 2816, vocabulary
                  32000 (the vocabulary map names every VQ code: Chameleon `IMGIMG...Z`, Emu3
                  `<|visual token NNNNNN|>`; the tokenizer is a word-level one, built like
                  tests/reference.py's, whose vocabulary is filled up to the vocabulary size).
  VQ tokenizer    Chameleon: VQ-GAN encoder, resolution 256, base channels 64, channel
                  multipliers (1, 2, 2, 4) (4 levels: 8x downsampling), 2 residual blocks per
                  level, attention at the lowest resolution (32), 8192 codes of dimension 256.
                  The image processor resizes the shortest edge to 256 and centre-crops 256x256:
                  32 x 32 = 1024 codes per image.
                  Emu3: the same widths and depth (4 levels: the processor assumes 8x), attention
                  width 256 at the last level, 8192 codes of dimension 4; images are repeated over
                  4 frames, as transformers does, and resized with min_pixels = max_pixels =
                  256*256 (aspect kept: a 320x280 image becomes 272x232 -> 34 x 29 codes, plus an
                  end-of-row token per row).
  The codebook is spread over the encoder's own latents of the benchmark images (farthest-point
  sampling, as tests/test_native.py does; the entries not needed are put far away), so every
  nearest-code decision is clear and the image token ids can be compared exactly.

What is timed, on a batch of --batch prompts "<image>What is in the picture? Answer:" with seeded
random 320x280 RGB PIL images (torch runs under `torch.inference_mode()` with `use_cache=False`;
ours is timed up to `jax.block_until_ready` on every output):
  prepare       ours:  vlm.prepare(images=..., prompts=...) -> a Batch whose input_ids hold the
                       image token ids: numpy/PIL preprocessing, the jitted VQ encoder, the
                       tokenizer and the family's image span.
                torch: processor(images=..., text=...) + model.model.get_image_tokens(pixel_values)
                       (so both sides end with the image token ids).
  logits        ours:  prepare + vlm.forward(batch).logits (Capture(): attention in causal query
                       blocks, no probabilities formed).
                torch: processor + model(**inputs).logits, the default "sdpa" attention (the VQ
                       encoder runs inside the forward).
  +resid+attn   ours:  prepare + vlm.forward(batch, capture=Capture(resid=True, attn=True)).
                torch: processor + model(**inputs, output_hidden_states=True,
                       output_attentions=True) with attn_implementation="eager".
With --breakdown (the default), the three stages are also timed on their own, to show where the
time goes: pixels (ours: `processing.images`, numpy + PIL; torch: the image processor),
VQ encoder (ours: the jitted encoder on those pixels; torch: get_image_tokens) and the language
model (ours: vlm.forward on the prepared batch; torch: model(input_ids with the image tokens in
place), no pixels).
The warm-up call (JAX: trace + compile + run; torch: the first call) is excluded. Then --repeats
timed calls alternate torch / ours. Reported, as in benchmarks/forward.py (whose helpers this
reuses): median and min wall time in ms, ratio = torch time / our time (> 1: ours is faster), the
median process CPU time per call, the time our warm-up spent tracing + lowering and in XLA's
compiler, peak memory per call, and the agreement: whether our prompt ids equal the processor's
(placeholders put back), whether our image token ids equal transformers' get_image_tokens
exactly, and max|ours - torch| / max|torch| of the logits over real positions and the entries
transformers does not suppress (Chameleon sets image-token logits to the dtype minimum; the
suppressed set must be the same on both sides), and of the residuals and attention probabilities.

Run time on 2 cores: about 1 minute to build, save, convert and load, then about 45 s (Chameleon)
or 60 s (Emu3) per timed repeat of all three settings and the breakdown: --repeats 3 (Chameleon)
and --repeats 2 (Emu3) each finish in about 3.5 minutes; the default of 5 takes 5-6 minutes.

--threads N (default: every core this process may use) restricts the whole process to N cores
(CPU affinity before JAX starts) and calls torch.set_num_threads(N). JAX runs on the CPU
(JAX_PLATFORMS=cpu unless set otherwise). Everything is float32 (the VQ encoder always is).
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
                                print_time_table, print_timing_tables, relative_error,
                                start_process)


SETTINGS = ("prepare", "logits", "+resid+attn")
STAGES = ("pixels", "VQ encoder", "LM forward")
PROMPT = "<image>What is in the picture? Answer:"
IMAGE_SIZE = (320, 280)  # width, height
EXTRA_WORDS = ("What", "Answer")  # the prompt's capitalised words, beyond tests/reference.WORDS


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--family", choices=("chameleon", "emu3"), default="chameleon")
  add_model_flags(p)
  p.add_argument("--batch", type=int, default=2, help="prompts (each with one image) B")
  p.add_argument("--codebook", type=int, default=8192, help="VQ codebook entries")
  p.add_argument("--vq_channels", type=int, default=64, help="VQ encoder base channels")
  p.add_argument("--vq_blocks", type=int, default=2, help="VQ residual blocks per level")
  p.add_argument("--image_side", type=int, default=256,
                 help="Chameleon: resize + crop size; Emu3: min_pixels = max_pixels = side^2")
  add_run_flags(p, SETTINGS)
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                 help="also time pixels / VQ encoder / LM forward on their own")
  args = check_args(p, p.parse_args(argv), SETTINGS)
  if args.image_side % 8:
    p.error("--image_side must be a multiple of 8 (the VQ encoder downsamples 8x)")
  return args


# ------------------------------------------------------------------------------- the models


def vocabulary_map(args) -> dict:
  """tests/reference.py's vocabulary (specials, words, the code names at the end), with the
  prompt's capitalised words and filler words up to the vocabulary size."""
  import reference as R

  if args.family == "chameleon":
    vmap = R._vocabulary_map(args.vocab, args.codebook)
  else:
    vmap = R.emu3_vocabulary_map(args.vocab, args.codebook)
  text_ids = args.vocab - args.codebook
  words = list(EXTRA_WORDS) + [f"word{i}" for i in range(text_ids)]
  free = [i for i in range(text_ids) if i not in set(vmap.values())]
  for word, index in zip((w for w in words if w not in vmap), free):
    vmap[word] = index
  assert sorted(vmap.values()) == list(range(args.vocab))
  return vmap


def _text_fields(args) -> dict:
  return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads,
              num_key_value_heads=args.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _multipliers() -> list[int]:
  return [1, 2, 2, 4]  # 4 levels: 8x downsampling


def chameleon_parts(args):
  """(config, tokenizer, image processor, processor call, model class)."""
  import transformers

  import reference as R

  side = args.image_side
  vq = dict(embed_dim=256, num_embeddings=args.codebook, latent_channels=256, resolution=side,
            base_channels=args.vq_channels, channel_multiplier=_multipliers(),
            num_res_blocks=args.vq_blocks, attn_resolutions=[side // 8])
  config = transformers.ChameleonConfig(**_text_fields(args), swin_norm=False, vq_config=vq,
                                        vocabulary_map=vocabulary_map(args))
  tokenizer = R.chameleon_tokenizer(config)
  image_processor = transformers.ChameleonImageProcessorPil(
      size={"shortest_edge": side}, crop_size={"height": side, "width": side})
  processor = transformers.ChameleonProcessor(image_processor, tokenizer,
                                              image_seq_length=(side // 8) ** 2)
  call = lambda images, text: processor(images=images, text=text, padding=True,  # noqa: E731
                                        return_for_text_completion=True, return_tensors="pt")
  return config, tokenizer, image_processor, call, transformers.ChameleonForConditionalGeneration


def emu3_parts(args):
  import transformers

  import reference as R

  width = args.vq_channels * _multipliers()[-1]
  vq = dict(embed_dim=4, codebook_size=args.codebook, latent_channels=4, double_latent=False,
            in_channels=3, out_channels=3, temporal_downsample_factor=4,
            base_channels=args.vq_channels, channel_multiplier=_multipliers(),
            num_res_blocks=args.vq_blocks, attn_resolutions=[3], hidden_size=width,
            num_attention_heads=1)
  config = transformers.Emu3Config(text_config=transformers.Emu3TextConfig(**_text_fields(args)),
                                   vq_config=vq, vocabulary_map=vocabulary_map(args))
  tokenizer = R.emu3_tokenizer(config)
  pixels = args.image_side ** 2
  image_processor = transformers.Emu3ImageProcessor(min_pixels=pixels, max_pixels=pixels)
  processor = transformers.Emu3Processor(image_processor, tokenizer)
  call = lambda images, text: processor(images=images, text=text, padding=True,  # noqa: E731
                                        return_tensors="pt")
  return config, tokenizer, image_processor, call, transformers.Emu3ForConditionalGeneration


def image_token_args(inputs) -> list:
  """get_image_tokens' arguments from the processor's output (Emu3 also takes image_sizes)."""
  return [inputs["pixel_values"]] + ([inputs["image_sizes"]] if "image_sizes" in inputs else [])


def spread_codebook(model, inputs) -> int:
  """Codebook entries from the encoder's own latents on `inputs` by farthest-point sampling (as
  tests/test_native.py's `_codebook_from_latents`), so every argmin is decisive: min(K, N / 2)
  entries for N latents; the other entries far outside the latents' ball, where none wins.
  Returns the number of entries spread over the latents."""
  import torch

  quantize = model.model.vqmodel.quantize
  seen = []
  hook = quantize.register_forward_pre_hook(lambda module, a: seen.append(a[0].detach()))
  with torch.no_grad():
    model.model.get_image_tokens(*image_token_args(inputs))
  hook.remove()
  latents = seen[0]
  weight = quantize.embedding.weight
  size, dim = weight.shape
  channels = 2 if latents.ndim == 5 else 1  # Emu3 quantises [B, T, C, H, W], Chameleon [B, C, H, W]
  latents = latents.movedim(channels, -1).reshape(-1, dim)
  used = max(1, min(size, latents.shape[0] // 2))
  chosen = [0]
  distance = torch.cdist(latents, latents[:1]).squeeze(1)
  for _ in range(used - 1):
    chosen.append(int(torch.argmax(distance)))
    distance = torch.minimum(distance, torch.cdist(latents, latents[chosen[-1:]]).squeeze(1))
  centre = latents.mean(0)
  radius = float(torch.linalg.vector_norm(latents - centre, dim=1).max())
  gen = torch.Generator().manual_seed(0)
  far = torch.randn(size - used, dim, generator=gen)
  far = centre + 10.0 * max(radius, 1.0) * far / torch.linalg.vector_norm(far, dim=1,
                                                                          keepdim=True)
  with torch.no_grad():
    weight.copy_(torch.cat([latents[chosen], far]))
  return used


def build_checkpoint(args, directory: str, images, prompts):
  """The seeded random model with its tokenizer and image processor, saved with save_pretrained;
  returns (torch model, processor call, image processor)."""
  import torch

  parts = chameleon_parts if args.family == "chameleon" else emu3_parts
  config, tokenizer, image_processor, call, model_class = parts(args)
  tokenizer.padding_side = "left"
  config._attn_implementation = "sdpa"
  torch.manual_seed(args.seed)
  model = model_class(config).float().eval()
  # Norm weights start at exactly 1 (biases at 0); perturb them so a scale mix-up could not hide.
  gen = torch.Generator().manual_seed(args.seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  args.codebook_used = spread_codebook(model, call(images, prompts))
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  image_processor.save_pretrained(directory)
  return model, call, image_processor


def benchmark_inputs(args):
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(args.seed)
  width, height = IMAGE_SIZE
  images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for _ in range(args.batch)]
  return images, [PROMPT] * args.batch


# ------------------------------------------------------------------------------ agreement


def image_positions(roles):
  from narrowgate_jax.processing.roles import select

  return select(["image", "image_break"], roles)  # Emu3's row ends are in get_image_tokens too


def flat_image_tokens(tokens):
  import numpy as np

  if isinstance(tokens, (list, tuple)):
    return np.concatenate([np.asarray(t).reshape(-1) for t in tokens])
  return np.asarray(tokens).reshape(-1)


def ids_agreement(batch, inputs, image_tokens, placeholder: int) -> dict:
  """Our prompt ids vs the processor's (our image ids put back to the placeholder), our image
  ids vs get_image_tokens; exact."""
  import numpy as np

  ids = np.asarray(batch.input_ids)
  image = image_positions(batch.roles)
  theirs = inputs["input_ids"].numpy()
  tokens = flat_image_tokens(image_tokens)
  prompt_equal = (ids.shape == theirs.shape
                  and bool(np.array_equal(np.where(image, placeholder, ids), theirs)))
  image_equal = ids[image].shape == tokens.shape and bool(np.array_equal(ids[image], tokens))
  out = {"prompt_ids_equal": prompt_equal, "image_ids_equal": image_equal,
         "image_tokens": int(tokens.size)}
  if not image_equal and ids[image].shape == tokens.shape:
    out["image_ids_differing"] = int(np.sum(ids[image] != tokens))
  return out


def logits_agreement(ours_logits, theirs_logits, mask) -> dict:
  """Max relative error over real positions and unsuppressed entries; suppression must match."""
  import numpy as np

  ours = np.asarray(ours_logits)
  theirs = theirs_logits.float().numpy()
  floor = np.finfo(np.float32).min
  suppressed = theirs <= floor
  keep = np.asarray(mask, bool)[..., None] & ~suppressed
  return {"logits": relative_error(ours[keep], theirs[keep]),
          "suppressed_equal": bool(np.array_equal(ours <= floor, suppressed))}


# ------------------------------------------------------------------------------- reporting


def _fmt_agreement(a: dict) -> str:
  parts = []
  if "prompt_ids_equal" in a:
    parts.append("prompt ids " + ("equal" if a["prompt_ids_equal"] else "DIFFER"))
  if "image_ids_equal" in a:
    parts.append(f"image ids ({a['image_tokens']}) " + (
        "equal" if a["image_ids_equal"]
        else f"DIFFER ({a.get('image_ids_differing', 'shape')})"))
  if "suppressed_equal" in a and not a["suppressed_equal"]:
    parts.append("suppressed logits DIFFER")
  for key in ("pixels", "logits", "resid", "attn"):
    if key in a:
      parts.append(f"{key} {a[key]:.1e}")
  return ", ".join(parts)


def print_report(results: dict, stages: dict, meta: dict) -> None:
  print()
  print(f"native image-to-logits: {meta['model']}; batch {meta['batch']} x {meta['image']} "
        f"image + prompt = {meta['tokens']} tokens ({meta['image_tokens']} image tokens), "
        f"float32, {meta['threads']} thread(s), {meta['repeats']} timed calls each "
        f"(median, min in parentheses)")
  print_timing_tables(results, "agreement with torch (max rel err)",
                      lambda r: _fmt_agreement(r["agreement"]))
  print("1st call: the excluded warm-up (ours includes trace, lower and compile: the VQ encoder's "
        "in `prepare`, then the forward's). peak MiB: the resident-set high-water mark above the "
        "resident set before a timed call (max over calls)")
  if stages:
    print()
    print("where the time goes: each stage timed on its own (same batch)")
    print_time_table("stage", stages)
    print("pixels: ours processing.images (numpy + PIL), torch the image processor; VQ encoder: "
          "ours jitted (compile excluded), torch get_image_tokens; LM forward: logits from the "
          "token ids, image tokens in place")
    header = f"{'stage':<13}| {'trace+lower s':>13} | {'XLA compile s':>13} | agreement"
    print(header)
    print("-" * len(header))
    for name, r in stages.items():
      o = r["ours"]
      print(f"{name:<13}| {o['trace_s'] + o['lower_s']:>13.2f} | {o['compile_s']:>13.2f} | "
            f"{_fmt_agreement(r['agreement']) or '-'}")
  print_load_note(meta)


# ------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = start_process(args.threads)

  import jax
  import numpy as np
  import torch

  import narrowgate_jax as ng
  from narrowgate_jax.models import chameleon_vq, emu3_vq
  from narrowgate_jax.models.native import ChameleonImages
  from narrowgate_jax.processing import images as im

  torch.set_num_threads(threads)
  env = environment(args, threads)

  images, prompts = benchmark_inputs(args)
  (torch_model, processor_call, image_processor), vlm, load_times = build_convert_load(
      lambda hf_dir: build_checkpoint(args, hf_dir, images, prompts), "ng_bench_native_")
  inner = torch_model.model
  vq_params = sum(p.numel() for p in inner.vqmodel.encoder.parameters()) + sum(
      p.numel() for p in inner.vqmodel.quant_conv.parameters()) + (
          inner.vqmodel.quantize.embedding.weight.numel())
  lm_params = sum(p.numel() for n, p in torch_model.named_parameters() if "vqmodel" not in n)
  print(f"{vlm}, LM {lm_params / 1e6:.1f}M parameters, VQ encoder + codebook "
        f"{vq_params / 1e6:.1f}M; {load_times}")

  placeholder = torch_model.model.vocabulary_mapping.image_token_id
  inputs0 = processor_call(images, prompts)
  meta = {
      "family": args.family,
      "model": (f"{args.family} D={args.hidden} L={args.layers} N={args.heads} K={args.kv_heads} "
                f"F={args.intermediate} V={args.vocab}, VQ base {args.vq_channels} x (1,2,2,4), "
                f"{args.vq_blocks} blocks/level, {args.codebook} codes"),
      "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
      "codebook": args.codebook, "codebook_spread": args.codebook_used,
      "vq_channels": args.vq_channels, "vq_blocks": args.vq_blocks,
      "lm_parameters": lm_params, "vq_encoder_parameters": vq_params,
      "batch": args.batch, "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}",
      "pixel_values": list(inputs0["pixel_values"].shape),
      "tokens": int(inputs0["input_ids"].shape[1]),
      "image_tokens": int((inputs0["input_ids"][0] == placeholder).sum()),
      **env,
  }
  print(f"pixel values {meta['pixel_values']}, {meta['tokens']} tokens per prompt of which "
        f"{meta['image_tokens']} image tokens; codebook spread over {args.codebook_used} of "
        f"{args.codebook} entries")
  del inputs0

  # ------------------------------------------------------------------------ the three settings

  def torch_prepare():
    with torch.inference_mode():
      inputs = processor_call(images, prompts)
      return inputs, torch_model.model.get_image_tokens(*image_token_args(inputs))

  def ours_prepare():
    return vlm.prepare(images=images, prompts=prompts)

  def check_prepare(theirs, batch):
    return ids_agreement(batch, theirs[0], theirs[1], placeholder)

  def torch_forward(**kwargs):
    def call():
      with torch.inference_mode():
        inputs = processor_call(images, prompts)
        return inputs, torch_model(**inputs, use_cache=False, **kwargs)
    return call

  def ours_forward(capture):
    def call():
      batch = vlm.prepare(images=images, prompts=prompts)
      return batch, jax.block_until_ready(vlm.forward(batch, capture=capture))
    return call

  def check_forward(theirs, ours):
    (inputs, out_t), (batch, out_o) = theirs, ours
    mask = np.asarray(batch.attention_mask)
    agreement = {"prompt_ids_equal": bool(np.array_equal(
        np.where(image_positions(batch.roles), placeholder, np.asarray(batch.input_ids)),
        inputs["input_ids"].numpy()))}
    agreement.update(logits_agreement(out_o.logits, out_t.logits, mask))
    if out_o.resid is not None:
      # transformers' last hidden state is after the final norm; ours is before it: 0..L-1.
      real = mask.astype(bool)
      hidden = np.stack([h.float().numpy() for h in out_t.hidden_states[:-1]])
      agreement["resid"] = relative_error(np.asarray(out_o.resid)[:-1][:, real], hidden[:, real])
    if out_o.attn is not None:
      agreement["attn"] = relative_error(out_o.attn, np.stack([a.float().numpy()
                                                               for a in out_t.attentions]))
    return agreement

  calls = {
      "prepare": (torch_prepare, ours_prepare, check_prepare),
      "logits": (torch_forward(), ours_forward(ng.Capture()), check_forward),
      "+resid+attn": (torch_forward(output_hidden_states=True, output_attentions=True),
                      ours_forward(ng.Capture(resid=True, attn=True)), check_forward),
  }
  results = {}
  meta["load_average"] = [os.getloadavg()[0]]
  for name in args.settings:
    t0 = time.perf_counter()
    torch_model.set_attn_implementation("eager" if name == "+resid+attn" else "sdpa")
    call_torch, call_ours, check = calls[name]
    results[name] = r = measure(call_torch, call_ours, check, args.repeats)
    torch_model.set_attn_implementation("sdpa")
    print(f"  {name}: torch {r['torch']['median_ms']:.1f} ms, ours {r['ours']['median_ms']:.1f} ms"
          f" ({r['ratio_median']:.2f}x); {_fmt_agreement(r['agreement'])} "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    meta["load_average"].append(os.getloadavg()[0])

  # ------------------------------------------------------------------------ the stages alone

  stages = {}
  if args.breakdown:
    side = vlm.images
    chameleon = isinstance(side, ChameleonImages)
    with torch.inference_mode():
      token_args = image_token_args(processor_call(images, prompts))
    batch = vlm.prepare(images=images, prompts=prompts)
    torch_ids = torch.as_tensor(np.asarray(batch.input_ids), dtype=torch.long)
    torch_mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)

    def ours_pixels():
      rgb = [im.load_image(x, index=n) for n, x in enumerate(images)]
      if chameleon:
        return np.stack([im.chameleon_pixels(x, side.spec) for x in rgb]), None
      return im.pad_to_batch([im.emu3_pixels(x, side.spec) for x in rgb])

    def torch_pixels():
      return image_processor(images, return_tensors="pt")

    ours_pix, ours_sizes = ours_pixels()

    def check_pixels(theirs, ours):
      return {"pixels": relative_error(ours[0], theirs["pixel_values"].numpy())}

    def ours_vq():
      if chameleon:
        return np.asarray(chameleon_vq.encode_codes(side.params, side.config, ours_pix))
      return emu3_vq.encode_codes(side.params, side.config, ours_pix, ours_sizes)

    def torch_vq():
      with torch.inference_mode():
        return torch_model.model.get_image_tokens(*token_args)

    def check_vq(theirs, ours):
      table = side.table
      if chameleon:
        ids = table[np.asarray(ours)].reshape(-1)
      else:  # get_image_tokens appends the end-of-row token to every row
        ids = np.concatenate([np.concatenate([table[g], np.full((g.shape[0], 1), side.eol_id)],
                                             axis=1).reshape(-1) for g in ours])
      tokens = flat_image_tokens(theirs)
      return {"image_ids_equal": ids.shape == tokens.shape and bool(np.array_equal(ids, tokens)),
              "image_tokens": int(tokens.size)}

    def torch_lm():
      with torch.inference_mode():
        return torch_model(input_ids=torch_ids, attention_mask=torch_mask, use_cache=False)

    def ours_lm():
      return jax.block_until_ready(vlm.forward(batch))

    def check_lm(theirs, ours):
      return logits_agreement(ours.logits, theirs.logits, np.asarray(batch.attention_mask))

    stage_calls = {"pixels": (torch_pixels, ours_pixels, check_pixels),
                   "VQ encoder": (torch_vq, ours_vq, check_vq),
                   "LM forward": (torch_lm, ours_lm, check_lm)}
    for name in STAGES:
      t0 = time.perf_counter()
      call_torch, call_ours, check = stage_calls[name]
      stages[name] = r = measure(call_torch, call_ours, check, args.repeats)
      print(f"  stage {name}: torch {r['torch']['median_ms']:.1f} ms, ours "
            f"{r['ours']['median_ms']:.1f} ms ({r['ratio_median']:.2f}x); "
            f"{_fmt_agreement(r['agreement'])} [{time.perf_counter() - t0:.0f}s]", flush=True)
      meta["load_average"].append(os.getloadavg()[0])

  print_report(results, stages, meta)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results, "stages": stages}, f, indent=2)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
