"""Native VLMs end to end, against transformers: pixels -> `vlm.prepare` -> logits, residuals,
attention and greedy generation, for tiny Chameleon (7B- and 34B-style blocks) and Emu3 models
built in code (model, tokenizer and image processor saved as a user's checkpoint would be).

Each family runs a batch of two prompts of different lengths with two different images. The
reference is the transformers model on its own processor's output (placeholder ids + pixel
values), with our rotary positions passed as position_ids. Errors are `reference.relative_error`
over real (non-pad) positions; image-token logits are the dtype minimum on both sides.
"""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import narrowgate_jax as ng
import reference as R
from narrowgate_jax.processing.roles import select

TOLERANCE = 1e-4
PROMPTS = ["<image>what is in the picture ? answer :", "a red cat <image> this animal is a"]
NEG = torch.finfo(torch.float32).min
KNOCKOUT_ATTENTION = "narrowgate_test_eoi_knockout"

CHAMELEON_VQ = dict(embed_dim=4, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                    latent_channels=4, resolution=16, num_res_blocks=1, attn_resolutions=[8])
# Emu3's processor assumes 8x spatial downsampling: 4 levels, all as wide as the attention blocks.
EMU3_VQ = dict(embed_dim=4, codebook_size=16, latent_channels=4, double_latent=False,
               in_channels=3, out_channels=3, temporal_downsample_factor=4, base_channels=32,
               channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3],
               hidden_size=32, num_attention_heads=2)


def _images():
  rng = np.random.default_rng(7)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
          for h, w in ((30, 44), (40, 28))]


def _codebook_from_latents(model, inputs, num_embeddings):
  """transformers initialises codebooks within ±1/K, near the origin, where one entry wins
  everywhere. Instead: entries picked from the encoder's own latents on the test images by
  farthest-point sampling, so codes vary over an image and every argmin is decisive."""
  seen = []
  hook = model.model.vqmodel.quantize.register_forward_pre_hook(
      lambda module, args: seen.append(args[0].detach()))
  args = [inputs["pixel_values"]] + ([inputs["image_sizes"]] if "image_sizes" in inputs else [])
  with torch.no_grad():
    model.model.get_image_tokens(*args)
  hook.remove()
  latents = seen[0]
  dim = model.model.vqmodel.quantize.embedding.weight.shape[1]
  channels = 2 if latents.ndim == 5 else 1  # Emu3 quantises [B, T, C, H, W], Chameleon [B, C, H, W]
  latents = latents.movedim(channels, -1).reshape(-1, dim)
  chosen = [0]
  distance = torch.cdist(latents, latents[:1]).squeeze(1)
  for _ in range(num_embeddings - 1):
    chosen.append(int(torch.argmax(distance)))
    distance = torch.minimum(distance, torch.cdist(latents, latents[chosen[-1:]]).squeeze(1))
  with torch.no_grad():
    model.model.vqmodel.quantize.embedding.weight.copy_(latents[chosen])


def _chameleon(swin_norm):
  vmap = R._vocabulary_map(R.COMMON["vocab_size"], CHAMELEON_VQ["num_embeddings"])
  config = R.tiny_chameleon(swin_norm=swin_norm, vq_config=CHAMELEON_VQ, vocabulary_map=vmap)
  tokenizer = R.chameleon_tokenizer(config)
  image_processor = transformers.ChameleonImageProcessorPil(
      size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
  processor = transformers.ChameleonProcessor(image_processor, tokenizer, image_seq_length=64)
  call = lambda images, text: processor(images=images, text=text, padding=True,  # noqa: E731
                                        return_for_text_completion=True, return_tensors="pt")
  return config, tokenizer, image_processor, processor, call


def _emu3():
  vmap = R.emu3_vocabulary_map(R.COMMON["vocab_size"], EMU3_VQ["codebook_size"])
  config = transformers.Emu3Config(text_config=transformers.Emu3TextConfig(**R.COMMON),
                                   vq_config=EMU3_VQ, vocabulary_map=vmap)
  tokenizer = R.emu3_tokenizer(config)
  image_processor = transformers.Emu3ImageProcessor(min_pixels=24 * 24, max_pixels=40 * 40)
  processor = transformers.Emu3Processor(image_processor, tokenizer)
  call = lambda images, text: processor(images=images, text=text, padding=True,  # noqa: E731
                                        return_tensors="pt")
  return config, tokenizer, image_processor, processor, call


FAMILIES = {"chameleon": lambda: _chameleon(False), "chameleon_34b": lambda: _chameleon(True),
            "emu3": _emu3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def native(request, tmp_path_factory):
  config, tokenizer, image_processor, processor, call = FAMILIES[request.param]()
  tokenizer.padding_side = "left"
  hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
  torch_model = R.build(config, hf_dir)
  images = _images()
  theirs = call(images, PROMPTS)
  codebook = torch_model.model.vqmodel.quantize.embedding.weight
  _codebook_from_latents(torch_model, theirs, codebook.shape[0])
  torch_model.save_pretrained(hf_dir)  # again, with that codebook
  tokenizer.save_pretrained(hf_dir)
  image_processor.save_pretrained(hf_dir)
  ng_dir = hf_dir.parent / "ng"
  vlm = R.convert_and_load(hf_dir, ng_dir)
  batch = vlm.prepare(images=images, prompts=PROMPTS)
  return SimpleNamespace(name=request.param, vlm=vlm, torch=torch_model, batch=batch,
                         inputs=theirs, tokenizer=tokenizer, config=config, ng_dir=ng_dir,
                         processor=processor)


def _image_positions(batch):
  return select(["image", "image_break"], batch.roles)


def _torch_forward(native, **kw):
  inputs = {k: v for k, v in native.inputs.items() if k != "input_ids"}
  pos = torch.as_tensor(np.asarray(native.batch.positions), dtype=torch.long)
  with torch.no_grad():
    return native.torch(input_ids=native.inputs["input_ids"], position_ids=pos,
                        output_hidden_states=True, output_attentions=True, **inputs, **kw)


@pytest.fixture(scope="module")
def reference_out(native):
  return _torch_forward(native)


def test_token_ids_equal_the_processor_and_the_image_tokens(native):
  """Placeholders put back, our ids are the processor's; in their place, the VQ tokens that
  transformers' get_image_tokens gives for the same pixels."""
  ids, theirs = np.asarray(native.batch.input_ids), native.inputs["input_ids"].numpy()
  image = _image_positions(native.batch)
  placeholder = native.tokenizer.convert_tokens_to_ids("<image>")
  np.testing.assert_array_equal(np.where(image, placeholder, ids), theirs)
  args = [native.inputs["pixel_values"]]
  if "image_sizes" in native.inputs:
    args.append(native.inputs["image_sizes"])
  with torch.no_grad():
    tokens = native.torch.model.get_image_tokens(*args)
  tokens = torch.cat([t.reshape(-1) for t in tokens]) if isinstance(tokens, list) else tokens
  np.testing.assert_array_equal(ids[image], tokens.reshape(-1).numpy())
  assert len(np.unique(ids[select("image", native.batch.roles)])) > 4  # codes vary


def test_chameleon_chat_mode_equals_the_processor(native):
  """chat=True ends each prompt with the separator token, as ChameleonProcessor's default mode."""
  if not native.name.startswith("chameleon"):
    with pytest.raises(ValueError, match="chat template"):
      native.vlm.prepare(images=_images(), prompts=PROMPTS, chat=True)
    return
  batch = native.vlm.prepare(images=_images(), prompts=PROMPTS, chat=True)
  theirs = native.processor(images=_images(), text=PROMPTS, padding=True, return_tensors="pt")
  placeholder = native.tokenizer.convert_tokens_to_ids("<image>")
  ids = np.where(_image_positions(batch), placeholder, np.asarray(batch.input_ids))
  np.testing.assert_array_equal(ids, theirs["input_ids"].numpy())
  assert (ids[:, -1] == native.tokenizer.sep_token_id).all()


def test_roles(native):
  """eoi: right after the last code (Chameleon) / the two end tokens (Emu3); image = code grid."""
  roles, ids = native.batch.roles, np.asarray(native.batch.input_ids)
  eoi, image = select("eoi", roles), select("image", roles)
  for b in range(2):
    last_code = np.flatnonzero(image[b])[-1]
    if native.name.startswith("chameleon"):
      assert np.flatnonzero(eoi[b]).tolist() == [last_code + 1]
      assert image[b].sum() == 64  # 16 px / 2 = 8 x 8 codes
      assert ids[b, eoi[b]].tolist() == [native.config.vocabulary_map["<eoss>"]]
    else:
      assert np.flatnonzero(eoi[b]).tolist() == [last_code + 2, last_code + 3]  # after the EOL
      rows = select("image_break", roles)[b].sum()
      assert image[b].sum() % rows == 0 and image[b].sum() // rows >= 3  # an h x w grid
      vmap = native.config.vocabulary_map
      assert ids[b, eoi[b]].tolist() == [vmap["<|extra_201|>"], vmap["<|image end|>"]]


def test_logits(native, reference_out):
  ours = np.asarray(native.vlm.forward(native.batch).logits)
  theirs = reference_out.logits.numpy()
  suppressed = theirs <= np.finfo(np.float32).min
  np.testing.assert_array_equal(ours <= np.finfo(np.float32).min, suppressed)
  keep = np.asarray(native.batch.attention_mask)[..., None] & ~suppressed
  assert R.relative_error(ours, theirs, keep) < TOLERANCE


def test_residuals_and_attention(native, reference_out):
  out = native.vlm.forward(native.batch, capture=ng.Capture(resid=True, attn=True))
  real = np.asarray(native.batch.attention_mask)
  layers = native.vlm.num_layers
  for layer in range(layers):  # hidden_states[L] is after the final norm; ours is before it
    assert R.relative_error(out.resid[layer], reference_out.hidden_states[layer].numpy(),
                            real) < TOLERANCE, f"resid[{layer}]"
    rows = np.broadcast_to(real[:, None, :, None], out.attn.shape[1:])
    assert R.relative_error(out.attn[layer], reference_out.attentions[layer].numpy(),
                            rows) < TOLERANCE, f"attn[{layer}]"


# ----------------------------------------------------------------------------------- generation


def _knockout_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
  """Eager attention with the probabilities of `module._ng_keys` [B, S0] zeroed for every query
  (prompt and generated), after the softmax: the study's post-softmax [EOI] knockout."""
  eager = sys.modules[type(module).__module__].eager_attention_forward
  blocked = getattr(module, "_ng_keys", None)
  if blocked is None:
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
  groups = module.num_key_value_groups
  k = key.repeat_interleave(groups, dim=1)
  v = value.repeat_interleave(groups, dim=1)
  scores = torch.matmul(query, k.transpose(2, 3)) * scaling
  if attention_mask is not None:
    scores = scores + attention_mask[..., :k.shape[-2]]
  probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
  cols = torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.bool)
  cols[:, :blocked.shape[1]] = blocked
  probs = probs.masked_fill(cols[:, None, None, :], 0.0)
  return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


transformers.AttentionInterface.register(KNOCKOUT_ATTENTION, _knockout_attention)
# A custom attention name gets no mask unless one is registered for it: build eager's.
AttentionMaskInterface.register(KNOCKOUT_ATTENTION, eager_mask)


def _torch_generate(native, blocked_keys=None, new_tokens=10):
  model = native.torch
  layers = R.decoder_layers(model)
  implementation = model.config._attn_implementation
  for layer in layers:
    layer.self_attn._ng_keys = None if blocked_keys is None else torch.as_tensor(blocked_keys)
  try:
    model.config._attn_implementation = KNOCKOUT_ATTENTION
    if hasattr(model.config, "text_config"):
      model.config.text_config._attn_implementation = KNOCKOUT_ATTENTION
    with torch.no_grad():
      out = model.generate(**native.inputs, max_new_tokens=new_tokens, do_sample=False,
                           num_beams=1, pad_token_id=0)
  finally:
    model.config._attn_implementation = implementation
    if hasattr(model.config, "text_config"):
      model.config.text_config._attn_implementation = implementation
    for layer in layers:
      del layer.self_attn._ng_keys
  return out[:, native.inputs["input_ids"].shape[1]:].numpy()


def _ours(native, tokens, width):
  out = np.zeros((tokens.shape[0], width), tokens.dtype)
  out[:, :tokens.shape[1]] = tokens
  return out


def test_greedy_generation_equals_transformers(native):
  ours = native.vlm.generate(native.batch, max_new_tokens=10).tokens
  theirs = _torch_generate(native)
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
  assert (ours[:, theirs.shape[1]:] == 0).all()  # transformers stops once every example is done


def test_generation_with_eoi_post_softmax_knockout_equals_transformers(native):
  batch = native.batch
  ko = native.vlm.knockout(batch, keys="eoi", queries="all", mode="post_softmax")
  ours = native.vlm.generate(batch, max_new_tokens=10, interventions=ko).tokens
  theirs = _torch_generate(native, blocked_keys=select("eoi", batch.roles))
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
  clean = native.vlm.generate(batch, max_new_tokens=10).tokens
  assert not np.array_equal(ours, clean)  # the knockout changed what was generated


# ----------------------------------------------------------------------------------- bad input


def test_marker_and_image_mismatches_are_refused(native):
  vlm, image = native.vlm, _images()[0]
  with pytest.raises(ValueError, match=r"prompt 0 has 0 <image> marker\(s\) but 1 image"):
    vlm.prepare(images=[image], prompts=["what is in the picture ?"])
  with pytest.raises(ValueError, match=r"prompt 1 has 1 <image> marker\(s\) but 0 image"):
    vlm.prepare(images=[image, None], prompts=["<image>a cat", "<image>a dog"])
  with pytest.raises(ValueError, match="2 image entries for 1 prompts"):
    vlm.prepare(images=[image, image], prompts=["<image>a cat"])


def test_non_rgb_is_converted_with_a_warning_and_unreadable_files_are_named(native, tmp_path):
  rgba = _images()[0].convert("RGBA")
  with pytest.warns(UserWarning, match="mode 'RGBA'"):
    batch = native.vlm.prepare(images=[rgba], prompts=["<image>a cat"])
  assert select("image", batch.roles).sum() > 0
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG but not really")
  with pytest.raises(ValueError, match=r"image 1: cannot read .*broken\.png"):
    native.vlm.prepare(images=[_images()[0], broken], prompts=["<image>a", "<image>b"])


def test_prompt_longer_than_the_context_is_refused(native):
  context = native.vlm.config.max_positions
  with pytest.raises(ValueError, match=rf"prompt 0 is \d+ tokens long; the model's context is "
                                       rf"{context} positions"):
    native.vlm.prepare(images=[_images()[0]], prompts=["<image>" + " a" * context])


def test_converted_metadata_names_the_image_tokenizer(native):
  meta = json.loads((native.ng_dir / "narrowgate.json").read_text())
  assert meta["image_tokenizer"] in ("chameleon_vq", "emu3_vq")
  assert any("vqmodel" in k for k in meta["unconverted_tensors"])  # the VQ decoder: generation
