"""The decoder-only transformer shared by every supported family, with its intercept points.

Layers are scanned: their parameters are stacked on a leading layer axis [L, ...] and one compiled
layer body runs L times. The body reads the interventions for its layer by index and emits what
the `CapturePlan` asks for, so a knockout sweep or a residual capture costs no Python hooks.

Parameter tree (shapes; legend in `layers.py`):
  embed/embedding                     [V, D]
  layers/input_norm/scale             [L, D]
  layers/attn/{q}/kernel              [L, D, N, H]      bias [L, N, H] (qkv_bias)
  layers/attn/{k,v}/kernel            [L, D, K, H]      bias [L, K, H] (qkv_bias)
  layers/attn/o/kernel                [L, N, H, D]      bias [L, D]    (out_bias)
  layers/attn/{q,k}_norm/{scale,bias} [L, N|K, H]                      (qk_norm)
  layers/post_attn_norm/scale         [L, D]
  layers/mlp/{gate,up}/kernel         [L, D, F]         bias [L, F]    (mlp_bias)
  layers/mlp/down/kernel              [L, F, D]         bias [L, D]    (mlp_bias)
  final_norm/scale                    [D]
  lm_head/kernel                      [D, V]            (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.capture import CapturePlan
from narrowgate_jax.interventions import Interventions
from narrowgate_jax.models.attention import attend, base_mask
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.layers import GatedMLP, HeadLayerNorm, RMSNorm, apply_rope, rope_tables


@flax.struct.dataclass
class LayerInputs:
  """What every layer reads besides the residual stream (broadcast over the layer scan)."""

  cos: jax.Array  # [B, T, H]
  sin: jax.Array  # [B, T, H]
  attention_mask: jax.Array  # [B, T] bool
  windows: jax.Array  # [L] int32 sliding window per layer, 0 = none
  interventions: Interventions
  plan: CapturePlan


class Attention(nn.Module):
  """Self-attention with GQA, optional q/k LayerNorm, RoPE, and knockout edits.

  x [B, T, D] -> (out [B, T, D], probabilities [B, N, T, S] or None).
  """

  config: DecoderConfig
  need_probabilities: bool

  @nn.compact
  def __call__(self, x, layer, inputs: LayerInputs):
    c = self.config
    proj = lambda heads, name, bias: nn.DenseGeneral(  # noqa: E731
        (heads, c.head_dim), use_bias=bias, dtype=x.dtype, param_dtype=jnp.float32, name=name)
    q = proj(c.num_heads, "q", c.qkv_bias)(x)  # [B, T, N, H]
    k = proj(c.num_kv_heads, "k", c.qkv_bias)(x)  # [B, T, K, H]
    v = proj(c.num_kv_heads, "v", c.qkv_bias)(x)
    if c.qk_norm:
      q = HeadLayerNorm(c.num_heads, c.qk_norm_eps, name="q_norm")(q)
      k = HeadLayerNorm(c.num_kv_heads, c.qk_norm_eps, name="k_norm")(k)
    q = apply_rope(q, inputs.cos, inputs.sin)
    k = apply_rope(k, inputs.cos, inputs.sin)

    visible = base_mask(inputs.attention_mask, inputs.windows[layer])
    post_block = None
    for ko in inputs.interventions.knockouts:
      blocked = ko.blocked(layer)
      if ko.mode == "pre_softmax":
        visible = visible & ~blocked
      else:
        post_block = blocked if post_block is None else post_block | blocked
    out, probs = attend(q, k, v, visible, scale=c.head_dim**-0.5, post_softmax_block=post_block,
                        need_probabilities=self.need_probabilities)
    out = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=c.out_bias, dtype=x.dtype,
                          param_dtype=jnp.float32, name="o")(out)
    return out, probs


class DecoderLayer(nn.Module):
  """One block; the scan carry is (residual [B, T, D], attention buffer or None)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, carry, layer, inputs: LayerInputs):
    c, plan, iv = self.config, inputs.plan, inputs.interventions
    x, attn_buffer = carry
    for p in iv.patches_at("resid_pre"):
      x = p.apply(x, layer)

    input_norm = RMSNorm(c.norm_eps, name="input_norm")
    post_attn_norm = RMSNorm(c.norm_eps, name="post_attn_norm")
    attention = Attention(c, need_probabilities=plan.needs_probabilities, name="attn")
    mlp = GatedMLP(c, name="mlp")

    attn_in = input_norm(x) if c.block_order == "pre_norm" else x
    for p in iv.patches_at("attn_in"):
      attn_in = p.apply(attn_in, layer)
    attn_out, probs = attention(attn_in, layer, inputs)
    if c.block_order == "pre_norm":
      x = x + attn_out
      x = x + mlp(post_attn_norm(x))
    else:  # swin_norm: normalise each branch's output before adding it back
      x = x + input_norm(attn_out)
      x = x + post_attn_norm(mlp(x))
    for p in iv.patches_at("resid_post"):
      x = p.apply(x, layer)

    emitted = {}
    if plan.resid:
      emitted["resid"] = x if plan.resid_index is None else _gather_positions(x, plan.resid_index)
    if plan.received_queries is not None:
      emitted["received"] = jnp.einsum("BNTS,BT->BNS", probs,
                                       plan.received_queries.astype(probs.dtype))
    if plan.attn_layers:
      slot = jnp.asarray(_slot_of_layer(plan.attn_layers, c.num_layers))[layer]
      attn_buffer = attn_buffer.at[slot].set(probs, mode="drop")
    return (x, attn_buffer), emitted


def _slot_of_layer(attn_layers: tuple[int, ...], num_layers: int) -> np.ndarray:
  """[L] int32: where layer l's probabilities go in the capture buffer (out of range = dropped)."""
  slots = np.full(num_layers, len(attn_layers), dtype=np.int32)
  slots[list(attn_layers)] = np.arange(len(attn_layers), dtype=np.int32)
  return slots


def _gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, D], index [B, P] -> [B, P, D] (out-of-range indices give zeros)."""
  return jnp.take_along_axis(x, index[:, :, None], axis=1, mode="fill", fill_value=0)


class Decoder(nn.Module):
  """Token ids (or embeddings) -> logits, with captures and interventions.

  __call__(input_ids [B, T] | None, positions [B, T], attention_mask [B, T] bool, interventions,
  plan, embeddings [B, T, D] | None) -> dict with "logits" [B, T, V] float32 and the captures.
  """

  config: DecoderConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)
    self.layers = nn.scan(
        DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast), length=c.num_layers)(c)
    self.final_norm = RMSNorm(c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                              param_dtype=jnp.float32)

  def __call__(self, input_ids, positions, attention_mask, interventions: Interventions,
               plan: CapturePlan, embeddings: Optional[jax.Array] = None):
    c = self.config
    x = self.embed(input_ids) if embeddings is None else embeddings.astype(self.dtype)
    cos, sin = rope_tables(positions, c)
    inputs = LayerInputs(cos=cos, sin=sin, attention_mask=attention_mask,
                         windows=jnp.asarray(c.layer_windows, jnp.int32),
                         interventions=interventions, plan=plan)
    attn_buffer = None
    if plan.attn_layers:
      b, t = attention_mask.shape
      attn_buffer = jnp.zeros((len(plan.attn_layers), b, c.num_heads, t, t), jnp.float32)
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    (x_out, attn_buffer), emitted = self.layers((x, attn_buffer), layer_ids, inputs)

    out = {"logits": self.unembed(self.final_norm(x_out))}
    if plan.resid:
      first = x if plan.resid_index is None else _gather_positions(x, plan.resid_index)
      out["resid"] = jnp.concatenate([first[None], emitted["resid"]], axis=0)
    if plan.received_queries is not None:
      out["received"] = emitted["received"]
    if plan.attn_layers:
      out["attn"] = attn_buffer
    return out

  def unembed(self, h):
    """h [B, T, D] (after the final norm) -> logits [B, T, V] float32."""
    if self.config.tie_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    if self.config.suppressed_logit_ids:
      ids = jnp.asarray(self.config.suppressed_logit_ids)
      logits = logits.at[..., ids].set(jnp.finfo(jnp.float32).min)
    return logits


def param_shapes(config: DecoderConfig) -> dict:
  """The parameter tree of `config` as jax.ShapeDtypeStruct leaves, without allocating it."""
  model = Decoder(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1), bool)
  init = lambda: model.init(jax.random.key(0), ids, ids, mask, Interventions(), CapturePlan())  # noqa: E731
  return jax.eval_shape(init)["params"]


# Logical axis names of every parameter, by its path below the layer stack (see distributed.py).
PARAM_LOGICAL_AXES = {
    "embed/embedding": ("vocab", "embed"),
    "attn/q/kernel": ("embed", "heads", "head_dim"),
    "attn/q/bias": ("heads", "head_dim"),
    "attn/k/kernel": ("embed", "kv_heads", "head_dim"),
    "attn/k/bias": ("kv_heads", "head_dim"),
    "attn/v/kernel": ("embed", "kv_heads", "head_dim"),
    "attn/v/bias": ("kv_heads", "head_dim"),
    "attn/o/kernel": ("heads", "head_dim", "embed"),
    "attn/o/bias": ("embed",),
    "attn/q_norm/scale": ("heads", "head_dim"),
    "attn/q_norm/bias": ("heads", "head_dim"),
    "attn/k_norm/scale": ("kv_heads", "head_dim"),
    "attn/k_norm/bias": ("kv_heads", "head_dim"),
    "input_norm/scale": ("embed",),
    "post_attn_norm/scale": ("embed",),
    "mlp/gate/kernel": ("embed", "mlp"),
    "mlp/gate/bias": ("mlp",),
    "mlp/up/kernel": ("embed", "mlp"),
    "mlp/up/bias": ("mlp",),
    "mlp/down/kernel": ("mlp", "embed"),
    "mlp/down/bias": ("embed",),
    "final_norm/scale": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
}


def logical_axes(path: str) -> tuple[str, ...]:
  """'layers/attn/q/kernel' -> ('layers', 'embed', 'heads', 'head_dim')."""
  if path.startswith("layers/"):
    return ("layers",) + PARAM_LOGICAL_AXES[path[len("layers/"):]]
  return PARAM_LOGICAL_AXES[path]
