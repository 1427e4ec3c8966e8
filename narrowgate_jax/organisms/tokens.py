"""Word-level tokenizers in the transformers format, built in code, for models made from a seed.

A model organism's vocabulary is its special tokens, the words of its synthetic world and (native
models) one token per image code. The tokenizer splits on whitespace and punctuation and knows
every special token as a whole, so what it produces is what a checkpoint's own tokenizer would.
"""

from __future__ import annotations

from typing import Mapping, Sequence

CHAMELEON_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<racm3:break>", "<eoss>",
                      "<reserved08706>")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_CODE_LETTERS = "ABCDEFGHIJ"


def chameleon_code_name(code: int) -> str:
  """Chameleon's name for image code `code`: its decimal digits spelled A-J, "IMGIMG...Z"."""
  return "IMGIMG" + "".join(_CODE_LETTERS[int(d)] for d in str(code)) + "Z"


def vocabulary(specials: Sequence[str], words: Sequence[str],
               image_codes: int = 0) -> dict[str, int]:
  """{token: id}: the specials, then the words, then (native models) the image codes' names."""
  tokens = list(dict.fromkeys([*specials, *words]))
  vocab = {t: i for i, t in enumerate(tokens)}
  for code in range(image_codes):
    vocab[chameleon_code_name(code)] = len(vocab)
  return vocab


def word_tokenizer(vocab: Mapping[str, int], specials: Sequence[str], add_bos: bool = True,
                   **special_tokens):
  """A `PreTrainedTokenizerFast` over `vocab`: whitespace/punctuation words; `specials` and the
  image-code names are special tokens; `add_bos` prepends <s> (as Llama's and Chameleon's do);
  batches pad on the left, as generation needs (and as `vlm.prepare` does).
  `special_tokens`: extra attributes (sep_token=..., image_token=...)."""
  import tokenizers
  import transformers

  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(dict(vocab), unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens([t for t in vocab if t in specials or t.startswith("IMGIMG")])
  if add_bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", padding_side="left", **special_tokens)
