"""VILA-U checkpoints (mit-han-lab/vila-u-7b-256) -> what the converter needs.

The released layout is what VILAUMetaModel.save_pretrained (vila_u/model/vila_u_arch.py) writes:

  config.json      VILAUConfig (model_type "vila_u"): llm_cfg, vision_tower_cfg, mm_projector_cfg
                   (the parts' configs, as dicts), hidden_size, mm_hidden_size,
                   image_aspect_ratio, mm_use_im_start_end, model_dtype, ...
  llm/             the LlamaForCausalLM ("model.*", "lm_head.weight"), its config.json and the
                   tokenizer (with <im_start>, <im_end>, ... added)
  vision_tower/    RQVAESIGLIPTransformer: config.json ({"rqvaesiglip": {...}, "rqtransformer":
                   {...}}), weights "rqvaesiglip.siglip_model.vision_model.*",
                   "rqvaesiglip.quantizer.codebooks.{i}.*", the RQ-VAE decoder and the depth
                   transformer (image generation, left unconverted), and the CLIPImageProcessor's
                   preprocessor_config.json
  mm_projector/    MultimodalProjector: config.json (mm_projector_type), weights "layers.*"

`ComponentReader` presents the three weight folders under the model's in-memory names
(VILAULlamaModel.state_dict(): "llm.", "vision_tower.vision_tower.", "mm_projector."), which
`models.vila_u` and `FAMILY` name; a directory holding that whole state dict in its own files
reads the same. `equivalent_config` turns the four config.json files into one
`models.vila_u.VilaUConfig`, written as the converted checkpoint's hf_config.json, so loading
needs no knowledge of the layout.

The SigLIP tower's config is not in the checkpoint: RQVAESiglipModel builds its SigLIP from
`rqvaesiglip.pretrained_model`, a Hub id, so it comes from a local directory of that name (its
config.json, a SiglipConfig or SiglipVisionConfig) or from `models.vila_u.KNOWN_SIGLIP`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from checkpoints_convert.safetensors_stream import CheckpointReader
from narrowgate_jax.models import vila_u
from narrowgate_jax.models.families import Family

# Weight folders and the in-memory prefix of their keys (save_pretrained strips it).
PARTS = (("llm", "llm."), ("vision_tower", "vision_tower.vision_tower."),
         ("mm_projector", "mm_projector."))
FAMILY = Family("vila_u", ("llm.model.",), text_config=lambda cfg: cfg.text_config,
                lm_head_keys=("llm.lm_head.weight",))
LLM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "added_tokens.json", "generation_config.json")


def is_vila_u(raw: dict) -> bool:
  """config.json of a VILA-U checkpoint (the authors' VILAUConfig). NVlabs' VILA saves the same
  llm_cfg / vision_tower_cfg layout under model_type "llava_llama" (another tower): not this."""
  return raw.get("model_type") == "vila_u"


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _part_config(hf_dir: str, raw: dict, part: str) -> dict:
  """A part's config: its folder's config.json, else the top config's `{part}_cfg` dict."""
  found = _read_json(os.path.join(hf_dir, part, "config.json"))
  if found is None:
    found = raw.get(f"{part}_cfg")
  if not isinstance(found, dict):
    raise ValueError(f"{hf_dir}: no {part}/config.json and no {part}_cfg dict in config.json")
  return found


# ---------------------------------------------------------------------------------- weights


class ComponentReader:
  """The tensors of llm/, vision_tower/ and mm_projector/ under the in-memory names, with
  CheckpointReader's interface (keys, shapes, row reads); the top directory's own weight files
  too, as they are named."""

  def __init__(self, directory: str, allow_pickle: bool = False):
    self.directory = directory
    self._readers: list[tuple[str, CheckpointReader]] = []
    for folder, prefix in PARTS:
      path = os.path.join(directory, folder)
      if os.path.isdir(path):
        self._readers.append((prefix, CheckpointReader(path, allow_pickle=allow_pickle)))
    try:
      self._readers.append(("", CheckpointReader(directory, allow_pickle=allow_pickle)))
    except FileNotFoundError:
      if not self._readers:
        raise FileNotFoundError(f"{directory} holds no weights: neither llm/, vision_tower/, "
                                "mm_projector/ nor its own *.safetensors") from None
    self._where = {prefix + key: (reader, key) for prefix, reader in self._readers
                   for key in reader.keys()}

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    reader, own = self._where[key]
    return reader.shape(own)

  def read(self, key: str):
    return self.read_rows(key, 0, self.shape(key)[0])

  def read_rows(self, key: str, start: int, stop: int):
    reader, own = self._where[key]
    return reader.read_rows(own, start, stop)


# ----------------------------------------------------------------------------------- config


def _siglip_config(name: str, hf_dir: str) -> dict:
  """The vision config of the SigLIP that `pretrained_model` names."""
  for directory in (name, os.path.join(hf_dir, name), os.path.join(hf_dir, "vision_tower", name)):
    found = _read_json(os.path.join(directory, "config.json"))
    if found is not None:
      return {**found.get("vision_config", found), "model_type": "siglip_vision_model"}
  if name in vila_u.KNOWN_SIGLIP:
    return dict(vila_u.KNOWN_SIGLIP[name])
  raise ValueError(f"{hf_dir}: the vision tower's rqvaesiglip.pretrained_model is {name!r}, which "
                   f"is neither a local directory with a config.json nor one of "
                   f"{sorted(vila_u.KNOWN_SIGLIP)}")


def equivalent_config(hf_dir: str, raw: Optional[dict] = None) -> vila_u.VilaUConfig:
  """The `VilaUConfig` of a VILA-U checkpoint dir (see the module docstring)."""
  raw = raw if raw is not None else _read_json(os.path.join(hf_dir, "config.json"))
  llm = _part_config(hf_dir, raw, "llm")
  if llm.get("model_type", "llama") != "llama":
    raise ValueError(f"{hf_dir}: the language model is {llm.get('model_type')!r}; VILA-U's is "
                     "a Llama")
  tower = _part_config(hf_dir, raw, "vision_tower")
  rq = tower.get("rqvaesiglip")
  if not isinstance(rq, dict):
    raise ValueError(f"{hf_dir}: the vision tower config has no rqvaesiglip section (only the "
                     "RQ-VAE SigLIP tower, RQVAESIGLIPTransformer, is supported)")
  vision = _siglip_config(rq.get("pretrained_model", "google/siglip-large-patch16-256"), hf_dir)
  projector = _part_config(hf_dir, raw, "mm_projector")
  text = {k: v for k, v in llm.items() if k not in ("architectures", "_name_or_path")}
  config = vila_u.VilaUConfig(
      text_config=text, vision_config=vision, latent_shape=list(rq["latent_shape"]),
      code_shape=list(rq["code_shape"]), n_embed=rq["n_embed"],
      shared_codebook=bool(rq.get("shared_codebook", False)),
      mm_projector_type=projector.get("mm_projector_type") or "mlp2x_gelu",
      image_aspect_ratio=raw.get("image_aspect_ratio") or "resize",
      tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)))
  mm_hidden = raw.get("mm_hidden_size")
  if mm_hidden is not None and int(mm_hidden) != int(config.latent_shape[2]):
    raise ValueError(f"{hf_dir}: mm_hidden_size {mm_hidden} differs from the quantised "
                     f"features' width {config.latent_shape[2]}")
  return config


def processor_config(hf_dir: str, hf_config) -> dict[str, Any]:
  """vision_tower/preprocessor_config.json (the CLIPImageProcessor the vision tower saves), or
  the one RQVAESIGLIPTransformerVisionTower builds: the tower's image size, mean = std = 0.5."""
  found = _read_json(os.path.join(hf_dir, "vision_tower", "preprocessor_config.json"))
  if found is not None:
    return found
  size = int(hf_config.vision_config.image_size)
  return dict(image_processor_type="CLIPImageProcessor", size={"height": size, "width": size},
              crop_size={"height": size, "width": size}, do_center_crop=True, resample=3,
              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def write_side_files(hf_dir: str, out_dir: str, hf_config) -> None:
  """The converted checkpoint's hf_config.json, preprocessor_config.json, chat_template.jinja
  (`models.vila_u.CHAT_TEMPLATE`), and llm/'s tokenizer and generation config."""
  for name in LLM_FILES:
    path = os.path.join(hf_dir, "llm", name)
    if os.path.exists(path):
      shutil.copy(path, os.path.join(out_dir, name))
  hf_config.to_json_file(os.path.join(out_dir, "hf_config.json"))
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(processor_config(hf_dir, hf_config), f, indent=2)
  with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
    f.write(vila_u.CHAT_TEMPLATE)
