"""The one configuration every decoder-only language model of a supported family reduces to."""

from __future__ import annotations

import dataclasses
from typing import Any

BLOCK_ORDERS = ("pre_norm", "swin_norm")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of the language model; hashable, so it can be a static jit argument.

  Attributes:
    family: the checkpoint family it was read from ("llama", "chameleon", ...), for messages.
    sliding_windows: one entry per layer, 0 meaning full causal attention; a key s is visible to
      query t when t - window < s <= t (transformers' convention).
    rope: (name, value) pairs; "rope_type" is one of ROPE_TYPES, plus that type's parameters.
    block_order: "pre_norm" (Llama) or "swin_norm" (Chameleon-34B: norm after attention and MLP).
    qk_norm: Chameleon's LayerNorm over head_dim on queries and keys, with per-head affine.
    suppressed_logit_ids: vocabulary ids whose logits are set to the dtype minimum (Chameleon's
      image tokens, as transformers does for text output).
    max_positions: the context length the checkpoint was trained for (0: unknown); longer
      prompts are refused.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  family: str = "llama"
  norm_eps: float = 1e-6
  rope: tuple[tuple[str, Any], ...] = (("rope_type", "default"), ("rope_theta", 10000.0))
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  qk_norm_eps: float = 1e-5
  block_order: str = "pre_norm"
  sliding_windows: tuple[int, ...] = ()
  tie_embeddings: bool = False
  hidden_act: str = "silu"
  suppressed_logit_ids: tuple[int, ...] = ()
  max_positions: int = 0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.block_order not in BLOCK_ORDERS:
      raise ValueError(f"block_order={self.block_order!r}; expected one of {BLOCK_ORDERS}")
    rope_type = self.rope_parameters["rope_type"]
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
      raise ValueError(
          f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")

  @property
  def rope_parameters(self) -> dict[str, Any]:
    return dict(self.rope)

  @property
  def layer_windows(self) -> tuple[int, ...]:
    """Sliding window per layer (0 = full attention)."""
    return self.sliding_windows or (0,) * self.num_layers

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["rope"] = dict(self.rope)
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown DecoderConfig fields: {sorted(unknown)}")
    d = dict(d)
    d["rope"] = tuple(sorted(d.get("rope", {}).items()))
    for key in ("sliding_windows", "suppressed_logit_ids"):
      d[key] = tuple(d.get(key, ()))
    return cls(**d)
