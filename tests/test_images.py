"""Our numpy/PIL preprocessing against transformers' image processors, value for value."""

import warnings

import numpy as np
import pytest
import transformers
from PIL import Image

from narrowgate_jax.processing import images as im


def _random_image(height, width, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4}[mode]
  return Image.fromarray(rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8), mode)


@pytest.mark.parametrize("size", [(300, 200), (90, 160), (40, 40), (513, 700)])
@pytest.mark.parametrize("target", [512, 64])
def test_chameleon_pixels_equal_the_processor(size, target):
  processor = transformers.ChameleonImageProcessorPil(
      size={"shortest_edge": target}, crop_size={"height": target, "width": target})
  spec = im.ChameleonImageSpec.from_processor_config(processor.to_dict())
  assert spec.size == target and spec.crop == target
  image = _random_image(*size)
  theirs = np.asarray(processor(image, return_tensors="np")["pixel_values"][0])
  ours = im.chameleon_pixels(image, spec)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, target, target)
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("size", [(300, 200), (37, 211), (64, 64)])
def test_emu3_pixels_equal_the_processor(size):
  processor = transformers.Emu3ImageProcessor(min_pixels=48 * 48, max_pixels=96 * 96)
  spec = im.Emu3ImageSpec.from_processor_config(processor.to_dict())
  image = _random_image(*size)
  out = processor(image, return_tensors="np")
  ours = im.emu3_pixels(image, spec)
  np.testing.assert_array_equal(ours, out["pixel_values"][0])
  assert list(ours.shape[1:]) == list(out["image_sizes"][0])
  assert ours.shape[1] % 8 == 0 and ours.shape[2] % 8 == 0


def test_emu3_batch_padding_equals_the_processor():
  processor = transformers.Emu3ImageProcessor(min_pixels=48 * 48, max_pixels=96 * 96)
  spec = im.Emu3ImageSpec.from_processor_config(processor.to_dict())
  pics = [_random_image(300, 200, 1), _random_image(50, 120, 2)]
  out = processor(pics, return_tensors="np")
  pixels, sizes = im.pad_to_batch([im.emu3_pixels(p, spec) for p in pics])
  np.testing.assert_array_equal(pixels, out["pixel_values"])
  np.testing.assert_array_equal(sizes, np.asarray(out["image_sizes"]))


def test_transparent_image_is_composited_on_white_with_a_warning():
  rgba = _random_image(20, 30, mode="RGBA")
  with pytest.warns(im.NonRGBImageWarning, match="mode 'RGBA'"):
    rgb = im.load_image(rgba)
  processor = transformers.ChameleonImageProcessorPil(
      size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
  spec = im.ChameleonImageSpec.from_processor_config(processor.to_dict())
  np.testing.assert_array_equal(im.chameleon_pixels(rgb, spec),
                                processor(rgba, return_tensors="np")["pixel_values"][0])


def test_grayscale_is_converted_and_rgb_passes_silently(tmp_path):
  gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
  with pytest.warns(im.NonRGBImageWarning):
    assert im.load_image(gray).mode == "RGB"
  path = tmp_path / "pic.png"
  _random_image(8, 8).save(path)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert im.load_image(path).size == (8, 8)


def test_unreadable_file_is_named(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match=r"image 3: cannot read .*broken\.jpg"):
    im.load_image(bad, index=3)
  with pytest.raises(ValueError, match="image 0: cannot read .*missing.png"):
    im.load_image(tmp_path / "missing.png")
