"""Image loading and each native family's preprocessing, in numpy and PIL (no torch).

Each function reproduces the family's transformers image processor step for step (the same PIL
resampling, the same float64 rescale then float32 cast, the same normalisation), so the pixels,
and therefore the VQ codes, are the ones the reference model sees.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class NonRGBImageWarning(UserWarning):
  pass


def load_image(image: ImageLike, index: int = 0) -> Image.Image:
  """A PIL RGB image from a PIL image, a uint8 array [H, W, 3] or a file path.

  Transparency is composited onto white and other modes are converted to RGB, with a warning
  (as transformers' processors convert silently). An unreadable file raises, naming it.
  """
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    try:
      with Image.open(path) as opened:
        opened.load()
        image = opened.copy()
    except (OSError, ValueError) as e:
      raise ValueError(f"image {index}: cannot read {path!r} as an image ({e})") from e
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
      raise ValueError(f"image {index}: an array image must be uint8 [H, W, 3|4], "
                       f"got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    raise TypeError(f"image {index}: expected a PIL image, a uint8 array or a path, "
                    f"got {type(image).__name__}")
  if image.mode == "RGB":
    return image
  warnings.warn(f"image {index} has mode {image.mode!r}; converting to RGB", NonRGBImageWarning,
                stacklevel=2)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def _rescale_normalize(rgb: np.ndarray, scale: float, mean, std) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [3, H, W]: x * scale (in float64, then float32), then
  (x - mean) / std in float32, as transformers' rescale and normalize do."""
  x = (rgb.astype(np.float64) * scale).astype(np.float32)
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(x.transpose(2, 0, 1))


# -------------------------------------------------------------------------------- Chameleon


@dataclasses.dataclass(frozen=True)
class ChameleonImageSpec:
  """ChameleonImageProcessor: shortest edge to `size`, centre crop, x * 0.0078 - 1."""

  size: int = 512
  crop: int = 512
  resample: int = Image.LANCZOS
  rescale: float = 0.0078
  mean: tuple = (1.0, 1.0, 1.0)
  std: tuple = (1.0, 1.0, 1.0)

  @classmethod
  def from_processor_config(cls, cfg: Mapping[str, Any]) -> "ChameleonImageSpec":
    d = cls()
    size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
    return cls(size=size.get("shortest_edge", d.size), crop=crop.get("height", d.crop),
               resample=cfg.get("resample", d.resample),
               rescale=cfg.get("rescale_factor", d.rescale),
               mean=tuple(cfg.get("image_mean", d.mean)), std=tuple(cfg.get("image_std", d.std)))


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the shorter side = size and the aspect kept (longer side truncated)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def center_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] -> [height, width, C] around the centre, zero-padding an image that is smaller."""
  h, w = rgb.shape[:2]
  pad_top, pad_left = math.ceil(max(height - h, 0) / 2), math.ceil(max(width - w, 0) / 2)
  if pad_top or pad_left:
    canvas = np.zeros((max(h, height), max(w, width), rgb.shape[2]), rgb.dtype)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = rgb
    rgb, h, w = canvas, canvas.shape[0], canvas.shape[1]
  top, left = (h - height) // 2, (w - width) // 2
  return rgb[top:top + height, left:left + width]


def chameleon_pixels(image: Image.Image, spec: ChameleonImageSpec) -> np.ndarray:
  """RGB image -> pixel values [3, crop, crop] float32."""
  height, width = shortest_edge_size(image.height, image.width, spec.size)
  resized = np.asarray(image.resize((width, height), resample=spec.resample))
  cropped = center_crop(resized, spec.crop, spec.crop)
  return _rescale_normalize(cropped, spec.rescale, spec.mean, spec.std)


# ------------------------------------------------------------------------------------- Emu3


@dataclasses.dataclass(frozen=True)
class Emu3ImageSpec:
  """Emu3ImageProcessor: resize to multiples of `spatial_factor` within a pixel budget, CLIP norm."""

  min_pixels: int = 512 * 512
  max_pixels: int = 1024 * 1024
  spatial_factor: int = 8
  resample: int = Image.BICUBIC
  rescale: float = 1 / 255
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD

  @classmethod
  def from_processor_config(cls, cfg: Mapping[str, Any]) -> "Emu3ImageSpec":
    d = cls()
    return cls(min_pixels=cfg.get("min_pixels", d.min_pixels),
               max_pixels=cfg.get("max_pixels", d.max_pixels),
               spatial_factor=cfg.get("spatial_factor", d.spatial_factor),
               resample=cfg.get("resample", d.resample),
               rescale=cfg.get("rescale_factor", d.rescale),
               mean=tuple(cfg.get("image_mean") or d.mean), std=tuple(cfg.get("image_std") or d.std))


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
  """Emu3's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels],
  aspect ratio kept as closely as those allow."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def emu3_pixels(image: Image.Image, spec: Emu3ImageSpec) -> np.ndarray:
  """RGB image -> pixel values [3, h, w] float32 (h, w multiples of spec.spatial_factor)."""
  height, width = smart_resize(image.height, image.width, spec.spatial_factor, spec.min_pixels,
                               spec.max_pixels)
  resized = np.asarray(image.resize((width, height), resample=spec.resample))
  return _rescale_normalize(resized, spec.rescale, spec.mean, spec.std)


def pad_to_batch(pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """[3, h_i, w_i] images -> ([B, 3, H, W] zero-padded at the bottom and right, sizes [B, 2])."""
  sizes = np.asarray([p.shape[1:] for p in pixels], np.int32)
  out = np.zeros((len(pixels), 3, *sizes.max(axis=0)), np.float32)
  for b, p in enumerate(pixels):
    out[b, :, :p.shape[1], :p.shape[2]] = p
  return out, sizes
