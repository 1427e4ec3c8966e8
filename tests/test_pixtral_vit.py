"""Pixtral's vision tower, its image preprocessing and its image-token layout against
transformers, on tiny random models built in code.

The tower is built inside LlavaForConditionalGeneration (as Pixtral-12B's HF checkpoint is) and
written with save_pretrained, so its parameters are read from a real checkpoint file, under the
prefix that file has, through `pixtral_tensor_sources` (the table the converter uses). Norm
weights are randomised (they start at 1, which would hide a swapped or missing norm). Images are
non-square, of two different sizes, one of them not a whole number of patches, packed into one
sequence as transformers packs them (block-diagonal attention).

Preprocessing is compared with `PixtralImageProcessorPil` (it needs no torchvision). The token
expansion is compared with `PixtralProcessor` itself: its module imports one function from the
torchvision image processor, the resize rule, which the PIL module defines identically; the test
loads the processor's source with that import served from the PIL module.

Tower comparisons are float32, relative error ≤ 1e-4 (max |ours - theirs| / max |theirs|).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from reference import relative_error, word_tokenizer
from safetensors.numpy import load_file
from transformers.models.pixtral import image_processing_pil_pixtral as hf_pil

from narrowgate_jax.models import pixtral_vit as pv
from narrowgate_jax.models.families import iter_layer_keys
from narrowgate_jax.processing import pixtral_images as pi

TOL = 1e-4
TEXT = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# 4 heads of width 8: 2 rotation frequencies per axis; rope_theta 100 so all of them turn
# noticeably over a few patches. 3 layers, so hidden state 1 is a middle one.
TOWER = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, image_size=64, patch_size=4,
             rope_parameters={"rope_type": "axial", "rope_theta": 100.0})
# (height, width) in pixels: 6 x 10 patches, and 9 x 5 patches with 2 rows and 2 columns of
# pixels beyond the last whole patch (transformers drops them)
IMAGE_SIZES = ((24, 40), (38, 22))


def _randomise_tower(tower: torch.nn.Module, seed: int) -> None:
  """Norm weights start at exactly 1, which would hide a swapped or missing norm: perturb them.
  The default init (std 0.02) leaves the tower nearly linear (attention near uniform, so RoPE
  barely matters; GELU near the origin, where erf and tanh agree): redraw every matrix with std
  2 / sqrt(fan_in), so attention is peaked and the activations work in their curved range. The
  patch conv gets std 0.01 / sqrt(fan_in): ln_pre's input then has a mean square of ~1e-4, where
  its epsilon (1e-5, hard-coded in transformers) changes the result by several percent."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in tower.named_parameters():
      if "norm" in name or "ln_pre" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
      else:
        gain = 0.01 if "patch_conv" in name else 2.0
        p.copy_(torch.randn(p.shape, generator=gen) * gain / p[0].numel()**0.5)


@pytest.fixture(scope="module", params=["gelu", "silu"])
def llava(request, tmp_path_factory):
  """(torch LLaVA with a Pixtral tower, the saved file's tensors, config.json as a dict).
  "gelu" is transformers' default (the exact erf GELU); Pixtral-12B's config says "silu"."""
  vision = dict(TOWER, hidden_act=request.param)
  config = transformers.LlavaConfig(vision_config=vision, text_config=TEXT, image_token_index=10,
                                    vision_feature_layer=-1,
                                    vision_feature_select_strategy="full")
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config).float().eval()
  _randomise_tower(model.model.vision_tower, 1)
  directory = tmp_path_factory.mktemp("llava_pixtral") / "hf"
  model.save_pretrained(directory)
  with open(directory / "config.json") as f:
    config_json = json.load(f)
  return model, load_file(str(directory / "model.safetensors")), config_json


def _ours(llava):
  """(our config read from config.json's vision_config, our params read from the file)."""
  _, state, config_json = llava
  config = pv.PixtralViTConfig.from_hf(config_json["vision_config"])
  return config, pv.pixtral_params_from_state(config, state, prefix="vision_tower.")


def _images(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in IMAGE_SIZES]


def _torch_inputs(images):
  """The processor's layout: [B, 3, H_max, W_max] zero-padded, and image_sizes [B, 2]."""
  height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
  pixels = np.zeros((len(images), 3, height, width), np.float32)
  for b, image in enumerate(images):
    pixels[b, :, :image.shape[0], :image.shape[1]] = image.transpose(2, 0, 1)
  return torch.from_numpy(pixels), torch.tensor([i.shape[:2] for i in images])


def _split(packed: np.ndarray, axis: int) -> list[np.ndarray]:
  """transformers' packed patch axis cut per image, as LLaVA splits it."""
  counts = [(h // TOWER["patch_size"]) * (w // TOWER["patch_size"]) for h, w in IMAGE_SIZES]
  return np.split(packed, np.cumsum(counts)[:-1], axis=axis)


@pytest.fixture(scope="module")
def reference_hidden(llava):
  """transformers' hidden states per image: [L+1, rows * cols, D] each."""
  model = llava[0]
  pixels, sizes = _torch_inputs(_images())
  with torch.no_grad():
    out = model.model.vision_tower(pixels, image_sizes=sizes, output_hidden_states=True)
  packed = np.stack([h[0].numpy() for h in out.hidden_states])
  assert len(packed) == TOWER["num_hidden_layers"] + 1
  return _split(packed, axis=1)


# --------------------------------------------------------------------------------- the tower


def test_config_from_hf_object_and_dict(llava):
  model, _, config_json = llava
  ours = pv.PixtralViTConfig.from_hf(model.config.vision_config)
  assert ours == pv.PixtralViTConfig.from_hf(config_json["vision_config"])
  assert (ours.num_layers, ours.num_heads, ours.head_dim, ours.rope_theta) == (3, 4, 8, 100.0)
  # configs written before rope_parameters existed (Pixtral-12B's) keep rope_theta at the top
  legacy = {k: v for k, v in config_json["vision_config"].items() if k != "rope_parameters"}
  assert pv.PixtralViTConfig.from_hf({**legacy, "rope_theta": 100.0}) == ours
  assert pv.PixtralViTConfig.from_hf(legacy).rope_theta == 10000.0  # transformers' default
  with pytest.raises(ValueError, match="axial"):
    pv.PixtralViTConfig.from_hf({**legacy, "rope_parameters": {"rope_type": "default"}})


def test_tensor_sources_cover_the_saved_tower(llava):
  """The table names exactly the file's vision_tower tensors, each with the shape our layout
  implies (what the converter checks from file headers)."""
  _, state, config_json = llava
  config = pv.PixtralViTConfig.from_hf(config_json["vision_config"])
  shapes = {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in
            jax.tree_util.tree_flatten_with_path(pv.pixtral_param_shapes(config))[0]}
  sources = pv.pixtral_tensor_sources(config, "vision_tower.")
  assert {s.path for s in sources} == set(shapes)
  assert all(s.per_layer == s.path.startswith("layers/") for s in sources)
  keys = set()
  for s in sources:
    ours = shapes[s.path][1:] if s.per_layer else shapes[s.path]
    for _, key in iter_layer_keys(s, config.num_layers):
      assert state[key].shape == tuple(s.layout.torch_shape(ours)), key
      keys.add(key)
  assert keys == {k for k in state if k.startswith("vision_tower.")}


def test_every_hidden_state_matches_transformers(llava, reference_hidden):
  config, params = _ours(llava)
  ours = pv.pixtral_hidden_states(params, config, _images())
  for image, (mine, theirs) in enumerate(zip(ours, reference_hidden)):
    assert mine.shape == theirs.shape
    for layer in range(len(theirs)):
      err = relative_error(mine[layer], theirs[layer])
      assert err <= TOL, f"image {image}, hidden state {layer}: relative error {err:.2e}"


def test_blocked_attention_and_other_buckets_match(llava, reference_hidden):
  """bucket 32: 105 patches padded to 128, attention in 4 blocks of 32 queries."""
  config, params = _ours(llava)
  ours = pv.pixtral_hidden_states(params, config, _images(), bucket=32)
  for mine, theirs in zip(ours, reference_hidden):
    assert relative_error(mine, theirs) <= TOL


@pytest.mark.parametrize("layer", [-1, 0, 1])
def test_features_of_one_layer(llava, reference_hidden, layer):
  """Only the blocks `layer` needs run; the result is that hidden state of each image."""
  if llava[0].config.vision_config.hidden_act != "gelu":
    pytest.skip("layer selection does not depend on the activation")
  config, params = _ours(llava)
  for mine, theirs in zip(pv.pixtral_features(params, config, _images(), layer=layer),
                          reference_hidden):
    assert relative_error(mine, theirs[layer]) <= TOL


def test_llava_projects_the_last_hidden_state(llava):
  """LLaVA-Pixtral (vision_feature_layer -1, strategy "full") projects every patch of hidden
  state -1, split per image by image_sizes // patch_size: its projector applied to our
  features gives its image features."""
  model = llava[0]
  config, params = _ours(llava)
  images = _images(seed=1)
  pixels, sizes = _torch_inputs(images)
  ours = pv.pixtral_features(params, config, images, layer=model.config.vision_feature_layer)
  with torch.no_grad():
    theirs = model.model.get_image_features(pixels, image_sizes=sizes).pooler_output
    for mine, reference in zip(ours, theirs):
      projected = model.model.multi_modal_projector(torch.from_numpy(np.array(mine)))
      assert relative_error(projected.numpy(), reference.numpy()) <= TOL


def test_feature_layer_lists_concatenate(llava, reference_hidden):
  if llava[0].config.vision_config.hidden_act != "gelu":
    pytest.skip("layer selection does not depend on the activation")
  config, params = _ours(llava)
  for mine, theirs in zip(pv.pixtral_features(params, config, _images(), layer=(0, -1)),
                          reference_hidden):
    assert relative_error(mine, np.concatenate([theirs[0], theirs[-1]], axis=-1)) <= TOL
  with pytest.raises(ValueError, match="out of range"):
    pv.pixtral_features(params, config, _images(), layer=4)


def test_bfloat16_compute(llava, reference_hidden):
  """A smoke check of the compute dtype, not parity: the output is float32, really computed in
  bfloat16 (it is not float32-close), and close to the reference in norm. bfloat16 keeps ~3
  significant digits per operation; this deliberately sharp random tower (peaked attention)
  amplifies that to a few percent over 3 layers: hence 0.1 on ||ours - theirs|| / ||theirs||."""
  if llava[0].config.vision_config.hidden_act != "gelu":
    pytest.skip("the dtype path does not depend on the activation")
  config, params = _ours(llava)
  for mine, theirs in zip(pv.pixtral_features(params, config, _images(), dtype=jnp.bfloat16),
                          reference_hidden):
    assert mine.dtype == jnp.float32
    error = np.linalg.norm(np.asarray(mine) - theirs[-1]) / np.linalg.norm(theirs[-1])
    assert 1e-3 < error < 0.1


def test_packing_layout_and_bad_images():
  seq, grids = pv.pack_patches(_images(), TOWER["patch_size"], bucket=256)
  assert grids == [(6, 10), (9, 5)]
  assert seq.patches.shape == (256, 4, 4, 3)
  ids, rows, cols = (np.asarray(a) for a in (seq.image_ids, seq.rows, seq.cols))
  assert (ids[:60] == 0).all() and (ids[60:105] == 1).all() and (ids[105:] == -1).all()
  assert (rows[60 + 7], cols[60 + 7]) == (1, 2)  # row-major within each image
  np.testing.assert_array_equal(np.asarray(seq.patches[60 + 7]), _images()[1][4:8, 8:12])
  with pytest.raises(ValueError, match="smaller than one"):
    pv.pack_patches([np.zeros((3, 40, 3), np.float32)], 4)


# ---------------------------------------------------------------------------- preprocessing

# (height, width): kept, downscaled, very wide, very tall, tiny (1 x 1 and 3 x 2 become one
# patch), exactly the box, and just over it (the floor then the round-up to patches)
PREPROCESS_SIZES = ((30, 50), (200, 90), (7, 300), (300, 5), (1, 1), (3, 2), (64, 64),
                    (65, 130))
PATCH = 8
LONGEST = 64


def _pil_image(height: int, width: int, seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _image_processor():
  return hf_pil.PixtralImageProcessorPil(size={"longest_edge": LONGEST},
                                         patch_size={"height": PATCH, "width": PATCH})


def test_spec_from_processor_config():
  spec = pi.PixtralImageSpec.from_processor_config(_image_processor().to_dict())
  assert spec == pi.PixtralImageSpec(max_height=LONGEST, max_width=LONGEST, patch_size=PATCH)
  assert (pi.PixtralImageSpec.from_processor_config(hf_pil.PixtralImageProcessorPil().to_dict())
          == pi.PixtralImageSpec())
  # PixtralProcessor resizes to its own patch_size * spatial_merge_size
  merged = pi.PixtralImageSpec.from_processor_config(
      _image_processor().to_dict(), {"patch_size": 4, "spatial_merge_size": 2})
  assert merged.patch_size == 8


def test_pixels_match_the_processor():
  """Each image's pixel_values, cropped to its image_sizes entry, equal ours exactly."""
  images = [_pil_image(h, w, seed) for seed, (h, w) in enumerate(PREPROCESS_SIZES)]
  out = _image_processor()(images=images, return_tensors="np")
  spec = pi.PixtralImageSpec(max_height=LONGEST, max_width=LONGEST, patch_size=PATCH)
  for image, padded, (height, width) in zip(images, out["pixel_values"], out["image_sizes"]):
    assert pi.pixtral_size(image.height, image.width, spec) == (height, width)
    ours = pi.pixtral_pixels(image, spec)
    assert ours.dtype == np.float32 and ours.shape == (height, width, 3)
    np.testing.assert_array_equal(ours, padded[:, :height, :width].transpose(1, 2, 0),
                                  err_msg=f"image {image.height} x {image.width}")


def test_resize_rule():
  spec = pi.PixtralImageSpec(max_height=LONGEST, max_width=LONGEST, patch_size=PATCH)
  assert pi.pixtral_size(30, 50, spec) == (32, 56)  # not enlarged, only up to whole patches
  assert pi.pixtral_size(200, 90, spec) == (64, 32)  # 200 / 3.125 = 64, 90 / 3.125 = 28.8
  assert pi.pixtral_size(7, 300, spec) == (8, 64)  # 7 / 4.6875 floors to 1 px: one patch row
  assert pi.pixtral_size(1, 1, spec) == (8, 8)


def test_degenerate_aspect_ratio_is_an_error():
  """A side that floors to 0 px: the processor fails with an unrelated message about size
  keys; ours names the cause, and never yields an image without tokens."""
  spec = pi.PixtralImageSpec(max_height=LONGEST, max_width=LONGEST, patch_size=PATCH)
  image = _pil_image(1, 300, seed=0)
  with pytest.raises(ValueError):
    _image_processor()(images=[image], return_tensors="np")
  with pytest.raises(ValueError, match="aspect ratio"):
    pi.pixtral_pixels(image, spec)
  with pytest.raises(ValueError, match="multiple"):
    pi.pixtral_token_grid(30, 32, PATCH)
  with pytest.raises(ValueError):
    pi.pixtral_span_text(0, 3)


def test_span_text():
  assert pi.pixtral_span_text(2, 3) == "[IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_END]"
  assert pi.pixtral_span_text(1, 1, "<i>", "<b>", "<e>") == "<i><e>"


# ------------------------------------------------------------------ the processor's expansion

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "[IMG]", "[IMG_BREAK]", "[IMG_END]")


@pytest.fixture(scope="module")
def processing_pixtral():
  """transformers' processing_pixtral module, loaded from its source; without torchvision, its
  import of `get_resize_output_image_size` from the torchvision image processor is served by the
  PIL module's (the same rule, "Adapted from" it). Both modules leave sys.modules afterwards."""
  torchvision_module = "transformers.models.pixtral.image_processing_pixtral"
  path = os.path.join(os.path.dirname(hf_pil.__file__), "processing_pixtral.py")
  with pytest.MonkeyPatch.context() as mp:
    if importlib.util.find_spec("torchvision") is None:
      stub = types.ModuleType(torchvision_module)
      stub.get_resize_output_image_size = hf_pil.get_resize_output_image_size
      mp.setitem(sys.modules, torchvision_module, stub)
    name = "transformers.models.pixtral._processing_pixtral_under_test"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    mp.setitem(sys.modules, name, module)  # transformers inspects the class's source
    spec.loader.exec_module(module)
    yield module


@pytest.mark.parametrize("merge", [1, 2])
def test_token_expansion_matches_pixtral_processor(processing_pixtral, merge):
  vocab = {t: i for i, t in enumerate(SPECIALS + ("describe", "and", "this"))}
  tokenizer = word_tokenizer(vocab, SPECIALS)
  processor = processing_pixtral.PixtralProcessor(
      image_processor=hf_pil.PixtralImageProcessorPil(size={"longest_edge": LONGEST}),
      tokenizer=tokenizer, patch_size=4, spatial_merge_size=merge)
  images = [_pil_image(h, w, seed) for seed, (h, w) in enumerate(((30, 50), (300, 5), (1, 1)))]
  prompt = "describe [IMG] and [IMG] and this [IMG]"
  out = processor(text=prompt, images=images, return_tensors="np")

  spec = pi.PixtralImageSpec.from_processor_config(
      processor.image_processor.to_dict(), {"patch_size": 4, "spatial_merge_size": merge})
  spans = []
  for image, size in zip(images, out["image_sizes"]):
    pixels = pi.pixtral_pixels(image, spec)
    assert pixels.shape[:2] == tuple(size)
    spans.append(pi.pixtral_span_text(*pi.pixtral_token_grid(*pixels.shape[:2], 4, merge)))
  pieces = prompt.split("[IMG]")
  text = pieces[0] + "".join(span + piece for span, piece in zip(spans, pieces[1:]))
  expected = tokenizer(text)["input_ids"]
  np.testing.assert_array_equal(out["input_ids"][0], expected)
