"""LLaVA-family preprocessing, AnyRes token layouts and feature packing against transformers.

Pixels are compared with the `*ImageProcessorPil` classes, token counts with the processors'
expansion rules, packed features with the torch models' pack_image_features on random features.
The configs are tiny: 28-pixel views, 7-pixel vision patches (g = 4), pinpoints of 28-pixel
tiles shaped like the released ones (NeXT: 1x2, 2x1, 2x2, 1x3, 3x1; OneVision: every grid up to
4x4, so anyres_max_9 shrinks the largest).
"""

import dataclasses

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from PIL import Image

from narrowgate_jax.models.anyres import bilinear_taps, pack_features
from narrowgate_jax.processing import anyres as ar

TILE, PATCH = 28, 7
GRID = TILE // PATCH
NEXT_PINS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
OV_PINS = [[28 * i, 28 * j] for i in range(1, 5) for j in range(1, 5)]

# (height, width): square, wide, tall, unpadded both ways, big enough for OneVision's shrink
# (anyres_max_9 over 4x4 tiles), elongated but still with HD rows, tiny (smaller than a patch).
SIZES = [(40, 40), (60, 100), (100, 60), (45, 100), (90, 41), (200, 210), (300, 180),
         (100, 1000), (1000, 100), (1, 1), (3, 5), (5, 3)]
EXTREME = [(30, 1000), (1000, 30)]


def _image(height, width, seed=0):
  rng = np.random.default_rng(seed + 7 * height + width)
  return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _channels_last(pixel_values):
  return np.moveaxis(np.asarray(pixel_values), -3, -1)


@pytest.fixture(scope="module")
def processors():
  """The PIL image processors of the tiny configs and our specs read from their to_dict()."""
  nxt = transformers.LlavaNextImageProcessorPil(
      size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
      image_grid_pinpoints=NEXT_PINS)
  ov = transformers.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                                    image_grid_pinpoints=OV_PINS)
  return {"llava_next": (nxt, ar.ClipImageSpec.from_processor_config(nxt.to_dict())),
          "llava_onevision": (ov, ar.ClipImageSpec.from_processor_config(ov.to_dict()))}


@pytest.fixture(scope="module")
def models():
  """Tiny torch models whose pack_image_features is the reference."""
  torch.manual_seed(0)
  text = {"vocab_size": 40, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1}
  vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": TILE, "patch_size": PATCH}
  nxt = transformers.LlavaNextModel(transformers.LlavaNextConfig(
      vision_config=transformers.CLIPVisionConfig(**vision),
      text_config=transformers.LlamaConfig(**text), image_grid_pinpoints=NEXT_PINS,
      image_token_id=4))
  ov = transformers.LlavaOnevisionModel(transformers.LlavaOnevisionConfig(
      vision_config=transformers.SiglipVisionConfig(**vision),
      text_config=transformers.Qwen2Config(**text), image_grid_pinpoints=OV_PINS,
      vision_feature_select_strategy="full", image_token_id=4))
  return {"llava_next": nxt.eval(), "llava_onevision": ov.eval()}


def _tokenizer():
  vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", "what", "?"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<image>", "<pad>", "<s>", "</s>"])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              pad_token="<pad>")


def _torch_pack(model, variant, features, size, vision_aspect_ratio):
  kw = ({"vision_feature_select_strategy": "default"} if variant == "llava_next" else
        {"vision_aspect_ratio": vision_aspect_ratio})
  with torch.no_grad():
    packed, _ = model.pack_image_features([torch.from_numpy(features)], torch.tensor([size]),
                                          image_newline=model.image_newline, **kw)
  return packed[0].numpy()


# ------------------------------------------------------------------------------------ pixels


@pytest.mark.parametrize("size", [(40, 40), (60, 100), (100, 60), (1000, 30), (3, 5)])
@pytest.mark.parametrize("do_pad", [False, True])
def test_llava_pixels_equal_the_processor(size, do_pad):
  processor = transformers.LlavaImageProcessorPil(
      size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, do_pad=do_pad)
  spec = ar.ClipImageSpec.from_processor_config(processor.to_dict())
  assert spec.pad_to_square == do_pad
  image = _image(*size)
  theirs = _channels_last(processor(image, return_tensors="np")["pixel_values"][0])
  ours = ar.llava_pixels(image, spec)
  assert ours.dtype == np.float32 and ours.shape == (TILE, TILE, 3)
  np.testing.assert_array_equal(ours, theirs)
  raw = processor(image, do_rescale=False, do_normalize=False, return_tensors="np")
  np.testing.assert_array_equal(ar.llava_pixels(image, spec, normalize=False),
                                _channels_last(raw["pixel_values"][0]))


@pytest.mark.parametrize("variant", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", SIZES + EXTREME)
def test_anyres_views_equal_the_processor(processors, variant, size):
  processor, spec = processors[variant]
  image = _image(*size)
  out = processor(image, return_tensors="np")
  theirs = _channels_last(out["pixel_values"][0])
  ours = ar.anyres_views(image, spec)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  np.testing.assert_array_equal(ours, theirs)
  raw = processor(image, do_rescale=False, do_normalize=False, return_tensors="np")
  np.testing.assert_array_equal(ar.anyres_views(image, spec, normalize=False),
                                _channels_last(raw["pixel_values"][0]))


@pytest.mark.parametrize("variant,kwargs,grid", [
    ("llava_next", {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
     24),
    ("llava_onevision", {}, 27),
])
@pytest.mark.parametrize("size", [(375, 500), (30, 1000), (1000, 30)])
def test_released_geometry_equals_the_processor(variant, kwargs, grid, size):
  """Released view sizes and pinpoints (CLIP-L/14-336, SigLIP-so400m/14-384): the pixels, and
  the token count of the processors' rule; 1000x30 still keeps HD rows at this scale."""
  cls = {"llava_next": transformers.LlavaNextImageProcessorPil,
         "llava_onevision": transformers.LlavaOnevisionImageProcessorPil}[variant]
  processor = cls(**kwargs)
  spec = ar.ClipImageSpec.from_processor_config(processor.to_dict())
  image = _image(*size)
  theirs = _channels_last(processor(image, return_tensors="np")["pixel_values"][0])
  np.testing.assert_array_equal(ar.anyres_views(image, spec), theirs)
  if variant == "llava_next":
    rule = transformers.LlavaNextProcessor(image_processor=processor, tokenizer=_tokenizer(),
                                           patch_size=14, num_additional_image_tokens=0)
  else:
    rule = object.__new__(transformers.LlavaOnevisionProcessor)
    rule.image_processor, rule.num_image_tokens = processor, grid * grid
    rule.vision_aspect_ratio = "anyres_max_9"
  layout = ar.anyres_layout(*size, spec, grid, variant)
  assert layout.plan.num_views == theirs.shape[0] and layout.plan.hd_shape[0] > 0
  view_size = theirs.shape[1]
  assert layout.num_tokens == rule._get_number_of_features(*size, view_size, view_size)


def test_onevision_multi_image_view_is_llava_pixels_padded(processors):
  processor, spec = processors["llava_onevision"]
  pics = [_image(40, 70), _image(90, 30)]
  out = processor([pics], return_tensors="np")
  padded = dataclasses.replace(spec, pad_to_square=True)
  for k, pic in enumerate(pics):
    np.testing.assert_array_equal(ar.llava_pixels(pic, padded),
                                  _channels_last(out["pixel_values"][k, 0]))


@pytest.mark.parametrize("size", [(40, 40), (60, 100), (100, 60), (10, 1000), (1, 1)])
@pytest.mark.parametrize("mean", [None, (0.5, 0.5, 0.5)])
def test_janus_pixels_equal_the_processor(size, mean):
  kwargs = {} if mean is None else {"image_mean": mean, "image_std": mean}
  processor = transformers.JanusImageProcessorPil(size={"height": 32, "width": 32}, **kwargs)
  spec = ar.JanusImageSpec.from_processor_config(processor.to_dict())
  image = _image(*size)
  theirs = _channels_last(processor(image, return_tensors="np")["pixel_values"][0])
  ours = ar.janus_pixels(image, spec)
  assert ours.shape == (32, 32, 3)
  np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------ token counts, packing


def test_next_token_count_equals_the_processor_expansion(processors):
  image_processor, spec = processors["llava_next"]
  processor = transformers.LlavaNextProcessor(
      image_processor=image_processor, tokenizer=_tokenizer(), patch_size=PATCH,
      vision_feature_select_strategy="default", num_additional_image_tokens=1)
  for size in SIZES:
    ids = processor(images=_image(*size), text="<image> what ?", return_tensors="np")["input_ids"]
    layout = ar.anyres_layout(*size, spec, GRID, "llava_next")
    assert layout.num_tokens == int((ids == 4).sum()), size


@pytest.mark.parametrize("vision_aspect_ratio", ["anyres_max_9", "anyres_max_2"])
def test_onevision_token_count_equals_the_processor_rule(processors, vision_aspect_ratio):
  # LlavaOnevisionProcessor cannot be built without torchvision (its video processor), so its
  # own expansion rule is called on a bare instance carrying the attributes it reads.
  image_processor, spec = processors["llava_onevision"]
  rule = object.__new__(transformers.LlavaOnevisionProcessor)
  rule.image_processor, rule.num_image_tokens = image_processor, GRID * GRID
  rule.vision_aspect_ratio = vision_aspect_ratio
  for size in SIZES:
    layout = ar.anyres_layout(*size, spec, GRID, "llava_onevision",
                              vision_aspect_ratio=vision_aspect_ratio)
    assert layout.num_tokens == rule._get_number_of_features(*size, TILE, TILE), size


@pytest.mark.parametrize("variant,vision_aspect_ratio", [
    ("llava_next", None), ("llava_onevision", "anyres_max_9"), ("llava_onevision", "anyres_max_2")])
def test_pack_features_equal_pack_image_features(processors, models, variant,
                                                 vision_aspect_ratio):
  _, spec = processors[variant]
  rng = np.random.default_rng(1)
  shrunk = 0
  for size in SIZES:
    layout = ar.anyres_layout(*size, spec, GRID, variant, vision_aspect_ratio=vision_aspect_ratio)
    features = rng.standard_normal((layout.plan.num_views, GRID * GRID, 8)).astype(np.float32)
    theirs = _torch_pack(models[variant], variant, features, size, vision_aspect_ratio)
    newline = models[variant].image_newline.detach().numpy()
    ours = np.asarray(pack_features(features, layout, newline))
    assert ours.shape == theirs.shape == (layout.num_tokens, 8), size
    np.testing.assert_array_equal(ours[layout.newline], np.broadcast_to(newline, (
        int(layout.newline.sum()), 8)))
    if layout.plan.resize is None:
      np.testing.assert_array_equal(ours, theirs)
    else:
      # Same taps and weights as torch (test_bilinear_taps_equal_torch); torch's compiled kernel
      # fuses its multiply-adds, which moves results by an ulp or two (|x| < 6 here).
      shrunk += 1
      np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
  assert (shrunk > 0) == (variant == "llava_onevision"), shrunk


@pytest.mark.parametrize("n_in,n_out", [(16, 12), (16, 13), (7, 4), (40, 13), (162, 100),
                                        (100, 37)])
def test_bilinear_taps_equal_torch(n_in, n_out):
  eye = torch.eye(n_in)[:, None, :, None].expand(n_in, 1, n_in, 2).contiguous()
  weights = torch.nn.functional.interpolate(eye, [n_out, 2], mode="bilinear",
                                            align_corners=False)[:, 0, :, 0].T.numpy()
  i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
  ours = np.zeros((n_out, n_in), np.float32)
  np.add.at(ours, (np.arange(n_out), i0), w0)
  np.add.at(ours, (np.arange(n_out), i1), w1)
  np.testing.assert_array_equal(ours, weights)


@pytest.mark.parametrize("variant", ["llava_next", "llava_onevision"])
def test_layout_coordinates_are_where_packing_takes_features(processors, variant):
  """Features that encode their own (view, row, col), packed: every token gets back the
  coordinates its layout claims (within half a patch where OneVision interpolates)."""
  _, spec = processors[variant]
  for size in SIZES:
    layout = ar.anyres_layout(*size, spec, GRID, variant)
    plan = layout.plan
    nw = plan.tiles[1]
    view, row, col = np.meshgrid(np.arange(plan.num_views), np.arange(GRID), np.arange(GRID),
                                 indexing="ij")
    # Full HD-grid coordinates for tiles (linear across tile borders, so bilinear keeps them).
    full_r = np.where(view > 0, (view - 1) // nw * GRID + row, row)
    full_c = np.where(view > 0, (view - 1) % nw * GRID + col, col)
    code = np.stack([view > 0, full_r, full_c], -1).reshape(plan.num_views, GRID * GRID, 3)
    packed = np.asarray(pack_features(code.astype(np.float32), layout, np.full(3, -9.0)))
    is_hd, got_r, got_c = packed[~layout.newline].T
    v = layout.view[~layout.newline]
    want_r = np.where(v > 0, (v - 1) // nw * GRID + layout.row[~layout.newline],
                      layout.row[~layout.newline])
    want_c = np.where(v > 0, (v - 1) % nw * GRID + layout.col[~layout.newline],
                      layout.col[~layout.newline])
    np.testing.assert_array_equal(is_hd, v > 0)
    assert np.abs(got_r - want_r).max() <= 0.5 and np.abs(got_c - want_c).max() <= 0.5, size
    if plan.resize is None:
      np.testing.assert_array_equal(got_r, want_r)
      np.testing.assert_array_equal(got_c, want_c)
    assert (packed[layout.newline] == -9).all()
    # Newlines close every HD row and nothing else.
    hd_rows = plan.hd_shape[0]
    assert layout.newline.sum() == hd_rows and not layout.newline[:GRID * GRID].any()
    assert layout.newline[-1] and (layout.view[layout.newline] == -1).all()


@pytest.mark.parametrize("variant", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", EXTREME)
def test_extreme_aspect_ratio_raises_where_transformers_drops_the_hd_view(processors, models,
                                                                          variant, size):
  _, spec = processors[variant]
  views = ar.anyres_views(_image(*size), spec)   # the pixels themselves are fine
  features = np.random.default_rng(0).standard_normal(
      (views.shape[0], GRID * GRID, 8)).astype(np.float32)
  theirs = _torch_pack(models[variant], variant, features, size, "anyres_max_9")
  hd = theirs[GRID * GRID:]
  # transformers keeps the base view and at most newline-only rows: no HD content.
  newline = models[variant].image_newline.detach().numpy()
  assert np.all(hd == newline[None]), hd.shape
  with pytest.raises(ValueError, match=f"{size[1]}x{size[0]} \\(width x height\\)"):
    ar.anyres_layout(*size, spec, GRID, variant)


def test_single_view_layouts_and_packing():
  layout = ar.single_view_layout(GRID)
  assert layout.num_tokens == GRID * GRID and not layout.newline.any()
  np.testing.assert_array_equal(layout.row * GRID + layout.col, np.arange(GRID * GRID))
  features = np.random.default_rng(0).standard_normal((1, GRID * GRID, 5)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(pack_features(features, layout)), features[0])
  trailing = ar.single_view_layout(GRID, trailing_newline=True)
  newline = np.arange(5, dtype=np.float32)
  packed = np.asarray(pack_features(features, trailing, newline))
  np.testing.assert_array_equal(packed, np.concatenate([features[0], newline[None]]))
  assert trailing.newline.tolist() == [False] * GRID * GRID + [True]
  with pytest.raises(ValueError, match="image_newline"):
    pack_features(features, trailing)


def test_llava_token_count_equals_the_processor_expansion():
  processor = transformers.LlavaProcessor(
      image_processor=transformers.LlavaImageProcessorPil(
          size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}),
      tokenizer=_tokenizer(), patch_size=PATCH, vision_feature_select_strategy="default",
      num_additional_image_tokens=1)
  ids = processor(images=_image(50, 80), text="<image> what ?", return_tensors="np")["input_ids"]
  assert ar.single_view_layout(GRID).num_tokens == int((ids == 4).sum())


# ----------------------------------------------------------------------------- box -> tokens


def test_box_canvas_is_red_on_green_with_inclusive_corners():
  canvas = np.asarray(ar.box_canvas(10, 6, [(2, 1, 4, 3)]))
  assert canvas.shape == (6, 10, 3)
  red = np.all(canvas == (255, 0, 0), axis=-1)
  assert red.sum() == 9 and red[1:4, 2:5].all()
  assert np.all(canvas[~red] == (0, 255, 0))


def test_related_patches():
  views = np.zeros((2, 28, 28, 3), np.float32)
  views[..., 1] = 255
  views[1, 8, 20] = (255, 0, 0)         # one red pixel: patch (1, 2) of view 1
  views[0, 3, 3] = (254, 0, 0)          # not pure red
  related = ar.related_patches(views, PATCH)
  assert related.shape == (2, GRID, GRID)
  assert np.argwhere(related).tolist() == [[1, 1, 2]]
  with pytest.raises(ValueError, match="patches"):
    ar.related_patches(views, 5)


def test_box_over_one_tile_selects_its_base_and_hd_tokens(processors):
  """A 56x56 image is tiled 2x2 exactly (no resize, no padding). A box over its top-left
  quarter fills HD tile 1 and the base view's top-left 2x2 patches (the base is the image
  halved: red pixels in rows/cols 0..12 after bicubic, so patches 0 and 1 of each axis)."""
  _, spec = processors["llava_next"]
  canvas = ar.box_canvas(56, 56, [(0, 0, 27, 27)])
  views = ar.anyres_views(canvas, spec, normalize=False)
  related = ar.related_patches(views, PATCH)
  layout = ar.anyres_layout(56, 56, spec, GRID, "llava_next")
  assert layout.plan.tiles == (2, 2) and layout.plan.hd_shape == (8, 8)
  selected = np.flatnonzero(layout.token_mask(related))
  base = [r * GRID + c for r in range(2) for c in range(2)]
  hd = [GRID * GRID + r * 9 + c for r in range(4) for c in range(4)]   # 8 patches + newline a row
  assert selected.tolist() == base + hd
  assert not layout.newline[selected].any()
  # The same canvas on OneVision's geometry (no shrink at this size) selects the same tokens.
  _, ov_spec = processors["llava_onevision"]
  ov = ar.anyres_layout(56, 56, ov_spec, GRID, "llava_onevision")
  ov_related = ar.related_patches(ar.anyres_views(canvas, ov_spec, normalize=False), PATCH)
  assert np.flatnonzero(ov.token_mask(ov_related)).tolist() == base + hd


def test_box_on_llava_single_view():
  spec = ar.ClipImageSpec(shortest_edge=TILE, crop_hw=(TILE, TILE), pad_to_square=True)
  canvas = ar.box_canvas(56, 28, [(28, 0, 55, 27)])    # the right half of a wide image
  views = ar.llava_pixels(canvas, spec, normalize=False)[None]
  mask = ar.single_view_layout(GRID).token_mask(ar.related_patches(views, PATCH))
  # Padded to 56x56 (image in rows 14..41), halved: red in rows ~7..20, cols ~14..27.
  grid = mask.reshape(GRID, GRID)
  assert grid[:, 2:].any() and not grid[:, :2].any()
  assert not grid[0].any() and not grid[3].any()


# ------------------------------------------------------------------------------ spec parsing


def test_spec_from_released_style_configs():
  nxt = ar.ClipImageSpec.from_processor_config({
      "image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 336},
      "crop_size": {"height": 336, "width": 336}, "do_pad": True,
      "image_grid_pinpoints": [[336, 672], [672, 336]]})
  assert (nxt.shortest_edge, nxt.crop_hw, nxt.tile_size) == (336, (336, 336), 336)
  assert not nxt.pad_to_square and nxt.grid_pinpoints == ((336, 672), (672, 336))
  clip = ar.ClipImageSpec.from_processor_config({"image_processor_type": "CLIPImageProcessor",
                                                 "size": 336, "crop_size": 336})
  assert (clip.shortest_edge, clip.crop_hw, clip.pad_to_square) == (336, (336, 336), False)
  ov = ar.ClipImageSpec.from_processor_config({
      "image_processor_type": "LlavaOnevisionImageProcessor",
      "size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5]})
  assert ov.size_hw == (384, 384) and ov.crop_hw is None and ov.tile_size == 384
  assert ov.grid_pinpoints == ar.ONEVISION_PINPOINTS and ov.mean == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="family"):
    ar.ClipImageSpec.from_processor_config({"image_processor_type": "SiglipImageProcessor"})
  with pytest.raises(ValueError, match="anyres_max"):
    ar.anyres_layout(40, 40, ov, 27, "llava_onevision", vision_aspect_ratio="anyres")
