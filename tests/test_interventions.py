"""Knockouts, patching, steering, the condition axis and the sharded forward, each against an
independent reference.

References (float32, on the transformers model the checkpoint was converted from):
  * knockout in every layer: transformers' own eager forward given a 4-D additive mask [B, 1, T, S]
    (0 where visible, float32 min where causality, padding or the knockout blocks the edge);
  * knockout in some layers, pre- or post-softmax: an attention function registered through
    `transformers.AttentionInterface` that applies edits attached to each attention module (the
    module carries `layer_idx`, so the edit is per layer);
  * patching and steering: PyTorch forward hooks / pre-hooks on the decoder layers and self_attn;
  * empty interventions, the condition axis and sharded loads: our own plain single-device forward
    (itself checked against transformers here and in the model tests).

Errors are `reference.relative_error` (max abs difference / max abs reference) over real query
positions only: a padded query row sees nothing in transformers and only itself here.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import repeat_kv

import narrowgate_jax as ng
import reference as ref

TOL = 1e-4
NEG = torch.finfo(torch.float32).min
REFERENCE_ATTENTION = "narrowgate_test_reference"
FUSED = ng.Capture(resid=True)  # no probabilities: jax.nn.dot_product_attention
EXPLICIT = ng.Capture(resid=True, attn=True)  # probabilities formed (and returned)


# ------------------------------------------------------------------------ the PyTorch reference


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
  """transformers' eager attention of `module`'s family, plus the edits attached to this layer.

  module._ng_pre [B, 1, T, S] bool: scores set to float32 min before the softmax.
  module._ng_post [B, 1, T, S] bool: probabilities set to 0 after it (no renormalisation).
  """
  pre, post = getattr(module, "_ng_pre", None), getattr(module, "_ng_post", None)
  if pre is not None:
    attention_mask = attention_mask.masked_fill(pre, NEG)
  if post is None:
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
  k = repeat_kv(key, module.num_key_value_groups)
  v = repeat_kv(value, module.num_key_value_groups)
  scores = torch.matmul(query, k.transpose(2, 3)) * scaling + attention_mask
  probs = torch.softmax(scores, dim=-1, dtype=torch.float32).masked_fill(post, 0.0)
  return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


transformers.AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)


def causal_visible(batch) -> np.ndarray:
  """[B, T, S] bool: key s visible to query t (causal, key not padding), as transformers has it."""
  real = np.asarray(batch.attention_mask)
  t = real.shape[1]
  return np.tril(np.ones((t, t), bool))[None] & real[:, None, :]


def edges(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[B, T] query and key masks -> [B, T, S] the edges between them."""
  return queries[:, :, None] & keys[:, None, :]


def _first(output):
  return output[0] if isinstance(output, tuple) else output  # Chameleon layers return tuples


def torch_forward(hf, batch, visible=None, pre=None, post=None, hooks=()):
  """transformers' forward with a 4-D additive mask, per-layer attention edits and hooks.

  visible: [B, T, S] bool, the mask every layer gets (default: causal and padding).
  pre, post: {layer: [B, T, S] bool} edges blocked before / zeroed after the softmax in that layer
    (through the registered reference attention function).
  hooks: functions hf -> [handles], registered before the residual recorders (so those see edits).
  Returns logits [B, T, V]; resid [L+1, B, T, D] (embeddings, then each layer's output as the next
  layer receives it); attn [L, B, N, T, S]; hidden_states (transformers' tuple).
  """
  ids, _, pos = ref.torch_inputs(batch)
  visible = causal_visible(batch) if visible is None else visible
  mask = torch.zeros(visible.shape).masked_fill(torch.as_tensor(~visible), NEG)[:, None]
  layers, config = hf.model.layers, hf.config
  recorded, handles = [], []
  implementation = config._attn_implementation
  try:
    for install in hooks:
      handles += install(hf)
    record = lambda module, args, out: recorded.append(_first(out))  # noqa: E731
    handles.append(hf.model.embed_tokens.register_forward_hook(record))
    handles += [layer.register_forward_hook(record) for layer in layers]
    for l, layer in enumerate(layers):
      for name, edits in (("_ng_pre", pre), ("_ng_post", post)):
        if edits and l in edits:
          setattr(layer.self_attn, name, torch.as_tensor(edits[l])[:, None])
    if pre or post:
      config._attn_implementation = REFERENCE_ATTENTION
    with torch.no_grad():
      out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True,
               output_hidden_states=True)
  finally:
    config._attn_implementation = implementation
    for h in handles:
      h.remove()
    for layer in layers:
      for name in ("_ng_pre", "_ng_post"):
        if hasattr(layer.self_attn, name):
          delattr(layer.self_attn, name)
  return SimpleNamespace(logits=out.logits.numpy(), resid=np.stack([r.numpy() for r in recorded]),
                         attn=np.stack([a.numpy() for a in out.attentions]),
                         hidden_states=out.hidden_states)


def _write(x, index, values, add):
  """x [B, T, D] torch; index [B, P]; values [B, P, D] -> x with values written (or added)."""
  x = x.clone()
  for b in range(index.shape[0]):
    v = torch.tensor(np.array(values[b]), dtype=x.dtype)
    x[b, index[b]] = x[b, index[b]] + v if add else v
  return x


def patch_hooks(site, layers, index, values, add=False):
  """A hook installer doing what ng.patch does: values [M, B, P, D] at layers[m], at `index`."""

  def install(hf):
    handles = []
    for m, l in enumerate(layers):
      edit = lambda x, m=m: _write(x, index, values[m], add)  # noqa: E731
      layer = hf.model.layers[l]
      if site == "resid_pre":
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, e=edit: (e(args[0]),) + tuple(args[1:])))
      elif site == "attn_in":
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kw, e=edit: (args, {**kw, "hidden_states": e(kw["hidden_states"])}),
            with_kwargs=True))
      else:
        handles.append(layer.register_forward_hook(
            lambda mod, args, out, e=edit: ((e(out[0]),) + out[1:]) if isinstance(out, tuple)
            else e(out)))
    return handles

  return install


# ------------------------------------------------------------------------------ comparisons


def assert_close(ours, theirs, what, tol=TOL):
  err = ref.relative_error(ours, theirs)
  assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def comparable_logits(logits, batch, reference_logits):
  """[real rows, V'] logits without the columns the reference suppresses (Chameleon's image
  tokens sit at float32 min there and would swamp the relative error)."""
  finite = ~np.all(reference_logits == NEG, axis=(0, 1))
  return np.asarray(logits)[np.asarray(batch.attention_mask)][:, finite]


def assert_changed(logits, clean, batch):
  """The intervention did something: logits move by more than 1% of their range."""
  err = ref.relative_error(comparable_logits(logits, batch, clean.logits),
                           comparable_logits(clean.logits, batch, clean.logits))
  assert err > 1e-2, f"the intervention barely changed the logits ({err:.1e})"


def assert_matches_torch(out, theirs, batch):
  """Logits (suppressed columns left out), residuals and probabilities at real query rows."""
  real = np.asarray(batch.attention_mask)
  assert_close(comparable_logits(out.logits, batch, theirs.logits),
               comparable_logits(theirs.logits, batch, theirs.logits), "logits")
  if out.resid is not None:
    for l in range(out.resid.shape[0]):
      assert_close(np.asarray(out.resid[l])[real], theirs.resid[l][real], f"resid[{l}]")
  if out.attn is not None:
    ours_attn = np.asarray(out.attn).transpose(0, 1, 3, 2, 4)[:, real]  # [L, real rows, N, S]
    assert_close(ours_attn, theirs.attn.transpose(0, 1, 3, 2, 4)[:, real], "attn")


def assert_matches_hidden_states(out, theirs, hf, batch):
  """transformers' hidden_states: [0..L-1] as ours; [L] is after the final norm, ours before it."""
  real = np.asarray(batch.attention_mask)
  hidden = theirs.hidden_states
  num_layers = len(hidden) - 1
  for l in range(num_layers):
    assert_close(np.asarray(out.resid[l])[real], hidden[l].numpy()[real], f"hidden_states[{l}]")
  with torch.no_grad():
    normed = hf.model.norm(torch.tensor(np.asarray(out.resid[num_layers]))).numpy()
  assert_close(normed[real], hidden[num_layers].numpy()[real], "final norm(resid[L])")


# --------------------------------------------------------------------------------- fixtures


def _build(tmp_path_factory, name, config):
  root = tmp_path_factory.mktemp(name)
  hf = ref.build(config, root / "hf")
  vlm = ref.convert_and_load(root / "hf", root / "ng")
  batch = vlm.prepare(token_ids=ref.two_prompts(config.vocab_size))
  return SimpleNamespace(hf=hf, vlm=vlm, batch=batch, path=str(root / "ng"), name=name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _build(tmp_path_factory, "llama", ref.tiny_llama())


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
  return _build(tmp_path_factory, "chameleon", ref.tiny_chameleon())


@pytest.fixture(params=["llama", "chameleon"])
def model(request):
  return request.getfixturevalue(request.param)


@pytest.fixture(params=["fused", "explicit"])
def capture(request):
  """fused: no probabilities asked for (jax.nn.dot_product_attention where no post-softmax edit
  forces explicit probabilities); explicit: probabilities formed and returned."""
  return {"fused": FUSED, "explicit": EXPLICIT}[request.param]


def span(batch, start, stop) -> np.ndarray:
  """[B, T] bool: each example's real tokens at offsets start..stop-1 from its first real token."""
  real = np.asarray(batch.attention_mask)
  offset = np.cumsum(real, axis=1) - 1
  return real & (offset >= start) & (offset < stop)


def last(batch) -> np.ndarray:
  """[B, T] bool: the final position (left padding puts every example's last token there)."""
  mask = np.zeros(np.asarray(batch.roles).shape, bool)
  mask[:, -1] = True
  return mask


def layer_knockouts(batch, mode):
  """Two knockouts in different layers and their reference edges {layer: [B, T, S] bool}.

  Every query keeps its first real token visible, so no row is emptied.
  """
  real = np.asarray(batch.attention_mask)
  keys_a, keys_b = span(batch, 1, 4), span(batch, 2, 5)
  kos = [ng.knockout(batch, keys=keys_a, queries="all", layers=[1], mode=mode),
         ng.knockout(batch, keys=keys_b, queries="last", layers=[0, 2], mode=mode)]
  a, b = edges(real, keys_a), edges(last(batch), keys_b)
  return kos, {0: b, 1: a, 2: b}


# ------------------------------------------------------------------------------- knockouts


def test_pre_softmax_knockout_every_layer_matches_4d_mask(model, capture):
  """Knockout in all layers == transformers eager given the knocked-out 4-D additive mask."""
  batch, hf = model.batch, model.hf
  real, keys = np.asarray(batch.attention_mask), span(batch, 1, 4)
  ko = ng.knockout(batch, keys=keys, queries="all", layers=range(model.vlm.num_layers))
  out = model.vlm.forward(batch, ko, capture=capture)
  theirs = torch_forward(hf, batch, visible=causal_visible(batch) & ~edges(real, keys))
  assert_matches_torch(out, theirs, batch)
  assert_matches_hidden_states(out, theirs, hf, batch)
  assert_changed(out.logits, torch_forward(hf, batch), batch)


# Chameleon runs the explicit path only: qk-norm happens before attention, so fused vs explicit is
# covered by Llama (and by the every-layer test), which keeps the number of compiled programs down.
SOME_LAYER_CASES = pytest.mark.parametrize("model,capture", [
    ("llama", "fused"), ("llama", "explicit"), ("chameleon", "explicit")], indirect=True)


@SOME_LAYER_CASES
def test_pre_softmax_knockout_some_layers(model, capture):
  """Layer-specific pre-softmax knockouts == reference attention adding a per-layer mask."""
  batch, hf = model.batch, model.hf
  kos, blocked = layer_knockouts(batch, "pre_softmax")
  out = model.vlm.forward(batch, kos, capture=capture)
  theirs = torch_forward(hf, batch, pre=blocked)
  assert_matches_torch(out, theirs, batch)
  assert_matches_hidden_states(out, theirs, hf, batch)
  assert_changed(out.logits, torch_forward(hf, batch), batch)


@SOME_LAYER_CASES
def test_post_softmax_knockout_some_layers(model, capture):
  """Post-softmax knockouts == reference attention zeroing those probabilities (no renorm)."""
  batch, hf = model.batch, model.hf
  kos, blocked = layer_knockouts(batch, "post_softmax")
  out = model.vlm.forward(batch, kos, capture=capture)
  theirs = torch_forward(hf, batch, post=blocked)
  assert_matches_torch(out, theirs, batch)
  assert_changed(out.logits, torch_forward(hf, batch), batch)
  if out.attn is not None:  # the rows really do not sum to 1
    rows = np.asarray(out.attn).sum(-1).transpose(0, 1, 3, 2)[:, np.asarray(batch.attention_mask)]
    assert rows.min() < 0.99


def test_knockout_layer_out_of_range_raises(llama):
  ko = ng.knockout(llama.batch, keys="last", layers=[99])
  with pytest.raises(ValueError, match=r"layer 99 .*3 layers"):
    llama.vlm.forward(llama.batch, ko)


# -------------------------------------------------------------------------- patch and steer


@pytest.mark.parametrize("site", ng.interventions.PATCH_SITES)
def test_patch_matches_torch_hooks(llama, site):
  """ng.patch at `site` == hooks replacing the same vectors (resid_pre: pre-hook on the layer,
  attn_in: pre-hook on self_attn's hidden_states, resid_post: hook on the layer's output).

  Residual sites get another prompt's clean residual (transformers' run); attn_in random vectors.
  """
  batch, hf = llama.batch, llama.hf
  layers, at = [0, 2], span(batch, 2, 4)
  index = np.stack([np.flatnonzero(row) for row in at])  # [B, P]
  rows = np.arange(index.shape[0])[:, None]
  if site == "attn_in":
    values = np.random.default_rng(0).normal(size=(len(layers), *index.shape, 64))
  else:
    other = llama.vlm.prepare(token_ids=ref.two_prompts(97, seed=1))
    donor = torch_forward(hf, other).resid
    values = np.stack([donor[l + (site == "resid_post")][rows, index] for l in layers])
  values = values.astype(np.float32)
  out = llama.vlm.forward(batch, ng.patch(batch, at=at, values=values, layers=layers, site=site),
                          capture=FUSED)
  theirs = torch_forward(hf, batch, hooks=[patch_hooks(site, layers, index, values)])
  assert_matches_torch(out, theirs, batch)
  assert_changed(out.logits, torch_forward(hf, batch), batch)


def test_attn_in_capture_matches_the_self_attention_input(llama):
  """Capture(attn_in=True) == what transformers' self_attn receives (its hidden_states), in every
  layer, at all positions and at `resid_at` positions."""
  batch, hf = llama.batch, llama.hf
  seen = []
  handles = [layer.self_attn.register_forward_pre_hook(
      lambda mod, args, kw: seen.append(kw["hidden_states"].detach().numpy()), with_kwargs=True)
      for layer in hf.model.layers]
  torch_forward(hf, batch)
  for h in handles:
    h.remove()
  theirs = np.stack(seen)  # [L, B, T, D]
  real = np.asarray(batch.attention_mask)
  full = llama.vlm.forward(batch, capture=ng.Capture(attn_in=True))
  assert_close(np.asarray(full.attn_in)[:, real], theirs[:, real], "attn_in")
  at = span(batch, 2, 4)
  picked = llama.vlm.forward(batch, capture=ng.Capture(resid_at=at, attn_in=True))
  index = np.stack([np.flatnonzero(row) for row in at])
  rows = np.arange(index.shape[0])[:, None]
  assert_close(np.asarray(picked.attn_in), theirs[:, rows, index], "attn_in at positions")


def test_steer_matches_torch_hooks(llama):
  """ng.steer == a pre-hook adding alpha * v at the selected positions of the chosen layers."""
  batch, hf = llama.batch, llama.hf
  v = np.random.default_rng(1).normal(size=64).astype(np.float32)
  layers, alpha = [1, 2], 2.5
  out = llama.vlm.forward(batch, ng.steer(batch, at="last", vector=v, layers=layers, alpha=alpha),
                          capture=FUSED)
  index = np.full((2, 1), batch.roles.shape[1] - 1)
  values = np.broadcast_to(alpha * v, (len(layers), 2, 1, 64))
  theirs = torch_forward(hf, batch, hooks=[patch_hooks("resid_pre", layers, index, values, True)])
  assert_matches_torch(out, theirs, batch)


def test_repeated_layer_is_refused(llama):
  """A patch holds one vector per layer: listing a layer twice is an error, not a silent drop."""
  batch = llama.batch
  v = np.zeros((2, 64), np.float32)
  with pytest.raises(ValueError, match="layer 1 is listed more than once"):
    ng.steer(batch, at="last", vector=v, layers=[1, 1])
  with pytest.raises(ValueError, match="layer 2 is listed more than once"):
    ng.knockout(batch, keys="last", layers=[2, 0, 2])


# -------------------------------------------------------------------------- empty intervention


def _assert_identical(a, b, what):
  for name in ("logits", "resid", "attn"):
    x, y = getattr(a, name), getattr(b, name)
    if x is not None:
      assert np.array_equal(np.asarray(x), np.asarray(y)), f"{what}: {name} differs"


def test_empty_interventions_are_bit_identical(llama, capture):
  """Interventions that change nothing give exactly the plain forward.

  None, Interventions() and [] are the same value; a knockout whose queries precede its keys
  blocks only edges causality already hides (pre-softmax: the mask is unchanged; post-softmax: the
  probabilities it zeroes are already exactly 0); steering with alpha=0 adds exact zeros.
  A post-softmax knockout always forms the probabilities, so it is compared with the explicit
  path only: against the fused kernel it differs by ~3e-7 relative (another attention algorithm).
  """
  vlm, batch = llama.vlm, llama.batch
  plain = vlm.forward(batch, None, capture=capture)
  _assert_identical(vlm.forward(batch, ng.Interventions(), capture=capture), plain, "empty")
  _assert_identical(vlm.forward(batch, [], capture=capture), plain, "[]")
  first = span(batch, 0, 1)
  noop_pre = ng.knockout(batch, keys="last", queries=first, layers=[0, 1, 2])
  _assert_identical(vlm.forward(batch, noop_pre, capture=capture), plain, "no-op pre-softmax")
  if not capture.attn:  # (a patch does not touch attention: one capture is enough)
    zero = ng.steer(batch, at="last", vector=np.ones(64, np.float32), layers=[1, 2], alpha=0.0)
    _assert_identical(vlm.forward(batch, zero, capture=capture), plain, "alpha=0 steering")
  else:
    noop_post = noop_pre.replace(mode="post_softmax")
    _assert_identical(vlm.forward(batch, noop_post, capture=capture), plain, "no-op post-softmax")


# ---------------------------------------------------------------------------- condition axis


def test_stacked_conditions_equal_separate_calls(llama):
  """stack_conditions([c1, c2, c3]) in one call == three forward calls (leading [C] axis).

  The conditions differ in knockout layers (1, 2 and 3 layers), keys, queries, patch layers and
  patch position counts, so stacking pads every kind of array. Not bit-exact (~3e-7 relative):
  the padding itself is exact (a padded condition run alone gives the unpadded result bit for
  bit); vmap turns the per-condition matmuls into batched ones, which XLA computes differently.
  """
  vlm, batch = llama.vlm, llama.batch
  rng = np.random.default_rng(2)
  vec = lambda m, p: rng.normal(size=(m, 2, p, 64)).astype(np.float32)  # noqa: E731
  conditions = [
      [ng.knockout(batch, keys=span(batch, 1, 4), layers=[0]),
       ng.patch(batch, at="last", values=vec(1, 1), layers=[2])],
      [ng.knockout(batch, keys=span(batch, 1, 3), queries="last", layers=[1, 2]),
       ng.patch(batch, at=span(batch, 3, 5), values=vec(2, 2), layers=[0, 1])],
      [ng.knockout(batch, keys=span(batch, 2, 4), layers=[0, 1, 2]),
       ng.patch(batch, at=span(batch, 1, 4), values=vec(1, 3), layers=[1])],
  ]
  stacked = vlm.forward(batch, ng.stack_conditions(conditions), capture=FUSED)
  assert stacked.logits.shape[0] == stacked.resid.shape[0] == 3
  for c, iv in enumerate(conditions):
    single = vlm.forward(batch, iv, capture=FUSED)
    assert_close(stacked.logits[c], single.logits, f"condition {c} logits", tol=1e-6)
    assert_close(stacked.resid[c], single.resid, f"condition {c} resid", tol=1e-6)


# ---------------------------------------------------------------------------------- captures


@pytest.mark.parametrize("selector", ["last", "span"])
def test_received_and_resid_at_match_torch(llama, selector):
  """received [L, B, N, S] == transformers' probabilities summed over the selected query rows;
  resid_at == the full residual gathered at the selected positions."""
  batch, hf = llama.batch, llama.hf
  rows = last(batch) if selector == "last" else span(batch, 2, 6)
  sel = "last" if selector == "last" else rows
  out = llama.vlm.forward(batch, capture=ng.Capture(received_from=sel, resid_at=sel))
  theirs = torch_forward(hf, batch)
  expected = np.einsum("LBNTS,BT->LBNS", theirs.attn, rows.astype(np.float32))
  assert_close(out.received, expected, "received")
  index = np.asarray(out.resid_index)
  assert np.array_equal(index, np.stack([np.flatnonzero(r) for r in rows]))
  gathered = theirs.resid[:, np.arange(2)[:, None], index]  # [L+1, B, P, D]
  assert_close(out.resid, gathered, "resid_at")
  full = llama.vlm.forward(batch, capture=FUSED).resid
  assert_close(out.resid, np.asarray(full)[:, np.arange(2)[:, None], index], "resid_at vs resid",
               tol=1e-6)


def test_value_weighted_received_matches_torch(llama):
  """received with value_norm weighting == sum over the selected queries of the probability
  times ||W_O^h v_s^h||, from transformers' probabilities, value projections and o_proj."""
  batch, hf = llama.batch, llama.hf
  rows = last(batch)
  out = llama.vlm.forward(batch, capture=ng.Capture(received_from="last",
                                                    received_weighting="value_norm"))
  values = []
  hooks = [lambda m: [layer.self_attn.v_proj.register_forward_hook(
      lambda mod, args, v: values.append(v.detach().numpy())) for layer in m.model.layers]]
  theirs = torch_forward(hf, batch, hooks=hooks)
  config = hf.config
  heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
  head_dim = config.hidden_size // heads
  expected = []
  for layer, v in zip(hf.model.layers, values):
    v = v.reshape(*v.shape[:2], kv_heads, head_dim)  # [B, S, K, H]
    v = np.repeat(v, heads // kv_heads, axis=2)  # each query head's value head
    w_o = layer.self_attn.o_proj.weight.detach().numpy().reshape(-1, heads, head_dim)  # [D, N, H]
    norms = np.linalg.norm(np.einsum("DNH,BSNH->BNSD", w_o, v), axis=-1)  # [B, N, S]
    expected.append(norms)
  weights = np.einsum("LBNTS,BT->LBNS", theirs.attn, rows.astype(np.float32))
  assert_close(out.received, weights * np.stack(expected), "value-weighted received")


# ---------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("data,model_axis,lengths",
                         [(2, 4, (9, 6)), (4, 2, (9, 6, 7, 4))], ids=["2x4", "4x2"])
def test_sharded_forward_matches_single_device(llama, data, model_axis, lengths):
  """ng.load(path, mesh=...) gives the single-device logits, residuals and probabilities under a
  layer-specific knockout (relative 1e-5); the knockout itself is checked against torch above."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  sharded = ng.load(llama.path, mesh=ng.make_mesh(data=data, model=model_axis))
  batch = llama.vlm.prepare(token_ids=ref.two_prompts(97, lengths=lengths))
  kos, _ = layer_knockouts(batch, "pre_softmax")
  ours, single = sharded.forward(batch, kos, EXPLICIT), llama.vlm.forward(batch, kos, EXPLICIT)
  assert ours.logits.sharding.spec[0] == "data"  # really split over the batch
  for name in ("logits", "resid", "attn"):
    assert_close(getattr(ours, name), getattr(single, name), name, tol=1e-5)
