"""`ng.load` and the loaded model: prepare a batch, run the forward with interventions and captures.

The forward is one jitted function of (params, batch, interventions, capture plan); the config is
static. A `Conditions` value adds a leading condition axis that is mapped over inside the same
compiled call, so a sweep over many interventions costs one dispatch.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from narrowgate_jax import checkpoint
from narrowgate_jax.capture import Capture, CapturePlan, Output
from narrowgate_jax.distributed import (DATA, batch_sharding, param_shardings, replicated,
                                        shard_batch)
from narrowgate_jax.generate import (GenerateOutput, decode_conditions_fn, decode_texts,
                                     default_eos_id, eos_array, eos_id_from_checkpoint,
                                     generate_fn, prefill_fn, prompt_pass, prompt_states_fn,
                                     suffix_pass)
from narrowgate_jax.interventions import (Conditions, InterventionLike, Interventions, Knockout,
                                          as_interventions, knockout)
from narrowgate_jax.models.config import DecoderConfig
from narrowgate_jax.models.decoder import Decoder, param_shapes
from narrowgate_jax.models.image_sides import IMAGE_PARAMS_DIR, IMAGE_READERS, IMAGE_SIDES
from narrowgate_jax.processing.batch import Batch, left_pad
from narrowgate_jax.processing.images import load_image
from narrowgate_jax.processing.prompts import (IMAGE_MARKER, PromptTokens, apply_chat_template,
                                               count_markers, tokenize_prompt)
from narrowgate_jax.processing.roles import Role, Selector


def _run(params, batch: Batch, interventions: Interventions, plan: CapturePlan, *,
         config: DecoderConfig, dtype) -> Output:
  out = Decoder(config, dtype).apply({"params": params}, batch.input_ids, batch.positions,
                                     batch.attention_mask, interventions, plan, batch.features,
                                     batch.feature_mask)
  return Output(resid_index=plan.resid_index, **out)


# Axis of the batch in each Output field (before any leading condition axis).
_OUTPUT_BATCH_AXIS = {"logits": 0, "resid_index": 0, "resid": 1, "attn_in": 1, "attn": 1,
                      "received": 1}


def _constrain_output(out: Output, mesh: Optional[Mesh], leading: int) -> Output:
  """On a mesh, keeps every output split over `data` along its batch axis."""
  if mesh is None:
    return out

  def one(path, x):
    axis = _OUTPUT_BATCH_AXIS[path[0].name] + leading
    if x.shape[axis] % mesh.shape[DATA]:
      return jax.lax.with_sharding_constraint(x, replicated(mesh))
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, axis))

  return jax.tree_util.tree_map_with_path(one, out)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh"))
def forward_fn(params, batch, interventions, plan, *, config, dtype, mesh=None) -> Output:
  """The jitted forward: one example batch, one set of interventions."""
  out = _run(params, batch, interventions, plan, config=config, dtype=dtype)
  return _constrain_output(out, mesh, leading=0)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh"))
def forward_conditions_fn(params, batch, conditions: Conditions, plan, *, config, dtype,
                          mesh=None) -> Output:
  """Every condition of `conditions` on the same batch; outputs gain a leading [C] axis."""
  run = functools.partial(_run, params, batch, plan=plan, config=config, dtype=dtype)
  return _constrain_output(jax.vmap(run)(conditions.stacked), mesh, leading=1)


PREFIX_STEP = 16  # shared prefixes end on a multiple of this, so few suffix lengths compile


@flax.struct.dataclass
class SuffixOutput:
  """What `VLM.forward_from_prefix` returns.

  Attributes:
    start: the first recomputed position (everything before it is the clean run's).
    clean: [B, V] float32 logits of the clean run at the last position.
    logits: [C, B, V] float32 at the last position under each condition (last_only), or
      [C, B, T - start, V] at every recomputed position.
  """

  start: int = flax.struct.field(pytree_node=False)
  clean: jax.Array
  logits: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "dtype", "start", "last_only", "mesh"))
def forward_suffix_fn(params, batch, stacked: Interventions, *, start, config, dtype,
                      last_only=True, mesh=None) -> tuple[jax.Array, jax.Array]:
  """The clean prompt pass once (its keys and values for every position), then each condition
  of `stacked` only over positions [start, T), attending to the cached clean prefix.

  Exact when no condition changes a position before `start` (`first_edited_position`): a
  position's computation sees only earlier positions, so the prefix is the clean run's.
  Returns (clean logits at the last position [B, V], per-condition logits [C, B, V] or
  [C, B, T - start, V]).
  """
  run = functools.partial(Decoder(config, dtype).apply, {"params": params})
  clean, kv = prompt_pass(run, batch, Interventions())
  logits = jax.vmap(lambda iv: suffix_pass(run, batch, kv, iv, start, last_only)[0])(stacked)
  if mesh is not None:
    clean = jax.lax.with_sharding_constraint(clean, batch_sharding(mesh, 2, 0))
    logits = jax.lax.with_sharding_constraint(logits, batch_sharding(mesh, logits.ndim, 1))
  return clean, logits


@functools.partial(jax.jit, static_argnames=("config", "dtype", "part"))
def _head_fn(params, h, *, config, dtype, part: str) -> jax.Array:
  """The final norm or the unembedding on their own (the logit lens reads every layer)."""
  shape = h.shape
  flat = h.reshape(1, -1, shape[-1]).astype(dtype)
  method = (lambda m, x: m.final_norm(x)) if part == "final_norm" else (
      lambda m, x: m.unembed(x))
  out = Decoder(config, dtype).apply({"params": params}, flat, method=method)
  return out.reshape(shape[:-1] + out.shape[-1:])


def _condition(conditions: Conditions, index: int) -> Conditions:
  """Condition `index` alone, still with a leading condition axis of 1."""
  return Conditions(stacked=jax.tree.map(lambda x: np.asarray(x)[index:index + 1],
                                         conditions.stacked))


def _prefix_start(batch: Batch, conditions: Conditions, start: Optional[int] = None) -> int:
  """Where a sweep's shared prefix ends: the first position any condition changes (the last
  position itself, else rounded down to a multiple of PREFIX_STEP so few suffix lengths
  compile), or `start` after checking it is not past that position."""
  first = int(np.min(conditions.stacked.first_edited_position()))
  if start is None:  # the last position alone (X->Last) is already one shape per bucket
    last = batch.shape[1] - 1
    return first if first == last else (min(first, last) // PREFIX_STEP) * PREFIX_STEP
  if not 0 <= start <= first:
    raise ValueError(f"start={start}: a condition edits position {first}, so the shared prefix "
                     f"must end at or before it")
  return int(start)


def _generation_start(batch: Batch, condition: Conditions) -> int:
  """Where a generation under `condition` starts to differ from the clean one: `_prefix_start`,
  or T when the condition edits no prompt position (the clean prompt pass serves it)."""
  if int(np.min(condition.stacked.first_edited_position())) >= batch.shape[1]:
    return batch.shape[1]
  return _prefix_start(batch, condition)


class VLM:
  """A loaded model. Build it with `ng.load`."""

  def __init__(self, config: DecoderConfig, params, *, tokenizer=None, mesh: Optional[Mesh] = None,
               dtype=jnp.float32, name: str = "", images=None,
               chat_template: Optional[str] = None):
    """images: the family's image side (`models.native`, `models.nonnative`), None for text-only
    checkpoints; chat_template: the processor's (jinja), when the checkpoint has one."""
    self.chat_template = chat_template
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.dtype = jnp.dtype(dtype)
    self.name = name
    self.images = images

  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  def __repr__(self):
    c = self.config
    return (f"VLM({self.name or c.family}: {c.num_layers} layers, d={c.hidden_size}, "
            f"{c.num_heads}/{c.num_kv_heads} heads, dtype={self.dtype.name})")

  # ------------------------------------------------------------------------------- batches

  def prepare(self, images: Optional[Sequence] = None, prompts: Optional[Sequence[str]] = None,
              token_ids: Optional[Sequence[Sequence[int]]] = None,
              questions: Optional[Sequence[Optional[str]]] = None, chat: bool = False) -> Batch:
    """Prompts (with their images) or token ids -> a left-padded `Batch` with roles.

    images: one entry per prompt: an image (PIL image, uint8 array [H, W, 3] or a file path), a
      list of images for a prompt with several "<image>" markers, or None. Each "<image>" in a
      prompt becomes the family's image span (Chameleon: start, codes, <eoss>; Emu3: start, size,
      rows of codes and row ends, end-of-frame, end; LLaVA-style: placeholders whose input
      embeddings are the projected vision features, in `batch.features`), tokenized as the
      family's processor does.
    questions: optionally, per prompt, the user's part of it: its tokens get Role.TEXT (the
      "question" selector) and the rest of the text Role.TEMPLATE.
    chat: Chameleon's chat mode (the prompt ends with its separator token, as its processor does
      by default); for other families, each prompt becomes one user turn of the checkpoint's chat
      template followed by the assistant's generation prompt. The default is plain text
      (the Narrow Gate study's text-completion mode).
    """
    if (prompts is None) == (token_ids is None):
      raise ValueError("prepare needs exactly one of prompts= or token_ids=")
    if token_ids is not None:
      if images:
        raise ValueError("images go with prompts=, not token_ids=")
      bos = getattr(self.tokenizer, "bos_token_id", None)
      seqs = [PromptTokens(np.asarray(ids), np.asarray(
          [Role.BOS if (j == 0 and t == bos) else Role.TEXT for j, t in enumerate(ids)]))
              for ids in token_ids]
    else:
      seqs = self._tokenize_prompts(prompts, images, questions, chat)
    for i, seq in enumerate(seqs):
      if not len(seq.ids):
        raise ValueError(f"example {i} has no tokens")
      if self.config.max_positions and len(seq.ids) > self.config.max_positions:
        raise ValueError(f"prompt {i} is {len(seq.ids)} tokens long; the model's context is "
                         f"{self.config.max_positions} positions")
    pad = getattr(self.tokenizer, "pad_token_id", None) or 0
    return left_pad([s.ids for s in seqs], [s.roles for s in seqs], pad_id=pad,
                    **_dense_extras(seqs, self.config.hidden_size))

  def _chat(self, prompts: Sequence[str], chat: bool) -> tuple[list[str], str]:
    """(prompts, suffix) in the chat format asked for: Chameleon's separator suffix, or the
    checkpoint's chat template around each prompt (non-native families)."""
    if not chat:
      return list(prompts), ""
    suffix = getattr(self.images, "chat_suffix", None)
    if suffix:
      return list(prompts), suffix
    template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
    if not template:
      raise ValueError(f"chat=True: the {self.config.family} checkpoint has no chat template "
                       "(chat_template.json / .jinja); format the prompts yourself")
    return [apply_chat_template(self.tokenizer, template, p, self.images.image_text)
            for p in prompts], ""

  def _tokenize_prompts(self, prompts, images, questions, chat: bool) -> list[PromptTokens]:
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer files; pass token_ids= instead")
    prompts, suffix = self._chat(prompts, chat)
    per_prompt = _images_per_prompt(images, len(prompts))
    if any(per_prompt) and self.images is None:
      raise ValueError(f"the {self.config.family} checkpoint has no image tokenizer; "
                       "it takes text only")
    flat = [load_image(image, index=n) for n, image in enumerate(
        image for group in per_prompt for image in group)]
    # How many images each prompt has: OneVision reads an image differently when it shares its
    # prompt with others.
    counts = [len(group) for group in per_prompt if group]
    spans = self.images.spans(flat, counts=counts) if flat else []
    questions = questions if questions is not None else [None] * len(prompts)
    if len(questions) != len(prompts):
      raise ValueError(f"{len(questions)} questions for {len(prompts)} prompts")
    out, used = [], 0
    for i, (prompt, group, question) in enumerate(zip(prompts, per_prompt, questions)):
      if count_markers(prompt) and self.images is None:
        raise ValueError(f"prompt {i} contains {IMAGE_MARKER} but the {self.config.family} "
                         "checkpoint has no image tokenizer")
      prefix = self.images.prefix if self.images is not None else ""
      wrappers = getattr(self.images, "wrappers", (None, None))
      out.append(tokenize_prompt(self.tokenizer, prompt, spans[used:used + len(group)], index=i,
                                 prefix=prefix, suffix=suffix, question=question,
                                 wrappers=wrappers))
      used += len(group)
    return out

  def region(self, batch: Batch, images: Sequence, boxes: Sequence) -> np.ndarray:
    """The image tokens of `batch` whose patch shows part of a box: [B, T] bool, usable as a
    selector (the cross-modal study's "related image patches"; newlines and row breaks never).

    images: as given to `prepare` for this batch (one entry per prompt).
    boxes: boxes[b][i] lists the (x0, y0, x1, y1) boxes of prompt b's image i, in that image's
      pixels (corners inclusive, as PIL draws them), e.g. [[[(10, 20, 40, 60)]]] for one prompt
      with one image and one box.
    """
    if batch.image_coords is None or not hasattr(self.images, "region_patches"):
      raise ValueError(f"{self.config.family}: this batch has no image patch coordinates")
    per_prompt = _images_per_prompt(images, batch.shape[0])
    if len(boxes) != len(per_prompt):
      raise ValueError(f"{len(boxes)} box entries for {len(per_prompt)} prompts")
    coords = np.asarray(batch.image_coords)
    out = np.zeros(batch.shape, bool)
    for b, (group, group_boxes) in enumerate(zip(per_prompt, boxes)):
      if len(group) != len(group_boxes):
        raise ValueError(f"prompt {b}: {len(group)} image(s) but {len(group_boxes)} box lists")
      for i, (image, image_boxes) in enumerate(zip(group, group_boxes)):
        related = self.images.region_patches(load_image(image, index=i), image_boxes)
        tokens = coords[b, :, 0] == i
        image_coords = coords[b, tokens, 1:]
        out[b, tokens] = related[tuple(image_coords.T)]
    return out

  # ------------------------------------------------------------------------------- forward

  def knockout(self, batch: Batch, keys: Selector, queries: Selector = "all",
               layers=None, mode: str = "pre_softmax",
               generated: Optional[bool] = None) -> Knockout:
    """`ng.knockout` with layers=None meaning every layer of this model."""
    return knockout(batch, keys, queries, layers, mode, num_layers=self.num_layers,
                    generated=generated)

  def forward(self, batch: Batch, interventions: InterventionLike | Conditions = None,
              capture: Optional[Capture] = None) -> Output:
    """Logits and the captures asked for; with `Conditions`, every output has a leading [C]."""
    plan = (capture or Capture()).plan(batch, self.num_layers)
    batch = self._place(batch)
    kwargs = dict(config=self.config, dtype=self.dtype, mesh=self.mesh)
    interventions = self._checked(interventions)
    run = forward_conditions_fn if isinstance(interventions, Conditions) else forward_fn
    return run(self.params, batch, self._replicate(interventions), self._replicate(plan),
               **kwargs)

  def forward_from_prefix(self, batch: Batch, conditions: Conditions,
                          start: Optional[int] = None, last_only: bool = True) -> SuffixOutput:
    """Every condition's logits, sharing the clean prefix: the prompt runs once, and each
    condition recomputes only the positions from the first one it changes (for knockouts to the
    last position: that one position). Equals `forward` with the same conditions at the
    positions it returns (tested), at a fraction of the cost.

    start: the first recomputed position (default: the earliest position any condition edits:
      the last position itself, or else rounded down to a multiple of PREFIX_STEP so few suffix
      lengths compile); it must not be past that position.
    """
    conditions = self._checked(conditions)
    if not isinstance(conditions, Conditions):
      raise ValueError("forward_from_prefix takes Conditions (ng.stack_conditions([...]))")
    start = _prefix_start(batch, conditions, start)
    clean, logits = forward_suffix_fn(self.params, self._place(batch),
                                      self._replicate(conditions.stacked), start=int(start),
                                      config=self.config, dtype=self.dtype,
                                      last_only=last_only, mesh=self.mesh)
    return SuffixOutput(start=int(start), clean=clean, logits=logits)

  def final_norm(self, h: jax.Array) -> jax.Array:
    """The decoder's final norm: h [..., D] (a residual, as `Output.resid` holds) -> [..., D]."""
    return _head_fn(self.params, jnp.asarray(h), config=self.config, dtype=self.dtype,
                    part="final_norm")

  def unembed(self, h: jax.Array) -> jax.Array:
    """The output projection: h [..., D] (after the final norm) -> logits [..., V] float32, with
    the family's suppressed logits (Chameleon's image tokens) at the float32 minimum."""
    return _head_fn(self.params, jnp.asarray(h), config=self.config, dtype=self.dtype,
                    part="unembed")

  def _generate_conditions(self, batch: Batch, conditions: Conditions, share_prefix: bool,
                           args, kwargs) -> jax.Array:
    """Every condition's prompt pass, then one decoding loop for all of them -> tokens
    [C, B, max_new_tokens].

    With `share_prefix`, the clean prompt runs once and conditions are grouped by where their
    shared prefix ends (`_prefix_start`: an [EOI] knockout shares everything before EOI, an
    all-image one almost nothing; a condition that edits nothing is the clean pass itself); each
    group recomputes only its suffix, in one call per group.
    """
    t = batch.shape[1]
    starts = np.zeros(conditions.size, int)
    if share_prefix:
      starts = np.asarray([_generation_start(batch, _condition(conditions, c))
                           for c in range(conditions.size)])
    static = dict(config=self.config, dtype=self.dtype)
    clean = None
    if (starts > 0).any():
      clean = prefill_fn(self.params, batch, Interventions(), **static)
    order = np.argsort(starts, kind="stable")  # conditions grouped by start, in one array
    logits, kv = [], []
    for start in np.unique(starts):
      members = np.flatnonzero(starts == start)
      if start == t:  # nothing edited: the clean pass
        logits.append(jnp.broadcast_to(clean[0], (members.size,) + clean[0].shape))
        kv.append(jax.tree.map(lambda x: jnp.repeat(x[:, None], members.size, axis=1), clean[1]))
        continue
      stacked = self._replicate(jax.tree.map(lambda x: np.asarray(x)[members],
                                             conditions.stacked))
      out = prompt_states_fn(self.params, batch, stacked, None if start == 0 else clean[1],
                             start=int(start), **static)
      logits.append(out[0])
      kv.append(out[1])
    def joined(parts, axis):  # the groups' conditions side by side (one group: no copy)
      return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis)

    stacked = self._replicate(jax.tree.map(lambda x: np.asarray(x)[order], conditions.stacked))
    tokens = decode_conditions_fn(self.params, batch, joined(logits, 0),
                                  jax.tree.map(lambda *xs: joined(xs, 1), *kv), stacked, *args,
                                  **kwargs)
    return jnp.take(tokens, np.argsort(order), axis=0)  # back to condition order

  def _checked(self, interventions: InterventionLike | Conditions) -> Interventions | Conditions:
    """`Conditions` as they are, anything else as one `Interventions`; either checked against
    this model (layer indices in range, vector widths)."""
    if not isinstance(interventions, Conditions):
      interventions = as_interventions(interventions)
    stacked = getattr(interventions, "stacked", interventions)
    stacked.check_against(self.num_layers, self.config.hidden_size)
    return interventions

  def _place(self, batch: Batch) -> Batch:
    batch = jax.tree.map(jnp.asarray, batch)
    return batch if self.mesh is None else shard_batch(batch, self.mesh)

  def _replicate(self, tree):
    if self.mesh is None:
      return tree
    return jax.device_put(tree, replicated(self.mesh))

  # ------------------------------------------------------------------------------- generation

  def generate(self, batch: Batch, max_new_tokens: int = 20,
               interventions: InterventionLike | Conditions = None, *, eos_id="auto",
               pad_id: Optional[int] = None, share_prefix: bool = True) -> GenerateOutput:
    """Greedy decoding with a KV cache; knockouts apply to the generated tokens too.

    One compiled program (prefill, then a while loop of cached decoding steps); see
    `narrowgate_jax.generate` for the cache layout and what each intervention does to new tokens.
    eos_id: "auto" (`generate.default_eos_id`: `vlm.eos_id` if set, else the tokenizer's), an
      id, a list of ids, or None to always produce max_new_tokens tokens.
    pad_id: written after an example's end-of-sequence token (default: the tokenizer's pad id,
      else 0, as `prepare` pads).
    share_prefix: with `Conditions`, run the clean prompt once and recompute per condition only
      the positions from the first one it changes (`generate.prompt_states`; equal to full
      recomputation, tested); conditions that change the prompt at different places form
      separate groups, and one that changes nothing (e.g. an empty knockout standing for "none")
      costs no prompt pass of its own. Every condition then decodes in one shared loop. False
      recomputes every condition's whole prompt.
    Returns GenerateOutput(tokens [B, max_new_tokens] int32, texts when there is a tokenizer);
    with `Conditions`, tokens [C, B, max_new_tokens] and texts [C][B].
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}; it must be at least 1")
    limit = self.config.max_positions
    longest = int(np.max(np.asarray(batch.positions)[:, -1])) + 1  # left padding: last = longest
    if limit and longest + max_new_tokens > limit:
      raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                       f"the model's {limit} positions")
    eos = eos_array(default_eos_id(self) if isinstance(eos_id, str) and eos_id == "auto"
                    else eos_id)
    if pad_id is None:
      pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
    kwargs = dict(config=self.config, dtype=self.dtype, max_new_tokens=int(max_new_tokens))
    batch = self._place(batch)
    args = (self._replicate(jnp.asarray(eos)), self._replicate(jnp.int32(pad_id)))
    interventions = self._checked(interventions)
    if isinstance(interventions, Conditions):
      tokens = self._generate_conditions(batch, interventions, share_prefix, args, kwargs)
    else:
      tokens = generate_fn(self.params, batch, self._replicate(interventions), *args, **kwargs)
    tokens = np.asarray(tokens)
    texts = None
    if self.tokenizer is not None:
      rows = tokens.reshape(-1, tokens.shape[-1])
      texts = decode_texts(self.tokenizer, rows, eos)
      if tokens.ndim == 3:
        texts = [texts[c * tokens.shape[1]:(c + 1) * tokens.shape[1]]
                 for c in range(tokens.shape[0])]
    return GenerateOutput(tokens=tokens, texts=texts)


def _dense_extras(seqs: Sequence[PromptTokens], width: int) -> dict:
  """`left_pad`'s per-example features / masks / coordinates, when any prompt has them."""
  out = {}
  if any(s.features is not None for s in seqs):
    out["features"] = [s.features if s.features is not None
                       else np.zeros((len(s.ids), width), np.float32) for s in seqs]
    out["feature_masks"] = [s.feature_mask if s.feature_mask is not None
                            else np.zeros(len(s.ids), bool) for s in seqs]
  if any(s.coords is not None for s in seqs):
    out["coords"] = [s.coords if s.coords is not None else np.full((len(s.ids), 4), -1, np.int32)
                     for s in seqs]
  return out


def _images_per_prompt(images, num_prompts: int) -> list[list]:
  """`prepare`'s images argument -> one list of images per prompt."""
  if images is None:
    return [[] for _ in range(num_prompts)]
  images = list(images)
  if len(images) != num_prompts:
    raise ValueError(f"{len(images)} image entries for {num_prompts} prompts: give one entry per "
                     "prompt (an image, a list of images, or None)")
  return [[] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
          for entry in images]


def _load_tokenizer(directory: str):
  if not any(os.path.exists(os.path.join(directory, f))
             for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    return None
  import transformers

  return transformers.AutoTokenizer.from_pretrained(directory)


def _chat_template(directory: str) -> Optional[str]:
  """The processor's chat template (chat_template.jinja, or chat_template.json's field)."""
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  path = os.path.join(directory, "chat_template.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f).get("chat_template")
  return None


def _hf_config_of_converted(directory: str):
  import transformers

  from narrowgate_jax.models import vila_u  # noqa: F401  (registers its config with AutoConfig)

  with open(os.path.join(directory, "hf_config.json")) as f:
    fields = json.load(f)
  return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def load(path: str, *, mesh: Optional[Mesh] = None, dtype: Optional[str] = None,
         allow_pickle: bool = False) -> VLM:
  """A converted checkpoint dir, or a Hugging Face checkpoint dir converted in memory.

  mesh: place parameters on this (data, model) mesh with `distributed.LOGICAL_RULES`; the first
    device when None. dtype: compute dtype ("float32", "bfloat16"); the stored dtype when None.
    A native VLM's VQ image tokenizer stays in float32 on the first device (it runs once per
    image, in `prepare`).
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory")
  image_params, image_kind, hf_config = None, None, None
  processor = checkpoint.read_processor_config(path)
  if checkpoint.is_converted(path):
    config, meta = checkpoint.read_meta(path)
    shardings = param_shardings(param_shapes(config), mesh) if mesh is not None else None
    params = checkpoint.restore_params(path, shardings)
    stored = meta.get("dtype", "float32")
    image_kind = meta.get("image_tokenizer")
    if image_kind:
      image_params = checkpoint.restore_params(path, subdir=IMAGE_PARAMS_DIR)
      hf_config = _hf_config_of_converted(path)
  elif os.path.exists(os.path.join(path, "config.json")):
    from checkpoints_convert.convert import load_in_memory, processor_config

    stored = dtype or "float32"
    config, params, image_params, hf_config = load_in_memory(path, dtype=stored,
                                                             allow_pickle=allow_pickle)
    processor = processor_config(path, hf_config)
    image_kind = IMAGE_SIDES[hf_config.model_type](hf_config).kind if image_params else None
    if mesh is not None:
      params = jax.tree.map(jax.device_put, params, param_shardings(param_shapes(config), mesh))
    else:
      params = jax.tree.map(jnp.asarray, params)
  else:
    raise FileNotFoundError(f"{path} is neither a converted checkpoint ({checkpoint.META_FILE}) "
                            "nor a Hugging Face checkpoint dir (config.json)")
  dtype = jnp.dtype(dtype or stored)
  params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)
  tokenizer = _load_tokenizer(path)
  images = None
  if image_kind and tokenizer is not None:  # without one, prompts cannot be built: ids only
    images = IMAGE_READERS[image_kind](hf_config, jax.tree.map(jnp.asarray, image_params),
                                       tokenizer, processor, dtype=dtype)
  vlm = VLM(config, params, tokenizer=tokenizer, mesh=mesh, dtype=dtype,
            name=os.path.basename(os.path.normpath(path)), images=images,
            chat_template=_chat_template(path))
  eos = eos_id_from_checkpoint(path)
  if eos is not None:
    vlm.eos_id = eos
  return vlm


def random_params(config: DecoderConfig, seed: int = 0) -> dict:
  """Freshly initialised parameters (for demos and tests that need no checkpoint)."""
  model = Decoder(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  return model.init(jax.random.key(seed), ids, ids, jnp.ones((1, 1), bool), Interventions(),
                    CapturePlan())["params"]
