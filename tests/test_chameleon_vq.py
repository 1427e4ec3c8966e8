"""Chameleon's VQ-GAN tokenizer (chameleon_vq.py) against transformers' ChameleonVQVAE.

One tiny random model, built in code: resolution 32, three levels (channels 32, 64, 64, so the
second level's first block has a 1x1 nin_shortcut), two stride-2 downsamples (32 -> 16 -> 8, an
8x8 latent grid), attention blocks at resolution 16 (level 1, after each of its two blocks) and
in the middle. Before comparing, every GroupNorm affine and every conv bias of the VQ model is
randomised in torch (they start at exactly 1 / 0, which would hide a scale/bias or key mix-up).

The codebook is chosen so that float32 round-off cannot flip an argmin: its 16 entries are
latents of the test batch picked by farthest-point sampling (well separated, and every entry is
some position's exact nearest one, so many distinct codes occur); the test then checks that the
gap between each position's nearest and second-nearest entry is far larger than any change the
observed latent difference (ours vs torch) could make to the distances.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
import transformers

from narrowgate_jax.models import chameleon_vq as cv

VQ = {"embed_dim": 8, "num_embeddings": 16, "base_channels": 32, "channel_multiplier": [1, 2, 2],
      "latent_channels": 8, "resolution": 32, "num_res_blocks": 2, "attn_resolutions": [16]}
NUM_CODES = VQ["num_embeddings"]


def _shuffled_vocabulary_map(vocab_size: int, seed: int = 0) -> dict:
  """16 image codes (two-letter names from code 10 on) on a permutation of the last 16 ids, so
  an identity-plus-offset mapping, or a digit misread, would give different ids."""
  letters = "ABCDEFGHIJ"
  ids = np.random.default_rng(seed).permutation(np.arange(vocab_size - NUM_CODES, vocab_size))
  vmap = {"<s>": 1, "</s>": 2, "<pad>": 0, "<image>": 3}
  for code in range(NUM_CODES):
    vmap["IMGIMG" + "".join(letters[int(d)] for d in str(code)) + "Z"] = int(ids[code])
  return vmap


def _randomise(vqmodel, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in vqmodel.modules():
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
        module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
      elif isinstance(module, torch.nn.Conv2d):
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def _farthest_points(x: np.ndarray, n: int) -> np.ndarray:
  """n rows of x [M, E], each the farthest from those already chosen (starting from row 0)."""
  chosen = [0]
  dist = np.sum((x - x[0]) ** 2, axis=1)
  for _ in range(n - 1):
    chosen.append(int(np.argmax(dist)))
    dist = np.minimum(dist, np.sum((x - x[chosen[-1]]) ** 2, axis=1))
  return x[chosen]


@pytest.fixture(scope="module")
def case():
  hf_config = reference.tiny_chameleon(
      vq_config=VQ, vocabulary_map=_shuffled_vocabulary_map(reference.COMMON["vocab_size"]))
  torch.manual_seed(0)
  model = transformers.ChameleonForConditionalGeneration(hf_config).float().eval()
  vq = model.model.vqmodel
  _randomise(vq, seed=1)
  pixels = torch.as_tensor(np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)),
                           dtype=torch.float32)
  with torch.no_grad():
    hidden = vq.encoder(pixels)  # [B, latent, h, w]
    latents = vq.quant_conv(hidden)  # [B, E, h, w]
    flat = latents.permute(0, 2, 3, 1).reshape(-1, VQ["embed_dim"]).numpy()
    vq.quantize.embedding.weight.copy_(torch.as_tensor(_farthest_points(flat, NUM_CODES)))
    encoded = vq.encode(pixels, return_dict=True)
    token_ids = model.model.get_image_tokens(pixels)

  config = cv.ChameleonVQConfig.from_hf(hf_config.vq_config)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = cv.params_from_state(config, state)
  ours = cv.encode(params, config, pixels.numpy())
  return {"hf_config": hf_config, "config": config, "state": state, "params": params,
          "pixels": pixels, "ours": {k: np.asarray(v) for k, v in ours.items()},
          "hidden": hidden.numpy(), "latents": latents.numpy(),
          "codebook": vq.quantize.embedding.weight.detach().numpy(),
          "codes": encoded.image_tokens.numpy(), "token_ids": token_ids.numpy()}


def _nchw(x):
  return np.transpose(x, (0, 3, 1, 2))


def test_config_reads_the_vq_config(case):
  c = case["config"]
  assert c.channel_multiplier == (1, 2, 2) and c.attn_resolutions == (16,)
  assert [c.level_has_attention(level) for level in range(3)] == [False, True, False]
  assert cv.ChameleonVQConfig.from_hf(case["hf_config"].vq_config.to_dict()) == c


def test_table_covers_the_encode_path_exactly(case):
  """Every encoder / quant_conv / codebook tensor is mapped once; decoder and post_quant_conv
  are the only VQ tensors left."""
  keys = [key for _, key, _ in cv.vq_tensor_sources(case["config"])]
  assert len(keys) == len(set(keys))
  vq_keys = {k for k in case["state"] if k.startswith("model.vqmodel.")}
  left = vq_keys - set(keys)
  assert set(keys) <= vq_keys
  assert left and all(k.startswith(("model.vqmodel.decoder.", "model.vqmodel.post_quant_conv."))
                      for k in left)


def test_encoder_output_and_latents_match(case):
  """(1) The continuous latents after quant_conv (and the encoder output before it)."""
  ours = case["ours"]
  assert ours["latents"].shape == (2, 8, 8, VQ["embed_dim"])
  assert reference.relative_error(_nchw(ours["hidden"]), case["hidden"]) <= 1e-4
  assert reference.relative_error(_nchw(ours["latents"]), case["latents"]) <= 1e-4


def test_codes_match_exactly(case):
  """(2) Code indices equal transformers' `image_tokens` (flattened over batch, rows, columns)."""
  ours = case["ours"]["codes"]
  assert ours.dtype == np.int32 and ours.shape == (2, 64)
  theirs = case["codes"].reshape(2, -1)
  # The comparison means something: many distinct codes, and no argmin is within reach of the
  # latents' disagreement. |d_j(z') - d_j(z)| <= 2 |z' - z| |z - e_j| + |z' - z|², so a code
  # can flip only if (second-nearest - nearest) distance < 2 * that bound.
  assert len(np.unique(theirs)) >= 8
  z = np.transpose(case["latents"], (0, 2, 3, 1)).reshape(-1, VQ["embed_dim"]).astype(np.float64)
  z_ours = case["ours"]["latents"].reshape(-1, VQ["embed_dim"]).astype(np.float64)
  e = case["codebook"].astype(np.float64)
  dist = np.sum((z[:, None] - e[None]) ** 2, axis=-1)
  nearest_two = np.sort(dist, axis=1)[:, :2]
  shift = np.max(np.linalg.norm(z_ours - z, axis=1))
  flip_bound = 2 * (2 * shift * np.sqrt(dist.max()) + shift**2)
  roundoff = 64 * np.finfo(np.float32).eps * dist.max()  # float32 |z|²+|e|²-2z·e, either side
  assert np.min(nearest_two[:, 1] - nearest_two[:, 0]) > 10 * (flip_bound + roundoff)
  np.testing.assert_array_equal(ours, theirs)


def test_token_ids_match_get_image_tokens(case):
  """(3) codes -> BPE ids equals `get_image_tokens` (the map is a shuffled one)."""
  vmap = case["hf_config"].vocabulary_map
  ids = cv.codes_to_token_ids(vmap, case["ours"]["codes"])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, case["token_ids"])
  table = cv.img2bpe_table(vmap)
  np.testing.assert_array_equal(cv.codes_to_token_ids(table, case["ours"]["codes"]), ids)
  mapping = transformers.models.chameleon.modeling_chameleon.ChameleonImageVocabularyMapping(vmap)
  np.testing.assert_array_equal(table, mapping.img2bpe_mapping_tensor.numpy())


def test_encode_codes_is_the_codes(case):
  np.testing.assert_array_equal(
      np.asarray(cv.encode_codes(case["params"], case["config"], case["pixels"].numpy())),
      case["ours"]["codes"])


def test_bad_state_is_named(case):
  config, state = case["config"], dict(case["state"])
  key = "model.vqmodel.encoder.down.1.attn.0.q.weight"
  state[key] = state[key][:, :-1]
  with pytest.raises(ValueError, match="down.1.attn.0.q.weight"):
    cv.params_from_state(config, state)
  del state[key]
  with pytest.raises(KeyError, match="down.1.attn.0.q.weight"):
    cv.params_from_state(config, state)
