"""What one image becomes in the token sequence of each native family (Chameleon, Emu3).

Chameleon: <racm3:break> [h*w VQ tokens] <eoss>           ("eoi" = <eoss>)
Emu3:      <|image start|> "h*w" <|image token|> [h rows of w VQ tokens, each followed by
           <|extra_200|>] <|extra_201|> <|image end|>     ("eoi" = both end tokens;
                                                           "image_break" = the row ends)
The special-token strings are read from the tokenizer where it names them, as the transformers
processors do, with these defaults otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from narrowgate_jax.processing.prompts import IMAGE_MARKER, ImageSpan
from narrowgate_jax.processing.roles import Role


@dataclasses.dataclass(frozen=True)
class ChameleonTokens:
  start: str = "<racm3:break>"
  end: str = "<eoss>"
  placeholder: str = IMAGE_MARKER

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "ChameleonTokens":
    d = cls()
    return cls(start=getattr(tokenizer, "boi_token", None) or d.start,
               end=getattr(tokenizer, "eoi_token", None) or d.end,
               placeholder=getattr(tokenizer, "image_token", None) or d.placeholder)

  def span(self, placeholder_id: int, image_ids: np.ndarray) -> ImageSpan:
    """image_ids: [h*w] the BPE ids of the image's codes, row-major."""
    n = image_ids.size
    return ImageSpan(text=self.start + self.placeholder * n + self.end,
                     placeholder_id=placeholder_id, ids=np.asarray(image_ids).reshape(-1),
                     roles=np.full(n, Role.IMAGE, np.int32))


@dataclasses.dataclass(frozen=True)
class Emu3Tokens:
  start: str = "<|image start|>"
  wrapper: str = "<|image token|>"
  end_of_frame: str = "<|extra_201|>"
  end: str = "<|image end|>"
  placeholder: str = IMAGE_MARKER

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "Emu3Tokens":
    d = cls()
    get = lambda name, default: getattr(tokenizer, name, None) or default  # noqa: E731
    return cls(start=get("boi_token", d.start), wrapper=get("image_wrapper_token", d.wrapper),
               end_of_frame=get("eof_token", d.end_of_frame), end=get("eoi_token", d.end),
               placeholder=get("image_token", d.placeholder))

  def span(self, placeholder_id: int, image_ids: np.ndarray, eol_id: int) -> ImageSpan:
    """image_ids: [h, w] the BPE ids of the image's codes; each row gets `eol_id` appended."""
    h, w = image_ids.shape
    rows = np.concatenate([image_ids, np.full((h, 1), eol_id, image_ids.dtype)], axis=1)
    roles = np.full((h, w + 1), Role.IMAGE, np.int32)
    roles[:, -1] = Role.IMAGE_BREAK
    text = (f"{self.start}{h}*{w}{self.wrapper}{self.placeholder * (h * (w + 1))}"
            f"{self.end_of_frame}{self.end}")
    return ImageSpan(text=text, placeholder_id=placeholder_id, ids=rows.reshape(-1),
                     roles=roles.reshape(-1))
