"""Checkpoints in the original LLaVA repository's layout -> the equivalent transformers config.

`liuhaotian/llava-v1.5-*`, `liuhaotian/llava-v1.6-vicuna-7b` and `lmms-lab/llama3-llava-next-8b`
keep LLaVA's own names: the language model at the top level ("model.layers.*", "lm_head.weight"),
"model.mm_projector.{0,2}.*", "model.vision_tower.vision_tower.vision_model.*" and
"model.image_newline"; their config.json is the language model's, plus `mm_*` fields naming the
vision tower by its Hub id. Here that config becomes the LlavaConfig / LlavaNextConfig a llava-hf
conversion would carry, so the rest of the converter treats both alike (the image side finds the
original key names among its candidates), and the converted checkpoint's hf_config.json and
preprocessor_config.json are the transformers ones.

The vision tower's config is not in the checkpoint: it comes from `mm_vision_tower` when that is
a local directory (a CLIP checkpoint's config.json), else from the known towers below.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from narrowgate_jax.models.families import FAMILIES, Family

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
               num_hidden_layers=24, num_attention_heads=16, patch_size=14, projection_dim=768,
               hidden_act="quick_gelu", layer_norm_eps=1e-5)
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L, "image_size": 224},
}
# The language model's architecture, from the original class name.
_TEXT_MODEL_TYPES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
                     "LlavaQwenForCausalLM": "qwen2"}
_SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}


def is_original_llava(raw: dict) -> bool:
  """config.json of a checkpoint in the LLaVA repository's layout (it names its vision tower)."""
  return "mm_vision_tower" in raw


def read_raw_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
  with open(path) as f:
    return json.load(f)


def _vision_config(raw: dict, hf_dir: str) -> dict:
  name = raw["mm_vision_tower"]
  for directory in (name, os.path.join(hf_dir, name)):
    path = os.path.join(directory, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        tower = json.load(f)
      return tower.get("vision_config", tower) | {"model_type": "clip_vision_model"}
  if name in KNOWN_TOWERS:
    return dict(KNOWN_TOWERS[name])
  raise ValueError(f"{hf_dir}/config.json names the vision tower {name!r}, which is neither a "
                   f"local directory with a config.json nor one of {sorted(KNOWN_TOWERS)}")


def equivalent_config(hf_dir: str, raw: Optional[dict] = None):
  """The transformers LlavaConfig / LlavaNextConfig of an original-layout checkpoint."""
  import transformers

  raw = raw if raw is not None else read_raw_config(hf_dir)
  projector = raw.get("mm_projector_type", "linear")
  if projector != "mlp2x_gelu":
    raise ValueError(f"{hf_dir}: mm_projector_type {projector!r} is not supported (LLaVA-1.5 and "
                     "later use 'mlp2x_gelu')")
  arch = (raw.get("architectures") or ["LlavaLlamaForCausalLM"])[0]
  text_type = _TEXT_MODEL_TYPES.get(arch)
  if text_type is None:
    raise ValueError(f"{hf_dir}: unknown original LLaVA architecture {arch!r}; known: "
                     f"{sorted(_TEXT_MODEL_TYPES)}")
  text = {k: v for k, v in raw.items()
          if not k.startswith("mm_") and k not in ("model_type", "architectures")}
  vision = _vision_config(raw, hf_dir)
  common = dict(
      text_config=transformers.AutoConfig.for_model(text_type, **text).to_dict(),
      vision_config=vision,
      vision_feature_layer=raw.get("mm_vision_select_layer", -2),
      vision_feature_select_strategy=_SELECT_STRATEGY[raw.get("mm_vision_select_feature",
                                                              "patch")],
      image_token_index=_image_token_id(hf_dir, raw),
      projector_hidden_act="gelu",
      tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
  )
  if raw.get("image_aspect_ratio") == "anyres" or "unpad" in raw.get("mm_patch_merge_type", ""):
    return transformers.LlavaNextConfig(image_grid_pinpoints=raw["image_grid_pinpoints"],
                                        **common)
  return transformers.LlavaConfig(**common)


def _image_token_id(hf_dir: str, raw: dict) -> int:
  """The tokenizer's "<image>" id when it has one (llava-hf style tokenizers); else the first id
  past the vocabulary, which the image reader adds to the tokenizer as a special token (LLaVA
  itself splices the image in by position, so no embedding row is ever read for it)."""
  import transformers

  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  except (OSError, ValueError):  # no tokenizer files: ids only
    return int(raw["vocab_size"])
  if "<image>" in tokenizer.get_vocab():
    return int(tokenizer.convert_tokens_to_ids("<image>"))
  return int(raw["vocab_size"])


def family(config) -> Family:
  """The language model sits at the top level, as in a plain Llama checkpoint."""
  base = FAMILIES[config.model_type]
  return Family(base.name, ("model.",), text_config=base.text_config, overrides=base.overrides,
                lm_head_keys=("lm_head.weight",))


def processor_config(config, raw: dict) -> dict[str, Any]:
  """preprocessor_config.json for the tower's CLIP preprocessing, as the original repository
  applies it: pad to square with the mean colour ("pad") or AnyRes tiling ("anyres")."""
  size = config.vision_config.image_size
  anyres = bool(getattr(config, "image_grid_pinpoints", None))
  out = dict(image_processor_type="LlavaNextImageProcessor" if anyres else "LlavaImageProcessor",
             size={"shortest_edge": size}, crop_size={"height": size, "width": size},
             image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
             do_center_crop=True, do_pad=raw.get("image_aspect_ratio") == "pad")
  if getattr(config, "image_grid_pinpoints", None):
    out["image_grid_pinpoints"] = config.image_grid_pinpoints
  return out
