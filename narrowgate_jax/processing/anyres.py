"""Image preprocessing of the non-native families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Janus)
in numpy and PIL, and the map from each image token back to the patch it came from.

The pixel functions reproduce transformers' `*ImageProcessorPil` classes step for step (the same
PIL resizes on uint8, zero or mean-colour padding, float64 rescale then float32 cast, float32
normalisation), but return channels-last arrays: one view is [S, S, 3], AnyRes views [V, S, S, 3].

AnyRes (LLaVA-NeXT / OneVision) turns one image into V = 1 + nh·nw views of S x S pixels: the whole
image squashed to S x S (the base view), then the tiles of the image resized to fit the best of the
`image_grid_pinpoints` (aspect kept, zero-padded around) in row-major order. The model turns every
view into a g x g grid of features (g = S / vision patch), keeps the base grid, stitches the tiles
into one (nh·g) x (nw·g) grid, crops away the rows or columns that only saw padding ("unpadding"),
optionally shrinks that grid bilinearly (OneVision's anyres_max_N), and puts a learned newline
feature after every row of it.

`Layout` records, for every image token in sequence order, which view, row and column of the
vision grid it came from, so experiments can select tokens by image region (the cross-modal
study's "related patches": boxes drawn red on a green canvas pushed through the same geometry with
`normalize=False`). Its `plan` holds the static shape facts `narrowgate_jax.models.anyres` needs to
pack the features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from narrowgate_jax.processing.images import (CLIP_MEAN, CLIP_STD, ImageLike, center_crop,
                                              load_image, shortest_edge_size)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
VARIANTS = ("llava_next", "llava_onevision")

# ------------------------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True)
class ClipImageSpec:
  """The CLIP-style processors of the LLaVA family (LlavaImageProcessor, CLIPImageProcessor,
  LlavaNextImageProcessor, LlavaOnevisionImageProcessor).

  Exactly one of `shortest_edge` (size={"shortest_edge": S}: aspect-keeping resize) and `size_hw`
  (size={"height", "width"}: resize to exactly that) is set. `crop_hw` is None when the processor
  has no crop_size (OneVision). `pad_to_square` is LlavaImageProcessor's do_pad (pad the image to
  a square with the mean colour before resizing), not NeXT's do_pad, which only pads the number of
  views of a batch and does not change one image's views.
  """

  shortest_edge: int | None = 224
  size_hw: tuple[int, int] | None = None
  crop_hw: tuple[int, int] | None = (224, 224)
  do_resize: bool = True
  do_center_crop: bool = True
  pad_to_square: bool = False
  resample: int = Image.BICUBIC
  do_rescale: bool = True
  rescale: float = 1 / 255
  do_normalize: bool = True
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD
  grid_pinpoints: tuple[tuple[int, int], ...] = NEXT_PINPOINTS

  def __post_init__(self):
    if (self.shortest_edge is None) == (self.size_hw is None):
      raise ValueError("ClipImageSpec needs exactly one of shortest_edge and size_hw, got "
                       f"{self.shortest_edge} and {self.size_hw}")

  @classmethod
  def defaults(cls, family: str) -> ClipImageSpec:
    """The class defaults of transformers' processor for `family` ("llava", "llava_next",
    "llava_onevision")."""
    if family == "llava":
      return cls()
    if family == "llava_next":
      return cls(grid_pinpoints=NEXT_PINPOINTS)
    if family == "llava_onevision":
      return cls(shortest_edge=None, size_hw=(384, 384), crop_hw=None, do_center_crop=False,
                 grid_pinpoints=ONEVISION_PINPOINTS)
    raise ValueError(f"unknown LLaVA image-processor family {family!r}; expected llava, "
                     "llava_next or llava_onevision")

  @classmethod
  def from_processor_config(cls, cfg: Mapping[str, Any],
                            family: str | None = None) -> ClipImageSpec:
    """The spec of a preprocessor_config.json dict; `family` defaults to the one its
    image_processor_type names."""
    family = family or _family_of(cfg)
    d = cls.defaults(family)
    shortest_edge, size_hw = d.shortest_edge, d.size_hw
    if cfg.get("size") is not None:
      shortest_edge, size_hw = _parse_size(cfg["size"])
    crop_hw = d.crop_hw
    if "crop_size" in cfg:
      crop_hw = None if cfg["crop_size"] is None else _parse_crop(cfg["crop_size"])
    pinpoints = cfg.get("image_grid_pinpoints") or d.grid_pinpoints
    get = lambda key, default: default if cfg.get(key) is None else cfg[key]
    return cls(shortest_edge=shortest_edge, size_hw=size_hw, crop_hw=crop_hw,
               do_resize=bool(get("do_resize", d.do_resize)),
               do_center_crop=bool(get("do_center_crop", d.do_center_crop)),
               pad_to_square=family == "llava" and bool(get("do_pad", False)),
               resample=int(get("resample", d.resample)),
               do_rescale=bool(get("do_rescale", d.do_rescale)),
               rescale=float(get("rescale_factor", d.rescale)),
               do_normalize=bool(get("do_normalize", d.do_normalize)),
               mean=tuple(get("image_mean", d.mean)), std=tuple(get("image_std", d.std)),
               grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints))

  @property
  def base_hw(self) -> tuple[int, int]:
    """The size the whole image is squashed to for AnyRes's base view."""
    return self.size_hw or (self.shortest_edge, self.shortest_edge)

  @property
  def tile_size(self) -> int:
    """The side of one AnyRes tile in the resized, padded image (the processor's patch_size)."""
    if self.crop_hw:
      return self.crop_hw[0]
    return self.size_hw[0] if self.size_hw else self.shortest_edge

  @property
  def background(self) -> tuple[int, int, int]:
    """The mean colour as uint8, used for pad-to-square (int() truncates, as transformers)."""
    return tuple(int(m * 255) for m in self.mean)


_FAMILIES = {"CLIPImageProcessor": "llava", "LlavaImageProcessor": "llava",
             "LlavaNextImageProcessor": "llava_next",
             "LlavaOnevisionImageProcessor": "llava_onevision"}


def _family_of(cfg: Mapping[str, Any]) -> str:
  name = str(cfg.get("image_processor_type", ""))
  for suffix in ("Fast", "Pil"):
    name = name.removesuffix(suffix)
  if name not in _FAMILIES:
    raise ValueError(f"image_processor_type {cfg.get('image_processor_type')!r} is not a LLaVA "
                     "processor; pass family= explicitly")
  return _FAMILIES[name]


def _parse_size(size) -> tuple[int | None, tuple[int, int] | None]:
  """(shortest_edge, size_hw) of a `size` entry: an int means the shortest edge (these processors
  have default_to_square=False), a pair or {"height", "width"} an exact size."""
  if isinstance(size, int):
    return size, None
  if isinstance(size, (list, tuple)):
    return None, (int(size[0]), int(size[1]))
  if size.get("longest_edge") is not None or size.get("max_height") is not None:
    raise ValueError(f"size {dict(size)} is not supported by the LLaVA processors")
  if size.get("shortest_edge") is not None:
    return int(size["shortest_edge"]), None
  if size.get("height") is not None and size.get("width") is not None:
    return None, (int(size["height"]), int(size["width"]))
  raise ValueError(f"size must have shortest_edge or height and width, got {dict(size)}")


def _parse_crop(crop) -> tuple[int, int]:
  if isinstance(crop, int):
    return crop, crop
  if isinstance(crop, (list, tuple)):
    return int(crop[0]), int(crop[1])
  return int(crop["height"]), int(crop["width"])


@dataclasses.dataclass(frozen=True)
class JanusImageSpec:
  """JanusImageProcessor: longest side to `size` (each side at least `min_size`), pad to a square
  with the mean colour, rescale, normalise."""

  size: int = 384
  min_size: int = 14
  do_resize: bool = True
  do_pad: bool = True
  resample: int = Image.BICUBIC
  do_rescale: bool = True
  rescale: float = 1 / 255
  do_normalize: bool = True
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD

  @classmethod
  def from_processor_config(cls, cfg: Mapping[str, Any]) -> JanusImageSpec:
    d = cls()
    size = d.size
    if cfg.get("size") is not None:
      _, size_hw = _parse_size(cfg["size"])
      if size_hw is None or size_hw[0] != size_hw[1]:
        raise ValueError(f"Janus needs a square size {{height, width}}, got {cfg['size']}")
      size = size_hw[0]
    get = lambda key, default: default if cfg.get(key) is None else cfg[key]
    return cls(size=size, min_size=int(get("min_size", d.min_size)),
               do_resize=bool(get("do_resize", d.do_resize)), do_pad=bool(get("do_pad", d.do_pad)),
               resample=int(get("resample", d.resample)),
               do_rescale=bool(get("do_rescale", d.do_rescale)),
               rescale=float(get("rescale_factor", d.rescale)),
               do_normalize=bool(get("do_normalize", d.do_normalize)),
               mean=tuple(get("image_mean", d.mean)), std=tuple(get("image_std", d.std)))

  @property
  def background(self) -> tuple[int, int, int]:
    """The padding colour: the mean as uint8. transformers derives it from the configured
    image_mean when the processor is built, and ignores a `background_color` entry."""
    return tuple(int(m * 255) for m in self.mean)


# ---------------------------------------------------------------------------- pixel helpers


def _rgb(image: ImageLike) -> np.ndarray:
  """uint8 [H, W, 3] of an image, refusing an empty one."""
  rgb = np.asarray(load_image(image))
  if rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise ValueError(f"image of {rgb.shape[1]}x{rgb.shape[0]} (width x height) is empty")
  return rgb


def _resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [height, width, 3] with PIL, as transformers' resize does for uint8
  input (PIL returns a copy when the size is unchanged)."""
  return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def _pad_to_square(rgb: np.ndarray, color: Sequence[int]) -> np.ndarray:
  """uint8 [h, w, 3] -> [m, m, 3], m = max(h, w), the image centred (offset rounded down)."""
  h, w = rgb.shape[:2]
  if h == w:
    return rgb
  m = max(h, w)
  out = np.empty((m, m, 3), rgb.dtype)
  out[...] = np.asarray(color, rgb.dtype)
  top, left = (m - h) // 2, (m - w) // 2
  out[top:top + h, left:left + w] = rgb
  return out


def _to_float(rgb: np.ndarray, normalize: bool, do_rescale: bool, scale: float, do_normalize: bool,
              mean, std) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3]: x * scale (float64, then float32), then (x - mean) / std
  in float32, as transformers' rescale and normalize; the raw 0..255 values if not `normalize`."""
  if not normalize:
    return rgb.astype(np.float32)
  x = (rgb.astype(np.float64) * scale).astype(np.float32) if do_rescale else rgb
  if do_normalize:
    x = (x.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.asarray(x, np.float32)


def _resize_view(rgb: np.ndarray, spec: ClipImageSpec) -> np.ndarray:
  """The per-view resize of the CLIP processors: shortest edge to S (aspect kept) or exactly
  size_hw."""
  if spec.size_hw:
    return _resize(rgb, *spec.size_hw, spec.resample)
  return _resize(rgb, *shortest_edge_size(*rgb.shape[:2], spec.shortest_edge), spec.resample)


def _finish_view(rgb: np.ndarray, spec: ClipImageSpec, normalize: bool) -> np.ndarray:
  """resize, centre crop, rescale and normalise one view: uint8 [h, w, 3] -> float32 [S, S, 3]."""
  if spec.do_resize:
    rgb = _resize_view(rgb, spec)
  if spec.do_center_crop and spec.crop_hw:
    rgb = center_crop(rgb, *spec.crop_hw)
  return _to_float(rgb, normalize, spec.do_rescale, spec.rescale, spec.do_normalize, spec.mean,
                   spec.std)


# ---------------------------------------------------------------------------- pixel values


def llava_pixels(image: ImageLike, spec: ClipImageSpec, normalize: bool = True) -> np.ndarray:
  """LlavaImageProcessor (and CLIPImageProcessor): optional pad to a square with the mean colour,
  resize, centre crop, rescale, normalise. -> [S, S, 3] float32.

  With normalize=False the same geometry, returning the raw 0..255 values (float32).
  """
  rgb = _rgb(image)
  if spec.pad_to_square:
    rgb = _pad_to_square(rgb, spec.background)
  return _finish_view(rgb, spec, normalize)


def select_best_resolution(height: int, width: int,
                           pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The pinpoint (h, w) that keeps most of the image's pixels when it is fitted inside, ties
  broken by the least padding; the first such pinpoint in list order."""
  if not pinpoints:
    raise ValueError("image_grid_pinpoints is empty")
  best, best_kept, best_wasted = None, 0, float("inf")
  for ph, pw in pinpoints:
    scale = min(pw / width, ph / height)
    kept = min(int(width * scale) * int(height * scale), width * height)
    wasted = ph * pw - kept
    if kept > best_kept or (kept == best_kept and wasted < best_wasted):
      best, best_kept, best_wasted = (ph, pw), kept, wasted
  return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
  """(h, w) of the image resized to fit inside (target_h, target_w), aspect kept: the limiting
  side exactly fills the target, the other is rounded up (and capped at the target)."""
  scale_w, scale_h = target_w / width, target_h / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), target_h), target_w
  return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_views(image: ImageLike, spec: ClipImageSpec, normalize: bool = True) -> np.ndarray:
  """LlavaNextImageProcessor / LlavaOnevisionImageProcessor pixel_values of one image (a single
  image: OneVision's multi-image inputs take `llava_pixels` with pad_to_square instead).

  -> [V, S, S, 3] float32: the base view (whole image squashed to base_hw, then resized and
  cropped like every view), then the tiles of the best pinpoint in row-major order. With
  normalize=False the same geometry with the raw 0..255 values (padding is 0, i.e. black).
  """
  rgb = _rgb(image)
  h, w = rgb.shape[:2]
  best_h, best_w = select_best_resolution(h, w, spec.grid_pinpoints)
  fit_h, fit_w = fit_size(h, w, best_h, best_w)
  fitted = _resize(rgb, fit_h, fit_w, spec.resample)
  top, rem_y = divmod(best_h - fit_h, 2)
  left, rem_x = divmod(best_w - fit_w, 2)
  padded = np.pad(fitted, ((top, top + rem_y), (left, left + rem_x), (0, 0)))
  t = spec.tile_size
  tiles = [padded[i:i + t, j:j + t] for i in range(0, best_h, t) for j in range(0, best_w, t)]
  base = _resize(rgb, *spec.base_hw, spec.resample)
  views = [_finish_view(v, spec, normalize) for v in [base] + tiles]
  if len({v.shape for v in views}) != 1:
    raise ValueError(f"views of different shapes {sorted({v.shape for v in views})}: the "
                     "pinpoints are not multiples of the tile size")
  return np.stack(views)


def janus_pixels(image: ImageLike, spec: JanusImageSpec, normalize: bool = True) -> np.ndarray:
  """JanusImageProcessor: longest side to `size` (sides rounded half to even, at least
  min_size), pad to a square with the mean colour, rescale, normalise. -> [S, S, 3] float32."""
  rgb = _rgb(image)
  if spec.do_resize:
    h, w = rgb.shape[:2]
    delta = spec.size / max(h, w)
    rgb = _resize(rgb, max(round(h * delta), spec.min_size), max(round(w * delta), spec.min_size),
                  spec.resample)
  if spec.do_pad:
    rgb = _pad_to_square(rgb, spec.background)
  return _to_float(rgb, normalize, spec.do_rescale, spec.rescale, spec.do_normalize, spec.mean,
                   spec.std)


# ------------------------------------------------------------------------------ token layout


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """The static shape facts of packing one image's view features into its tokens (hashable: one
  compile of `models.anyres.pack_features` serves every image with the same plan).

  Attributes:
    grid: g, patches per side of one view (vision image_size // patch_size).
    tiles: (nh, nw) HD tiles per column and per row; None for a single-view image.
    crop: (top, bottom, left, right) of the unpadded region of the (nh·g) x (nw·g) HD grid.
    resize: OneVision's bilinearly shrunk size (ho, wo) of the unpadded grid, or None.
    trailing_newline: a single view followed by one newline (OneVision multi-image inputs).
  """

  grid: int
  tiles: tuple[int, int] | None = None
  crop: tuple[int, int, int, int] | None = None
  resize: tuple[int, int] | None = None
  trailing_newline: bool = False

  @property
  def num_views(self) -> int:
    return 1 + (self.tiles[0] * self.tiles[1] if self.tiles else 0)

  @property
  def hd_shape(self) -> tuple[int, int]:
    """(rows, cols) of the HD content grid as packed (after unpadding and any resize)."""
    if not self.tiles:
      return 0, 0
    if self.resize:
      return self.resize
    top, bottom, left, right = self.crop
    return bottom - top, right - left

  @property
  def num_tokens(self) -> int:
    rows, cols = self.hd_shape
    return self.grid ** 2 + rows * (cols + 1) + int(self.trailing_newline)

  @property
  def has_newlines(self) -> bool:
    return self.trailing_newline or self.hd_shape[0] > 0


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Where each of an image's n tokens comes from, in sequence order.

  Attributes:
    view: [n] int32, 0 = the base view, k >= 1 = the k-th HD tile (its index in pixel_values);
      -1 for newline tokens.
    row, col: [n] int32, the patch's position inside that view's g x g grid; -1 for newlines.
      A token of a bilinearly shrunk grid (OneVision) gets the patch whose cell contains the
      token's centre: source index floor((i + 0.5) * n_in / n_out) along each axis.
    newline: [n] bool, True for image_newline tokens.
    plan: the static facts for packing (`PackPlan`).
  """

  view: np.ndarray
  row: np.ndarray
  col: np.ndarray
  newline: np.ndarray
  plan: PackPlan

  @property
  def num_tokens(self) -> int:
    return int(self.view.shape[0])

  def token_mask(self, related: np.ndarray) -> np.ndarray:
    """[V, g, g] bool per patch (e.g. `related_patches`) -> [n] bool per token, never a
    newline."""
    if related.shape[0] < self.plan.num_views or related.shape[1:] != (self.plan.grid,) * 2:
      raise ValueError(f"related has shape {related.shape}; this layout needs "
                       f"[{self.plan.num_views}, {self.plan.grid}, {self.plan.grid}]")
    return related[self.view, self.row, self.col] & ~self.newline


def _base_tokens(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rows, cols = np.divmod(np.arange(grid * grid, dtype=np.int32), grid)
  return np.zeros_like(rows), rows, cols


def _layout(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
            plan: PackPlan) -> Layout:
  view, row, col, newline = (np.concatenate(a) for a in zip(*parts))
  layout = Layout(view.astype(np.int32), row.astype(np.int32), col.astype(np.int32),
                  newline.astype(bool), plan)
  assert layout.num_tokens == plan.num_tokens, (layout.num_tokens, plan)
  return layout


def single_view_layout(grid: int, trailing_newline: bool = False) -> Layout:
  """One g x g view in row-major order (LLaVA-1.5 with its CLS feature dropped, Janus),
  optionally followed by one newline (OneVision's multi-image inputs)."""
  view, row, col = _base_tokens(grid)
  parts = [(view, row, col, np.zeros(grid * grid, bool))]
  if trailing_newline:
    parts.append((np.full(1, -1), np.full(1, -1), np.full(1, -1), np.ones(1, bool)))
  return _layout(parts, PackPlan(grid=grid, trailing_newline=trailing_newline))


def _max_num_patches(max_num_patches: int | None, vision_aspect_ratio: str | None) -> int:
  if max_num_patches is not None:
    return int(max_num_patches)
  ratio = vision_aspect_ratio or "anyres_max_9"
  if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_"):].isdigit():
    raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {ratio!r}")
  return int(ratio[len("anyres_max_"):])


def unpad_crop(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of the part of a rows x cols feature grid (the padded, resized
  image) that covers the original height x width image: the padding removed equally from both
  sides of the longer axis, rounded down (so one padded row or column may stay)."""
  if width / height > cols / rows:
    new_rows = int(round(height * (cols / width), 7))
    pad = (rows - new_rows) // 2
    return pad, rows - pad, 0, cols
  new_cols = int(round(width * (rows / height), 7))
  pad = (cols - new_cols) // 2
  return 0, rows, pad, cols - pad


def _nearest_source(n_in: int, n_out: int) -> np.ndarray:
  """[n_out] the input cell containing each output cell's centre under an n_in -> n_out resize."""
  return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def anyres_layout(height: int, width: int, spec: ClipImageSpec, grid: int,
                  variant: str = "llava_next", max_num_patches: int | None = None,
                  vision_aspect_ratio: str | None = None) -> Layout:
  """The tokens of one AnyRes image of height x width pixels, in sequence order: the base view's
  g·g patches, then every row of the unpadded HD grid followed by a newline.

  `grid` is g = vision image_size // patch_size; the spec's tile_size must equal the vision
  tower's image_size (as in every released checkpoint). For "llava_onevision" the HD grid is
  shrunk bilinearly when it exceeds max_num_patches views' worth of patches by more than 10%
  (max_num_patches from `vision_aspect_ratio`, "anyres_max_9" by default). The token count is
  the processor's `_get_number_of_features` (CLS excluded) and the model's packed length.

  Raises ValueError when the unpadded HD grid is empty (an extreme aspect ratio: transformers
  would silently keep only the base view, or newline-only rows), naming the image size.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if height < 1 or width < 1:
    raise ValueError(f"image of {width}x{height} (width x height) is empty")
  tile = spec.tile_size
  best_h, best_w = select_best_resolution(height, width, spec.grid_pinpoints)
  if best_h % tile or best_w % tile:
    raise ValueError(f"pinpoint {best_h}x{best_w} is not a multiple of the tile size {tile}")
  nh, nw = best_h // tile, best_w // tile
  crop = unpad_crop(height, width, nh * grid, nw * grid)
  top, bottom, left, right = crop
  rows, cols = bottom - top, right - left
  resize = None
  if variant == "llava_onevision":
    limit = _max_num_patches(max_num_patches, vision_aspect_ratio)
    ratio = math.sqrt(rows * cols / (limit * grid ** 2))
    if ratio > 1.1:
      resize = (int(rows // ratio), int(cols // ratio))
  out_rows, out_cols = resize or (rows, cols)
  if out_rows < 1 or out_cols < 1:
    raise ValueError(
        f"image of {width}x{height} (width x height) is too elongated: its high-resolution grid "
        f"({nh}x{nw} tiles of {grid}x{grid} patches) keeps {out_rows}x{out_cols} patches after "
        "unpadding, so the model would see no high-resolution content")
  src_r = np.arange(rows) if resize is None else _nearest_source(rows, out_rows)
  src_c = np.arange(cols) if resize is None else _nearest_source(cols, out_cols)
  full_r = np.repeat(src_r + top, out_cols).reshape(out_rows, out_cols)
  full_c = np.tile(src_c + left, out_rows).reshape(out_rows, out_cols)
  hd_view = 1 + (full_r // grid) * nw + full_c // grid
  # Each HD row is followed by a newline: append a column of -1 and flatten row-major.
  marker = np.full((out_rows, 1), -1)
  hd = [np.concatenate([a, marker], axis=1).reshape(-1)
        for a in (hd_view, full_r % grid, full_c % grid)]
  base = _base_tokens(grid)
  parts = [(*base, np.zeros(grid * grid, bool)), (*hd, hd[0] < 0)]
  return _layout(parts, PackPlan(grid=grid, tiles=(nh, nw), crop=crop, resize=resize))


# ---------------------------------------------------------------------- related patches (CM)


def box_canvas(width: int, height: int, boxes: Sequence[Sequence[float]]) -> Image.Image:
  """A pure-green RGB canvas of width x height with every box (x0, y0, x1, y1) filled pure red.

  Boxes are drawn with PIL's ImageDraw.rectangle, so both corners are inclusive: (x, y, x + w,
  y + h) covers w + 1 columns, as the cross-modal study's original code draws GQA boxes.
  """
  if width < 1 or height < 1:
    raise ValueError(f"canvas of {width}x{height} (width x height) is empty")
  canvas = Image.new("RGB", (width, height), GREEN)
  draw = ImageDraw.Draw(canvas)
  for box in boxes:
    draw.rectangle(tuple(box), fill=RED)
  return canvas


def related_patches(views_raw: np.ndarray, patch: int) -> np.ndarray:
  """[V, S, S, 3] raw 0..255 views (normalize=False) -> [V, S/patch, S/patch] bool: True where
  any pixel of the patch is pure red (255, 0, 0)."""
  v, h, w, _ = views_raw.shape
  if h % patch or w % patch:
    raise ValueError(f"views of {h}x{w} pixels do not divide into {patch}-pixel patches")
  red = np.all(views_raw == np.asarray(RED, views_raw.dtype), axis=-1)
  return red.reshape(v, h // patch, patch, w // patch, patch).any(axis=(2, 4))
