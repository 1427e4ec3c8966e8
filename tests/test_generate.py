"""Greedy generation with a KV cache against transformers' own `generate`, and against our forward.

References:
  * transformers `generate` (greedy, do_sample=False, num_beams=1, use_cache=True, the batch's
    attention mask, the same max_new_tokens, eos and pad ids) on the model the checkpoint was
    converted from; its output is padded to max_new_tokens when every example stopped early.
  * knockouts: the same `generate` with an attention function registered through
    `transformers.AttentionInterface` that blocks the knocked-out edges for every query, prompt or
    generated. With the KV cache a layer's keys are every position so far, so the key index is the
    absolute position and the queries are the last q_len of them.
  * self-consistency: our own full forward (no cache) run again on prompt + tokens so far, taking
    the argmax at the last position, one token at a time.
Batches: two prompts of different lengths (left padding), 10 new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv

import narrowgate_jax as ng
import reference as R
from narrowgate_jax.generate import eos_id_from_checkpoint
from narrowgate_jax.model import VLM
from narrowgate_jax.models.decoder import Decoder

NEW = 10
PAD = 0
EOS = 2  # the tiny configs' eos_token_id
NEG = torch.finfo(torch.float32).min
GENERATE_ATTENTION = "narrowgate_generate_reference"


# ------------------------------------------------------------------------ the PyTorch reference


def _generate_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
  """transformers' eager attention plus the knockout attached to the module as `_ng_knockout`:
  (mode, prompt queries [B, T] bool, generated queries bool, keys [B, T] bool).

  The cache holds every position so far, so key j is absolute position j and the q_len queries
  are the last q_len positions; a generated position (>= T) is a query when the flag says so and
  never a key.
  """
  edit = getattr(module, "_ng_knockout", None)
  if edit is None:
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
  mode, prompt_queries, generated, keys = edit
  b, t = keys.shape
  q_len, kv_len = query.shape[2], key.shape[2]
  query_flags = np.concatenate([prompt_queries, np.full((b, kv_len - t), generated)], axis=1)
  key_flags = np.concatenate([keys, np.zeros((b, kv_len - t), bool)], axis=1)
  blocked = query_flags[:, kv_len - q_len:, None] & key_flags[:, None, :]  # [B, q_len, kv_len]
  blocked = torch.as_tensor(blocked)[:, None]
  if mode == "pre_softmax":
    attention_mask = attention_mask.masked_fill(blocked, NEG)
  k = repeat_kv(key, module.num_key_value_groups)
  v = repeat_kv(value, module.num_key_value_groups)
  scores = torch.matmul(query, k.transpose(2, 3)) * scaling + attention_mask
  probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
  if mode == "post_softmax":
    probs = probs.masked_fill(blocked, 0.0)
  return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


transformers.AttentionInterface.register(GENERATE_ATTENTION, _generate_attention)
AttentionMaskInterface.register(GENERATE_ATTENTION, eager_mask)  # masks as eager builds them


def hf_generate(hf, batch, eos=EOS, knockout=None) -> np.ndarray:
  """transformers' greedy generate -> [B, NEW] new tokens, padded with PAD after an early stop.

  knockout: (mode, prompt queries [B, T], generated bool, keys [B, T]) applied in every layer.
  """
  ids, mask, _ = R.torch_inputs(batch)
  layers, config = R.decoder_layers(hf), hf.config
  implementation = config._attn_implementation
  try:
    if knockout is not None:
      config._attn_implementation = GENERATE_ATTENTION
      for layer in layers:
        layer.self_attn._ng_knockout = knockout
    with torch.no_grad():
      out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                        num_beams=1, use_cache=True, eos_token_id=eos, pad_token_id=PAD)
  finally:
    config._attn_implementation = implementation
    for layer in layers:
      if hasattr(layer.self_attn, "_ng_knockout"):
        del layer.self_attn._ng_knockout
  new = out[:, ids.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


def forward_greedy(vlm, batch, knockout=None) -> np.ndarray:
  """[B, NEW] tokens from our full forward, re-run on prompt + tokens so far (no cache).

  Every step uses the same shape: the sequence is left-padded to T + NEW, so one program serves
  all steps. knockout: (mode, keys [B, T] bool) with queries = every real position, generated
  ones included.
  """
  real = np.asarray(batch.attention_mask)
  seqs = [list(np.asarray(batch.input_ids)[b][real[b]]) for b in range(real.shape[0])]
  prompt_lengths = [len(s) for s in seqs]
  total = real.shape[1] + NEW
  for _ in range(NEW):
    step = vlm.prepare(token_ids=seqs)
    step = ng.Batch(*(np.pad(np.asarray(x), ((0, 0), (total - x.shape[1], 0)))
                      for x in (step.input_ids, step.positions, step.roles)))
    iv = None
    if knockout is not None:
      mode, keys = knockout
      wide = np.zeros((len(seqs), total), bool)  # the prompt's key positions in the wider batch
      for b, n in enumerate(prompt_lengths):
        start = total - len(seqs[b])
        wide[b, start:start + n] = keys[b][real[b]]
      iv = ng.knockout(step, keys=wide, queries="all", mode=mode, num_layers=vlm.num_layers)
    token = np.asarray(vlm.forward(step, iv).logits[:, -1]).argmax(-1)
    for b, s in enumerate(seqs):
      s.append(int(token[b]))
  return np.array([s[-NEW:] for s in seqs], np.int32)


# --------------------------------------------------------------------------------- fixtures


QK_GAIN = 8.0


def _build(tmp_path_factory, name, config, lengths=(9, 6), prompt_vocab=None):
  """The tiny model with its query and key projections scaled by QK_GAIN (and saved again):
  random weights give near-uniform attention, which hides position and mask errors from greedy
  tokens; sharper attention makes the tokens depend on them."""
  root = tmp_path_factory.mktemp(name)
  hf = R.build(config, root / "hf")
  with torch.no_grad():
    for layer in R.decoder_layers(hf):
      layer.self_attn.q_proj.weight.mul_(QK_GAIN)
      layer.self_attn.k_proj.weight.mul_(QK_GAIN)
  hf.save_pretrained(root / "hf")
  vlm = R.convert_and_load(root / "hf", root / "ng")
  batch = vlm.prepare(token_ids=R.two_prompts(prompt_vocab or config.vocab_size, lengths=lengths))
  return SimpleNamespace(hf=hf, vlm=vlm, batch=batch, path=str(root / "ng"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _build(tmp_path_factory, "llama", R.tiny_llama())


def _mostly_image_vocabulary(vocab_size: int, first_image_id: int) -> dict:
  """A Chameleon vocabulary map whose ids from `first_image_id` up are image codes (IMGIMG*),
  so that with random weights an image id would win most greedy steps."""
  letters = "ABCDEFGHIJ"
  vmap = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
  for code, token_id in enumerate(range(first_image_id, vocab_size)):
    vmap["IMGIMG" + "".join(letters[int(d)] for d in str(code)) + "Z"] = token_id
  return vmap


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
  config = R.tiny_chameleon(vocabulary_map=_mostly_image_vocabulary(97, 20))
  return _build(tmp_path_factory, "chameleon", config, prompt_vocab=30)  # text ids 4..19


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  """Sliding window 5: prompts of 12 and 7 tokens plus 10 new ones all cross it."""
  return _build(tmp_path_factory, "mistral", R.tiny_mistral(), lengths=(12, 7))


def span(batch, start, stop) -> np.ndarray:
  """[B, T] bool: each example's real tokens at offsets start..stop-1 from its first one."""
  real = np.asarray(batch.attention_mask)
  offset = np.cumsum(real, axis=1) - 1
  return real & (offset >= start) & (offset < stop)


# ------------------------------------------------------------------------------------ tests


def test_llama_equals_transformers(llama):
  out = llama.vlm.generate(llama.batch, max_new_tokens=NEW, eos_id=EOS)
  assert out.tokens.shape == (2, NEW) and out.tokens.dtype == np.int32 and out.texts is None
  np.testing.assert_array_equal(out.tokens, hf_generate(llama.hf, llama.batch))


def test_chameleon_never_generates_image_tokens(chameleon):
  """transformers' Chameleon sets image-token logits to the dtype minimum; so does ours, and the
  tokens agree. Without the suppression, image ids (77 of the 97) would be generated."""
  vlm, batch = chameleon.vlm, chameleon.batch
  image_ids = np.asarray(vlm.config.suppressed_logit_ids)
  assert image_ids.min() == 20 and image_ids.size == 77
  out = vlm.generate(batch, max_new_tokens=NEW, eos_id=EOS)
  np.testing.assert_array_equal(out.tokens, hf_generate(chameleon.hf, batch))
  assert not np.isin(out.tokens, image_ids).any()
  unsuppressed = VLM(dataclasses.replace(vlm.config, suppressed_logit_ids=()), vlm.params)
  raw = unsuppressed.generate(batch, max_new_tokens=NEW, eos_id=EOS).tokens
  assert np.isin(raw, image_ids).any(), "the vocabulary does not exercise the suppression"


@pytest.mark.parametrize("mode,queries", [("post_softmax", "all"), ("pre_softmax", "all"),
                                          ("post_softmax", "last")])
def test_knockout_applies_to_generated_tokens(llama, mode, queries):
  """A knockout of prompt keys in every layer == transformers generate with those edges blocked
  for every query, generated ones included ("all": generated=True by default) or only for the
  prompt's last query ("last": generated=False by default)."""
  vlm, batch, hf = llama.vlm, llama.batch, llama.hf
  keys = span(batch, 1, 4)
  ko = vlm.knockout(batch, keys=keys, queries=queries, mode=mode)
  generated = queries == "all"
  assert np.asarray(ko.generated_queries).tolist() == [generated]
  ours = vlm.generate(batch, max_new_tokens=NEW, interventions=ko, eos_id=EOS).tokens
  prompt_queries = np.asarray(ko.queries[0])
  theirs = hf_generate(hf, batch, knockout=(mode, prompt_queries, generated, keys))
  np.testing.assert_array_equal(ours, theirs)
  clean = vlm.generate(batch, max_new_tokens=NEW, eos_id=EOS).tokens
  assert (ours != clean).any(), "the knockout changed nothing: a weak test"
  if generated:  # blocking the generated queries matters here
    prompt_only = vlm.generate(batch, max_new_tokens=NEW, eos_id=EOS,
                               interventions=ko.with_generated(False)).tokens
    assert (ours != prompt_only).any()


@pytest.mark.parametrize("mode", ["clean", "post_softmax"])
def test_cache_equals_repeated_forward(llama, mode):
  """The cached path gives the tokens of our full forward re-run on the growing sequence."""
  vlm, batch = llama.vlm, llama.batch
  if mode == "clean":
    ko, reference_ko = None, None
  else:
    keys = span(batch, 1, 4)
    ko = vlm.knockout(batch, keys=keys, queries="all", mode=mode)
    reference_ko = (mode, keys)
  ours = vlm.generate(batch, max_new_tokens=NEW, interventions=ko, eos_id=None).tokens
  np.testing.assert_array_equal(ours, forward_greedy(vlm, batch, reference_ko))


@pytest.mark.parametrize("name,mode", [("mistral", "post_softmax"), ("llama", "pre_softmax")])
def test_cached_step_logits_equal_forward_logits(request, name, mode):
  """Prefill, then one `Decoder.decode` step per new token (teacher-forced with random tokens),
  gives the logits of one full forward over prompt + new tokens at every step, within float32
  noise: positions, cache slots, sliding windows and the knockout's generated queries all line
  up. (Token equality alone is a weak check: tiny random models barely feel a position shift.)"""
  model = request.getfixturevalue(name)
  vlm, batch = model.vlm, model.batch
  keys = span(batch, 1, 4)
  ko = vlm.knockout(batch, keys=keys, queries="all", mode=mode)
  b, t = batch.input_ids.shape
  tokens = np.random.default_rng(3).integers(3, 97, size=(b, NEW)).astype(np.int32)
  full = ng.Batch(
      input_ids=np.concatenate([batch.input_ids, tokens], 1),
      positions=np.concatenate([batch.positions, batch.positions[:, -1:] + 1 + np.arange(NEW)], 1),
      roles=np.concatenate([batch.roles, np.full((b, NEW), int(ng.Role.TEXT))], 1))
  wide_keys = np.pad(keys, ((0, 0), (0, NEW)))
  expected = np.asarray(vlm.forward(full, ng.knockout(
      full, keys=wide_keys, queries="all", mode=mode, num_layers=vlm.num_layers)).logits)

  decoder = Decoder(vlm.config)
  apply = functools.partial(decoder.apply, {"params": vlm.params})
  iv = ng.Interventions(knockouts=(ko,))
  last, (k, v) = jax.jit(functools.partial(apply, method=Decoder.prefill))(
      batch.input_ids, batch.positions, batch.attention_mask, iv)
  widen = ((0, 0), (0, 0), (0, 0), (0, NEW), (0, 0))  # [L, B, K, S, H]
  cache = (np.pad(k, widen), np.pad(v, widen))
  key_real = np.asarray(full.attention_mask)
  step = jax.jit(functools.partial(apply, method=Decoder.decode))
  decode_iv = iv.for_generated_query(t + NEW)
  ours = [last]
  for i in range(1, NEW):
    slot = t + i - 1
    logits, (k_new, v_new) = step(tokens[:, i - 1], full.positions[:, slot], slot, key_real,
                                  cache, decode_iv)
    cache = tuple(np.asarray(c).copy() for c in cache)
    cache[0][:, :, :, slot:slot + 1], cache[1][:, :, :, slot:slot + 1] = k_new, v_new
    ours.append(logits)
  ours = np.stack([np.asarray(x) for x in ours], axis=1)  # [B, NEW, V]
  theirs = expected[:, t - 1:t + NEW - 1]
  assert R.relative_error(ours, theirs) < 1e-5


def test_sliding_window_equals_transformers(mistral):
  assert set(mistral.vlm.config.layer_windows) == {5}
  out = mistral.vlm.generate(mistral.batch, max_new_tokens=NEW, eos_id=EOS)
  np.testing.assert_array_equal(out.tokens, hf_generate(mistral.hf, mistral.batch))


def _word_tokenizer(vocab_size: int):
  import tokenizers

  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>")


def test_eos_stops_an_example_early(llama):
  """eos = a token example 0 generates early (its first occurrence, at step >= 2) and example 1
  never does: example 0 is padded after it, example 1 runs on, as transformers does. The default
  eos comes from `vlm.eos_id` (then the tokenizer); texts stop before the eos."""
  vlm, batch = llama.vlm, llama.batch
  free = vlm.generate(batch, max_new_tokens=NEW, eos_id=None).tokens
  step = next(i for i in range(2, NEW - 2) if free[0, i] not in free[0, :i]
              and free[0, i] not in free[1] and free[0, i] != PAD)
  eos = int(free[0, step])
  out = vlm.generate(batch, max_new_tokens=NEW, eos_id=eos).tokens
  np.testing.assert_array_equal(out[0, :step + 1], free[0, :step + 1])
  assert (out[0, step + 1:] == PAD).all()
  np.testing.assert_array_equal(out[1], free[1])
  np.testing.assert_array_equal(out, hf_generate(llama.hf, batch, eos=eos))

  assert eos_id_from_checkpoint(llama.path) == EOS  # generation_config.json, copied by convert
  with_tokenizer = VLM(vlm.config, vlm.params, tokenizer=_word_tokenizer(97))
  with_tokenizer.eos_id = eos
  result = with_tokenizer.generate(batch, max_new_tokens=NEW)
  np.testing.assert_array_equal(result.tokens, out)
  special = (PAD, 1, EOS)  # dropped from texts
  assert result.texts[0] == " ".join(f"w{t}" for t in free[0, :step] if t not in special)
  assert result.texts[1] == " ".join(f"w{t}" for t in free[1] if t not in special)


def test_conditions_equal_separate_calls(llama):
  """stack_conditions: every condition's tokens in one call == one call per condition."""
  vlm, batch = llama.vlm, llama.batch
  conditions = [vlm.knockout(batch, keys=span(batch, 1, 4), mode="post_softmax"),
                vlm.knockout(batch, keys=span(batch, 2, 3), queries="last", mode="post_softmax")]
  stacked = vlm.generate(batch, max_new_tokens=NEW, eos_id=EOS,
                         interventions=ng.stack_conditions(conditions)).tokens
  assert stacked.shape == (2, 2, NEW)
  for c, ko in enumerate(conditions):
    np.testing.assert_array_equal(
        stacked[c], vlm.generate(batch, max_new_tokens=NEW, eos_id=EOS, interventions=ko).tokens)


def test_patch_acts_in_the_prefill(llama):
  """A patch at prompt positions changes the cached keys and values (so the tokens), exactly as
  the repeated forward with the same patch does."""
  vlm, batch = llama.vlm, llama.batch
  at = span(batch, 2, 4)
  vec = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32) * 5
  p = ng.steer(batch, at=at, vector=vec, layers=[1])
  ours = vlm.generate(batch, max_new_tokens=NEW, interventions=p, eos_id=None).tokens
  first = np.asarray(vlm.forward(batch, p).logits[:, -1]).argmax(-1)
  np.testing.assert_array_equal(ours[:, 0], first)
  assert (ours != vlm.generate(batch, max_new_tokens=NEW, eos_id=None).tokens).any()


def test_sharded_generate_equals_single_device(llama):
  """On a (data=2, model=4) mesh: the tokens of one device, under a knockout."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  vlm, batch = llama.vlm, llama.batch
  sharded = ng.load(llama.path, mesh=ng.make_mesh(data=2, model=4))
  ko = vlm.knockout(batch, keys=span(batch, 1, 4), mode="post_softmax")
  np.testing.assert_array_equal(
      sharded.generate(batch, max_new_tokens=NEW, interventions=ko, eos_id=EOS).tokens,
      vlm.generate(batch, max_new_tokens=NEW, interventions=ko, eos_id=EOS).tokens)
