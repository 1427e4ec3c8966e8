"""Greedy decoding with a KV cache, with interventions applied to the generated tokens too.

One jitted program per (config, batch shape, max_new_tokens, intervention structure):

  prefill   one pass over the left-padded prompt [B, T] (`Decoder.prefill`), every intervention
            applied as in `forward`; it returns the last position's logits and every layer's
            keys and values [L, B, K, T, H], which are padded into a cache [L, B, K, S, H] with
            S = T + max_new_tokens slots.
  decode    a `jax.lax.while_loop` of `Decoder.decode` steps: step i embeds token i - 1, writes
            its keys and values at cache slot T + i - 1 and attends over the whole cache,
            unembeds, takes the argmax. The loop ends after max_new_tokens tokens or once every
            example has emitted an end-of-sequence id.

Layout: cache slot = index in the padded sequence (prompt slots 0..T-1, then one slot per new
token, the same for every example). Masks come from absolute slots (`attention.visibility`):
key s is visible to the query at slot q when s <= q, q - window < s (sliding-window layers), and
s is not prompt padding. Rotary positions continue from each example's own last prompt position
(left padding: the new token's position = number of tokens before it, padding excluded).

Interventions during decoding:
  * Knockouts: rule r blocks a generated token's query from the rule's keys (prompt positions
    only) where `Knockout.generated_queries[r]` is set; both pre- and post-softmax.
  * Patches and steering act at prompt positions during the prefill (so the cached keys and
    values carry their effect); a generated token never sits at a prompt position, so there is
    nothing for them to do while decoding.
A `Conditions` value (`VLM.generate`): the clean prompt runs once, each condition recomputes only
the positions from the first one it changes (`prompt_states`, one call per group of conditions
that start at the same place), and one decoding loop serves every condition (`decode_conditions_fn`,
the conditions vmapped, so a step reads the weights once for all of them); tokens gain a leading
[C] axis.

After an example emits an end-of-sequence id, its remaining tokens are `pad_id`, as transformers'
greedy `generate` does. Image-token logits (Chameleon's `suppressed_logit_ids`) sit at the float32
minimum, so the argmax never picks them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.interventions import Interventions
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.decoder import Decoder
from narrowgate_jax.processing.batch import Batch

EosIds = Union[None, int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """tokens: [B, max_new_tokens] int32 (with a `Conditions` input: [C, B, max_new_tokens]),
  `pad_id` after an example's end-of-sequence token. texts: the tokens decoded up to (not
  including) the end-of-sequence token, when the model has a tokenizer ([B] or [C][B])."""

  tokens: np.ndarray
  texts: Optional[list] = None


def eos_array(eos_id: EosIds) -> np.ndarray:
  """None, an id or a list of ids -> [E] int32 (E >= 1; -1 never matches a token)."""
  if eos_id is None:
    return np.full((1,), -1, np.int32)
  ids = np.atleast_1d(np.asarray(eos_id, np.int32))
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"eos_id must be None, an id or a non-empty list of ids, got {eos_id!r}")
  return ids


def prompt_pass(run, batch: Batch, interventions: Interventions) -> tuple[jax.Array, tuple]:
  """`Decoder.prefill` over the whole prompt (`run`: the bound `Decoder.apply`) -> (logits at
  the last position [B, V], (keys, values) [L, B, K, T, H])."""
  return run(batch.input_ids, batch.positions, batch.attention_mask, interventions,
             batch.features, batch.feature_mask, method=Decoder.prefill)


def suffix_pass(run, batch: Batch, kv, interventions: Interventions, start: int,
                last_only: bool = True) -> tuple[jax.Array, tuple]:
  """`Decoder.extend` over positions [start, T) of the prompt, attending to the cached prefix in
  `kv` (keys, values) [L, B, K, T, H], under `interventions` as the whole prompt sees them ->
  (logits [B, V], or [B, T - start, V] without last_only; the suffix's (keys, values)
  [L, B, K, T - start, H])."""
  real = batch.attention_mask
  cut = lambda x: None if x is None else x[:, start:]  # noqa: E731
  return run(batch.input_ids[:, start:], batch.positions[:, start:], start, real, kv,
             interventions.for_suffix(start), query_real=real[:, start:],
             features=cut(batch.features), feature_mask=cut(batch.feature_mask),
             last_only=last_only, method=Decoder.extend)


def greedy(params, batch: Batch, interventions: Interventions, eos_ids: jax.Array,
           pad_id: jax.Array, *, config: DecoderConfig, dtype, max_new_tokens: int) -> jax.Array:
  """Greedy tokens [B, max_new_tokens] int32 (traceable; `generate_fn` is its jitted form).

  eos_ids: [E] int32 end-of-sequence ids (-1 for none); pad_id: scalar int32.
  """
  run = functools.partial(Decoder(config, dtype).apply, {"params": params})
  logits, kv = prompt_pass(run, batch, interventions)
  # One condition: a condition axis of 1 (after the layer axis of the keys and values).
  kv = jax.tree.map(lambda x: x[:, None], kv)
  stacked = jax.tree.map(lambda x: x[None], interventions)
  return _decode(run, batch, logits[None], kv, stacked, eos_ids, pad_id, max_new_tokens)[0]


def prompt_states(params, batch: Batch, stacked: Interventions, clean_kv, *, start: int,
                  config: DecoderConfig, dtype) -> tuple[jax.Array, tuple]:
  """Every condition's prompt pass, as decoding starts from it: logits at the last position
  [C, B, V] and the keys and values of every prompt position [L, C, B, K, T, H] (layers first,
  as the decoding loop scans them).

  start == 0: a whole prefill per condition (`clean_kv` unused, may be None). start > 0: the
  clean prefix is shared: each condition recomputes only positions [start, T) over `clean_kv`
  (the clean prefill's keys and values [L, B, K, T, H]), which is exact when no condition changes
  a position before `start` (`Interventions.first_edited_position`): a position's computation
  sees only earlier positions, so the prefix is the clean run's.
  """
  run = functools.partial(Decoder(config, dtype).apply, {"params": params})
  if start == 0:
    return jax.vmap(lambda iv: prompt_pass(run, batch, iv), out_axes=(0, 1))(stacked)
  keys, values = clean_kv

  def one(interventions: Interventions):
    logits, (k_new, v_new) = suffix_pass(run, batch, clean_kv, interventions, start)
    return logits, (jax.lax.dynamic_update_slice_in_dim(keys, k_new.astype(keys.dtype), start, 3),
                    jax.lax.dynamic_update_slice_in_dim(values, v_new.astype(values.dtype), start,
                                                        3))

  return jax.vmap(one, out_axes=(0, 1))(stacked)


def _decode(run, batch: Batch, logits: jax.Array, kv, stacked: Interventions,
            eos_ids: jax.Array, pad_id: jax.Array, max_new_tokens: int) -> jax.Array:
  """The decoding loop after the prompt passes of C conditions: logits [C, B, V] at the last
  prompt position, kv (keys, values) [L, C, B, K, T, H] of every prompt position, `stacked`
  each condition's interventions [C, ...] -> tokens [C, B, max_new_tokens].

  One loop for all conditions: each step maps `Decoder.decode` over the condition axis, so the
  weights are read once per step for every condition, and the loop's condition is one scalar
  (a loop mapped over conditions would select its whole carry, caches included, every step).
  """
  keys, values = kv
  c = logits.shape[0]
  b, t = batch.input_ids.shape
  length = t + max_new_tokens
  widen = ((0, 0), (0, 0), (0, 0), (0, 0), (0, max_new_tokens), (0, 0))
  cache = (jnp.pad(keys, widen), jnp.pad(values, widen))  # [L, C, B, K, S, H]
  key_real = jnp.concatenate([batch.attention_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
  decode_iv = jax.vmap(lambda iv: iv.for_generated_query(length), axis_size=c)(stacked)
  last_position = batch.positions[:, -1]  # left padding: every example's last prompt token

  def decode(token, position, slot, cache, interventions):  # one condition's step
    return run(token, position, slot, key_real, cache, interventions, method=Decoder.decode)

  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [C, B]
  tokens = jnp.full((c, b, max_new_tokens), pad_id, jnp.int32).at[:, :, 0].set(first)
  done = jnp.isin(first, eos_ids)

  def unfinished(state):
    i, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(state):
    """Token i from token i - 1, which goes into cache slot t + i - 1."""
    i, tokens, done, (cache_k, cache_v) = state
    slot = t + i - 1
    logits, (k_new, v_new) = jax.vmap(decode, in_axes=(0, None, None, 1, 0), out_axes=(0, 1))(
        tokens[:, :, i - 1], last_position + i, slot, (cache_k, cache_v), decode_iv)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k_new.astype(cache_k.dtype), slot, 4)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v_new.astype(cache_v.dtype), slot, 4)
    token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, :, None], i, axis=2)
    return i + 1, tokens, done | jnp.isin(token, eos_ids), (cache_k, cache_v)

  _, tokens, _, _ = jax.lax.while_loop(unfinished, step, (jnp.int32(1), tokens, done, cache))
  return tokens


@functools.partial(jax.jit, static_argnames=("config", "dtype", "max_new_tokens"))
def generate_fn(params, batch, interventions, eos_ids, pad_id, *, config, dtype,
                max_new_tokens) -> jax.Array:
  """The jitted `greedy`: prefill and the whole decoding loop in one program."""
  return greedy(params, batch, interventions, eos_ids, pad_id, config=config, dtype=dtype,
                max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def prefill_fn(params, batch, interventions, *, config, dtype) -> tuple[jax.Array, tuple]:
  """One prompt pass -> (logits at the last position [B, V], (keys, values) [L, B, K, T, H])."""
  return prompt_pass(functools.partial(Decoder(config, dtype).apply, {"params": params}), batch,
                     interventions)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "start"))
def prompt_states_fn(params, batch, stacked: Interventions, clean_kv, *, start, config,
                     dtype) -> tuple[jax.Array, tuple]:
  """The jitted `prompt_states` -> ([C, B, V], (keys, values) [L, C, B, K, T, H])."""
  return prompt_states(params, batch, stacked, clean_kv, start=start, config=config, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "max_new_tokens"))
def decode_conditions_fn(params, batch, logits, kv, stacked: Interventions, eos_ids, pad_id, *,
                         config, dtype, max_new_tokens) -> jax.Array:
  """One decoding loop for every condition at once (each over its own cache, under its own
  knockouts): logits [C, B, V], kv [L, C, B, K, T, H] from `prompt_states` -> tokens
  [C, B, max_new_tokens]. The conditions' steps run as one batch, so each step reads the
  weights once for all of them."""
  run = functools.partial(Decoder(config, dtype).apply, {"params": params})
  return _decode(run, batch, logits, kv, stacked, eos_ids, pad_id, max_new_tokens)


def decode_texts(tokenizer, tokens: np.ndarray, eos_ids: np.ndarray) -> list[str]:
  """[B, N] tokens -> B strings, each cut before its first end-of-sequence id."""
  texts = []
  for row in np.asarray(tokens):
    stop = np.flatnonzero(np.isin(row, eos_ids))
    row = row[:stop[0]] if stop.size else row
    texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
  return texts


def default_eos_id(vlm) -> EosIds:
  """The end-of-sequence id(s) `generate` stops at by default: `vlm.eos_id` when it has been set
  (an id, a list of ids, or None for none), else the tokenizer's `eos_token_id`, else None."""
  if "eos_id" in getattr(vlm, "__dict__", {}):
    return vlm.eos_id
  return getattr(vlm.tokenizer, "eos_token_id", None)


def eos_id_from_checkpoint(directory: str) -> EosIds:
  """`eos_token_id` of a checkpoint dir (converted or Hugging Face): generation_config.json
  first, then hf_config.json / config.json (top level, then text_config); None if none says."""
  for name in ("generation_config.json", "hf_config.json", "config.json"):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      cfg = json.load(f)
    for section in (cfg, cfg.get("text_config") or {}):
      if section.get("eos_token_id") is not None:
        return section["eos_token_id"]
  return None
