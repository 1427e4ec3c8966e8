"""Non-native image side: pixels -> vision tower -> projector -> input embeddings.

LLaVA-1.5 (CLIP), LLaVA with a Pixtral tower, LLaVA-NeXT (CLIP, AnyRes tiles and a learned
`image_newline`), LLaVA-OneVision (SigLIP, AnyRes with `anyres_max_9`) and Janus (its SigLIP-like
encoder and aligner) read an image as continuous features. `vlm.prepare` runs the tower and the
projector here, once per image (jitted, in the model's dtype), and the batch carries the result in
`Batch.features`: the decoder takes them in place of the placeholder tokens' embeddings, exactly
where transformers' `masked_scatter` puts them. Each image token also gets its (view, row, col) in
the patch grid it came from (`Batch.image_coords`), so a region of the picture maps to positions.

Image parameters (converted into image_params/, stored in the checkpoint's dtype):
  tower/...       the vision tower (`models.vit` or `models.pixtral_vit`)
  projector/...   LLaVA's two-layer MLP, or Janus's aligner (`models.projectors`)
  newline         [D] LLaVA-NeXT / OneVision's learned row end
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.models import anyres as pack
from narrowgate_jax.models import pixtral_vit, projectors, vit
from narrowgate_jax.models.families import (SAME, ImageSide, TensorSource, first_present,
                                            flat_shapes)
from narrowgate_jax.processing import anyres, pixtral_images
from narrowgate_jax.processing.prompts import ImageSpan
from narrowgate_jax.processing.roles import Role

# Where the parts sit in a checkpoint: files written by save_pretrained (legacy names), newer Hub
# conversions (in-memory names), and the original LLaVA repository's layout.
PROJECTOR_PREFIXES = (("multi_modal_projector.", ("linear_1", "linear_2")),
                      ("model.multi_modal_projector.", ("linear_1", "linear_2")),
                      ("model.mm_projector.", ("0", "2")))
NEWLINE_KEYS = ("image_newline", "model.image_newline")
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PIXTRAL_PREFIXES = ("vision_tower.", "model.vision_tower.")
JANUS_ALIGNER_PREFIXES = ("model.aligner.",)


def _prefixed(sources, part: str) -> tuple[TensorSource, ...]:
  return tuple(dataclasses.replace(s, path=f"{part}/{s.path}") for s in sources)


def _tower_config(hf_config):
  vision = hf_config.vision_config
  if vision.model_type == "pixtral":
    return pixtral_vit.PixtralViTConfig.from_hf(vision)
  return vit.ViTConfig.from_hf(vision)


def _tower_parts(config, keys) -> tuple[tuple[TensorSource, ...], dict]:
  if isinstance(config, pixtral_vit.PixtralViTConfig):
    prefix = first_present(PIXTRAL_PREFIXES, "patch_conv.weight", keys)
    return (_prefixed(pixtral_vit.pixtral_tensor_sources(config, prefix), "tower"),
            flat_shapes(pixtral_vit.pixtral_param_shapes(config), "tower/"))
  candidates = vit.LLAVA_PREFIXES + vit.JANUS_PREFIXES + (ORIGINAL_TOWER_PREFIX,)
  prefix = first_present(candidates, "embeddings.patch_embedding.weight", keys)
  return (_prefixed(vit.vit_tensor_sources(config, prefix), "tower"),
          flat_shapes(vit.vit_param_shapes(config), "tower/"))


def _llava_projector_parts(hf_config, keys):
  config = projectors.MLPProjectorConfig.from_hf(hf_config)
  prefix, names = PROJECTOR_PREFIXES[0]
  if keys is not None:
    prefix, names = next(((p, n) for p, n in PROJECTOR_PREFIXES if f"{p}{n[0]}.weight" in keys),
                         PROJECTOR_PREFIXES[0])
  sources = projectors.projector_tensor_sources(prefix, names, bias=config.bias)
  return (_prefixed(sources, "projector"),
          flat_shapes(projectors.param_shapes(config), "projector/"))


def nonnative_side(hf_config, keys=None) -> ImageSide:
  """The converter's view of a LLaVA-family or Janus checkpoint's image side."""
  kind = _KIND[hf_config.model_type](hf_config)
  tower = _tower_config(hf_config)
  sources, shapes = _tower_parts(tower, keys)
  if kind == "janus":
    aligner = projectors.JanusAlignerConfig.from_hf(hf_config)
    prefix = first_present(JANUS_ALIGNER_PREFIXES, "fc1.weight", keys)
    sources += _prefixed(projectors.aligner_tensor_sources(aligner, prefix), "projector")
    shapes.update(flat_shapes(projectors.param_shapes(aligner), "projector/"))
  else:
    more_sources, more_shapes = _llava_projector_parts(hf_config, keys)
    sources += more_sources
    shapes.update(more_shapes)
  if kind in ("llava_next", "llava_onevision"):
    sources += (TensorSource("newline", first_present(NEWLINE_KEYS, "", keys), SAME, False),)
    shapes["newline"] = (hf_config.text_config.hidden_size,)
  return ImageSide(kind, tower, sources, shapes, num_layers=tower.num_layers, dtype=None)


_KIND = {
    "llava": lambda cfg: "llava_pixtral" if cfg.vision_config.model_type == "pixtral" else "llava",
    "llava_next": lambda cfg: "llava_next",
    "llava_onevision": lambda cfg: "llava_onevision",
    "janus": lambda cfg: "janus",
}


# ------------------------------------------------------------------------------------ readers


class _Reader:
  """What every non-native image reader shares: the tower, projector and token strings.

  Each reader gives `spans(images)` (one `ImageSpan` per image, with its features and patch
  coordinates) and `region_patches(image, boxes)` -> [V, rows, cols] bool: the patches of each
  view that show part of a box, found as the cross-modal study does (the boxes drawn pure red on
  a green canvas of the image's size, pushed through the same resize / pad / tiling without
  normalisation; a patch with any pure-red pixel is related).
  """

  prefix = ""  # the tokenizer adds BOS itself
  chat_suffix = None  # chat=True applies the checkpoint's chat template
  wrappers = (None, None)

  def __init__(self, hf_config, params, tokenizer, processor_config: Optional[dict] = None,
               dtype=jnp.float32):
    self.hf_config = hf_config
    self.params = params
    self.dtype = jnp.dtype(dtype)
    self.processor_config = processor_config or {}
    self.tower = _tower_config(hf_config)
    self.image_token_id = _image_token_id(hf_config, tokenizer)
    self.image_text = tokenizer.convert_ids_to_tokens(self.image_token_id)
    if self.image_text is None:
      # The original LLaVA tokenizers have no image token (LLaVA splices the image in by
      # position): add one, so "<image>" tokenizes as one placeholder whose embedding is replaced.
      tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]},
                                   replace_extra_special_tokens=False)
      self.image_text = "<image>"
      self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

  def _project(self, features: jax.Array) -> np.ndarray:
    """[N, P, Dv] tower features -> [N, P, D] input embeddings (float32 numpy)."""
    config = projectors.MLPProjectorConfig.from_hf(self.hf_config)
    return np.asarray(projectors.project(self.params["projector"], config, features, self.dtype),
                      np.float32)

  def _span(self, features: np.ndarray, coords: np.ndarray,
            roles: Optional[np.ndarray] = None, text: Optional[str] = None) -> ImageSpan:
    n = features.shape[0]
    roles = np.full(n, Role.IMAGE, np.int32) if roles is None else roles
    return ImageSpan(text=self.image_text * n if text is None else text,
                     placeholder_id=self.image_token_id,
                     ids=np.full(n, self.image_token_id, np.int64), roles=roles,
                     features=features, coords=coords)

  def _feature_layer(self):
    layer = self.hf_config.vision_feature_layer
    return tuple(layer) if isinstance(layer, (list, tuple)) else int(layer)

  def _tower_features(self, pixels: np.ndarray) -> jax.Array:
    """pixels [N, S, S, 3] -> the selected hidden state [N, P, Dv] (CLS dropped by "default")."""
    features = vit.vit_features(self.params["tower"], self.tower, pixels, self._feature_layer(),
                                dtype=self.dtype)
    if self.hf_config.vision_feature_select_strategy == "default":
      features = features[:, 1:]
    return features


def _image_token_id(hf_config, tokenizer) -> int:
  for name in ("image_token_id", "image_token_index"):
    value = getattr(hf_config, name, None)
    if value is not None:
      return int(value)
  return int(tokenizer.convert_tokens_to_ids(tokenizer.image_token))


def _grid_coords(rows: int, cols: int) -> np.ndarray:
  """[rows * cols, 3] (view 0, row, col) in row-major order."""
  r, c = np.divmod(np.arange(rows * cols), cols)
  return np.stack([np.zeros_like(r), r, c], axis=1).astype(np.int32)


class LlavaImages(_Reader):
  """LLaVA-1.5: one CLIP view, P patch tokens. Padded to square with the mean colour when the
  image processor says do_pad (the original LLaVA-1.5 does; llava-hf's CLIPImageProcessor does
  not, and transformers parity follows the checkpoint's own preprocessor_config.json)."""

  family = "llava"

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)
    self.spec = anyres.ClipImageSpec.from_processor_config(self.processor_config, self.family)

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    del counts  # images per prompt: only OneVision reads shared prompts differently
    pixels = np.stack([anyres.llava_pixels(image, self.spec) for image in images])
    features = self._project(self._tower_features(pixels))
    side = self.tower.grid_side
    return [self._span(f, _grid_coords(side, side)) for f in features]

  def region_patches(self, image, boxes) -> np.ndarray:
    canvas = anyres.box_canvas(image.width, image.height, boxes)
    raw = anyres.llava_pixels(canvas, self.spec, normalize=False)[None]
    return anyres.related_patches(raw, self.tower.patch_size)


class LlavaNextImages(_Reader):
  """LLaVA-NeXT / OneVision: base view + AnyRes tiles, unpadded, a learned newline per HD row."""

  family = "llava_next"

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)
    self.spec = anyres.ClipImageSpec.from_processor_config(self.processor_config, self.family)

  def _views(self, image, shares_prompt: bool) -> tuple[np.ndarray, "anyres.Layout"]:
    """One image's views [V, S, S, 3] and its token layout."""
    del shares_prompt  # LLaVA-NeXT tiles every image
    layout = anyres.anyres_layout(image.height, image.width, self.spec, self.tower.grid_side,
                                  self.family, **self._layout_options())
    return anyres.anyres_views(image, self.spec), layout

  def _layout_options(self) -> dict:
    return {}

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    shared = np.repeat(np.asarray(counts if counts is not None else [1] * len(images)) > 1,
                       counts if counts is not None else 1)
    views, layouts = zip(*(self._views(image, bool(s)) for image, s in zip(images, shared)))
    features = self._project(self._tower_features(np.concatenate(views)))
    spans, start = [], 0
    for v, layout in zip(views, layouts):
      packed = pack.pack_features(features[start:start + len(v)], layout,
                                  self.params["newline"])
      start += len(v)
      roles = np.where(layout.newline, Role.IMAGE_BREAK, Role.IMAGE).astype(np.int32)
      coords = np.stack([layout.view, layout.row, layout.col], axis=1).astype(np.int32)
      spans.append(self._span(np.asarray(packed, np.float32), coords, roles))
    return spans

  def region_patches(self, image, boxes) -> np.ndarray:
    canvas = anyres.box_canvas(image.width, image.height, boxes)
    raw = anyres.anyres_views(canvas, self.spec, normalize=False)
    return anyres.related_patches(raw, self.tower.patch_size)


class OnevisionImages(LlavaNextImages):
  """LLaVA-OneVision: as NeXT, with `anyres_max_9` (HD features bilinearly shrunk when the grid
  exceeds 9 tiles' worth); in a prompt with several images, each is one view. `<|im_start|>` /
  `<|im_end|>` right around the image (the Narrow Gate study's wrapping) become its IMAGE_START /
  IMAGE_END."""

  family = "llava_onevision"

  def __init__(self, hf_config, params, tokenizer, *args, **kw):
    super().__init__(hf_config, params, tokenizer, *args, **kw)
    self.wrappers = tuple(tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab()
                          else None for t in ("<|im_start|>", "<|im_end|>"))

  def _layout_options(self) -> dict:
    return dict(vision_aspect_ratio=getattr(self.hf_config, "vision_aspect_ratio", None))

  def _views(self, image, shares_prompt: bool) -> tuple[np.ndarray, "anyres.Layout"]:
    """An image that shares its prompt with others is one padded view and a newline, as
    OneVision's processor and model treat multi-image prompts."""
    if not shares_prompt:
      return super()._views(image, shares_prompt)
    spec = dataclasses.replace(self.spec, pad_to_square=True)
    return (anyres.llava_pixels(image, spec)[None],
            anyres.single_view_layout(self.tower.grid_side, trailing_newline=True))


class PixtralImages(_Reader):
  """LLaVA with a Pixtral tower: each image at its own size (patch multiples), rows of [IMG]
  each ended by [IMG_BREAK], the last one replaced by [IMG_END]."""

  def __init__(self, hf_config, params, tokenizer, *args, **kw):
    super().__init__(hf_config, params, tokenizer, *args, **kw)
    processor = self.processor_config.get("processor")  # processor_config.json, if any
    self.spec = pixtral_images.PixtralImageSpec.from_processor_config(self.processor_config,
                                                                      processor)
    self.break_text = (processor or {}).get("image_break_token") or "[IMG_BREAK]"
    self.end_text = (processor or {}).get("image_end_token") or "[IMG_END]"

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    del counts  # images per prompt: only OneVision reads shared prompts differently
    pixels = [pixtral_images.pixtral_pixels(image, self.spec) for image in images]
    hidden = pixtral_vit.pixtral_features(self.params["tower"], self.tower, pixels,
                                          layer=self._feature_layer(), dtype=self.dtype)
    spans = []
    for p, h in zip(pixels, hidden):
      rows, cols = pixtral_images.pixtral_token_grid(p.shape[0], p.shape[1], self.tower.patch_size)
      features = self._project(h[None])[0]
      text = pixtral_images.pixtral_span_text(rows, cols, self.image_text, self.break_text,
                                              self.end_text)
      spans.append(self._span(features, _grid_coords(rows, cols), text=text))
    return spans

  def region_patches(self, image, boxes) -> np.ndarray:
    canvas = anyres.box_canvas(image.width, image.height, boxes)
    height, width = pixtral_images.pixtral_size(image.height, image.width, self.spec)
    raw = np.asarray(canvas.resize((width, height), resample=self.spec.resample))[None]
    return anyres.related_patches(raw, self.tower.patch_size)


class JanusImages(_Reader):
  """Janus: `<begin_of_image>` [576 features] `<end_of_image>` from its SigLIP encoder's
  post-norm output and the aligner MLP."""

  def __init__(self, hf_config, params, tokenizer, *args, **kw):
    super().__init__(hf_config, params, tokenizer, *args, **kw)
    self.spec = anyres.JanusImageSpec.from_processor_config(self.processor_config)
    self.aligner = projectors.JanusAlignerConfig.from_hf(hf_config)
    self.start_text, self.end_text = tokenizer.boi_token, tokenizer.eoi_token

  def spans(self, images: Sequence, counts: Optional[Sequence[int]] = None) -> list[ImageSpan]:
    del counts  # images per prompt: only OneVision reads shared prompts differently
    pixels = np.stack([anyres.janus_pixels(image, self.spec) for image in images])
    hidden = vit.vit_features(self.params["tower"], self.tower, pixels, -1, post_norm=True,
                              dtype=self.dtype)
    features = np.asarray(projectors.project(self.params["projector"], self.aligner, hidden,
                                           self.dtype), np.float32)
    side = self.tower.grid_side
    n = side * side
    text = self.start_text + self.image_text * n + self.end_text
    return [self._span(f, _grid_coords(side, side), text=text) for f in features]

  def region_patches(self, image, boxes) -> np.ndarray:
    canvas = anyres.box_canvas(image.width, image.height, boxes)
    raw = anyres.janus_pixels(canvas, self.spec, normalize=False)[None]
    return anyres.related_patches(raw, self.tower.patch_size)


NONNATIVE_READERS = {"llava": LlavaImages, "llava_pixtral": PixtralImages,
                     "llava_next": LlavaNextImages, "llava_onevision": OnevisionImages,
                     "janus": JanusImages}
NONNATIVE_MODEL_TYPES = tuple(_KIND)
