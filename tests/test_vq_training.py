"""Training the Chameleon VQ tokenizer (training/vq.py) on the shapes world.

One short training run of a one-level 8 px tokenizer (module fixture; every phase runs) on the
160 scenes of `data.shapes_world`, a second identical run (determinism, through a workdir) and a
third on the finished workdir (resume). The trained tokenizer is then loaded into transformers'
ChameleonVQVAE by the checkpoint table `chameleon_vq.vq_tensor_sources` read backwards, and its
codes must equal ours. The loss, the seeding and the re-seeding are checked on their own against
numpy. The organism's own config, trained with the defaults, and the probes that its codes carry
colour, shape, position and size take two minutes: `slow`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.chameleon.image_processing_pil_chameleon import (
    ChameleonImageProcessorPil)

from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.models import chameleon_vq as cv
from narrowgate_jax.training import vq

# One level at 8 px (an 8x8 grid, a code per pixel), 64 four-wide codes: every training step
# compiles once per phase, and compiling is most of this file's time, so the graph is kept small.
# The organism's three-level config is trained in the slow test.
CONFIG = cv.ChameleonVQConfig(embed_dim=4, num_embeddings=64, latent_channels=4, resolution=8,
                              base_channels=32, channel_multiplier=(1,), num_res_blocks=1)
# Every phase runs (autoencoder warm-up, two VQ rounds with a re-seed between), a few steps each;
# the re-seed window is one batch of 8 images, so that some codes are dead and re-seeded.
FAST = vq.VQTrainConfig(steps=8, pretrain_steps=4, rounds=2, batch_size=8, warmup_steps=1,
                        init_sample=64, eval_sample=160, reseed_window=1, log_every=1, seed=0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  # [160, 8, 8, 3] uint8: the world's smallest rendering, every other pixel
  return np.ascontiguousarray(world.render_batch(world.ALL_SCENES, 16)[:, ::2, ::2])


@pytest.fixture(scope="module")
def trained(images):
  tokenizer, metrics, decoder = vq.train_tokenizer(images, CONFIG, FAST, progress=False,
                                                   return_decoder=True)
  return {"tokenizer": tokenizer, "decoder": decoder, "metrics": metrics}


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _trees_equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b))))


# ------------------------------------------------------------------------------ pure pieces


def test_pixel_values_are_the_chameleon_processors(images):
  """x * 0.0078 - 1 in [N, 3, H, W], as transformers' processor (no resize or crop) gives."""
  ours = vq.pixel_values(images[:4])
  processor = ChameleonImageProcessorPil(do_resize=False, do_center_crop=False)
  theirs = processor(list(images[:4]), return_tensors="np")["pixel_values"]
  assert ours.dtype == np.float32 and ours.shape == (4, 3, 8, 8)
  np.testing.assert_array_equal(ours, theirs)
  ends = vq.pixel_values(np.array([[[[0, 128, 255]]]], np.uint8))[:, :, 0, 0]
  np.testing.assert_allclose(ends, [[-1.0, 128 * 0.0078 - 1, 255 * 0.0078 - 1]], atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    vq.pixel_values(images.astype(np.float32))


def test_batches_are_pure_in_the_step_and_cover_every_epoch():
  first = [vq.batch_indices(s, 10, 4, seed=3) for s in range(5)]  # 20 images = 2 epochs
  again = [vq.batch_indices(s, 10, 4, seed=3) for s in (4, 2, 0, 3, 1)]
  for s, b in zip((4, 2, 0, 3, 1), again):
    np.testing.assert_array_equal(b, first[s])
  flat = np.concatenate(first)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:])  # each epoch its own order
  assert not np.array_equal(vq.batch_indices(0, 10, 4, seed=4), first[0])


def test_kmeans_pp_picks_distinct_data_points_deterministically():
  points = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
  points[100:] = points[:100]  # every point twice: duplicates must not be picked twice
  picked = vq.kmeans_pp(points, 50, seed=1)
  rows = {tuple(p) for p in points}
  assert picked.shape == (50, 4) and all(tuple(p) in rows for p in picked)
  assert len({tuple(p) for p in picked}) == 50
  np.testing.assert_array_equal(picked, vq.kmeans_pp(points, 50, seed=1))
  assert not np.array_equal(picked, vq.kmeans_pp(points, 50, seed=2))


def test_kmeans_finds_well_separated_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float64)
  points = np.concatenate([c + 0.1 * rng.normal(size=(50, 2)) for c in centres])
  found = vq.kmeans(points, 4, seed=0, iterations=5)
  cluster_means = np.stack([points[i * 50:(i + 1) * 50].mean(0) for i in range(4)])
  order = np.argmin(((found[:, None] - cluster_means[None]) ** 2).sum(-1), axis=0)
  np.testing.assert_allclose(found[order], cluster_means, atol=1e-5)


def test_reseed_replaces_only_the_dead_codes():
  """Entries no code uses become latents of the window (D²-sampled against the live entries:
  a latent on a live entry is never drawn); live entries stay bit for bit."""
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(8, 3)).astype(np.float32)
  latents = rng.normal(size=(40, 3)).astype(np.float32)
  codes = np.array([0, 2, 2, 5, 7, 0])  # 1, 3, 4, 6 unused
  new, dead = vq.reseed_dead(codebook, latents, codes, seed=0)
  np.testing.assert_array_equal(dead, [1, 3, 4, 6])
  np.testing.assert_array_equal(new[[0, 2, 5, 7]], codebook[[0, 2, 5, 7]])
  rows = {tuple(x) for x in latents}
  assert all(tuple(new[i]) in rows for i in dead)
  assert len({tuple(new[i]) for i in dead}) == 4
  np.testing.assert_array_equal(new, vq.reseed_dead(codebook, latents, codes, seed=0)[0])
  # Every latent but one sits on a live entry: the one off them is the only possible draw.
  on_live = np.concatenate([np.repeat(codebook[[0, 2]], 20, axis=0), [[9.0, 9.0, 9.0]]])
  for seed in range(5):
    new, _ = vq.reseed_dead(codebook, on_live, np.array([0, 2, 3, 4, 5, 6, 7]), seed=seed)
    np.testing.assert_array_equal(new[1], [9.0, 9.0, 9.0])
  unchanged, none = vq.reseed_dead(codebook, latents, np.arange(8), seed=0)
  assert len(none) == 0
  np.testing.assert_array_equal(unchanged, codebook)


def test_params_are_chameleons_tree_and_the_decoder_mirrors_its_levels():
  """For the organism's config (shapes only, nothing compiled): params["tokenizer"] is exactly
  `chameleon_vq`'s parameter tree, and the decoder maps the 8x8 grid back to 32 px."""
  config = vq.organism_vq_config(32)
  decoder_config = vq.VQTrainConfig().decoder_config(config)
  shapes = jax.eval_shape(lambda: vq.init_params(config, decoder_config, seed=0))
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), shapes["tokenizer"])
          == jax.tree.map(lambda x: (x.shape, x.dtype), cv.vq_param_shapes(config)))
  z = jax.ShapeDtypeStruct((2, 8, 8, config.embed_dim), np.float32)
  out = jax.eval_shape(lambda p, z: vq.Decoder(decoder_config).apply({"params": p}, z),
                       shapes["decoder"], z)
  assert out.shape == (2, 32, 32, 3)
  assert sorted(shapes["decoder"]) == ["conv_in", "conv_out", "mid", "up_1_block_0",
                                       "up_1_upsample", "up_2_block_0", "up_2_upsample"]
  grid = np.arange(4.0).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(np.asarray(vq.upsample_nearest(grid))[0, :, :, 0],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


# ------------------------------------------------------------------------------------- loss


def test_loss_terms_and_straight_through_gradients(images):
  """vq_loss's terms against numpy, and its gradients. With beta = 0 the encoder still gets a
  gradient, which only the straight-through path can give it; the codebook's gradient is exactly
  the codebook term's: 2 (e_n - z_m) summed over the positions m coded n, over B·Y·X·E, and zero
  for entries no position picks."""
  config = dataclasses.replace(FAST, beta=0.0)
  params = vq.init_params(CONFIG, config.decoder_config(CONFIG), seed=0)
  pixels = vq.pixel_values(images[::10])  # [16, 3, 8, 8]
  z = np.asarray(cv.encode(params["tokenizer"], CONFIG, pixels)["latents"], np.float64)
  z = z.reshape(-1, CONFIG.embed_dim)
  far = 1e3 * (1 + np.arange(4))[:, None] * np.ones(CONFIG.embed_dim)  # 4 entries never chosen
  codebook = np.concatenate([vq.kmeans_pp(z, CONFIG.num_embeddings - 4, seed=0), far])
  params = vq.with_codebook(params, codebook)
  codes = np.asarray(cv.encode(params["tokenizer"], CONFIG, pixels)["codes"]).reshape(-1)
  e = codebook.astype(np.float64)

  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p: vq.vq_loss(p, pixels, None, vq_config=CONFIG, train_config=config), has_aux=True))
  (loss, metrics), grads = loss_and_grad(params)
  sq = np.mean((e[codes] - z) ** 2)
  np.testing.assert_allclose(metrics["codebook_loss"], sq, rtol=1e-4)
  np.testing.assert_allclose(metrics["commit_loss"], sq, rtol=1e-4)
  np.testing.assert_allclose(loss, metrics["recon_mse"] + sq, rtol=1e-5)  # beta = 0

  for path in ("encoder/conv_in/kernel", "encoder/down_0/block_0/conv1/kernel",
               "encoder/mid/attn_1/q/kernel", "quant_conv/kernel"):
    leaf = grads["tokenizer"]
    for key in path.split("/"):
      leaf = leaf[key]
    assert np.abs(np.asarray(leaf)).max() > 0, path
  expected = np.zeros_like(e)
  np.add.at(expected, codes, 2 * (e[codes] - z) / z.size)
  got = np.asarray(grads["tokenizer"]["quantize"]["embedding"])
  used = np.unique(codes)
  assert 4 < len(used) <= CONFIG.num_embeddings - 4
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-9)
  assert np.all(got[np.setdiff1d(np.arange(CONFIG.num_embeddings), used)] == 0)
  assert np.abs(np.asarray(grads["decoder"]["conv_out"]["kernel"])).max() > 0


def test_logged_loss_weighs_the_commitment_by_beta(trained):
  """Every logged VQ step: loss = recon_mse + codebook_loss + 0.25 commit_loss."""
  records = trained["metrics"]["history"]["vq_1"] + trained["metrics"]["history"]["vq_2"]
  for r in records:
    np.testing.assert_allclose(r["loss"], r["recon_mse"] + r["codebook_loss"]
                               + 0.25 * r["commit_loss"], rtol=1e-5)
  assert any(r["commit_loss"] > 1e-4 for r in records)


# --------------------------------------------------------------------------------- training


def test_reconstruction_error_falls(trained):
  history = trained["metrics"]["history"]
  assert list(history) == ["autoencoder", "vq_1", "vq_2"]
  assert [len(h) for h in history.values()] == [4, 4, 4]  # log_every=1
  start = history["autoencoder"][0]["recon_mse"]
  end = history["vq_2"][-1]["recon_mse"]
  assert end < 0.5 * start, (start, end)
  assert trained["metrics"]["recon_mse"] < 0.5 * start


def test_codebook_is_used(trained, images):
  """At least a quarter of the 64 codes occur on the 160 scenes, measured again from the
  returned parameters with `chameleon_vq.encode_codes`; codes unused in the window were
  re-seeded after the first round."""
  metrics = trained["metrics"]
  codes = np.asarray(cv.encode_codes(trained["tokenizer"], CONFIG, vq.pixel_values(images)))
  assert codes.shape == (160, 64)
  used = len(np.unique(codes))
  assert used == metrics["used_codes"] >= CONFIG.num_embeddings // 4
  np.testing.assert_allclose(metrics["usage"], used / CONFIG.num_embeddings)
  counts = np.bincount(codes.reshape(-1), minlength=CONFIG.num_embeddings) / codes.size
  entropy = -np.sum(counts[counts > 0] * np.log(counts[counts > 0]))
  np.testing.assert_allclose(metrics["perplexity"], np.exp(entropy), rtol=1e-4)
  assert len(metrics["reseeded"]) == 1 and metrics["reseeded"][0] > 0


def _torch_state(params: dict, config: cv.ChameleonVQConfig) -> dict:
  """Our tokenizer params -> a ChameleonVQVAE state dict (no prefix), by the table read
  backwards: conv kernels [kh, kw, in, out] -> weights [out, in, kh, kw]."""
  backwards = {"conv2d": lambda a: a.transpose(3, 2, 0, 1), "same": lambda a: a}
  state = {}
  for ours, key, layout in cv.vq_tensor_sources(config, prefix=""):
    leaf = params
    for part in ours.split("/"):
      leaf = leaf[part]
    state[key] = torch.as_tensor(np.array(backwards[layout.name](np.asarray(leaf))))
  return state


def _assert_codes_match_transformers(tokenizer: dict, config: cv.ChameleonVQConfig,
                                     pixels: np.ndarray) -> None:
  """`tokenizer`, unchanged, in transformers' ChameleonVQVAE (its config from the same
  hyper-parameters) gives the codes `encode_codes` gives."""
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  fields.update(channel_multiplier=list(config.channel_multiplier),
                attn_resolutions=list(config.attn_resolutions))
  hf_config = transformers.ChameleonVQVAEConfig(**fields)
  assert cv.ChameleonVQConfig.from_hf(hf_config) == config
  model = transformers.models.chameleon.modeling_chameleon.ChameleonVQVAE(hf_config).eval()
  state = _torch_state(tokenizer, config)
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected
  assert missing and all(k.startswith("post_quant_conv.") for k in missing)  # not encode path
  # The backwards table is right: reading the state forwards gives our tree back exactly.
  assert _trees_equal(cv.params_from_state(config, state, prefix=""), tokenizer)
  with torch.no_grad():
    theirs = model.encode(torch.as_tensor(pixels)).image_tokens.numpy().reshape(len(pixels), -1)
  ours = np.asarray(cv.encode_codes(tokenizer, config, pixels))
  assert len(np.unique(ours)) >= 8  # many codes, so equality means something
  np.testing.assert_array_equal(ours, theirs)


def test_trained_tokenizer_codes_equal_transformers(trained, images):
  _assert_codes_match_transformers(trained["tokenizer"], CONFIG, vq.pixel_values(images[::4]))


def test_training_is_deterministic_and_resumes(trained, images, tmp_path):
  """The same seed gives bit-identical parameters (here through a workdir); run again on the
  finished workdir, every phase restores its last checkpoint and the result is the same."""
  tokenizer, metrics = vq.train_tokenizer(images, CONFIG, FAST, str(tmp_path), progress=False)
  assert _trees_equal(tokenizer, trained["tokenizer"])
  assert metrics["recon_mse"] == trained["metrics"]["recon_mse"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder", "vq_1", "vq_2",
                                                        vq.SETTINGS_FILE]
  again, _ = vq.train_tokenizer(images, CONFIG, FAST, str(tmp_path), progress=False)
  assert _trees_equal(again, tokenizer)
  # Settings the phases' own checks cannot see are refused: the loss, the images.
  with pytest.raises(ValueError, match="train_config.beta: 0.25 != 0.5"):
    vq.train_tokenizer(images, CONFIG, dataclasses.replace(FAST, beta=0.5), str(tmp_path),
                       progress=False)
  with pytest.raises(ValueError, match="images_sha256"):
    vq.train_tokenizer(images[::-1], CONFIG, FAST, str(tmp_path), progress=False)


def test_bad_inputs_are_refused(images):
  with pytest.raises(ValueError, match="resolution is 8"):
    vq.train_tokenizer(images[:, :4, :4], CONFIG, FAST, progress=False)
  with pytest.raises(ValueError, match="rounds"):
    vq.train_tokenizer(images, CONFIG, dataclasses.replace(FAST, rounds=0), progress=False)


# ---------------------------------------------------------------------------- slow: probes


def _probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float:
  """Held-out accuracy of a multinomial logistic probe, averaged over the folds (each fold's
  rows predicted by a probe fitted on the others)."""
  from sklearn.linear_model import LogisticRegression

  correct = 0
  for fold in np.unique(folds):
    held = folds == fold
    probe = LogisticRegression(max_iter=3000).fit(features[~held], labels[~held])
    correct += int(np.sum(probe.predict(features[held]) == labels[held]))
  return correct / len(labels)


def _minimal_pairs_differ(codes: np.ndarray, labels: np.ndarray, greys: np.ndarray) -> dict:
  """{attribute: the fraction of image pairs that differ in that attribute alone (same
  background) whose code grids differ}."""
  out = {}
  for i, attribute in enumerate(world.ATTRIBUTES):
    differs = []
    for x in range(len(codes)):
      other = np.sum(labels != labels[x], axis=1)
      pairs = np.flatnonzero((other == 1) & (labels[:, i] != labels[x, i]) & (greys == greys[x]))
      differs += [bool(np.any(codes[x] != codes[y])) for y in pairs[pairs > x]]
    out[attribute] = float(np.mean(differs))
  return out


@pytest.mark.slow
def test_organism_tokenizer_codes_carry_the_attributes():
  """The organism's tokenizer, default training on its images (160 scenes x 3 greys):
    * reconstruction well below knowing only the background (each image's own grey);
    * every image pair that differs in one attribute alone gets different codes;
    * logistic probes on one-hot codes [64 positions x 64 codes] read colour, position and size
      of held-out images (5 folds of the 480; the held-out scene is in training on other greys);
    * and transformers' ChameleonVQVAE gives the same codes.
  Shape is carried but not linearly readable across greys: a grey change alters most codes,
  shape edges included, so its probe is reported, not asserted."""
  config = vq.organism_vq_config(32)
  images = np.concatenate([world.render_batch(world.ALL_SCENES, 32, background=grey)
                           for grey in world.BACKGROUNDS])
  greys = np.repeat(np.arange(len(world.BACKGROUNDS)), len(world.ALL_SCENES))
  labels = np.array([[world.VALUES[a].index(getattr(s, a)) for a in world.ATTRIBUTES]
                     for s in world.ALL_SCENES] * len(world.BACKGROUNDS))
  tokenizer, metrics = vq.train_tokenizer(images, config, vq.VQTrainConfig(), progress=False)

  pixels = vq.pixel_values(images)
  background = np.array([g for g in world.BACKGROUNDS])[greys] * 0.0078 - 1  # [480, 3]
  background_mse = float(np.mean((pixels - background[:, :, None, None]) ** 2))
  codes = np.asarray(cv.encode_codes(tokenizer, config, pixels))
  features = np.eye(config.num_embeddings, dtype=np.float32)[codes].reshape(len(codes), -1)
  folds = np.random.default_rng(0).permutation(len(codes)) % 5
  accuracy = {a: _probe_accuracy(features, labels[:, i], folds)
              for i, a in enumerate(world.ATTRIBUTES)}
  distinct = _minimal_pairs_differ(codes, labels, greys)
  print("\nmetrics:", {k: v for k, v in metrics.items() if k != "history"},
        "\nbackground-only mse:", background_mse, "\nheld-out probe accuracy:", accuracy,
        "\nminimal pairs with different codes:", distinct)
  assert metrics["recon_mse"] < 0.5 * background_mse
  assert metrics["usage"] >= 0.5
  assert min(distinct.values()) >= 0.95
  assert min(accuracy["colour"], accuracy["position"], accuracy["size"]) >= 0.9
  _assert_codes_match_transformers(tokenizer, config, pixels[::12])
