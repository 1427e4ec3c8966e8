"""A training loop that a SIGKILL cannot make non-deterministic.

  result = train(loss_fn, params, batch_at, TrainConfig(steps=1000), workdir)

Step i (0-based) sees exactly `batch_at(i)` and the key `fold_in(key(seed), i)`, and the optimizer
state holds everything else, so the parameters after step i are a function of (params, config,
loss_fn, batch_at) alone. A run restarted from the checkpoint of step s therefore continues with
the very arrays an uninterrupted run would have had, and ends bit-identical to it.

The workdir (optional) holds:
  <workdir>/train_config.json   {"config": TrainConfig fields + "name", "provenance": ...}; a
                                restart with a different config is refused, naming the fields
  <workdir>/checkpoints/<s>/    Orbax: {"params": the trainable leaves (frozen ones are None:
                                they come from the caller again), "opt_state"} after s steps,
                                every `checkpoint_every` steps and at the end; Orbax writes each
                                to a temporary directory and renames it when complete
  <workdir>/train_log.jsonl     `RecordStore` keyed by ("step",): {"step", "loss", <metrics>,
                                "grad_norm", "lr"} every `log_every` steps and at the last step;
                                steps re-run after a restart are not logged twice

Frozen leaves (`trainable`) get no gradient, no Adam moments and no donation: they pass through
the step untouched, so a frozen 7B base costs neither optimizer memory nor a copy. Trainable
leaves are copied once on entry (then donated step to step), so the caller's arrays stay valid.

Mesh: batch leaves are split over `data` along their leading axis, parameters placed by
`param_sharding` (default: replicated), and each Adam moment sharded like the parameter it
mirrors. Data parallelism changes only the order of the batch reduction, so the result matches a
single device to float rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from narrowgate_jax.distributed import replicated, shard_batch
from narrowgate_jax.runs.records import RecordStore, to_jsonable
from narrowgate_jax.runs.workdir import (MAX_LISTED_DIFFERENCES, config_differences, provenance,
                                         write_json)

CONFIG_FILE = "train_config.json"
CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
RESERVED_METRICS = ("step", "loss", "grad_norm", "lr")
NO_DECAY_NAMES = ("scale", "bias")  # norm scales and biases, also when stacked to [L, ...]
_TRAIN, _FROZEN = "train", "frozen"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to optimise (AdamW with global-norm clipping, warmup then cosine decay).

  Attributes:
    steps: optimizer steps in the whole run (a resumed run counts the ones already done).
    learning_rate: peak learning rate.
    warmup_steps: linear warmup steps; step s < warmup_steps uses (s + 1) / warmup_steps of it.
    end_lr_fraction: the cosine decay reaches end_lr_fraction * learning_rate at the last step.
    weight_decay: decoupled (AdamW); never applied to norm scales, biases or other 1-D leaves.
    b1, b2: Adam's moment decay rates.
    grad_clip: clip the trainable gradients to this global norm; 0 disables.
    seed: the step keys are fold_in(key(seed), step).
    checkpoint_every: checkpoint every this many steps (and at the end), when given a workdir.
    keep_checkpoints: how many of the latest checkpoints to keep.
    log_every: log (history, train_log.jsonl, progress bar) every this many steps and the last.
  """

  steps: int
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0
  seed: int = 0
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  log_every: int = 10

  def __post_init__(self):
    for name in ("steps", "warmup_steps", "seed", "checkpoint_every", "keep_checkpoints",
                 "log_every"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"TrainConfig.{name} must be an int, not {value!r}")
    for name in ("learning_rate", "end_lr_fraction", "weight_decay", "b1", "b2", "grad_clip"):
      value = getattr(self, name)
      if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
        raise TypeError(f"TrainConfig.{name} must be a number, not {value!r}")
    checks = (
        ("steps", self.steps >= 1, "at least 1"),
        ("learning_rate", self.learning_rate > 0, "positive"),
        ("warmup_steps", 0 <= self.warmup_steps <= self.steps, f"in [0, steps={self.steps}]"),
        ("end_lr_fraction", 0 <= self.end_lr_fraction <= 1, "in [0, 1]"),
        ("weight_decay", self.weight_decay >= 0, "non-negative"),
        ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
        ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
        ("grad_clip", self.grad_clip >= 0, "non-negative (0 disables clipping)"),
        ("checkpoint_every", self.checkpoint_every >= 1, "at least 1"),
        ("keep_checkpoints", self.keep_checkpoints >= 1, "at least 1"),
        ("log_every", self.log_every >= 1, "at least 1"),
    )
    for name, ok, wanted in checks:
      if not ok:
        raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; it must be {wanted}")


@dataclasses.dataclass
class TrainResult:
  """params: the trained tree (frozen leaves are the arrays given); history: one dict per logged
  step, {"step", "loss", <metrics>..., "grad_norm", "lr"} (with a workdir, every logged step of
  the run, those before a restart included); resumed_from: the checkpoint's step, 0 if fresh."""

  params: Any
  history: list[dict]
  resumed_from: int


def learning_rate_schedule(config: TrainConfig) -> Callable[[Any], jax.Array]:
  """step -> learning rate (float32, traceable): linear warmup, then cosine decay.

  Step s < W (W = warmup_steps) gets lr * (s + 1) / W, so no step is spent at rate 0; steps
  W .. steps - 1 follow a half cosine from lr at W to end_lr_fraction * lr at the last step.
  """
  peak = float(config.learning_rate)
  end = peak * float(config.end_lr_fraction)
  warmup = int(config.warmup_steps)
  decay_steps = max(config.steps - warmup - 1, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def _leaf_name(path) -> str:
  """The last key of a tree path ('kernel', 'scale', ...), '' for a sequence index."""
  return str(getattr(path[-1], "key", "")) if path else ""


def path_name(path) -> str:
  """A tree path as 'layers/attn/q/kernel' (sequence indices as numbers)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def decay_mask(params) -> Any:
  """True where weight decay applies: leaves of 2+ axes that are not norm scales or biases (by
  name: a stacked norm scale [L, D] is still a scale)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and _leaf_name(path) not in NO_DECAY_NAMES, params)


def broadcast_trainable(trainable, params) -> Any:
  """`trainable` (a tree of bools with the structure of `params`, or a prefix of it such as
  {"base": False, "lora": True}) -> one bool per leaf of `params`. Errors name the problem."""
  def check(path, flag):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"trainable{jax.tree_util.keystr(path)} is {flag!r}; every leaf of "
                      "`trainable` must be a bool")
    return bool(flag)

  flags = jax.tree_util.tree_map_with_path(check, trainable)
  try:
    return jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), flags, params)
  except ValueError as e:
    raise ValueError("`trainable` must have the structure of `params` (or a prefix of it) with "
                     f"bool leaves: {e}") from None


def make_optimizer(config: TrainConfig, trainable=None) -> optax.GradientTransformation:
  """AdamW with `learning_rate_schedule`, global-norm clipping and `decay_mask`.

  trainable: None (every leaf trains) or a tree of bools with the params' structure (or a
  prefix of it). Frozen leaves get zero updates and no optimizer state (optax masks them out:
  their moments are `MaskedNode`s, no arrays), and the clipping norm is over trainable leaves.
  """
  inner = []
  if config.grad_clip > 0:
    inner.append(optax.clip_by_global_norm(config.grad_clip))
  inner.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay, mask=decay_mask))
  tx = optax.chain(*inner)
  if trainable is None:
    return tx

  def labels(params):
    flags = broadcast_trainable(trainable, params)
    return jax.tree.map(lambda flag: _TRAIN if flag else _FROZEN, flags)

  return optax.multi_transform({_TRAIN: tx, _FROZEN: optax.set_to_zero()}, labels)


def _split(leaves: Sequence, mask: Sequence[bool]) -> tuple[list, list]:
  """Leaves -> (trainable leaves, frozen leaves), each in tree order."""
  return ([x for x, m in zip(leaves, mask) if m], [x for x, m in zip(leaves, mask) if not m])


def _join(treedef, mask: Sequence[bool], train: Sequence, frozen: Sequence):
  """The inverse of `_split`: the whole tree again."""
  train_it, frozen_it = iter(train), iter(frozen)
  return treedef.unflatten([next(train_it) if m else next(frozen_it) for m in mask])


def _checked_loss(loss_fn, params, batch, rng) -> tuple[jax.Array, dict]:
  """loss_fn's (loss, metrics), checked while tracing so a wrong return fails in one line."""
  out = loss_fn(params, batch, rng)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(f"loss_fn must return (loss, metrics dict), not a {type(out).__name__}")
  loss, metrics = out
  loss = jnp.asarray(loss)
  if loss.ndim or not jnp.issubdtype(loss.dtype, jnp.floating):
    raise ValueError(f"loss_fn's loss must be a float scalar; it is {loss.dtype} of shape "
                     f"{loss.shape}")
  if not isinstance(metrics, Mapping):
    raise TypeError(f"loss_fn's metrics must be a dict of scalars, not {type(metrics).__name__}")
  for name, value in metrics.items():
    if not isinstance(name, str) or name in RESERVED_METRICS:
      raise ValueError(f"loss_fn's metric name {name!r} is not allowed: names must be strings "
                       f"other than {RESERVED_METRICS}")
    if jnp.ndim(value):
      raise ValueError(f"loss_fn's metric {name!r} must be a scalar; its shape is "
                       f"{jnp.shape(value)}")
  return loss, dict(metrics)


def _make_step(loss_fn, optimizer, treedef, mask: Sequence[bool], config: TrainConfig):
  """(trainable leaves, frozen leaves, opt_state, batch, step) -> (trainable leaves, opt_state,
  metrics). Gradients are taken for the trainable leaves only; the frozen ones are inputs."""
  schedule = learning_rate_schedule(config)

  def step_fn(train, frozen, opt_state, batch, step):
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    loss_of = lambda t: _checked_loss(loss_fn, _join(treedef, mask, t, frozen), batch, rng)  # noqa: E731
    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(train)
    params = _join(treedef, mask, train, frozen)
    # The frozen zeros only fill the tree: optax's set_to_zero never reads them, so XLA drops them.
    all_grads = _join(treedef, mask, grads, [jnp.zeros_like(f) for f in frozen])
    updates, opt_state = optimizer.update(all_grads, opt_state, params)
    new_train, _ = _split(treedef.flatten_up_to(updates), mask)
    train = [(p + u).astype(p.dtype) for p, u in zip(train, new_train)]
    metrics = {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads),
               "lr": schedule(step)}
    return train, opt_state, metrics

  return step_fn


def opt_state_shardings(opt_shapes, params, param_sharding, mesh: Mesh):
  """A sharding for every optimizer-state leaf: the parameter's where the leaf mirrors one (its
  tree path ends with the parameter's path and it has the parameter's shape: Adam's mu and nu),
  else replicated (step counts). opt_shapes: the state's ShapeDtypeStructs (jax.eval_shape of
  the optimizer's init); param_sharding: a NamedSharding per leaf of params."""
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), sharding in zip(flat_params, jax.tree.leaves(param_sharding)):
    by_path[tuple(path)] = (sharding, tuple(np.shape(leaf)))

  def one(path, leaf):
    for start in range(len(path)):
      sharding, shape = by_path.get(tuple(path[start:]), (None, None))
      if sharding is not None and shape == tuple(leaf.shape):
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, opt_shapes)


def _place(leaves: Sequence, shardings: Sequence, copy: bool) -> list:
  """Puts leaves on their shardings (None: the default device). With copy, a leaf that already
  lives there is copied, so donating the result never invalidates the caller's array."""
  alias = False if copy else None
  return [jax.device_put(x, s, may_alias=alias) for x, s in zip(leaves, shardings)]


class _RunDir:
  """The workdir's config file, checkpoint manager and log (see the module docstring)."""

  def __init__(self, workdir: str, config: TrainConfig, name: str, mesh: Optional[Mesh]):
    self.path = os.path.abspath(workdir)
    self.writer = jax.process_index() == 0  # one process writes the config and the log
    os.makedirs(self.path, exist_ok=True)
    if self.writer:
      # As it reads back from the file (numpy numbers as Python ones), to compare like with like.
      stored_form = json.loads(json.dumps(to_jsonable({**dataclasses.asdict(config),
                                                       "name": name}, "config")))
      self._open_config(stored_form, mesh)
    # A kill mid-save leaves only a temporary directory, never a step: clean those up on start.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    self.checkpoints = ocp.CheckpointManager(os.path.join(self.path, CHECKPOINTS_DIR),
                                             options=options)
    self.log = RecordStore(os.path.join(self.path, LOG_FILE), ("step",)) if self.writer else None

  def _open_config(self, config: dict, mesh: Optional[Mesh]) -> None:
    path = os.path.join(self.path, CONFIG_FILE)
    if not os.path.exists(path):
      if os.path.isdir(os.path.join(self.path, CHECKPOINTS_DIR)):
        raise ValueError(f"workdir {self.path}: has {CHECKPOINTS_DIR}/ but no {CONFIG_FILE}, so "
                         "its config cannot be checked; use a new workdir")
      write_json(path, {"config": config, "provenance": provenance(mesh)})
      return
    with open(path) as f:
      stored = json.load(f)
    differences = config_differences(stored.get("config"), config)
    if differences:
      listed = "; ".join(differences[:MAX_LISTED_DIFFERENCES])
      more = len(differences) - MAX_LISTED_DIFFERENCES
      listed += f"; and {more} more" if more > 0 else ""
      raise ValueError(f"workdir {self.path} holds a training run with a different config "
                       f"(stored != new: {listed}); use a new workdir, or the stored config "
                       f"({CONFIG_FILE})")
    stored["resumed"] = stored.get("resumed", []) + [provenance(mesh)]
    write_json(path, stored)

  def restore(self, state: dict) -> tuple[int, dict]:
    """(step of the latest checkpoint, its state placed like `state`), or (0, state)."""
    step = self.checkpoints.latest_step()
    if step is None:
      return 0, state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      restored = self.checkpoints.restore(step, args=ocp.args.StandardRestore(target))
    except ValueError as e:
      raise ValueError(f"{self.path}/{CHECKPOINTS_DIR}/{step}: the checkpoint does not fit the "
                       f"parameters and trainable mask given to train: {e}") from None
    return int(step), restored

  def save(self, step: int, state: dict) -> None:
    # Orbax copies the arrays to host before returning, so the next step may donate them.
    self.checkpoints.save(step, args=ocp.args.StandardSave(state))

  def append_log(self, record: dict) -> None:
    if self.log is not None:
      self.log.append([record])

  def history(self, steps: int) -> Optional[list[dict]]:
    if self.log is None:
      return None
    return sorted((r for r in self.log.records() if r["step"] < steps), key=lambda r: r["step"])

  def close(self) -> None:
    self.checkpoints.wait_until_finished()
    self.checkpoints.close()


def _is_logged(step: int, config: TrainConfig) -> bool:
  return step % config.log_every == 0 or step == config.steps - 1


def _is_checkpointed(done: int, config: TrainConfig) -> bool:
  return done % config.checkpoint_every == 0 or done == config.steps


def _host_record(step: int, metrics: dict) -> dict:
  """Device metrics -> {"step", "loss", ..., "lr"} of Python numbers; non-finite loss raises."""
  values = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(values["loss"]):
    raise FloatingPointError(f"the loss at step {step} is {values['loss']}; training diverged "
                             "(lower learning_rate, or check the loss and the data)")
  ordered = {"step": step, "loss": values.pop("loss")}  # then the loss_fn's metrics, then ours
  tail = {k: values.pop(k) for k in ("grad_norm", "lr")}
  return {**ordered, **values, **tail}


def _trainable_mask(params, trainable, paths: Sequence[str]) -> list[bool]:
  """One bool per leaf of params (in tree order); the trained ones must be floats."""
  treedef = jax.tree.structure(params)
  mask = treedef.flatten_up_to(broadcast_trainable(True if trainable is None else trainable,
                                                   params))
  if not any(mask):
    raise ValueError("`trainable` marks every leaf frozen; nothing would be trained")
  for path, leaf, flag in zip(paths, jax.tree.leaves(params), mask):
    if flag and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"params leaf {path!r} is {jnp.result_type(leaf)}; only float leaves can "
                      "be trained (mark it frozen in `trainable`)")
  return mask


def _leaf_shardings(params, paths: Sequence[str], mesh: Optional[Mesh], param_sharding) -> list:
  """One sharding per leaf of params (None: the default device, when there is no mesh)."""
  if param_sharding is not None and mesh is None:
    raise ValueError("param_sharding needs the mesh it shards over: pass mesh= too")
  if mesh is None:
    return [None] * len(paths)
  if param_sharding is None:
    return [replicated(mesh)] * len(paths)
  try:
    shardings = jax.tree.structure(params).flatten_up_to(param_sharding)
  except (ValueError, TypeError) as e:
    raise ValueError(f"param_sharding must have the structure of params: {e}") from None
  for path, sharding in zip(paths, shardings):
    if not isinstance(sharding, NamedSharding):
      raise TypeError(f"param_sharding at {path!r} is a {type(sharding).__name__}, not a "
                      "NamedSharding")
  return shardings


def train(loss_fn, params, batch_at, config: TrainConfig, workdir: Optional[str] = None, *,
          trainable=None, mesh: Optional[Mesh] = None, param_sharding=None,
          progress: bool = True, name: str = "train") -> TrainResult:
  """Optimises `params` for `config.steps` steps (see the module docstring).

  Args:
    loss_fn: (params, batch, rng) -> (loss float scalar, metrics dict of scalars); pure.
    params: a tree of float arrays (numpy or jax).
    batch_at: step -> the batch of that step (a tree of arrays), a pure function of the step.
    config: a TrainConfig.
    workdir: where checkpoints, the log and train_config.json go; None: nothing is written.
    trainable: None (all leaves) or bools with params' structure or a prefix of it.
    mesh: a (data, model) mesh (`distributed.make_mesh`); batches are split over `data`.
    param_sharding: a NamedSharding per parameter (needs mesh); default replicated.
    progress: show a tqdm bar with the loss and steps/s.
    name: the run's name (progress bar; stored in train_config.json).
  Returns:
    TrainResult(params, history, resumed_from).
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"config must be a TrainConfig, not {type(config).__name__}")
  if not callable(loss_fn) or not callable(batch_at):
    raise TypeError("loss_fn and batch_at must be callables")
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError("params has no arrays to train")
  paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  mask = _trainable_mask(params, trainable, paths)
  shardings = _leaf_shardings(params, paths, mesh, param_sharding)

  train_s, frozen_s = _split(shardings, mask)
  train_leaves, frozen_leaves = _split(leaves, mask)
  train_leaves = _place(train_leaves, train_s, copy=True)
  frozen_leaves = _place(frozen_leaves, frozen_s, copy=False)
  params = _join(treedef, mask, train_leaves, frozen_leaves)
  no_frozen = [None] * len(frozen_leaves)  # what a checkpoint holds in their place

  optimizer = make_optimizer(config, None if trainable is None else treedef.unflatten(mask))
  init_kwargs, step_kwargs = {}, {}
  if mesh is not None:
    opt_s = opt_state_shardings(jax.eval_shape(optimizer.init, params), params,
                                treedef.unflatten(shardings), mesh)
    init_kwargs = dict(out_shardings=opt_s)
    step_kwargs = dict(out_shardings=(train_s, opt_s, replicated(mesh)))
  opt_state = jax.jit(optimizer.init, **init_kwargs)(params)
  step_fn = jax.jit(_make_step(loss_fn, optimizer, treedef, mask, config),
                    donate_argnums=(0, 2), **step_kwargs)

  run_dir = _RunDir(workdir, config, name, mesh) if workdir is not None else None
  history: list[dict] = []
  start = 0
  try:
    if run_dir is not None:
      start, state = run_dir.restore({"params": _join(treedef, mask, train_leaves, no_frozen),
                                      "opt_state": opt_state})
      train_leaves, opt_state = jax.tree.leaves(state["params"]), state["opt_state"]
    with tqdm(total=config.steps, initial=start, desc=name, unit="step", disable=not progress,
              dynamic_ncols=True) as bar:  # tqdm's rate is the steps/s
      for step in range(start, config.steps):
        batch = batch_at(step)
        batch = shard_batch(batch, mesh) if mesh is not None else batch
        train_leaves, opt_state, metrics = step_fn(train_leaves, frozen_leaves, opt_state,
                                                   batch, np.int32(step))
        logged = _is_logged(step, config)
        saved = run_dir is not None and _is_checkpointed(step + 1, config)
        if logged or saved:
          record = _host_record(step, metrics)  # also stops a diverged run before it is saved
        if logged:
          history.append(record)
          if run_dir is not None:
            run_dir.append_log(record)
          bar.set_postfix(loss=f"{record['loss']:.4g}")
        if saved:
          run_dir.save(step + 1, {"params": _join(treedef, mask, train_leaves, no_frozen),
                                  "opt_state": opt_state})
        bar.update(1)
    if run_dir is not None:
      history = run_dir.history(config.steps) or history
  finally:
    if run_dir is not None:
      run_dir.close()  # waits until the last checkpoint is complete on disk
  return TrainResult(params=_join(treedef, mask, train_leaves, frozen_leaves), history=history,
                     resumed_from=start)
