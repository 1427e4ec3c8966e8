"""LoRA adapters on the decoder's stacked kernels, as pure functions of parameter trees.

A target kernel W [L, in..., out...] (the layer axis first; `LORA_TARGETS` says how many axes
after it are inputs) gets a pair a [L, in..., R], b [L, R, out...], and the merged kernel is

  W' = W + (alpha / R) * a b        (contracting the rank axis R, per layer)

b starts at zero, so the merged model is exactly the base model at initialisation, and a starts
with variance 1 / (product of the input axes), so a's output has unit scale per input unit.
The adapters are a separate tree {path: {"a": ..., "b": ...}}; to train only them, train the
tree {"base": params, "lora": adapters} with the base frozen:

  tree = lora_tree(params, init_lora(params, rank=8))
  result = loop.train(lora_loss_fn(loss_fn, alpha=16.0), tree, batch_at, config,
                      trainable=trainable_lora_mask(tree))
  merged = merge_lora(result.params["base"], result.params["lora"], alpha=16.0)

The base then stays an input of the compiled step (no gradient, no optimizer state, never
copied), and `merge_lora` runs inside the step, so only the targeted kernels are materialised
merged.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# Decoder kernel path -> number of input axes after the layer axis (shapes: legend in layers.py).
LORA_TARGETS = {
    "layers/attn/q/kernel": 1,  # [L, D | N, H]
    "layers/attn/k/kernel": 1,  # [L, D | K, H]
    "layers/attn/v/kernel": 1,  # [L, D | K, H]
    "layers/attn/o/kernel": 2,  # [L, N, H | D]
    "layers/mlp/gate/kernel": 1,  # [L, D | F]
    "layers/mlp/up/kernel": 1,  # [L, D | F]
    "layers/mlp/down/kernel": 1,  # [L, F | D]
}
# The original LoRA recipe: queries and values only.
DEFAULT_TARGETS = ("layers/attn/q/kernel", "layers/attn/v/kernel")
BASE, LORA = "base", "lora"

# Einsum legend for the adapter product: L layer, R rank, A B C input axes, X Y Z output axes.
_IN_AXES, _OUT_AXES = "ABC", "XYZ"


def get_path(params: Mapping, path: str) -> Any:
  """params["layers"]["attn"]["q"]["kernel"] for path "layers/attn/q/kernel"."""
  node = params
  for depth, key in enumerate(path.split("/")):
    if not isinstance(node, Mapping) or key not in node:
      where = "/".join(path.split("/")[:depth]) or "the top level"
      known = sorted(node) if isinstance(node, Mapping) else []
      raise KeyError(f"params has no {path!r}: no {key!r} under {where} (keys there: {known})")
    node = node[key]
  return node


def _replace_path(params: Mapping, keys: Sequence[str], value: Any) -> dict:
  """A copy of the nested dict with the leaf at `keys` replaced (only the path is copied)."""
  out = dict(params)
  out[keys[0]] = value if len(keys) == 1 else _replace_path(params[keys[0]], keys[1:], value)
  return out


def _resolve_targets(targets: Union[Sequence[str], Mapping[str, int]]) -> dict[str, int]:
  """Target paths (looked up in LORA_TARGETS) or a {path: input axes} mapping -> the mapping."""
  if isinstance(targets, str):
    targets = (targets,)
  if not isinstance(targets, Mapping):
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
      raise ValueError(f"unknown LoRA targets {unknown}; known: {sorted(LORA_TARGETS)} (or pass "
                       "a {path: number of input axes} mapping)")
    targets = {t: LORA_TARGETS[t] for t in targets}
  if not targets:
    raise ValueError("no LoRA targets given")
  for path, n_in in targets.items():
    if not isinstance(n_in, int) or not 1 <= n_in <= len(_IN_AXES):
      raise ValueError(f"LoRA target {path!r}: {n_in!r} input axes; expected 1 to "
                       f"{len(_IN_AXES)}")
  return dict(targets)


def _path_seed(path: str) -> int:
  # Stable per path, so a kernel's initial `a` does not depend on which other kernels are targets.
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def init_lora(params: Mapping, rank: int,
              targets: Union[Sequence[str], Mapping[str, int]] = DEFAULT_TARGETS,
              seed: int = 0) -> dict:
  """Adapters for the target kernels of `params` (arrays or ShapeDtypeStructs).

  Returns {path: {"a": [L, in..., R] float32 ~ N(0, 1 / prod(in)), "b": [L, R, out...] zeros}}.
  targets: paths of LORA_TARGETS, or {path: number of input axes after the layer axis} for
  other stacked kernels.
  """
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"LoRA rank must be a positive int, not {rank!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"LoRA seed must be a non-negative int, not {seed!r}")
  layouts = []  # (path, layers, input axes, output axes)
  for path, n_in in _resolve_targets(targets).items():
    shape = tuple(np.shape(get_path(params, path)))
    n_out = len(shape) - 1 - n_in
    if n_out < 1 or n_out > len(_OUT_AXES):
      raise ValueError(f"LoRA target {path!r} has shape {shape}; with a layer axis and {n_in} "
                       f"input axes it needs 1 to {len(_OUT_AXES)} output axes")
    layouts.append((path, shape[0], shape[1:1 + n_in], shape[1 + n_in:]))
  adapters = {}
  for path, layers, ins, outs in layouts:
    # numpy, not jax.random: no compilation, and the same draw on every backend.
    rng = np.random.default_rng([seed, _path_seed(path)])
    a = rng.standard_normal((layers, *ins, rank), np.float32) / np.sqrt(np.prod(ins))
    adapters[path] = {"a": jnp.asarray(a, jnp.float32),
                      "b": jnp.zeros((layers, rank, *outs), jnp.float32)}
  return adapters


def _product_equation(n_in: int, n_out: int) -> str:
  """'LAR,LRXY->LAXY' for one input and two output axes (legend above)."""
  ins, outs = _IN_AXES[:n_in], _OUT_AXES[:n_out]
  return f"L{ins}R,LR{outs}->L{ins}{outs}"


def lora_delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [L, in..., R], b [L, R, out...] -> a b [L, in..., out...] float32 (without alpha / R)."""
  n_in, n_out = a.ndim - 2, b.ndim - 2
  if not (1 <= n_in <= len(_IN_AXES) and 1 <= n_out <= len(_OUT_AXES)):
    raise ValueError(f"LoRA a {a.shape} and b {b.shape} must be [L, in..., R] and "
                     f"[L, R, out...] with 1 to 3 input and output axes")
  return jnp.einsum(_product_equation(n_in, n_out), a.astype(jnp.float32),
                    b.astype(jnp.float32))


def _check_pair(path: str, kernel_shape: tuple, pair: Any) -> None:
  if not isinstance(pair, Mapping) or set(pair) != {"a", "b"}:
    raise ValueError(f"LoRA adapter {path!r} must be a dict with keys 'a' and 'b'")
  a, b = np.shape(pair["a"]), np.shape(pair["b"])
  n_in = len(a) - 2
  expected_a = kernel_shape[:1 + n_in] + a[-1:]
  expected_b = kernel_shape[:1] + a[-1:] + kernel_shape[1 + n_in:]
  if n_in < 1 or a != expected_a or b != expected_b:
    raise ValueError(f"LoRA adapter {path!r}: a {a} and b {b} do not fit the kernel "
                     f"{kernel_shape} (expected a [L, in..., R] and b [L, R, out...])")


def merge_lora(params: Mapping, lora: Mapping, alpha: float) -> dict:
  """params with every adapted kernel W replaced by W + (alpha / R) * a b (in W's dtype; the
  sum is taken in float32). Untouched subtrees are shared with `params`, not copied."""
  if not isinstance(lora, Mapping):
    raise TypeError(f"lora must be a dict {{path: {{'a', 'b'}}}}, not {type(lora).__name__}")
  merged = params
  for path, pair in lora.items():
    kernel = get_path(params, path)
    _check_pair(path, tuple(np.shape(kernel)), pair)
    rank = np.shape(pair["a"])[-1]
    delta = (alpha / rank) * lora_delta(pair["a"], pair["b"])
    new = (jnp.asarray(kernel).astype(jnp.float32) + delta).astype(jnp.result_type(kernel))
    merged = _replace_path(merged, path.split("/"), new)
  return merged


def lora_tree(params: Mapping, lora: Mapping) -> dict:
  """The tree to train: {"base": params, "lora": lora}."""
  return {BASE: params, LORA: lora}


def trainable_lora_mask(tree: Mapping) -> dict:
  """For a {"base", "lora"} tree: bools of its structure, the base frozen, the adapters not."""
  if not isinstance(tree, Mapping) or set(tree) != {BASE, LORA}:
    raise ValueError(f"expected a tree {{{BASE!r}: params, {LORA!r}: adapters}} (`lora_tree`), "
                     f"got keys {sorted(tree) if isinstance(tree, Mapping) else type(tree)}")
  return {BASE: jax.tree.map(lambda _: False, tree[BASE]),
          LORA: jax.tree.map(lambda _: True, tree[LORA])}


def lora_loss_fn(loss_fn: Callable, alpha: float) -> Callable:
  """loss_fn(params, batch, rng) -> the same loss of a {"base", "lora"} tree, on the merged
  params (for `loop.train`)."""
  def loss(tree, batch, rng):
    return loss_fn(merge_lora(tree[BASE], tree[LORA], alpha), batch, rng)

  return loss
