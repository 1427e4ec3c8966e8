"""Interventions as data: attention knockouts, activation patches and steering vectors.

Each intervention is a pytree of arrays handed to the forward function; nothing is monkey-patched.
Stacking several with `stack_conditions` gives a leading condition axis [C, ...] that the forward
maps over inside one compiled call.

Layers are given as index lists (padded with -1), so an intervention can be built from a batch
alone; indices are checked against the model when it runs.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from narrowgate_jax.processing.batch import Batch
from narrowgate_jax.processing.roles import Selector, positions_of, select

KNOCKOUT_MODES = ("pre_softmax", "post_softmax")
PATCH_SITES = ("resid_pre", "attn_in", "resid_post")
NO_LAYER = -1
NO_POSITION = np.iinfo(np.int32).max  # an index scatters with mode='drop' ignore


@flax.struct.dataclass
class Knockout:
  """Attention edges to cut. Rule r blocks query t -> key s (in every head) in layer l when
  `l in layers[r]` and queries[r, b, t] and keys[r, b, s].

  Attributes:
    layers: [R, M] int32 layer indices per rule, padded with -1.
    queries: [R, B, T] bool.
    keys: [R, B, T] bool.
    mode: "pre_softmax" (score -> dtype minimum, so the row renormalises) or "post_softmax"
      (probability -> 0 after the softmax, no renormalisation).
    generated_queries: [R] bool or None: whether rule r also blocks the queries of tokens produced
      by `generate` (from its keys, which are always prompt positions). None means no rule does.
      `knockout(...)` sets it from the query selector (see there).
  """

  layers: jax.Array
  queries: jax.Array
  keys: jax.Array
  mode: str = flax.struct.field(pytree_node=False, default="pre_softmax")
  generated_queries: Optional[jax.Array] = None

  def blocked(self, layer: jax.Array) -> jax.Array:
    """[B, T, S] bool: the edges this knockout cuts in `layer` (a traced scalar)."""
    active = jnp.any(self.layers == layer, axis=-1).astype(jnp.float32)  # [R]
    hits = jnp.einsum("R,RBT,RBS->BTS", active, self.queries.astype(jnp.float32),
                      self.keys.astype(jnp.float32))
    return hits > 0

  def generated_flags(self) -> jax.Array:
    """[R] bool: `generated_queries`, with None read as False for every rule."""
    if self.generated_queries is None:
      return jnp.zeros(self.layers.shape[:1], bool)
    return jnp.asarray(self.generated_queries, bool)

  def with_generated(self, generated: bool) -> "Knockout":
    """The same knockout with every rule's `generated_queries` set to `generated`."""
    return self.replace(generated_queries=np.full(np.shape(self.layers)[:1], bool(generated)))

  def for_generated_query(self, length: int) -> "Knockout":
    """The rules as one generated token's query sees them, against a KV cache of `length` slots.

    Returns a Knockout with queries [R, B, 1] (= generated_queries) and keys [R, B, length] (the
    prompt's keys, then False for every generated slot: keys never include generated tokens), so
    `blocked(layer)` gives the [B, 1, length] edges of a decoding step.
    """
    rules, b, t = self.keys.shape
    queries = jnp.broadcast_to(self.generated_flags()[:, None, None], (rules, b, 1))
    keys = jnp.pad(jnp.asarray(self.keys, bool), ((0, 0), (0, 0), (0, length - t)))
    return self.replace(queries=queries, keys=keys)

  def for_suffix(self, start: int) -> "Knockout":
    """The rules as queries from position `start` on see them (keys stay every position):
    queries [R, B, T - start], for a pass that recomputes only the suffix over a cached prefix."""
    return self.replace(queries=self.queries[:, :, start:])


@flax.struct.dataclass
class Patch:
  """Writes vectors into one stream of the decoder at some layers and positions.

  Attributes:
    layers: [M] int32 layer indices, padded with -1.
    index: [B, P] int32 positions per example, padded with out-of-range indices (ignored).
    values: [M, B, P, D] the vector written at (layers[m], b, index[b, p]).
    site: "resid_pre" (input of the decoder layer), "attn_in" (input of self-attention, after its
      norm where the block has one), or "resid_post" (output of the decoder layer).
    add: False replaces the activation (patching); True adds to it (steering).
  """

  layers: jax.Array
  index: jax.Array
  values: jax.Array
  site: str = flax.struct.field(pytree_node=False, default="resid_pre")
  add: bool = flax.struct.field(pytree_node=False, default=False)

  def apply(self, x: jax.Array, layer: jax.Array) -> jax.Array:
    """x [B, T, D] at `layer` -> x with this patch written in where it applies."""
    hit = self.layers == layer  # [M]
    values = self.values[jnp.argmax(hit)].astype(x.dtype)  # [B, P, D]
    rows = jnp.arange(x.shape[0])[:, None]
    if self.add:
      edited = x.at[rows, self.index].add(values, mode="drop")
    else:
      edited = x.at[rows, self.index].set(values, mode="drop")
    return jnp.where(jnp.any(hit), edited, x)


@flax.struct.dataclass
class Interventions:
  """Everything one forward pass does differently from the clean run."""

  knockouts: tuple[Knockout, ...] = ()
  patches: tuple[Patch, ...] = ()

  def __add__(self, other) -> "Interventions":
    other = as_interventions(other)
    return Interventions(self.knockouts + other.knockouts, self.patches + other.patches)

  def patches_at(self, site: str) -> tuple[Patch, ...]:
    return tuple(p for p in self.patches if p.site == site)

  def for_generated_query(self, length: int) -> "Interventions":
    """What applies to a generated token's query against a KV cache of `length` slots: every
    knockout as `Knockout.for_generated_query` gives it, and no patch (a patch writes at prompt
    positions, which a generated token never occupies)."""
    return Interventions(tuple(k.for_generated_query(length) for k in self.knockouts), ())

  def for_suffix(self, start: int) -> "Interventions":
    """What applies to the positions from `start` on, recomputed over a cached clean prefix:
    knockouts with their queries cut to the suffix, patches moved to suffix indices (a patch
    inside the prefix would change it: `first_edited_position` keeps start past every one)."""
    patches = tuple(p.replace(index=p.index - start) for p in self.patches)
    return Interventions(tuple(k.for_suffix(start) for k in self.knockouts), patches)

  def first_edited_position(self) -> np.ndarray:
    """[B] int: per example, the first position whose computation any intervention changes (a
    knockout's query that can see one of its keys, a patched position); T when none. Everything
    before it is the clean run."""
    b, t = None, None
    firsts = []
    for k in self.knockouts:
      # A query is changed only once a blocked key is causally visible to it: the first query
      # at or after the rule's first key (so an [EOI] knockout with queries "all" leaves every
      # position before EOI as it was).
      queries, keys = np.asarray(k.queries), np.asarray(k.keys)  # [..., R, B, T]
      b, t = queries.shape[-2:]
      seen = np.cumsum(keys.reshape(-1, b, t), axis=-1) > 0
      hit = (queries.reshape(-1, b, t) & seen).any(axis=0)
      firsts.append(np.where(hit.any(axis=1), hit.argmax(axis=1), t))
    for p in self.patches:
      index = np.asarray(p.index).reshape(-1, *np.shape(p.index)[-2:])  # [.., B, P]
      b = index.shape[1]
      firsts.append(np.where(index >= 0, index, np.iinfo(np.int32).max).min(axis=(0, 2)))
    if not firsts:
      raise ValueError("no intervention: nothing to recompute")
    return np.minimum.reduce(firsts)

  def check_against(self, num_layers: int, hidden_size: int) -> None:
    """Raises a clear error for layer indices or vector widths that do not fit the model."""
    for kind, items in (("knockout", self.knockouts), ("patch", self.patches)):
      for item in items:
        layers = np.asarray(item.layers)
        bad = layers[(layers != NO_LAYER) & ((layers < 0) | (layers >= num_layers))]
        if bad.size:
          raise ValueError(f"{kind} layer {int(bad[0])} out of range for a model with "
                           f"{num_layers} layers (valid: 0..{num_layers - 1})")
    for p in self.patches:
      if p.values.shape[-1] != hidden_size:
        raise ValueError(f"patch at {p.site!r} has vectors of width {p.values.shape[-1]}; "
                         f"the model's hidden size is {hidden_size}")


InterventionLike = Union[None, Knockout, Patch, Interventions, Sequence["InterventionLike"]]


def as_interventions(x: InterventionLike) -> Interventions:
  """None, a Knockout, a Patch, an Interventions or a list of these -> one Interventions."""
  if x is None:
    return Interventions()
  if isinstance(x, Interventions):
    return x
  if isinstance(x, Knockout):
    return Interventions(knockouts=(x,))
  if isinstance(x, Patch):
    return Interventions(patches=(x,))
  if isinstance(x, (list, tuple)):
    out = Interventions()
    for item in x:
      out = out + item
    return out
  raise TypeError(f"not an intervention: {type(x).__name__}")


def _layer_indices(layers: Iterable[int] | int | None, what: str) -> np.ndarray | None:
  if layers is None:
    return None
  idx = np.atleast_1d(np.asarray(list(layers) if not np.isscalar(layers) else layers, np.int32))
  if idx.size == 0:
    raise ValueError(f"{what}: `layers` is empty")
  if (idx < 0).any():
    raise ValueError(f"{what} layer {int(idx[idx < 0][0])} is negative")
  values, counts = np.unique(idx, return_counts=True)
  if (counts > 1).any():
    # One entry per layer: a patch holds one vector per layer, and a knockout's layer list is a set.
    raise ValueError(f"{what} layer {int(values[counts > 1][0])} is listed more than once; give "
                     "each layer once (add steering vectors of the same layer together first)")
  return idx


# Query selectors that include every text position after the image: generated tokens continue
# that text, so a knockout with these queries applies to them too unless told otherwise.
GENERATED_QUERY_SELECTORS = ("all", "text", "text_after_image")


def covers_generated(queries: Selector) -> bool:
  """Whether a query selector extends to generated tokens by default (see `knockout`)."""
  if isinstance(queries, str):
    return queries in GENERATED_QUERY_SELECTORS
  if isinstance(queries, (list, tuple)) and all(isinstance(q, str) for q in queries):
    return any(q in GENERATED_QUERY_SELECTORS for q in queries)
  return False


def knockout(batch: Batch, keys: Selector, queries: Selector = "all",
             layers: Iterable[int] | None = None, mode: str = "pre_softmax",
             num_layers: int | None = None, generated: bool | None = None) -> Knockout:
  """Blocks attention from `queries` to `keys` in `layers` (all layers when None).

  With layers=None the knockout needs the model depth: pass `num_layers`, or use
  `vlm.knockout(...)`, which fills it in.

  generated: whether the queries of tokens produced by `generate` are blocked from `keys` too.
    None: True when `queries` includes every text position after the image ("all", "text",
    "text_after_image", or a list naming one of them), False otherwise ("last", "question", an
    explicit array, ...). Keys are always prompt positions.
  """
  if mode not in KNOCKOUT_MODES:
    raise ValueError(f"knockout mode {mode!r}; expected one of {KNOCKOUT_MODES}")
  idx = _layer_indices(layers, "knockout")
  if idx is None:
    if num_layers is None:
      raise ValueError("knockout(layers=None) means every layer: pass num_layers, "
                       "or call vlm.knockout(...)")
    idx = np.arange(num_layers, dtype=np.int32)
  q = select(queries, batch.roles, what="knockout queries")
  k = select(keys, batch.roles, what="knockout keys")
  if generated is None:
    generated = covers_generated(queries)
  return Knockout(layers=idx[None], queries=q[None], keys=k[None], mode=mode,
                  generated_queries=np.array([bool(generated)]))


def no_knockout(batch: Batch, mode: str = "pre_softmax") -> Knockout:
  """A knockout that blocks nothing: the clean condition in a stack of knockouts
  (`stack_conditions` needs one structure in every condition). `VLM.generate` serves it from
  the clean prompt pass at no extra cost."""
  if mode not in KNOCKOUT_MODES:
    raise ValueError(f"knockout mode {mode!r}; expected one of {KNOCKOUT_MODES}")
  nothing = np.zeros((1,) + tuple(np.shape(batch.roles)), bool)
  return Knockout(layers=np.full((1, 1), NO_LAYER, np.int32), queries=nothing, keys=nothing,
                  mode=mode, generated_queries=np.zeros(1, bool))


def patch(batch: Batch, at: Selector, values, layers: Iterable[int], site: str = "resid_pre",
          add: bool = False) -> Patch:
  """Writes `values` at the positions `at` selects, in `layers`.

  values: [M, B, P, D] (one vector per layer, example and selected position), [M, B, D] (the same
  vector at every selected position of an example), or [D] / [M, D] (the same for every example).
  """
  if site not in PATCH_SITES:
    raise ValueError(f"patch site {site!r}; expected one of {PATCH_SITES}")
  idx = _layer_indices(layers, "patch")
  mask = select(at, batch.roles, what="patch positions")
  index = positions_of(mask, fill=NO_POSITION)
  values = jnp.asarray(values)
  m, (b, p) = idx.size, index.shape
  if values.ndim == 1:
    values = values[None]
  if values.ndim == 2:  # [M, D]
    values = values[:, None, None, :]
  elif values.ndim == 3:  # [M, B, D]
    values = values[:, :, None, :]
  if values.shape[0] == 1 and m > 1:
    values = jnp.repeat(values, m, axis=0)
  values = jnp.broadcast_to(values, (m, b, p, values.shape[-1]))
  return Patch(layers=idx, index=index, values=values, site=site, add=add)


def steer(batch: Batch, at: Selector, vector, layers: Iterable[int], alpha: float = 1.0,
          site: str = "resid_pre") -> Patch:
  """Adds alpha * vector ([D] or [M, D] per layer) at the selected positions in `layers`."""
  return patch(batch, at, alpha * jnp.asarray(vector), layers, site=site, add=True)


# ----------------------------------------------------------------------------- condition axis


@flax.struct.dataclass
class Conditions:
  """Interventions with a leading condition axis [C, ...] on every array leaf."""

  stacked: Interventions

  @property
  def size(self) -> int:
    return jax.tree.leaves(self.stacked)[0].shape[0]


def _pad_axis(x, axis: int, size: int, fill):
  x = np.asarray(x)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return np.pad(x, widths, constant_values=fill)


def _pad_knockouts(kos: Sequence[Knockout]) -> list[Knockout]:
  rules = max(k.layers.shape[0] for k in kos)
  width = max(k.layers.shape[1] for k in kos)
  return [k.replace(layers=_pad_axis(_pad_axis(k.layers, 1, width, NO_LAYER), 0, rules, NO_LAYER),
                    queries=_pad_axis(k.queries, 0, rules, False),
                    keys=_pad_axis(k.keys, 0, rules, False),
                    generated_queries=_pad_axis(k.generated_flags(), 0, rules, False))
          for k in kos]


def _pad_patches(ps: Sequence[Patch]) -> list[Patch]:
  m = max(p.layers.shape[0] for p in ps)
  width = max(p.index.shape[1] for p in ps)
  return [p.replace(layers=_pad_axis(p.layers, 0, m, NO_LAYER),
                    index=_pad_axis(p.index, 1, width, NO_POSITION),
                    values=_pad_axis(_pad_axis(p.values, 2, width, 0), 0, m, 0)) for p in ps]


def stack_conditions(conditions: Sequence[InterventionLike]) -> Conditions:
  """N interventions of the same structure -> one `Conditions` evaluated in a single call.

  Structure means: the same number of knockouts (with the same modes, in the same order) and of
  patches (same sites and add/replace). Rule counts, layer lists and position counts may differ:
  they are padded with entries that select nothing.
  """
  items = [as_interventions(c) for c in conditions]
  if not items:
    raise ValueError("stack_conditions needs at least one condition")
  signature = lambda iv: ([k.mode for k in iv.knockouts], [(p.site, p.add) for p in iv.patches])  # noqa: E731
  for i, iv in enumerate(items):
    if signature(iv) != signature(items[0]):
      raise ValueError(f"condition {i} has structure {signature(iv)}, condition 0 has "
                       f"{signature(items[0])}; every condition needs the same kinds of "
                       "intervention")
  knockouts = [_pad_knockouts([iv.knockouts[j] for iv in items])
               for j in range(len(items[0].knockouts))]
  patches = [_pad_patches([iv.patches[j] for iv in items]) for j in range(len(items[0].patches))]
  padded = [Interventions(tuple(k[i] for k in knockouts), tuple(p[i] for p in patches))
            for i in range(len(items))]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *padded)
  return Conditions(stacked=stacked)
