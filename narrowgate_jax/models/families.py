"""Per-family knowledge: how a transformers config maps to `DecoderConfig`, and which checkpoint
tensor feeds which parameter (with the reshape that turns the torch layout into ours, and its
inverse, so the same tables export our parameters back).

Adding a family = one `Family` entry: where its language model sits in the checkpoint, and the
few config fields that differ from Llama.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Container, Iterator, Mapping, Optional, Sequence

import flax
import jax
import numpy as np

from narrowgate_jax.models.config import DecoderConfig

# ----------------------------------------------------------------------- tensor layout changes


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the rows of a checkpoint tensor (torch layout; rows = its first axis) land in our
  parameter, and back, so a tensor can be converted a block of rows at a time either way.

  Rows [r0, r1) fill indices [r0 / unit, r1 / unit) of our axis `row_axis`, where `unit` is the
  number of rows one index of that axis takes (head_dim for q/k/v weights, whose rows are
  (head, h) pairs; 1 otherwise).

  Attributes:
    torch_shape: our shape -> the shape the checkpoint must have (checked from file headers).
    to_ours: (a block of rows, the shape of our block) -> our block.
    to_torch: our block (any extent along `row_axis`) -> the checkpoint rows it holds; the exact
      inverse of `to_ours` (a pure reshape / transpose: the result may be a view).
  """

  name: str
  row_axis: int
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  rows_per_index: Callable[[tuple[int, ...]], int] = lambda ours: 1


SAME = Layout("same", 0, lambda ours: ours, lambda w, ours: w.reshape(ours), lambda x: x)
# nn.Linear weight [out, in] -> kernel [in, out]
LINEAR = Layout("linear", 1, lambda ours: ours[::-1], lambda w, ours: w.T, lambda x: x.T)
# q/k/v projections [heads * H, D] -> [D, heads, H]
HEADS_OUT = Layout("heads_out", 1, lambda ours: (ours[1] * ours[2], ours[0]),
                   lambda w, ours: w.T.reshape(ours),
                   lambda x: x.reshape(x.shape[0], x.shape[1] * x.shape[2]).T,
                   rows_per_index=lambda ours: ours[2])
# o projection [D, N * H] -> [N, H, D]
HEADS_IN = Layout("heads_in", 2, lambda ours: (ours[2], ours[0] * ours[1]),
                  lambda w, ours: w.T.reshape(ours),
                  lambda x: x.reshape(x.shape[0] * x.shape[1], x.shape[2]).T)
# q/k/v biases [heads * H] -> [heads, H]
HEAD_BIAS = Layout("head_bias", 0, lambda ours: (ours[0] * ours[1],),
                   lambda w, ours: w.reshape(ours), lambda x: x.reshape(x.shape[0] * x.shape[1]),
                   rows_per_index=lambda ours: ours[1])


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """Parameter `path` (below the layer axis for per-layer ones) comes from checkpoint key `key`
  (with `{i}` the layer index) through `layout`."""

  path: str
  key: str
  layout: Layout
  per_layer: bool


def _layer_sources(config: DecoderConfig) -> list[tuple[str, str, Layout]]:
  attn = [("attn/q/kernel", "self_attn.q_proj.weight", HEADS_OUT),
          ("attn/k/kernel", "self_attn.k_proj.weight", HEADS_OUT),
          ("attn/v/kernel", "self_attn.v_proj.weight", HEADS_OUT),
          ("attn/o/kernel", "self_attn.o_proj.weight", HEADS_IN)]
  if config.qkv_bias:
    attn += [(f"attn/{p}/bias", f"self_attn.{p}_proj.bias", HEAD_BIAS) for p in "qkv"]
  if config.out_bias:
    attn += [("attn/o/bias", "self_attn.o_proj.bias", SAME)]
  if config.qk_norm:
    attn += [(f"attn/{p}_norm/{ours}", f"self_attn.{p}_norm.{theirs}", SAME)
             for p in "qk" for ours, theirs in (("scale", "weight"), ("bias", "bias"))]
  mlp = [(f"mlp/{p}/kernel", f"mlp.{p}_proj.weight", LINEAR) for p in ("gate", "up", "down")]
  if config.mlp_bias:
    mlp += [(f"mlp/{p}/bias", f"mlp.{p}_proj.bias", SAME) for p in ("gate", "up", "down")]
  norms = [("input_norm/scale", "input_layernorm.weight", SAME),
           ("post_attn_norm/scale", "post_attention_layernorm.weight", SAME)]
  return attn + mlp + norms


# ------------------------------------------------------------------------------------ families


@dataclasses.dataclass(frozen=True)
class Family:
  """A checkpoint family: where its language model lives and how its config reads.

  Attributes:
    name: our name for the family.
    lm_prefixes: key prefixes of the language model's tensors (embed_tokens, layers, norm); the
      first one the checkpoint has is used (files written by save_pretrained can name tensors
      differently from the model in memory: Emu3's "text_model.model." vs "model.text_model.").
    text_config: the language-model part of the transformers config.
    overrides: DecoderConfig fields that differ from the Llama reading of the text config.
    lm_head_keys: candidate keys of the output projection, likewise.
  """

  name: str
  lm_prefixes: tuple[str, ...]
  text_config: Callable[[Any], Any] = lambda cfg: cfg
  overrides: Callable[[Any, Any], dict] = lambda top, text: {}
  lm_head_keys: tuple[str, ...] = ("lm_head.weight",)

  def decoder_config(self, hf_config) -> DecoderConfig:
    text = self.text_config(hf_config)
    heads = text.num_attention_heads
    fields = dict(
        family=self.name,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        norm_eps=text.rms_norm_eps,
        rope=_rope(text),
        qkv_bias=bool(getattr(text, "attention_bias", False)),
        out_bias=bool(getattr(text, "attention_bias", False)),
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        sliding_windows=_sliding_windows(text),
        tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        hidden_act=text.hidden_act,
        max_positions=getattr(text, "max_position_embeddings", None) or 0,
    )
    fields.update(self.overrides(hf_config, text))
    return DecoderConfig(**fields)

  def tensor_sources(self, config: DecoderConfig,
                     keys: Optional[Container[str]] = None) -> list[TensorSource]:
    """Where every parameter comes from; `keys` (the checkpoint's) picks among candidate names."""
    p = first_present(self.lm_prefixes, "embed_tokens.weight", keys)
    out = [TensorSource("embed/embedding", p + "embed_tokens.weight", SAME, False),
           TensorSource("final_norm/scale", p + "norm.weight", SAME, False)]
    out += [TensorSource("layers/" + ours, f"{p}layers.{{i}}.{theirs}", layout, True)
            for ours, theirs, layout in _layer_sources(config)]
    if not config.tie_embeddings:
      out.append(TensorSource("lm_head/kernel", first_present(self.lm_head_keys, "", keys),
                              LINEAR, False))
    return out


_ROPE_KEYS = ("rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings")


def _rope(text) -> tuple:
  params = dict(getattr(text, "rope_parameters", None) or {})
  if not params:  # configs written before rope_parameters existed
    params = dict(getattr(text, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(text, "rope_theta", 10000.0))
  params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
  return tuple(sorted((k, params[k]) for k in _ROPE_KEYS if params.get(k) is not None))


def _sliding_windows(text) -> tuple[int, ...]:
  window = getattr(text, "sliding_window", None)
  if not window:
    return ()
  layer_types = getattr(text, "layer_types", None)
  if layer_types:
    return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)
  return (window,) * text.num_hidden_layers


def _chameleon_overrides(top, text) -> dict:
  image_ids = sorted(v for k, v in (text.vocabulary_map or {}).items() if k.startswith("IMGIMG"))
  return dict(qk_norm=True, block_order="swin_norm" if text.swin_norm else "pre_norm",
              head_dim=text.hidden_size // text.num_attention_heads,
              suppressed_logit_ids=tuple(image_ids))


def _qwen2_overrides(top, text) -> dict:
  return dict(qkv_bias=True, out_bias=False)


def _tied_at_top(top, text) -> dict:
  return dict(tie_embeddings=bool(getattr(top, "tie_word_embeddings", False)))


def _llava_overrides(top, text) -> dict:
  """A LLaVA-style model's language model reads as its own family (Llama, Mistral, Qwen2)."""
  return {**FAMILIES[text.model_type].overrides(top, text), **_tied_at_top(top, text)}


# LLaVA-style checkpoints written by save_pretrained keep the legacy names
# ("language_model.model.*"); newer conversions on the Hub use the in-memory names.
_LLAVA_LM = dict(text_config=lambda cfg: cfg.text_config, overrides=_llava_overrides,
                 lm_head_keys=("language_model.lm_head.weight", "lm_head.weight"))
_LLAVA_LM_PREFIXES = ("language_model.model.", "model.language_model.")

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("model.",)),
    "mistral": Family("mistral", ("model.",)),
    "qwen2": Family("qwen2", ("model.",), overrides=_qwen2_overrides),
    "chameleon": Family("chameleon", ("model.",), overrides=_chameleon_overrides),
    "emu3": Family("emu3", ("model.text_model.", "text_model.model."),
                   text_config=lambda cfg: cfg.text_config, overrides=_tied_at_top,
                   lm_head_keys=("lm_head.weight", "text_model.lm_head.weight")),
    "emu3_text_model": Family("emu3", ("model.",)),
    "janus": Family("janus", ("model.language_model.",), text_config=lambda cfg: cfg.text_config,
                    overrides=_tied_at_top),
    "llava": Family("llava", _LLAVA_LM_PREFIXES, **_LLAVA_LM),
    "llava_next": Family("llava_next", _LLAVA_LM_PREFIXES, **_LLAVA_LM),
    "llava_onevision": Family("llava_onevision", _LLAVA_LM_PREFIXES, **_LLAVA_LM),
}


@dataclasses.dataclass(frozen=True)
class ImageSide:
  """A family's image side as the converter sees it (native: the VQ image tokenizer; non-native:
  the vision tower, projector and newline).

  Attributes:
    kind: the reader that runs it ("chameleon_vq", "emu3_vq", "llava", "llava_next", ...).
    config: its config (a frozen dataclass: the VQ's or the vision tower's).
    sources: every checkpoint tensor it reads.
    shapes: "a/b/c" parameter path -> shape (stacked layers first).
    num_layers: the depth of its per-layer sources (0: none).
    dtype: the stored dtype ("float32"), or None to store it as the language model is.
  """

  kind: str
  config: Any
  sources: tuple[TensorSource, ...]
  shapes: dict
  num_layers: int = 0
  dtype: Optional[str] = None


def flat_shapes(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """A tree of arrays (or shape structs) -> {prefix + "a/b/c": shape}."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + "/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def first_present(candidates: tuple[str, ...], suffix: str,
                  keys: Optional[Container[str]]) -> str:
  """The first candidate c with c + suffix among `keys` (the first candidate if none, or no keys:
  a missing tensor is then reported under its first name)."""
  if keys is not None:
    for c in candidates:
      if c + suffix in keys:
        return c
  return candidates[0]


def read_model_type(hf_dir: str) -> str:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
  with open(path) as f:
    model_type = json.load(f).get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"unknown model_type {model_type!r} in {path}; supported: "
                     f"{', '.join(sorted(FAMILIES))}")
  return model_type


def family_of(hf_dir: str) -> tuple[Family, Any]:
  """The family of an HF checkpoint dir and its parsed transformers config."""
  import transformers  # configs only; no model code is imported

  family = FAMILIES[read_model_type(hf_dir)]
  return family, transformers.AutoConfig.from_pretrained(hf_dir)


def iter_layer_keys(source: TensorSource, num_layers: int) -> Iterator[tuple[int | None, str]]:
  if source.per_layer:
    for i in range(num_layers):
      yield i, source.key.format(i=i)
  else:
    yield None, source.key


def params_from_state(sources: Sequence[TensorSource], shape_tree,
                      state: Mapping[str, Any], num_layers: int = 0) -> dict:
  """A full-array torch state (key -> array; torch CPU tensors also work) -> our params tree of
  float32 numpy arrays, through `sources`; per-layer sources are read for layers
  0..num_layers-1 and stacked on a leading axis. Keys the table does not name are ignored.

  Raises KeyError naming a missing tensor (and layer), ValueError naming one whose shape differs
  from what the config implies, AssertionError if the table misses a parameter of `shape_tree`.
  """
  shapes = flat_shapes(shape_tree)
  flat = {}
  for source in sources:
    if source.path not in shapes:
      raise AssertionError(f"the table names {source.path!r}, which the module does not have")
    ours = shapes[source.path]
    layers = range(num_layers) if source.per_layer else [None]
    slice_shape = ours[1:] if source.per_layer else ours
    blocks = []
    for i in layers:
      key = source.key if i is None else source.key.format(i=i)
      if key not in state:
        where = "" if i is None else f", layer {i}"
        raise KeyError(f"state lacks tensor {key!r} (needed for parameter {source.path}{where})")
      tensor = np.asarray(state[key], dtype=np.float32)
      expected = tuple(source.layout.torch_shape(slice_shape))
      if tensor.shape != expected:
        raise ValueError(f"tensor {key!r} has shape {tensor.shape}, but the config implies "
                         f"{expected}")
      blocks.append(source.layout.to_ours(tensor, slice_shape))
    flat[source.path] = np.ascontiguousarray(np.stack(blocks) if source.per_layer else blocks[0])
  if set(flat) != set(shapes):  # the table and the module must describe the same tree
    raise AssertionError(f"parameters without a source: {sorted(set(shapes) - set(flat))}")
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def state_from_params(sources: Sequence[TensorSource], params, num_layers: int = 0,
                      shapes: Optional[Mapping[str, tuple]] = None) -> dict[str, np.ndarray]:
  """Our params tree -> the checkpoint state `params_from_state` reads it from: the exact
  inverse, key -> numpy array in the torch layout and the parameter's own dtype. Per-layer
  sources are unstacked into one tensor per layer ("{i}" -> 0..num_layers-1).

  The arrays may be views of `params` (leaves already in host memory are not copied; device
  arrays are fetched once each), so they need not be contiguous. `shapes` ("a/b/c" -> shape,
  as `flat_shapes` gives for the module), when given, is the shape every parameter must have.

  Raises KeyError naming a parameter the table needs that `params` lacks, ValueError naming a
  parameter of the wrong shape (or depth) or one no source writes (it would be dropped
  silently), AssertionError if the table and `shapes` describe different trees.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}
  unwritten = set(flat) - {s.path for s in sources}
  if unwritten:
    raise ValueError(f"params has {sorted(unwritten)}, which no checkpoint tensor holds")
  if shapes is not None and set(shapes) != {s.path for s in sources}:
    raise AssertionError(f"the table and the module differ: "
                         f"{sorted(set(shapes) ^ {s.path for s in sources})}")
  state = {}
  for source in sources:
    if source.path not in flat:
      raise KeyError(f"params lack parameter {source.path!r} (checkpoint tensor "
                     f"{source.key!r})")
    value = np.asarray(flat[source.path])
    if shapes is not None and value.shape != tuple(shapes[source.path]):
      raise ValueError(f"parameter {source.path} has shape {value.shape}, but the config "
                       f"implies {shapes[source.path]}")
    if source.per_layer and value.shape[:1] != (num_layers,):
      raise ValueError(f"parameter {source.path} has shape {value.shape}: expected "
                       f"{num_layers} stacked layers first")
    for layer, key in iter_layer_keys(source, num_layers):
      state[key] = source.layout.to_torch(value if layer is None else value[layer])
  return state
