"""Emu3's VQ image tokenizer against transformers' `Emu3VQVAE.encode` and
`Emu3Model.get_image_tokens`, on a tiny random Emu3 built in code and saved with save_pretrained.

The tiny VQ config exercises every encode-path part: two levels (a channel change, so a
`nin_shortcut`, and a downsample), attention after each block of level 1 plus the middle block's,
two heads, two stride-2 temporal convs (temporal_downsample_factor 4) and two temporal resnet
blocks, latent_channels != embed_dim (so a transposed conv kernel cannot pass).

The codes are compared exactly, which is only meaningful if float32 round-off cannot flip an
argmin: the codebook is drawn around the latents' own spread (so the codes vary across positions),
and `_assert_codes_are_decisive` checks at every position that the distance gap between the
nearest and second-nearest entries is far larger (10x) than the measured error of the float32
distances, ours and transformers', against exact float64 ones.
"""

from __future__ import annotations

import flax.traverse_util
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from narrowgate_jax.models import emu3_vq, vq_common

CODEBOOK_SIZE = 16
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<|extra_200|>": 4}
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
VQ = dict(codebook_size=CODEBOOK_SIZE, embed_dim=4, latent_channels=6, base_channels=32,
          channel_multiplier=[1, 2], num_res_blocks=2, attn_resolutions=[1], hidden_size=64,
          num_attention_heads=2, temporal_downsample_factor=4)


def _vocabulary_map() -> dict:
  """Specials, a few text tokens, and "<|visual token NNNNNN|>" for every code; the codes' ids are
  a permutation (not code + offset), so a mapping that ignores the names cannot pass."""
  vmap = dict(SPECIAL)
  vmap.update({f"text{i}": 5 + i for i in range(10)})
  ids = 40 + np.random.default_rng(3).permutation(CODEBOOK_SIZE)
  vmap.update({f"<|visual token {code:06d}|>": int(ids[code]) for code in range(CODEBOOK_SIZE)})
  return vmap


def _images(shape, seed, image_sizes=None) -> np.ndarray:
  """Random pixels in [-1, 1], zero outside each image's (height, width), as the processor pads."""
  pixels = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
  for image, (height, width) in zip(pixels, image_sizes or ()):
    image[..., height:, :] = 0
    image[..., :, width:] = 0
  return pixels


# (pixel shape, image_sizes): square; non-square with the second image padded, odd-sized
CASES = {
    "square": ((2, 3, 32, 32), [[32, 32], [32, 32]]),
    "non_square_padded": ((2, 3, 32, 48), [[32, 48], [25, 37]]),
}


def _torch_latents(vq, pixel_values: torch.Tensor):
  """transformers' encode up to the quantiser: (last_hidden_state [B, T', Z, Y, X],
  quant_conv output [B, E, T', Y, X]), the latter as `Emu3VQVAE.encode` computes it."""
  sizes = torch.tensor([pixel_values.shape[-2:]] * pixel_values.shape[0])
  hidden = vq.encode(pixel_values, sizes).last_hidden_state
  return hidden, vq.quant_conv(hidden.permute(0, 2, 1, 3, 4))


def _case_pixels(case: str) -> np.ndarray:
  shape, image_sizes = CASES[case]
  return _images(shape, seed=10 + sorted(CASES).index(case), image_sizes=image_sizes)


def _min_gap(latents: torch.Tensor, codebook: torch.Tensor) -> float:
  """Smallest difference, over positions, between the nearest two codebook distances."""
  distances = torch.cdist(latents.double(), codebook.double()) ** 2
  nearest_two = torch.sort(distances, dim=1).values[:, :2]
  return float(torch.min(nearest_two[:, 1] - nearest_two[:, 0]))


def _separated_codebook(vq, gen, candidates: int = 32) -> torch.Tensor:
  """A codebook drawn around the latents' spread, so codes vary across positions (transformers'
  init, uniform(±1/K), puts every entry near the origin); of `candidates` draws, the one whose
  nearest entry wins by the widest margin at every position of the test images, so float32
  round-off cannot flip an argmin (`_assert_codes_are_decisive` checks it)."""
  latents = torch.cat([
      _torch_latents(vq, torch.from_numpy(_case_pixels(case)))[1]
      .permute(0, 2, 3, 4, 1).reshape(-1, VQ["embed_dim"]) for case in CASES])
  draws = [latents.mean(0) + 1.5 * latents.std(0)
           * torch.randn(CODEBOOK_SIZE, VQ["embed_dim"], generator=gen) for _ in range(candidates)]
  return max(draws, key=lambda codebook: _min_gap(latents, codebook))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  config = transformers.Emu3Config(text_config=TEXT, vq_config=VQ,
                                   vocabulary_map=_vocabulary_map())
  torch.manual_seed(0)
  model = transformers.Emu3ForConditionalGeneration(config).float().eval()
  vq = model.model.vqmodel
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    # Norm weights start at exactly 1 (biases 0; BatchNorm's running stats at 0 and 1), which
    # would hide a scale/bias/mean/var mix-up.
    for name, p in vq.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
    for name, b in vq.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.2 * torch.randn(b.shape, generator=gen))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    vq.quantize.embedding.weight.copy_(_separated_codebook(vq, gen))
  directory = tmp_path_factory.mktemp("emu3") / "hf"
  model.save_pretrained(directory)
  state = load_file(str(directory / "model.safetensors"))
  ours = emu3_vq.Emu3VQConfig.from_hf(model.config.vq_config)
  return model, ours, emu3_vq.params_from_state(ours, state)


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _assert_codes_are_decisive(theirs: np.ndarray, ours: np.ndarray, codebook: np.ndarray):
  """At every position, the nearest codebook entry wins by a margin that neither float32 distance
  computation can close: the gap between the nearest and second-nearest exact (float64) distances
  of transformers' latents exceeds 10x the largest error of the float32 distances, ours (from our
  latents) and transformers' formula (from its latents). Codes can differ only if some distance
  moves by half the gap, so exact equality of the codes is then no accident of round-off.

  theirs, ours: latents [M, E]; codebook [K, E].
  """
  exact = np.sum((theirs.astype(np.float64)[:, None] - codebook.astype(np.float64)[None]) ** 2,
                 axis=-1)  # [M, K]
  ours_d = np.asarray(vq_common.code_distances(jnp.asarray(ours), jnp.asarray(codebook)))
  z, e = torch.from_numpy(theirs), torch.from_numpy(codebook)
  theirs_d = (torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1)
              - 2 * torch.matmul(z, e.transpose(0, 1))).numpy()  # Emu3VQVAEVectorQuantizer's
  error = max(np.max(np.abs(ours_d - exact)), np.max(np.abs(theirs_d - exact)))
  nearest_two = np.sort(exact, axis=1)[:, :2]
  gap = nearest_two[:, 1] - nearest_two[:, 0]
  assert gap.min() > 10 * error, (gap.min(), error)
  assert len(np.unique(np.argmin(exact, axis=1))) >= CODEBOOK_SIZE // 2  # the codes really vary


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_match_transformers(tiny, case):
  model, config, params = tiny
  shape, image_sizes = CASES[case]
  pixels = _case_pixels(case)
  pixel_values, sizes = torch.from_numpy(pixels), torch.tensor(image_sizes)
  vq = model.model.vqmodel
  with torch.no_grad():
    hidden, latents = _torch_latents(vq, pixel_values)
    their_codes = vq.encode(pixel_values, sizes).image_tokens
    their_ids = model.model.get_image_tokens(pixel_values, sizes)
  out = emu3_vq.encode(params, config, jnp.asarray(pixels))

  # (1) continuous outputs: the encoder's, then quant_conv's (theirs channels-first)
  assert out["hidden"].shape == (2, 1, 16, shape[-1] // 2, VQ["latent_channels"])
  assert relative_error(out["hidden"], hidden.permute(0, 1, 3, 4, 2).numpy()) <= 1e-4
  their_latents = latents.permute(0, 2, 3, 4, 1).numpy()  # [B, T', Y, X, E]
  assert relative_error(out["latents"], their_latents) <= 1e-4
  _assert_codes_are_decisive(their_latents.reshape(-1, VQ["embed_dim"]),
                             np.asarray(out["latents"]).reshape(-1, VQ["embed_dim"]),
                             params["quantize"]["embedding"])

  # (2) codes, cropped per image to image_sizes / spatial_factor
  codes = emu3_vq.encode_codes(params, config, pixels, image_sizes)
  assert [c.shape for c in codes] == [tuple(t.shape) for t in their_codes]
  for ours_i, theirs_i in zip(codes, their_codes):
    assert ours_i.dtype == np.int32
    np.testing.assert_array_equal(ours_i, theirs_i.numpy())

  # (3) BPE ids: rows of image tokens, each followed by <|extra_200|>, images concatenated
  ids = emu3_vq.codes_to_token_ids(model.config.vocabulary_map, codes)
  assert ids.dtype == np.int32 and their_ids.dtype == torch.int32
  np.testing.assert_array_equal(ids, their_ids.numpy())


def test_video_matches_transformers(tiny):
  """Distinct frames [B, T, C, H, W] (not repeated): the temporal convs see real time structure,
  so a flipped or mis-padded temporal kernel cannot pass as it might on a still image."""
  model, config, params = tiny
  pixels = _images((1, 4, 3, 16, 16), seed=12)
  with torch.no_grad():
    hidden, latents = _torch_latents(model.model.vqmodel, torch.from_numpy(pixels))
  out = emu3_vq.encode(params, config, jnp.asarray(pixels))
  assert relative_error(out["hidden"], hidden.permute(0, 1, 3, 4, 2).numpy()) <= 1e-4
  assert relative_error(out["latents"], latents.permute(0, 2, 3, 4, 1).numpy()) <= 1e-4


def test_checkpoint_keys_and_state_dict_keys_give_the_same_params(tiny):
  """save_pretrained writes "vqmodel.*"; a loaded model's state_dict() has "model.vqmodel.*"."""
  model, config, params = tiny
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert emu3_vq.find_prefix(state) == emu3_vq.STATE_DICT_PREFIX
  from_state_dict = emu3_vq.params_from_state(config, state)
  a, b = (flax.traverse_util.flatten_dict(tree, sep="/") for tree in (params, from_state_dict))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path])
  del state["model.vqmodel.encoder.time_res_stack.1.norm2.running_var"]
  with pytest.raises(KeyError, match="time_res_stack.1.norm2.running_var"):
    emu3_vq.params_from_state(config, state)


def test_vocabulary_table_matches_transformers(tiny):
  model, _, _ = tiny
  mapping = model.model.vocabulary_mapping
  np.testing.assert_array_equal(emu3_vq.img2bpe_table(model.config.vocabulary_map),
                                mapping.img2bpe_mapping_tensor.numpy())
  grid = np.array([[0, 15, 3], [7, 7, 1]])
  np.testing.assert_array_equal(
      emu3_vq.codes_to_token_ids(model.config.vocabulary_map, [grid]),
      mapping.convert_img2bpe(torch.from_numpy(grid)).flatten().numpy())
