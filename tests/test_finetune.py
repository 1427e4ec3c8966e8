"""Masked fine-tuning: the objective is the analysis path's knockout, full and LoRA tuning learn,
and a mesh changes nothing but the layout."""

import jax
import numpy as np
import pytest

import narrowgate_jax as ng
from narrowgate_jax.data.examples import Example
from narrowgate_jax.model import random_params
from narrowgate_jax.organisms import tokens
from narrowgate_jax.processing.batch import Batch
from narrowgate_jax.training import finetune

WORDS = ("what colour is the shape ? red green blue yellow a it").split()
CONFIG = ng.DecoderConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)
EDGES = [("text", "text")]  # each text query keeps only BOS (and the pre-softmax row stays defined)


def _vlm(mesh=None) -> ng.VLM:
  vocab = tokens.vocabulary(tokens.LLAMA_SPECIALS, WORDS)
  tok = tokens.word_tokenizer(vocab, tokens.LLAMA_SPECIALS)
  params = random_params(CONFIG, seed=3)
  if mesh is not None:
    from narrowgate_jax.distributed import param_shardings

    params = jax.tree.map(jax.device_put, params, param_shardings(params, mesh))
  return ng.VLM(CONFIG, params, tokenizer=tok, mesh=mesh)


def _examples() -> list[Example]:
  colours = ("red", "green", "blue", "yellow")
  return [Example(id=f"q{i}", prompt=("a " * (i % 3)) + "what colour is the shape ?",
                  answer=colours[i % 4]) for i in range(16)]


def _cross_entropy(logits, targets, weights) -> float:
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return float(-(picked * weights).sum() / weights.sum())


def test_the_objective_is_the_analysis_knockout():
  """masked_loss == the cross-entropy of `vlm.forward` under `vlm.knockout` with the same edges,
  computed in numpy from the analysis path's logits."""
  vlm = _vlm()
  data = finetune.training_rows(vlm, _examples())
  queries, keys = finetune.edge_masks(data.roles, EDGES)
  batch = {**data.take(np.arange(len(data))), "queries": queries, "keys": keys}
  ours, _ = finetune.masked_loss(vlm.params, batch, None, config=CONFIG, mode="pre_softmax")
  prepared = Batch(input_ids=data.ids, positions=data.positions, roles=data.roles)
  ko = vlm.knockout(prepared, keys="text", queries="text", mode="pre_softmax")
  logits = vlm.forward(prepared, interventions=ko).logits
  reference = _cross_entropy(logits, data.targets, data.weights)
  np.testing.assert_allclose(float(ours), reference, rtol=1e-5)
  clean = _cross_entropy(vlm.forward(prepared).logits, data.targets, data.weights)
  assert abs(clean - reference) > 1e-3  # the edges matter to the loss


@pytest.mark.parametrize("rank", [0, 4])
def test_full_and_lora_tuning_learn_the_answers(rank):
  vlm = _vlm()
  targets = ("layers/attn/v/kernel", "layers/attn/o/kernel")  # q, k get no gradient (below)
  config = finetune.FinetuneConfig(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=2,
                                   lora_rank=rank, lora_targets=targets)
  params, history = finetune.finetune(vlm, _examples(), EDGES, config, progress=False)
  assert history[-1]["answer_loss"] < 0.7 * history[0]["answer_loss"]
  assert jax.tree.structure(params) == jax.tree.structure(vlm.params)
  changed = {path: not np.array_equal(np.asarray(a), np.asarray(b)) for (path, a), (_, b) in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_flatten_with_path(vlm.params)[0])}
  names = {"/".join(k.key for k in path): v for path, v in changed.items()}
  if rank:  # only the adapted kernels move
    assert {n for n, v in names.items() if v} == set(targets)
  else:
    # With every text query left only BOS to attend to, attention scores cannot change the loss:
    # q and k get no gradient, which shows the mask is applied while training; all else moves.
    scores = {"layers/attn/q/kernel", "layers/attn/k/kernel"}
    assert {n for n, v in names.items() if not v} == scores


def test_a_mesh_gives_the_same_tuning():
  mesh = ng.make_mesh(data=4, model=2)
  config = finetune.FinetuneConfig(steps=6, batch_size=8, learning_rate=1e-2, warmup_steps=1,
                                   lora_rank=2)
  alone, _ = finetune.finetune(_vlm(), _examples(), EDGES, config, progress=False)
  sharded, _ = finetune.finetune(_vlm(mesh), _examples(), EDGES, config, progress=False)
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_bad_input_is_named():
  vlm = _vlm()
  with pytest.raises(ValueError, match="no edges"):
    finetune.finetune(vlm, _examples(), [], finetune.FinetuneConfig())
  unanswered = [Example(id="x", prompt="what colour is it ?")]
  with pytest.raises(ValueError, match="answer for every example.*x"):
    finetune.finetune(vlm, unanswered, EDGES, finetune.FinetuneConfig())
  with pytest.raises(ValueError, match="mode"):
    finetune.FinetuneConfig(mode="sideways")
