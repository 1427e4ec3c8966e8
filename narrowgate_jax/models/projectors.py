"""The MLPs that map vision-tower features into the language model's embedding space: LLaVA's
multi-modal projector and Janus's aligner.

  LLaVA (`LlavaMultiModalProjector`, also LLaVA-NeXT / OneVision): linear_1 [V -> D],
      `projector_hidden_act` (default "gelu", the exact erf form), linear_2 [D -> D]; biases iff
      `multimodal_projector_bias`. V = the vision width times the number of feature layers:
      with a list `vision_feature_layer`, transformers concatenates those layers' hidden states on
      the last axis (`vit.vit_features` with a tuple of layers does the same).
  Janus (`JanusVisionAlignerMLP`): fc1 [V -> E], then for each hidden_layers.{j}, j < depth-1:
      the vision config's `hidden_act` ("gelu", exact erf), Linear [E -> E]; always with biases.
      The activation comes before each hidden layer, never after the last linear: depth=1 is fc1
      alone. E = vision_config.projection_dim, which must be the language model's width.

Parameter trees (V = vision width x feature layers, D = text width, E = projection_dim):
  MLPProjector   linear_{1,2}/kernel   [V, D], [D, D]      bias [D] (config.bias)
  JanusAligner   fc1/kernel            [V, E]              bias [E]
                 hidden_{j}/kernel     [E, E]              bias [E]

Checkpoint prefixes (the argument of `projector_tensor_sources` / `aligner_tensor_sources`):
  LLaVA saved by transformers (4 or 5) and on the Hub   "multi_modal_projector."
  LLaVA model in memory (state_dict())                  "model.multi_modal_projector."
  original LLaVA layout (liuhaotian/*)                  "model.mm_projector." with names ("0", "2")
  Janus (files and memory alike)                        "model.aligner."

Axis legend: B images · P feature tokens · V vision feature width · D output width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from narrowgate_jax.models.families import LINEAR, SAME, TensorSource
from narrowgate_jax.models.layers import activation
from narrowgate_jax.models.vit import PRECISION

LLAVA_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
JANUS_PREFIX = "model.aligner."


def _reader(config: Any):
  """name -> value for a transformers config object or its dict form (None when absent)."""
  if config is None:
    return lambda name: None
  if isinstance(config, Mapping):
    return config.get
  return lambda name: getattr(config, name, None)


def _dense(features: int, bias: bool, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=dtype, precision=PRECISION,
                  param_dtype=jnp.float32, name=name)


def _check_width(features: jax.Array, expected: int) -> None:
  if features.shape[-1] != expected:
    raise ValueError(f"features have width {features.shape[-1]}, the projector takes {expected}")


# ------------------------------------------------------------------------------------- LLaVA


@dataclasses.dataclass(frozen=True)
class MLPProjectorConfig:
  """LLaVA's projector; hashable, so it can be a static jit argument.

  Attributes:
    in_features: the vision hidden size times the number of feature layers.
    out_features: the language model's hidden size.
    hidden_act: a transformers activation name (`projector_hidden_act`).
    bias: `multimodal_projector_bias`.
  """

  in_features: int
  out_features: int
  hidden_act: str = "gelu"
  bias: bool = True

  def __post_init__(self):
    activation(self.hidden_act)

  @classmethod
  def from_hf(cls, hf_config: Any) -> "MLPProjectorConfig":
    """From a LlavaConfig (or LLaVA-NeXT / OneVision config) object or its dict form."""
    get = _reader(hf_config)
    vision, text = _reader(get("vision_config")), _reader(get("text_config"))
    if vision("hidden_size") is None or text("hidden_size") is None:
      raise ValueError("the LLaVA config needs vision_config.hidden_size and "
                       "text_config.hidden_size")
    layers = get("vision_feature_layer")
    num_layers = 1 if layers is None or isinstance(layers, int) else len(layers)
    act, bias = get("projector_hidden_act"), get("multimodal_projector_bias")
    return cls(in_features=int(vision("hidden_size")) * num_layers,
               out_features=int(text("hidden_size")),
               hidden_act="gelu" if act is None else str(act),
               bias=True if bias is None else bool(bias))


class MLPProjector(nn.Module):
  """features [B, P, V] -> linear_2(act(linear_1(features))) [B, P, D]."""

  config: MLPProjectorConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    c = self.config
    _check_width(features, c.in_features)
    x = _dense(c.out_features, c.bias, self.dtype, "linear_1")(features.astype(self.dtype))
    return _dense(c.out_features, c.bias, self.dtype, "linear_2")(activation(c.hidden_act)(x))


def projector_tensor_sources(prefix: str, names: Sequence[str] = ("linear_1", "linear_2"),
                             bias: bool = True) -> list[TensorSource]:
  """Our linear_1 / linear_2 from the checkpoint's `prefix + names[0]` / `prefix + names[1]`.

  prefix "multi_modal_projector." for LLaVA files (see the module docstring for the others); the
  original LLaVA layout: prefix "model.mm_projector.", names ("0", "2") (an nn.Sequential whose
  index 1 is the activation).
  """
  if len(names) != 2:
    raise ValueError(f"LLaVA's projector has two linear layers, got names {names}")
  return _linear_sources(prefix, {"linear_1": names[0], "linear_2": names[1]}, bias)


def _linear_sources(prefix: str, names: Mapping[str, str], bias: bool) -> list[TensorSource]:
  """our module name -> checkpoint module name, for Linear layers."""
  out = []
  for ours, theirs in names.items():
    out.append(TensorSource(f"{ours}/kernel", f"{prefix}{theirs}.weight", LINEAR, False))
    if bias:
      out.append(TensorSource(f"{ours}/bias", f"{prefix}{theirs}.bias", SAME, False))
  return out


# ------------------------------------------------------------------------------------- Janus


@dataclasses.dataclass(frozen=True)
class JanusAlignerConfig:
  """Janus's aligner (JanusVisionAlignerMLP); hashable, so it can be a static jit argument.

  Attributes:
    in_features: the vision hidden size.
    out_features: `projection_dim` (the language model's hidden size).
    depth: the number of Linear layers (fc1 and depth-1 hidden layers).
    hidden_act: the vision config's `hidden_act`.
  """

  in_features: int
  out_features: int
  depth: int = 2
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.depth < 1:
      raise ValueError(f"depth={self.depth}: the aligner has at least one linear layer")
    activation(self.hidden_act)

  @classmethod
  def from_hf(cls, hf_config: Any) -> "JanusAlignerConfig":
    """From a JanusConfig (its vision_config is read) or a JanusVisionConfig, object or dict.
    Missing fields take JanusVisionConfig's defaults."""
    get = _reader(hf_config)
    if get("vision_config") is not None:
      get = _reader(get("vision_config"))
    value = lambda name, default: default if get(name) is None else get(name)  # noqa: E731
    return cls(in_features=int(value("hidden_size", 1024)),
               out_features=int(value("projection_dim", 2048)), depth=int(value("depth", 2)),
               hidden_act=str(value("hidden_act", "gelu")))


class JanusAligner(nn.Module):
  """features [B, P, V] -> [B, P, E]: fc1, then (act, hidden_{j}) for j = 0..depth-2."""

  config: JanusAlignerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    c = self.config
    _check_width(features, c.in_features)
    x = _dense(c.out_features, True, self.dtype, "fc1")(features.astype(self.dtype))
    for j in range(c.depth - 1):
      x = _dense(c.out_features, True, self.dtype, f"hidden_{j}")(activation(c.hidden_act)(x))
    return x


def aligner_tensor_sources(config: JanusAlignerConfig,
                           prefix: str = JANUS_PREFIX) -> list[TensorSource]:
  """fc1 and hidden_layers.{j} (j = 0..depth-2) -> our fc1 and hidden_{j}."""
  names = {"fc1": "fc1"} | {f"hidden_{j}": f"hidden_layers.{j}" for j in range(config.depth - 1)}
  return _linear_sources(prefix, names, bias=True)


# ------------------------------------------------------------------------------ entry points

_MODULES = {MLPProjectorConfig: MLPProjector, JanusAlignerConfig: JanusAligner}


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def project(params: dict, config: MLPProjectorConfig | JanusAlignerConfig, features: jax.Array,
            dtype: Any = jnp.float32) -> jax.Array:
  """features [B, P, V] (or any [..., V]) -> [..., D] float32, computed in `dtype`, through
  LLaVA's projector or Janus's aligner (whichever `config` describes)."""
  out = _MODULES[type(config)](config, dtype).apply({"params": params}, jnp.asarray(features))
  return out.astype(jnp.float32)


def param_shapes(config: MLPProjectorConfig | JanusAlignerConfig) -> dict:
  """The parameter tree of `config` as jax.ShapeDtypeStruct leaves, without allocating it."""
  features = jnp.zeros((1, 1, config.in_features), jnp.float32)
  init = lambda: _MODULES[type(config)](config).init(jax.random.key(0), features)  # noqa: E731
  return jax.eval_shape(init)["params"]
