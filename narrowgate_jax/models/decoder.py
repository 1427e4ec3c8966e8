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
from narrowgate_jax.models.attention import attend, attend_step, visibility
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.layers import GatedMLP, HeadLayerNorm, RMSNorm, apply_rope, rope_tables


@flax.struct.dataclass
class LayerInputs:
  """What every layer reads besides the residual stream (broadcast over the layer scan).

  A full pass has queries and keys at the same T positions. A suffix pass (`prefix` set) has
  T queries at slots prefix .. prefix + T - 1 over the cached keys of the slots before them. A
  decoding step has T = 1 query at cache slot `cache_index` and S = the cache length of keys
  (every slot, filled or not: the mask hides the empty ones).
  """

  cos: jax.Array  # [B, T, H]
  sin: jax.Array  # [B, T, H]
  query_index: jax.Array  # [T] int32: each query's slot in the key sequence
  key_real: jax.Array  # [B, S] bool: False at padding keys
  query_real: Optional[jax.Array]  # [B, T] bool (a padding query sees itself), None when decoding
  windows: jax.Array  # [L] int32 sliding window per layer, 0 = none
  interventions: Interventions
  plan: CapturePlan
  cache_index: Optional[jax.Array] = None  # scalar int32: cache slot of the new keys (decoding)
  keep_kv: bool = flax.struct.field(pytree_node=False, default=False)  # emit this pass's K/V
  prefix: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # suffix passes


class Attention(nn.Module):
  """Self-attention with GQA, optional q/k LayerNorm, RoPE, and knockout edits.

  x [B, T, D] -> (out [B, T, D], probabilities [B, N, T, S] or None).
  """

  config: DecoderConfig
  need_probabilities: bool
  value_norms: bool = False

  @nn.compact
  def __call__(self, x, layer, inputs: LayerInputs, cache=None):
    """cache: this layer's (keys, values) [B, K, S, H] in a suffix pass or decoding, else None.

    Returns (out [B, T, D], probabilities [B, N, T, S] or None, (keys, values) [B, K, T, H] of
    the T positions of x, after RoPE: what a KV cache stores, and with `value_norms` the norm
    of each key's contribution through each head ||W_O^h v_s^h|| [B, N, S], else None).
    """
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

    value_rows = v  # [B, T, K, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H], the cache's layout
    new_kv = (k, v)
    stepping = cache is not None and inputs.prefix is None
    if cache is not None and not stepping:  # a suffix: its keys follow the cached prefix's
      k = jnp.concatenate([cache[0][:, :, :inputs.prefix].astype(k.dtype), k], axis=2)
      v = jnp.concatenate([cache[1][:, :, :inputs.prefix].astype(v.dtype), v], axis=2)
    key_index = jnp.arange(cache[0].shape[2] if stepping else k.shape[2])
    visible = visibility(inputs.query_index, key_index, inputs.key_real, inputs.windows[layer],
                         inputs.query_real)
    post_block = None
    for ko in inputs.interventions.knockouts:
      blocked = ko.blocked(layer)
      if ko.mode == "pre_softmax":
        visible = visible & ~blocked
      else:
        post_block = blocked if post_block is None else post_block | blocked
    if stepping:  # the cache does not hold this step's slot yet: its own key comes apart
      visible = visible & (key_index < inputs.cache_index)
      out, probs = attend_step(q, k, v, cache, visible, scale=c.head_dim**-0.5,
                               post_softmax_block=post_block), None
    else:
      out, probs = attend(q, k, v, visible, scale=c.head_dim**-0.5, post_softmax_block=post_block,
                          need_probabilities=self.need_probabilities)
    o = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=c.out_bias, dtype=x.dtype,
                        param_dtype=jnp.float32, name="o")
    out = o(out)
    norms = None
    if self.value_norms:
      norms = _value_output_norms(value_rows, o.variables["params"]["kernel"], c.num_heads)
    return out, probs, new_kv, norms


def _value_output_norms(v: jax.Array, o_kernel: jax.Array, num_heads: int) -> jax.Array:
  """||W_O^h v_s^h|| for every key s and query head h: v [B, S, K, H], o_kernel [N, H, D] ->
  [B, N, S] float32, through the [N, H, H] Gram matrices of the output projection (cheaper than
  forming each [D] vector)."""
  groups = num_heads // v.shape[2]
  vn = jnp.repeat(v.astype(jnp.float32), groups, axis=2)  # [B, S, N, H]: each query head's kv
  gram = jnp.einsum("NHD,NJD->NHJ", o_kernel, o_kernel)
  squared = jnp.einsum("BSNH,NHJ,BSNJ->BNS", vn, gram, vn)
  return jnp.sqrt(jnp.maximum(squared, 0.0))


class DecoderLayer(nn.Module):
  """One block; the scan carry is (residual [B, T, D], attention buffer or None).

  Scanned over `xs` = (layer index, this layer's KV cache (keys, values) [B, K, S, H] or None).
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self, carry, xs, inputs: LayerInputs):
    c, plan, iv = self.config, inputs.plan, inputs.interventions
    x, attn_buffer = carry
    layer, cache = xs
    for p in iv.patches_at("resid_pre"):
      x = p.apply(x, layer)

    input_norm = RMSNorm(c.norm_eps, name="input_norm")
    post_attn_norm = RMSNorm(c.norm_eps, name="post_attn_norm")
    attention = Attention(c, need_probabilities=plan.needs_probabilities,
                          value_norms=plan.value_weighted, name="attn")
    mlp = GatedMLP(c, name="mlp")

    attn_in = input_norm(x) if c.block_order == "pre_norm" else x
    for p in iv.patches_at("attn_in"):
      attn_in = p.apply(attn_in, layer)
    attn_out, probs, new_kv, value_norms = attention(attn_in, layer, inputs, cache)
    if c.block_order == "pre_norm":
      x = x + attn_out
      x = x + mlp(post_attn_norm(x))
    else:  # swin_norm: normalise each branch's output before adding it back
      x = x + input_norm(attn_out)
      x = x + post_attn_norm(mlp(x))
    for p in iv.patches_at("resid_post"):
      x = p.apply(x, layer)

    emitted = {}
    if inputs.keep_kv:
      emitted["kv"] = new_kv
    if plan.resid:
      emitted["resid"] = x if plan.resid_index is None else _gather_positions(x, plan.resid_index)
    if plan.attn_in:
      emitted["attn_in"] = (attn_in if plan.resid_index is None
                            else _gather_positions(attn_in, plan.resid_index))
    if plan.received_queries is not None:
      received = jnp.einsum("BNTS,BT->BNS", probs, plan.received_queries.astype(probs.dtype))
      emitted["received"] = received if value_norms is None else received * value_norms
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

  __call__(input_ids [B, T], positions [B, T], attention_mask [B, T] bool, interventions, plan,
  features [B, T, D] | None, feature_mask [B, T] bool | None) -> dict with "logits" [B, T, V]
  float32 and the captures. Where `feature_mask` is True the input embedding is `features` (a
  non-native VLM's projected image features) instead of the token's embedding.
  `prefill` and `decode` are the two halves of cached generation (see `narrowgate_jax.generate`).
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

  def _embed(self, input_ids, features, feature_mask):
    x = self.embed(input_ids)
    if features is None:
      return x
    return jnp.where(feature_mask[..., None], features.astype(self.dtype), x)

  def _prompt_pass(self, input_ids, positions, attention_mask, interventions, plan, features,
                   feature_mask, keep_kv: bool):
    """The layer scan over a whole prompt -> (embeddings [B, T, D], last layer's output
    [B, T, D], attention buffer or None, what the layers emitted, stacked on [L])."""
    c = self.config
    x = self._embed(input_ids, features, feature_mask)
    cos, sin = rope_tables(positions, c)
    b, t = attention_mask.shape
    inputs = LayerInputs(cos=cos, sin=sin, query_index=jnp.arange(t), key_real=attention_mask,
                         query_real=attention_mask,
                         windows=jnp.asarray(c.layer_windows, jnp.int32),
                         interventions=interventions, plan=plan, keep_kv=keep_kv)
    attn_buffer = None
    if plan.attn_layers:
      attn_buffer = jnp.zeros((len(plan.attn_layers), b, c.num_heads, t, t), jnp.float32)
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    (x_out, attn_buffer), emitted = self.layers((x, attn_buffer), (layer_ids, None), inputs)
    return x, x_out, attn_buffer, emitted

  def __call__(self, input_ids, positions, attention_mask, interventions: Interventions,
               plan: CapturePlan, features: Optional[jax.Array] = None,
               feature_mask: Optional[jax.Array] = None):
    x, x_out, attn_buffer, emitted = self._prompt_pass(
        input_ids, positions, attention_mask, interventions, plan, features, feature_mask,
        keep_kv=False)
    out = {"logits": self.unembed(self.final_norm(x_out))}
    if plan.resid:
      first = x if plan.resid_index is None else _gather_positions(x, plan.resid_index)
      out["resid"] = jnp.concatenate([first[None], emitted["resid"]], axis=0)
    if plan.attn_in:
      out["attn_in"] = emitted["attn_in"]
    if plan.received_queries is not None:
      out["received"] = emitted["received"]
    if plan.attn_layers:
      out["attn"] = attn_buffer
    return out

  def prefill(self, input_ids, positions, attention_mask, interventions: Interventions,
              features: Optional[jax.Array] = None, feature_mask: Optional[jax.Array] = None):
    """The prompt pass of generation (left-padded: the last position is every example's last).

    Returns (logits at the last position [B, V] float32, (keys, values) [L, B, K, T, H]: the KV
    cache's heads-major layout).
    """
    _, x_out, _, emitted = self._prompt_pass(input_ids, positions, attention_mask, interventions,
                                             CapturePlan(), features, feature_mask, keep_kv=True)
    return self.unembed(self.final_norm(x_out[:, -1:]))[:, 0], emitted["kv"]

  def decode(self, token_ids, positions, cache_index, key_real, cache,
             interventions: Interventions):
    """One decoding step: a new token at cache slot `cache_index` for every example.

    token_ids, positions: [B] int (rotary position of the new token); cache_index: scalar int;
    key_real: [B, S] bool (False at the prompt's padding); cache: (keys, values) [L, B, K, S, H]
    holding slots < cache_index; interventions: in the form `Interventions.for_generated_query`
    gives (knockout queries [R, B, 1], keys [R, B, S]; no patches).
    Returns (logits [B, V] float32, the new token's (keys, values) [L, B, K, 1, H]); the caller
    writes these into its cache. The step attends to the cache where it lies
    (`attention.attend_step`), so no layer copies its cache to insert one key.
    """
    logits, kv = self._cached_pass(token_ids[:, None], positions[:, None], cache_index, key_real,
                                   cache, interventions, prefix=None)
    return logits[:, 0], kv

  def extend(self, input_ids, positions, start: int, key_real, cache,
             interventions: Interventions, query_real: Optional[jax.Array] = None,
             features: Optional[jax.Array] = None, feature_mask: Optional[jax.Array] = None,
             last_only: bool = False):
    """A prompt's suffix, positions start .. T - 1, recomputed over its cached prefix (the shared
    prefix of a sweep: `narrowgate_jax.model.forward_suffix_fn`, `generate.prompt_states`).

    input_ids, positions: [B, U] with U = T - start; start: a Python int (the prefix length is
    part of the compiled shape); key_real: [B, T] bool; cache: (keys, values) [L, B, K, S, H]
    holding at least slots < start (S >= start; later slots are not read); interventions: as the
    new queries see them (`for_suffix`); query_real: [B, U] bool or None (None: every new
    position is real); features, feature_mask: [B, U, D], [B, U] for non-native image embeddings.
    Returns (logits [B, U, V] float32, or [B, V] at the last position when last_only; the new
    positions' (keys, values) [L, B, K, U, H]).
    """
    logits, kv = self._cached_pass(input_ids, positions, start, key_real, cache, interventions,
                                   query_real, features, feature_mask, prefix=int(start),
                                   last_only=last_only)
    return (logits[:, 0] if last_only else logits), kv

  def _cached_pass(self, input_ids, positions, start, key_real, cache, interventions,
                   query_real=None, features=None, feature_mask=None, *,
                   prefix: Optional[int], last_only: bool = False):
    """U new positions at cache slots start .. start + U - 1 over a cache of earlier slots:
    a suffix (`prefix` = start, static) or a decoding step (`prefix` None, start traced).
    Returns (logits [B, U, V] float32, or [B, 1, V] of the last position when last_only; the new
    positions' (keys, values) [L, B, K, U, H])."""
    c = self.config
    x = self._embed(input_ids, features, feature_mask)
    cos, sin = rope_tables(positions, c)
    start = jnp.asarray(start, jnp.int32)
    inputs = LayerInputs(cos=cos, sin=sin, query_index=start + jnp.arange(input_ids.shape[1]),
                         key_real=key_real, query_real=query_real,
                         windows=jnp.asarray(c.layer_windows, jnp.int32),
                         interventions=interventions, plan=CapturePlan(), cache_index=start,
                         keep_kv=True, prefix=prefix)
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    (x_out, _), emitted = self.layers((x, None), (layer_ids, cache), inputs)
    if last_only:
      x_out = x_out[:, -1:]
    return self.unembed(self.final_norm(x_out)), emitted["kv"]

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
