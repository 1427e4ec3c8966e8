"""Prompt building for the native families against transformers' processors, and roles."""

import numpy as np
import pytest
import transformers
from PIL import Image

import reference as R
from narrowgate_jax.models.native_spans import ChameleonTokens, Emu3Tokens
from narrowgate_jax.processing.batch import left_pad
from narrowgate_jax.processing.prompts import tokenize_prompt
from narrowgate_jax.processing.roles import Role, select

PROMPTS = ["<image>what is in the picture ? answer :", "a red cat <image> this animal is a"]
QUESTIONS = ["what is in the picture ?", "this animal is"]


def _images(sizes=((20, 30), (33, 17))):
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def chameleon():
  config = R.tiny_chameleon()
  tokenizer = R.chameleon_tokenizer(config)
  image_processor = transformers.ChameleonImageProcessorPil(
      size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
  return config, tokenizer, transformers.ChameleonProcessor(image_processor, tokenizer,
                                                            image_seq_length=4)


@pytest.fixture(scope="module")
def emu3():
  vmap = R.emu3_vocabulary_map(97, 16)
  tokenizer = R.word_tokenizer(vmap, R.EMU3_SPECIALS, extra_special_tokens={
      "image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
      "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
  image_processor = transformers.Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=32 * 32)
  return vmap, tokenizer, transformers.Emu3Processor(image_processor, tokenizer)


def test_chameleon_ids_equal_the_processor(chameleon):
  """With the placeholders left in, our ids are the processor's (text-completion mode)."""
  config, tokenizer, processor = chameleon
  tokens = ChameleonTokens.from_tokenizer(tokenizer)
  placeholder = tokenizer.convert_tokens_to_ids("<image>")
  for prompt, image in zip(PROMPTS, _images()):
    theirs = processor(images=[image], text=[prompt], return_for_text_completion=True,
                       return_tensors="np")["input_ids"][0]
    out = tokenize_prompt(tokenizer, prompt, [tokens.span(placeholder, np.full(4, placeholder))])
    ids, roles = out.ids, out.roles
    np.testing.assert_array_equal(ids, theirs)
    eoi = tokenizer.convert_tokens_to_ids("<eoss>")
    assert [Role(r) for r in roles[ids == eoi]] == [Role.IMAGE_END]
    assert roles[0] == Role.BOS and (roles == Role.IMAGE).sum() == 4


def test_emu3_ids_equal_the_processor(emu3):
  vmap, tokenizer, processor = emu3
  tokens = Emu3Tokens.from_tokenizer(tokenizer)
  placeholder = tokenizer.image_token_id  # row ends too: the processor has placeholders there
  for prompt, image in zip(PROMPTS, _images()):
    out = processor(images=[image], text=[prompt], return_tensors="np")
    h, w = (np.asarray(out["image_sizes"][0]) // 8).tolist()
    tokenized = tokenize_prompt(
        tokenizer, prompt, [tokens.span(placeholder, np.full((h, w), placeholder), placeholder)],
        prefix=tokenizer.bos_token)
    ids, roles = tokenized.ids, tokenized.roles
    np.testing.assert_array_equal(ids, out["input_ids"][0])
    assert (roles == Role.IMAGE).sum() == h * w and (roles == Role.IMAGE_BREAK).sum() == h


def test_roles_and_selectors_in_a_batch(emu3):
  """eoi = the two end tokens; image = the h x w codes; image_break = the row ends; question."""
  vmap, tokenizer, _ = emu3
  tokens = Emu3Tokens.from_tokenizer(tokenizer)
  codes = [np.arange(6).reshape(2, 3) + vmap["<|visual token 000000|>"],
           np.arange(4).reshape(1, 4) + vmap["<|visual token 000000|>"]]
  seqs = [tokenize_prompt(tokenizer, p, [tokens.span(tokenizer.image_token_id, c, vmap["<|extra_200|>"])],
                          prefix=tokenizer.bos_token, question=q, index=i)
          for i, (p, q, c) in enumerate(zip(PROMPTS, QUESTIONS, codes))]
  batch = left_pad([s.ids for s in seqs], [s.roles for s in seqs], pad_id=0)
  ids = np.asarray(batch.input_ids)
  for b, c in enumerate(codes):
    eoi = np.flatnonzero(select("eoi", batch.roles)[b])
    assert ids[b, eoi].tolist() == [vmap["<|extra_201|>"], vmap["<|image end|>"]]
    assert eoi[0] == np.flatnonzero(select("image_break", batch.roles)[b])[-1] + 1
    assert select("image", batch.roles)[b].sum() == c.size
    np.testing.assert_array_equal(ids[b, select("image", batch.roles)[b]], c.reshape(-1))
    question = tokenizer.decode(ids[b, select("question", batch.roles)[b]])
    assert question.replace(" ", "") == QUESTIONS[b].replace(" ", "")
  start = select("image_start", batch.roles)
  assert tokenizer.decode(ids[0, start[0]]).replace(" ", "") == "<|imagestart|>2*3<|imagetoken|>"


def test_marker_and_image_counts_must_agree(emu3):
  _, tokenizer, _ = emu3
  with pytest.raises(ValueError, match=r"prompt 2 has 0 <image> marker\(s\) but 1 image"):
    tokenize_prompt(tokenizer, "no marker here", [Emu3Tokens().span(4, np.zeros((1, 1), int), 8)],
                    index=2)
  with pytest.raises(ValueError, match=r"prompt 0 has 1 <image> marker\(s\) but 0 image"):
    tokenize_prompt(tokenizer, "<image> a cat", [])
  with pytest.raises(ValueError, match="question 'a dog' does not occur"):
    tokenize_prompt(tokenizer, "a cat", [], question="a dog")
