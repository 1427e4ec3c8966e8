"""Training a small Chameleon VQ image tokenizer from scratch, as a VQ-VAE.

The tokenizer is `chameleon_vq.ChameleonVQTokenizer` unchanged (encoder, quant_conv, codebook),
so the trained `params["tokenizer"]` tree works with `chameleon_vq.encode_codes` and exports to a
transformers ChameleonVQVAE by `chameleon_vq.vq_tensor_sources`. A small conv decoder (`Decoder`,
mirroring the encoder) turns quantised latents back into pixels; it exists only to give the
encoder a reconstruction target and is dropped after training (transformers' ChameleonVQVAE has
no decoder to export it to).

Loss (van den Oord et al. 2017), with z the latents after quant_conv and q = codebook[argmin]:
  recon MSE(decoder(z + sg(q - z)), pixels) + |q - sg(z)|² + beta |sg(q) - z|²
The straight-through term z + sg(q - z) is q in value and z in gradient, so the reconstruction
gradient reaches the encoder; the codebook only learns from its own term. (transformers'
ChameleonVQVAEVectorQuantizer puts beta on the other term, as taming-transformers' legacy code
did; we follow the paper, beta on the commitment term.)

Training runs in phases, each one call of `training.loop.train` (its own optimiser state,
warmup and decay, checkpoints in workdir/<phase>):
  autoencoder  `pretrain_steps` without the quantiser (decoder(z), MSE only). From scratch the
               quantised model sits for a long time at the mean image: the decoder ignores codes
               that carry nothing yet, and the codebook and commitment terms pull the latents
               together, so few codes survive. A short warm-up gives latents worth clustering.
  (seeding)    the codebook becomes k-means centres (k-means++ seeds, a few Lloyd steps) of the
               warmed-up encoder's latents on `init_sample` training images: every entry starts
               where latents are.
  vq_1 .. vq_R the VQ-VAE loss, `steps` in all over `rounds`. Between rounds, entries no position
               of the round's last `reseed_window` batches picked are re-seeded from those
               batches' latents (`reseed_dead`), D²-sampled against the live entries so they land
               where the codebook fits the data worst.
Seeding and re-seeding replace parameter values, which a pure loss function cannot do, hence the
phases. A fresh optimiser per phase is what a re-seeded entry needs anyway: Adam's moments for it
describe the dead entry's old trajectory. Every choice is a function of (seed, phase), so two
runs with the same seed give identical parameters, and a resumed run recomputes the same seeds.

Axis legend of the einsum strings and shapes:
  B batch · H, W image rows, columns · Y, X latent grid rows, columns · C channels ·
  M flattened latent positions (B·Y·X) · E code width (embed_dim) · N codebook entries
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.models import chameleon_vq as cv
from narrowgate_jax.models import vq_common
from narrowgate_jax.models.vq_common import ResnetBlock
from narrowgate_jax.processing.images import ChameleonImageSpec

# ---------------------------------------------------------------------------------- configs


def organism_vq_config(image_size: int = 32) -> cv.ChameleonVQConfig:
  """The tiny organism's tokenizer: `image_size` px -> an (image_size/4)² grid of codes.

  base_channels 32 is the least GroupNorm(32) allows; (1, 2, 2) gives two stride-2 downsamples
  (32 px -> 8x8 = 64 image tokens, each code a 4x4 patch seen with a wider receptive field).
  One block per level and attention only in the middle (Chameleon's `attn_type` "vanilla"; the
  only other value, None, is refused by transformers' strict config) keep a step cheap on CPU.
  16-wide codes and 64 entries (64 image-token ids in the organism's vocabulary): one shape on
  grey needs background codes, a fill code per colour and per-colour edge and corner codes for
  four shapes at two sizes, a few dozen in all. Trained on the organism's 480 images, 57-61 of
  the 64 are in use (perplexity 12-22: most positions are background).
  """
  return cv.ChameleonVQConfig(
      embed_dim=16, num_embeddings=64, latent_channels=16, resolution=image_size,
      base_channels=32, channel_multiplier=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
      attn_type="vanilla")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The training-only decoder (`Decoder`): as many levels as the encoder, one width."""

  channels: int = 32
  num_levels: int = 3
  num_res_blocks: int = 1
  out_channels: int = 3


@dataclasses.dataclass(frozen=True)
class VQTrainConfig:
  """Hyper-parameters of `train_tokenizer` (frozen, hashable: a static jit argument).

  pretrain_steps: autoencoder warm-up steps (0: seed the codebook from the random encoder).
  steps: VQ steps in all, split evenly over `rounds` phases; dead codes are re-seeded after
    every round but the last. A code is dead when no position of the images of the round's last
    `reseed_window` batches picks it.
  init_sample / kmeans_iterations: images whose latents seed the codebook, Lloyd steps after
    the k-means++ seeds.
  eval_sample: images the returned metrics are measured on.
  decoder_channels / decoder_res_blocks: the training-only decoder (`Decoder`).
  The learning-rate fields are `loop.TrainConfig`'s, for every phase.

  Defaults: on 2 CPU cores a step of 16 images at 32 px costs about a fifth of a second, most of
  it in the encoder's full-resolution convolutions' gradients; at a fixed budget, batches of 16
  reconstructed far better than batches of 32 for half the steps, and learning rates of 5e-3
  and up sometimes stall at the mean image, hence 2e-3. 360 steps in all fit the organism's
  budget (well under two minutes, three compilations included).
  """

  steps: int = 200
  pretrain_steps: int = 160
  batch_size: int = 16
  learning_rate: float = 2e-3
  warmup_steps: int = 20
  end_lr_fraction: float = 0.1
  grad_clip: float = 1.0
  beta: float = 0.25
  rounds: int = 2
  reseed_window: int = 16
  init_sample: int = 256
  kmeans_iterations: int = 10
  eval_sample: int = 1024
  decoder_channels: int = 32
  decoder_res_blocks: int = 1
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 200

  def decoder_config(self, vq_config: cv.ChameleonVQConfig) -> DecoderConfig:
    """The decoder mirroring `vq_config`'s levels, `decoder_channels` wide."""
    return DecoderConfig(channels=self.decoder_channels, num_levels=vq_config.num_levels,
                         num_res_blocks=self.decoder_res_blocks,
                         out_channels=vq_config.in_channels)


# ------------------------------------------------------------------------------------ data


def pixel_values(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: ChameleonImageProcessor's rescale and
  normalise (x * 0.0078 in float64, cast to float32, minus mean 1, over std 1: [-1, 0.989]).

  No resize or crop: the images are already the tokenizer's size.
  """
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
  spec = ChameleonImageSpec()
  x = (images.astype(np.float64) * spec.rescale).astype(np.float32)
  x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> np.ndarray:
  """int [batch_size]: the images of global step `step`, a pure function of (step, seed).

  Epoch e visits every image once in a permutation seeded by (seed, e); the batch_size //
  num_images + 1 epochs a step can straddle are concatenated, so any batch size works.
  """
  start = step * batch_size
  first, last = start // num_images, (start + batch_size - 1) // num_images
  order = np.concatenate([np.random.default_rng((seed, e)).permutation(num_images)
                          for e in range(first, last + 1)])
  offset = start - first * num_images
  return order[offset:offset + batch_size]


# ---------------------------------------------------------------------------------- decoder


def upsample_nearest(x: jax.Array) -> jax.Array:
  """x [B, Y, X, C] -> [B, 2Y, 2X, C], each pixel repeated into a 2x2 block."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Decoder(nn.Module):
  """Quantised latents [B, Y, X, E] -> pixels [B, Y·2^(L-1), X·2^(L-1), out_channels].

  The encoder reversed, at one width C: conv_in to C, a middle block, then for each level but
  the first (last level first) `num_res_blocks` blocks, a nearest x2 upsample and a 3x3 conv;
  then SiLU and conv_out. Two departures from a literal mirror, both for this tiny width:
    * no blocks at full resolution: they would be the costliest part of a step, and the 3x3
      conv after the last upsample is enough to paint flat shapes;
    * no GroupNorm before conv_out: with C = 32 = GROUPS each channel would be normalised on
      its own over the image, erasing the absolute grey level of the background.
  No output squashing: targets lie in [-1, 0.989].
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self, z):
    c = self.config
    x = vq_common.conv(c.channels, (3, 3), "conv_in")(z)
    x = ResnetBlock(c.channels, name="mid")(x)
    for level in reversed(range(1, c.num_levels)):
      for i in range(c.num_res_blocks):
        x = ResnetBlock(c.channels, name=f"up_{level}_block_{i}")(x)
      x = vq_common.conv(c.channels, (3, 3), f"up_{level}_upsample")(upsample_nearest(x))
    return vq_common.conv(c.out_channels, (3, 3), "conv_out")(nn.silu(x))


# ----------------------------------------------------------------------------------- params


def init_params(vq_config: cv.ChameleonVQConfig, decoder_config: DecoderConfig,
                seed: int) -> dict:
  """{"tokenizer": ChameleonVQTokenizer params, "decoder": Decoder params}, random (seeded).

  The codebook here is flax's N(0, 1) init; `train_tokenizer` replaces it with k-means seeds
  from the encoder's latents before training.
  """
  return _init_params(jax.random.key(seed), vq_config, decoder_config)


@functools.partial(jax.jit, static_argnames=("vq_config", "decoder_config"))
def _init_params(key: jax.Array, vq_config: cv.ChameleonVQConfig,
                 decoder_config: DecoderConfig) -> dict:
  # Jitted: flax's init run eagerly compiles every operation on its own (seconds on CPU).
  size = vq_config.resolution
  tok_key, dec_key = jax.random.split(key)
  pixels = jnp.zeros((1, size, size, vq_config.in_channels), jnp.float32)
  tokenizer = cv.ChameleonVQTokenizer(vq_config).init(tok_key, pixels)["params"]
  grid = size // 2 ** (vq_config.num_levels - 1)
  z = jnp.zeros((1, grid, grid, vq_config.embed_dim), jnp.float32)
  decoder = Decoder(decoder_config).init(dec_key, z)["params"]
  return {"tokenizer": tokenizer, "decoder": decoder}


# ------------------------------------------------------------------------------------- loss


def code_statistics(codes: jax.Array, num_embeddings: int) -> dict:
  """codes [...] int -> {"usage": fraction of entries used, "perplexity": exp(entropy) of the
  code frequencies (the effective number of codes)}."""
  counts = jnp.bincount(codes.reshape(-1), length=num_embeddings)
  freq = counts / jnp.maximum(jnp.sum(counts), 1)
  entropy = -jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.where(freq > 0, freq, 1.0)), 0.0))
  return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}


def vq_loss(params: dict, pixels: jax.Array, rng: jax.Array, *, vq_config: cv.ChameleonVQConfig,
            train_config: VQTrainConfig) -> tuple[jax.Array, dict]:
  """pixels [B, 3, H, W] in Chameleon's normalisation -> (scalar loss, metrics).

  `rng` is unused (no dropout or noise); it is in the signature `training.loop.train` calls.
  Metrics: recon_mse, codebook_loss, commit_loss (each a mean over elements), and the batch's
  code usage and perplexity.
  """
  del rng
  x = jnp.transpose(jnp.asarray(pixels, jnp.float32), (0, 2, 3, 1))  # NCHW -> NHWC
  out = cv.ChameleonVQTokenizer(vq_config).apply({"params": params["tokenizer"]}, x)
  z, codes = out["latents"], out["codes"]
  codebook = params["tokenizer"]["quantize"]["embedding"]
  # argmin has no gradient; the lookup has one, to the chosen entries only.
  q = codebook[codes].reshape(z.shape)  # [B, Y, X, E]
  codebook_loss = jnp.mean(jnp.square(q - jax.lax.stop_gradient(z)))
  commit_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(q) - z))
  z_st = z + jax.lax.stop_gradient(q - z)
  recon = Decoder(train_config.decoder_config(vq_config)).apply({"params": params["decoder"]},
                                                                 z_st)
  recon_mse = jnp.mean(jnp.square(recon - x))
  loss = recon_mse + codebook_loss + train_config.beta * commit_loss
  metrics = {"recon_mse": recon_mse, "codebook_loss": codebook_loss, "commit_loss": commit_loss,
             **code_statistics(codes, vq_config.num_embeddings)}
  return loss, metrics


def autoencoder_loss(params: dict, pixels: jax.Array, rng: jax.Array, *,
                     vq_config: cv.ChameleonVQConfig,
                     train_config: VQTrainConfig) -> tuple[jax.Array, dict]:
  """The warm-up objective: `vq_loss` without the quantiser (decoder(z), MSE only).

  pixels [B, 3, H, W] -> (recon MSE, {"recon_mse"}). The codebook gets no gradient.
  """
  del rng
  x = jnp.transpose(jnp.asarray(pixels, jnp.float32), (0, 2, 3, 1))  # NCHW -> NHWC
  z = cv.ChameleonVQTokenizer(vq_config).apply({"params": params["tokenizer"]}, x)["latents"]
  recon = Decoder(train_config.decoder_config(vq_config)).apply({"params": params["decoder"]}, z)
  recon_mse = jnp.mean(jnp.square(recon - x))
  return recon_mse, {"recon_mse": recon_mse}


# --------------------------------------------------------------------------- codebook seeds


def kmeans_pp(points: np.ndarray, count: int, seed: int,
              centres: Optional[np.ndarray] = None) -> np.ndarray:
  """`count` rows of points [M, E] by k-means++ D² sampling -> [count, E] float32.

  Each new row is drawn with probability proportional to its squared distance to the nearest
  row chosen so far, or to one of `centres` [K, E] (kept fixed, not returned) when given; with no
  centres the first row is uniform. Seeded numpy, so deterministic. Points on a chosen row have
  weight 0, so a duplicate is drawn only once every distinct point is taken.
  """
  rng = np.random.default_rng(seed)
  x = np.asarray(points, np.float64)
  chosen = []
  if centres is not None and len(centres):
    dist = np.full(len(x), np.inf)
    for c in np.asarray(centres, np.float64):  # one [M] pass per centre: no [M, K] array
      dist = np.minimum(dist, np.sum((x - c) ** 2, axis=1))
  else:
    chosen.append(int(rng.integers(len(x))))
    dist = np.sum((x - x[chosen[0]]) ** 2, axis=1)
  while len(chosen) < count:
    total = dist.sum()
    # Every point coincides with a chosen one: uniform draws (duplicates are unavoidable).
    i = int(rng.choice(len(x), p=dist / total)) if total > 0 else int(rng.integers(len(x)))
    chosen.append(i)
    dist = np.minimum(dist, np.sum((x - x[i]) ** 2, axis=1))
  return x[chosen].astype(np.float32)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """points [M, E], centres [K, E] -> int [M]: each point's nearest centre (first of ties)."""
  dist = (np.sum(points**2, axis=1, keepdims=True) + np.sum(centres**2, axis=1)
          - 2 * np.einsum("ME,KE->MK", points, centres))
  return np.argmin(dist, axis=1)


def kmeans(points: np.ndarray, count: int, seed: int, iterations: int) -> np.ndarray:
  """k-means++ seeds, then `iterations` Lloyd steps -> centres [count, E] float32.

  A centre whose cluster empties keeps its place.
  """
  x = np.asarray(points, np.float64)
  centres = kmeans_pp(x, count, seed).astype(np.float64)
  for _ in range(iterations):
    assign = _nearest(x, centres)
    sums = np.zeros_like(centres)
    np.add.at(sums, assign, x)
    counts = np.bincount(assign, minlength=count)[:, None]
    centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
  return centres.astype(np.float32)


def reseed_dead(codebook: np.ndarray, latents: np.ndarray, codes: np.ndarray,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """codebook [N, E], the window's latents [M, E] and codes [...] -> (codebook, dead indices).

  An entry is dead when no code of the window is it. Dead entries become latents of the window
  D²-sampled against the live entries (k-means++ continued), so they land where the live codebook
  fits the data worst; live entries are unchanged. A new array; the input is not modified.
  """
  codebook = np.array(codebook, np.float32)
  live = np.zeros(len(codebook), bool)
  live[np.unique(np.asarray(codes))] = True
  dead = np.flatnonzero(~live)
  if len(dead):
    codebook[dead] = kmeans_pp(latents, len(dead), seed, centres=codebook[live])
  return codebook, dead


def with_codebook(params: dict, codebook: np.ndarray) -> dict:
  """`params` with tokenizer/quantize/embedding replaced (a new tree; the input is not changed)."""
  tokenizer = {**params["tokenizer"], "quantize": {"embedding": jnp.asarray(codebook,
                                                                              jnp.float32)}}
  return {**params, "tokenizer": tokenizer}


# ------------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("vq_config", "decoder_config"))
def _encode_chunk(params: dict, pixels: jax.Array, vq_config: cv.ChameleonVQConfig,
                  decoder_config: DecoderConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """pixels [B, 3, H, W] -> (latents [B·Y·X, E], codes [B, Y·X], squared error of the
  reconstruction per image [B], summed over pixels and channels)."""
  out = cv.encode(params["tokenizer"], vq_config, pixels)
  b, y, x, e = out["latents"].shape
  q = params["tokenizer"]["quantize"]["embedding"][out["codes"]].reshape(b, y, x, e)
  recon = Decoder(decoder_config).apply({"params": params["decoder"]}, q)
  target = jnp.transpose(pixels, (0, 2, 3, 1))
  return (out["latents"].reshape(b * y * x, e), out["codes"],
          jnp.sum(jnp.square(recon - target), axis=(1, 2, 3)))


def encode_dataset(params: dict, vq_config: cv.ChameleonVQConfig, decoder_config: DecoderConfig,
                   pixels: np.ndarray, chunk: int = 256) -> dict:
  """pixels [N, 3, H, W] -> {"latents" [N·Y·X, E], "codes" [N, Y·X] int32, "recon_mse" float}.

  Runs in chunks of `chunk` images, the last one padded by repeating an image, so a single
  shape is compiled however many images there are; padding rows are dropped.
  """
  latents, codes, sq_err = [], [], []
  for start in range(0, len(pixels), chunk):
    part = pixels[start:start + chunk]
    n = len(part)
    if n < chunk:
      part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
    lat, cod, err = _encode_chunk(params, part, vq_config, decoder_config)
    per_image = lat.shape[0] // chunk
    latents.append(np.asarray(lat[:n * per_image]))
    codes.append(np.asarray(cod[:n]))
    sq_err.append(np.asarray(err[:n], np.float64))
  return {"latents": np.concatenate(latents), "codes": np.concatenate(codes),
          "recon_mse": float(np.concatenate(sq_err).sum() / pixels[0].size / len(pixels))}


def codebook_metrics(codes: np.ndarray, num_embeddings: int) -> dict:
  """codes [...] -> {"usage", "perplexity", "used_codes"} as Python numbers."""
  stats = code_statistics(jnp.asarray(codes), num_embeddings)
  return {"usage": float(stats["usage"]), "perplexity": float(stats["perplexity"]),
          "used_codes": int(len(np.unique(codes)))}


# --------------------------------------------------------------------------------- training

SETTINGS_FILE = "vq_settings.json"
# What a derived seed is for: each gets its own stream from (seed, purpose, round).
_SAMPLE, _INIT, _TRAIN, _RESEED = 0, 1, 2, 3


def _derived_seed(seed: int, purpose: int, round_index: int = 0) -> int:
  return int(np.random.default_rng((seed, purpose, round_index)).integers(2**31))


def _phase_batch(step: int, *, pixels: np.ndarray, first: int, batch_size: int,
                 seed: int) -> np.ndarray:
  """A phase's step -> pixels [batch_size, 3, H, W] of global step first + step."""
  return pixels[batch_indices(first + step, len(pixels), batch_size, seed)]


def _sample(n: int, size: int, seed: int, purpose: int) -> np.ndarray:
  """Sorted indices of min(size, n) of n images, a seeded choice."""
  return np.sort(np.random.default_rng(_derived_seed(seed, purpose)).permutation(n)[:size])


def _train_phase(loss_fn: Callable, params: dict, pixels: np.ndarray, first: int, steps: int,
                 c: VQTrainConfig, index: int, name: str, workdir: Optional[str],
                 progress: bool) -> tuple[dict, list, Callable]:
  """One `loop.train` call of `steps` steps from global step `first` -> (params, history,
  batch_at). Its step keys and checkpoints (workdir/<name>) are the phase's own."""
  from narrowgate_jax.training import loop  # late: the pure functions here need no optimiser

  batch_at = functools.partial(_phase_batch, pixels=pixels, first=first, batch_size=c.batch_size,
                               seed=c.seed)
  config = loop.TrainConfig(steps=steps, learning_rate=c.learning_rate,
                            warmup_steps=min(c.warmup_steps, steps),
                            end_lr_fraction=c.end_lr_fraction, grad_clip=c.grad_clip,
                            seed=_derived_seed(c.seed, _TRAIN, index), log_every=c.log_every,
                            checkpoint_every=c.checkpoint_every)
  phase_dir = None if workdir is None else os.path.join(workdir, name)
  result = loop.train(loss_fn, params, batch_at, config, phase_dir, progress=progress,
                      name=f"vq tokenizer: {name}")
  return result.params, result.history, batch_at


def _check_workdir(workdir: str, settings: dict) -> None:
  """Writes `settings` to workdir/vq_settings.json, or refuses a workdir whose stored settings
  differ (naming the fields): each phase's checkpoints only check the optimiser's config, and
  would otherwise restore parameters trained with another loss, codebook or image set."""
  from narrowgate_jax.runs.workdir import config_differences, write_json

  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SETTINGS_FILE)
  settings = json.loads(json.dumps(settings))  # as it reads back: tuples as lists
  if not os.path.exists(path):
    write_json(path, settings)
    return
  with open(path) as f:
    differences = config_differences(json.load(f), settings)
  if differences:
    raise ValueError(f"workdir {workdir} holds a tokenizer trained with other settings "
                     f"(stored != new: {'; '.join(differences[:5])}); use a new workdir")


def train_tokenizer(images_uint8: np.ndarray, vq_config: cv.ChameleonVQConfig,
                    train_config: VQTrainConfig, workdir: Optional[str] = None,
                    progress: bool = True, *, return_decoder: bool = False):
  """Trains the tokenizer on images_uint8 [N, H, W, 3] -> (tokenizer params, metrics).

  Phases (each a `loop.train` call): "autoencoder" (`pretrain_steps` without the quantiser),
  then the codebook is seeded by k-means on the encoder's latents of `init_sample` images, then
  "vq_1" .. "vq_<rounds>" (`steps` in all), dead codes re-seeded between them.

  Metrics, over `eval_sample` of the images with the final parameters: recon_mse, usage (the
  fraction of codebook entries used), used_codes, perplexity; `reseeded`: the dead codes
  re-seeded after each VQ round but the last; `history`: {phase name: its `train` history}.
  With `return_decoder`, a third value: the decoder's params. `workdir` (optional) gets one
  folder per phase, so an interrupted run resumes where it stopped: finished phases restore their
  last checkpoint, and the seeding between them, a pure function of those, is recomputed.
  """
  c = train_config
  pixels = pixel_values(images_uint8)
  if pixels.shape[1:] != (vq_config.in_channels, vq_config.resolution, vq_config.resolution):
    raise ValueError(f"images are {images_uint8.shape[1:3]} px, the tokenizer's resolution is "
                     f"{vq_config.resolution}")
  if not 1 <= c.rounds <= c.steps:
    raise ValueError(f"rounds ({c.rounds}) must be in [1, steps={c.steps}]")
  if workdir is not None:
    _check_workdir(workdir, {"vq_config": dataclasses.asdict(vq_config),
                             "train_config": dataclasses.asdict(c),
                             "images_sha256": hashlib.sha256(
                                 np.ascontiguousarray(images_uint8).tobytes()).hexdigest(),
                             "images_shape": list(images_uint8.shape)})
  decoder_config = c.decoder_config(vq_config)
  encode_all = functools.partial(encode_dataset, vq_config=vq_config,
                                 decoder_config=decoder_config)
  phase = functools.partial(_train_phase, pixels=pixels, c=c, workdir=workdir, progress=progress)
  history = {}

  params = init_params(vq_config, decoder_config, c.seed)
  if c.pretrain_steps:
    params, history["autoencoder"], _ = phase(
        functools.partial(autoencoder_loss, vq_config=vq_config, train_config=c), params,
        first=0, steps=c.pretrain_steps, index=0, name="autoencoder")
  sample = pixels[_sample(len(pixels), c.init_sample, c.seed, _SAMPLE)]
  params = with_codebook(params, kmeans(encode_all(params, pixels=sample)["latents"],
                                        vq_config.num_embeddings, _derived_seed(c.seed, _INIT),
                                        c.kmeans_iterations))

  loss_fn = functools.partial(vq_loss, vq_config=vq_config, train_config=c)
  bounds = [c.pretrain_steps + round(r * c.steps / c.rounds) for r in range(c.rounds + 1)]
  reseeded = []
  for r in range(c.rounds):
    steps = bounds[r + 1] - bounds[r]
    name = f"vq_{r + 1}"
    params, history[name], batch_at = phase(loss_fn, params, first=bounds[r], steps=steps,
                                            index=r + 1, name=name)
    if r + 1 < c.rounds:
      window = np.concatenate([batch_at(s) for s in range(max(0, steps - c.reseed_window),
                                                            steps)])
      encoded = encode_all(params, pixels=window)
      codebook, dead = reseed_dead(params["tokenizer"]["quantize"]["embedding"],
                                   encoded["latents"], encoded["codes"],
                                   _derived_seed(c.seed, _RESEED, r))
      params = with_codebook(params, codebook)
      reseeded.append(int(len(dead)))

  encoded = encode_all(params, pixels=pixels[_sample(len(pixels), c.eval_sample, c.seed,
                                                     _SAMPLE)])
  metrics = {"recon_mse": encoded["recon_mse"],
             **codebook_metrics(encoded["codes"], vq_config.num_embeddings),
             "reseeded": reseeded, "history": history}
  params = jax.tree.map(np.asarray, params)
  if return_decoder:
    return params["tokenizer"], metrics, params["decoder"]
  return params["tokenizer"], metrics
