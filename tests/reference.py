"""Tiny transformers models built in code, saved, converted and loaded: the parity reference.

Nothing is downloaded. Each `tiny_*` returns a transformers config small enough to compile in
seconds; `build` instantiates it in float32 with random weights (seeded) and writes it with
`save_pretrained`, as a user's checkpoint would be.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

import narrowgate_jax as ng
from checkpoints_convert.convert import convert

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def tiny_llama(**kw):
  return transformers.LlamaConfig(**{**COMMON, **kw})


def tiny_llama3(**kw):
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  return transformers.LlamaConfig(**{**COMMON, "rope_parameters": rope, **kw})


def tiny_mistral(**kw):
  return transformers.MistralConfig(**{**COMMON, "sliding_window": 5, "head_dim": 24, **kw})


def tiny_qwen2(**kw):
  return transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True, **kw})


WORDS = tuple(("what is in the picture answer a an cat dog red blue green shape colour this animal "
         "provide one sentence caption for provided image question using single word or phrase "
         ": . ? 0 1 2 3 4 5 6 7 8 9 *").split())
CHAMELEON_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<racm3:break>", "<eoss>",
                      "<reserved08706>")
EMU3_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image start|>", "<|image end|>",
                 "<|image token|>", "<|extra_200|>", "<|extra_201|>")


def _vocabulary_map(vocab_size: int, image_tokens: int = 8) -> dict:
  """A Chameleon vocabulary: special tokens, words, then IMGIMG* names for the image codes (the
  code's decimal digits spelled with letters A-J, as Chameleon names them) at the end."""
  letters = "ABCDEFGHIJ"
  vmap = {t: i for i, t in enumerate(CHAMELEON_SPECIALS + WORDS)}
  assert len(vmap) <= vocab_size - image_tokens
  for code in range(image_tokens):
    name = "IMGIMG" + "".join(letters[int(d)] for d in str(code)) + "Z"
    vmap[name] = vocab_size - image_tokens + code
  return vmap


def emu3_vocabulary_map(vocab_size: int, image_tokens: int) -> dict:
  """An Emu3 vocabulary: special tokens, words, then `<|visual token NNNNNN|>` for every code."""
  vmap = {t: i for i, t in enumerate(EMU3_SPECIALS + WORDS)}
  assert len(vmap) <= vocab_size - image_tokens
  for code in range(image_tokens):
    vmap[f"<|visual token {code:06d}|>"] = vocab_size - image_tokens + code
  return vmap


def word_tokenizer(vocabulary_map: dict, specials, add_bos: bool = False, **special_tokens):
  """A transformers fast tokenizer over `vocabulary_map`: whitespace words, single digits, and
  every name in `specials` (and the image-code names) as special tokens; `add_bos` prepends <s>
  when special tokens are added (as Chameleon's tokenizer does; Emu3's GPT-style one does not)."""
  import tokenizers

  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(dict(vocabulary_map), unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Whitespace(),
      tokenizers.pre_tokenizers.Digits(individual_digits=True)])
  tok.add_special_tokens([t for t in vocabulary_map if t in specials or t.startswith(("IMGIMG", "<|"))])
  if add_bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocabulary_map["<s>"])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", **special_tokens)


def chameleon_tokenizer(config):
  return word_tokenizer(config.vocabulary_map, CHAMELEON_SPECIALS, add_bos=True,
                        sep_token="<reserved08706>")


def emu3_tokenizer(config):
  extra = {"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
           "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}
  return word_tokenizer(config.vocabulary_map, EMU3_SPECIALS, extra_special_tokens=extra)


def tiny_chameleon(swin_norm: bool = False, **kw):
  kw = {**COMMON, "swin_norm": swin_norm, **kw}
  kw.setdefault("vocabulary_map", _vocabulary_map(kw["vocab_size"]))
  kw.setdefault("vq_config", {"embed_dim": 8, "num_embeddings": 8, "base_channels": 32,
                              "channel_multiplier": [1, 1], "latent_channels": 8, "resolution": 32,
                              "num_res_blocks": 1, "attn_resolutions": []})
  return transformers.ChameleonConfig(**kw)


def tiny_emu3_text(**kw):
  return transformers.Emu3TextConfig(**{**COMMON, **kw})


_MODEL_CLASSES = {
    transformers.ChameleonConfig: transformers.ChameleonForConditionalGeneration,
    transformers.Emu3TextConfig: transformers.Emu3ForCausalLM,
    transformers.Emu3Config: transformers.Emu3ForConditionalGeneration,
    transformers.JanusConfig: transformers.JanusForConditionalGeneration,
    transformers.LlavaConfig: transformers.LlavaForConditionalGeneration,
    transformers.LlavaNextConfig: transformers.LlavaNextForConditionalGeneration,
    transformers.LlavaOnevisionConfig: transformers.LlavaOnevisionForConditionalGeneration,
}


def tiny_janus(**kw):
  """Janus with a tiny Llama LM; the vision and VQ parts are minimal (the LM is what is tested)."""
  vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=8, projection_dim=64)
  vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1],
            latent_channels=8, resolution=32, num_res_blocks=1, attn_resolutions=[],
            projection_dim=64, image_token_embed_dim=64, num_patches=4)
  return transformers.JanusConfig(text_config=transformers.LlamaConfig(**{**COMMON, **kw}),
                                  vision_config=vision, vq_config=vq)


def decoder_layers(model):
  """The transformers model's list of decoder layers, wherever its family keeps the LM."""
  inner = model.model
  for name in ("language_model", "text_model"):  # LLaVA-style and Janus / Emu3
    if hasattr(inner, name):
      return getattr(inner, name).layers
  return inner.layers


def build(config, directory, seed: int = 0):
  """Random float32 model for `config`, saved to `directory` with save_pretrained."""
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = _MODEL_CLASSES.get(type(config), transformers.AutoModelForCausalLM.from_config)(config)
  model = model.float().eval()
  _randomise_norms(model, seed)
  model.save_pretrained(directory)
  return model


def _randomise_norms(model, seed: int) -> None:
  """Norm weights start at exactly 1 (and biases at 0), which would hide a scale/bias mix-up."""
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


def convert_and_load(hf_dir, out_dir, **load_kw) -> ng.VLM:
  convert(str(hf_dir), str(out_dir), progress=False)
  return ng.load(str(out_dir), **load_kw)


def two_prompts(vocab_size: int, lengths=(9, 6), seed: int = 0, bos: int = 1):
  """Two token sequences of different lengths (ids avoid 0, the pad id)."""
  rng = np.random.default_rng(seed)
  return [[bos] + rng.integers(4, vocab_size - 10, size=n - 1).tolist() for n in lengths]


def torch_inputs(batch: ng.Batch):
  ids = torch.as_tensor(np.asarray(batch.input_ids), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)
  pos = torch.as_tensor(np.asarray(batch.positions), dtype=torch.long)
  return ids, mask, pos


def relative_error(ours, theirs, mask=None) -> float:
  """max |ours - theirs| / max |theirs| over the entries `mask` keeps (the norm the tests use)."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  if mask is not None:
    ours, theirs = ours[mask], theirs[mask]
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))
