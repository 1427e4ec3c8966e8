"""Pixtral's image preprocessing and image-token layout, in numpy and PIL (no torch).

Reproduces transformers' `PixtralImageProcessor(Pil)` and the image-token expansion of
`PixtralProcessor` (whose torch-only import keeps it from being used here):

  1. resize (PIL, bicubic by default) so the image fits within `max_height` x `max_width`
     (the checkpoint's `longest_edge` both ways), never enlarging it, then up to whole patches;
  2. x * rescale_factor in float64, cast to float32, then (x - mean) / std in float32;
  3. one `[IMG]` token per patch, row by row, each row ended by `[IMG_BREAK]`, the image's last
     `[IMG_BREAK]` replaced by `[IMG_END]`.

The processor pads a batch to its largest image and passes `image_sizes`; the model only ever
reads each image's own (h, w) corner, so here each image keeps its own size: `pixtral_pixels`
returns the processor's pixel_values of that image cropped to its `image_sizes` entry.

Patch size: `PixtralProcessor` overrides the image processor's patch size with its own
`patch_size * spatial_merge_size` (processor_config.json), so the resize aligns to that; the
token grid counts patches of that size too. Pixtral-12B has spatial_merge_size 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PixtralImageSpec:
  """PixtralImageProcessor's settings (defaults = transformers' defaults).

  Attributes:
    max_height, max_width: the box the resized image fits in (`size.longest_edge` both ways, or
      `size.height` / `size.width`).
    patch_size: the side the resized sides are multiples of (the processor's patch_size times
      its spatial_merge_size, when built from both config files).
    resample: PIL resampling filter.
    rescale: the factor pixels are multiplied by (1.0 when do_rescale is off).
    mean, std: per-channel normalisation ((0, 0, 0) and (1, 1, 1) when do_normalize is off).
  """

  max_height: int = 1024
  max_width: int = 1024
  patch_size: int = 16
  resample: int = Image.BICUBIC
  rescale: float = 1 / 255
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD

  @classmethod
  def from_processor_config(cls, cfg: Mapping[str, Any],
                            processor_cfg: Optional[Mapping[str, Any]] = None
                            ) -> "PixtralImageSpec":
    """From preprocessor_config.json (and processor_config.json, whose patch_size and
    spatial_merge_size win, as PixtralProcessor passes them to the image processor).

    Raises ValueError for settings the model cannot use: no resize (sides would not be whole
    patches), non-square patches, or a size without longest_edge or height and width.
    """
    d = cls()
    if not cfg.get("do_resize", True):
      raise ValueError("do_resize=False is not supported: Pixtral needs whole patches")
    size = cfg.get("size") or {"longest_edge": d.max_height}
    if isinstance(size, int):
      size = {"longest_edge": size}
    if size.get("longest_edge"):
      max_height = max_width = int(size["longest_edge"])
    elif size.get("height") and size.get("width"):
      max_height, max_width = int(size["height"]), int(size["width"])
    else:
      raise ValueError(f"size must have longest_edge, or height and width; got {size}")
    patch = _square_patch(cfg.get("patch_size", d.patch_size))
    if processor_cfg is not None:
      patch = (_square_patch(processor_cfg.get("patch_size", patch))
               * int(processor_cfg.get("spatial_merge_size", 1)))
    do_rescale, do_normalize = cfg.get("do_rescale", True), cfg.get("do_normalize", True)
    return cls(max_height=max_height, max_width=max_width, patch_size=patch,
               resample=int(cfg.get("resample", d.resample)),
               rescale=float(cfg.get("rescale_factor", d.rescale)) if do_rescale else 1.0,
               mean=tuple(cfg.get("image_mean") or d.mean) if do_normalize else (0.0,) * 3,
               std=tuple(cfg.get("image_std") or d.std) if do_normalize else (1.0,) * 3)


def _square_patch(patch: Any) -> int:
  """An int patch size, or {"height": p, "width": p} -> p; a non-square patch raises."""
  if isinstance(patch, Mapping):
    if patch.get("height") != patch.get("width"):
      raise ValueError(f"non-square patch_size {dict(patch)} is not supported")
    patch = patch["height"]
  return int(patch)


def pixtral_size(height: int, width: int, spec: PixtralImageSpec) -> tuple[int, int]:
  """The processor's target (h, w) for an image of (height, width).

  An image larger than the box is scaled down by ratio = max(height / max_height,
  width / max_width), each side floored; then each side is rounded up to a whole number of
  patches. Small images are not enlarged, except up to whole patches (so a 1 x 1 image becomes
  one patch).

  Raises ValueError when a side floors to zero (aspect ratio beyond the box's side in pixels):
  the processor then fails with an unrelated message, and such an image would have no tokens.
  """
  if height < 1 or width < 1:
    raise ValueError(f"image of size {height} x {width} has no pixels")
  original = f"{height} x {width}"
  ratio = max(height / spec.max_height, width / spec.max_width)
  if ratio > 1:
    # floor, not round: the processor keeps the result inside the box (its comment notes the
    # original implementation's banker's rounding).
    height, width = math.floor(height / ratio), math.floor(width / ratio)
  if height < 1 or width < 1:
    raise ValueError(f"image of {original} (height x width): aspect ratio too extreme for "
                     f"Pixtral's resize, a side shrinks to 0 pixels (target {height} x {width} "
                     f"within {spec.max_height} x {spec.max_width})")
  p = spec.patch_size
  return ((height - 1) // p + 1) * p, ((width - 1) // p + 1) * p


def pixtral_pixels(image: Image.Image, spec: PixtralImageSpec) -> np.ndarray:
  """RGB image -> pixel values [h, w, 3] float32 (channels last; h, w = `pixtral_size`)."""
  if image.mode != "RGB":
    raise ValueError(f"expected an RGB image, got mode {image.mode!r} (see processing.images."
                     f"load_image)")
  height, width = pixtral_size(image.height, image.width, spec)
  resized = np.asarray(image.resize((width, height), resample=spec.resample))
  x = (resized.astype(np.float64) * spec.rescale).astype(np.float32)
  return (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def pixtral_token_grid(height: int, width: int, patch: int,
                       spatial_merge_size: int = 1) -> tuple[int, int]:
  """(rows, cols) of image tokens for a preprocessed image of (height, width) pixels.

  One token per patch * spatial_merge_size square; (height, width) must be whole multiples of
  it (as `pixtral_size` returns), else ValueError (the processor would floor silently).
  """
  unit = patch * spatial_merge_size
  if height < unit or width < unit or height % unit or width % unit:
    raise ValueError(f"image size {height} x {width} is not a positive multiple of the token "
                     f"size {unit}; resize it with pixtral_size first")
  return height // unit, width // unit


def pixtral_span_text(rows: int, cols: int, img: str = "[IMG]", brk: str = "[IMG_BREAK]",
                      end: str = "[IMG_END]") -> str:
  """The text an image placeholder expands to: `rows` rows of `cols` `img` tokens, each row
  followed by `brk`, the last `brk` replaced by `end` (rows * (cols + 1) tokens)."""
  if rows < 1 or cols < 1:
    raise ValueError(f"an image needs at least one token row and column, got {rows} x {cols}")
  row = img * cols
  return (row + brk) * (rows - 1) + row + end
