"""Prompts with images -> token ids and roles, for families that read images as tokens.

A family says what one image becomes in the text (`ImageSpan.text`: its start tokens,
`placeholder` tokens, its end tokens) and which ids replace the placeholders. The expanded text is
tokenized by the checkpoint's own tokenizer, exactly as the transformers processor does, so the
ids match it by construction. Roles come from where each token falls:

  before the image span / after it   BOS, or TEXT (the user's question) / TEMPLATE (the rest)
  span tokens before the first placeholder   IMAGE_START (Emu3: also its "h*w" size text)
  the placeholders                   the image's own roles (IMAGE; Emu3's row ends IMAGE_BREAK)
  span tokens after the last placeholder     IMAGE_END (the gate: Chameleon's <eoss>, Emu3's two)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from narrowgate_jax.processing.roles import Role

IMAGE_MARKER = "<image>"


@dataclasses.dataclass(frozen=True)
class ImageSpan:
  """One image as the sequence sees it.

  Attributes:
    text: what the prompt's "<image>" becomes before tokenizing (placeholders included).
    placeholder_id: the id of the placeholder token in that text.
    ids: [n] the token ids that replace the n placeholders, in order.
    roles: [n] their roles.
  """

  text: str
  placeholder_id: int
  ids: np.ndarray
  roles: np.ndarray


def count_markers(prompt: str) -> int:
  return prompt.count(IMAGE_MARKER)


def _expand(prompt: str, spans: Sequence[ImageSpan], prefix: str, suffix: str):
  """The expanded text, the char range of each image span, and a map of prompt offsets."""
  pieces = prompt.split(IMAGE_MARKER)
  text, ranges, shifts = prefix, [], []
  for i, piece in enumerate(pieces):
    shifts.append((len(text), sum(len(p) + len(IMAGE_MARKER) for p in pieces[:i])))
    text += piece
    if i < len(spans):
      ranges.append((len(text), len(text) + len(spans[i].text)))
      text += spans[i].text
  return text + suffix, ranges, shifts


def _question_range(prompt: str, question: Optional[str], shifts, index: int):
  """The char range of `question` in the expanded text (it must sit inside one text piece)."""
  if question is None:
    return None
  where = prompt.find(question)
  if not question or where < 0:
    raise ValueError(f"prompt {index}: its question {question!r} does not occur in the prompt")
  for expanded_start, prompt_start in reversed(shifts):
    if where >= prompt_start:
      return expanded_start + where - prompt_start, expanded_start + where - prompt_start + len(
          question)
  raise AssertionError("unreachable: shifts start at offset 0")


def tokenize_prompt(tokenizer, prompt: str, spans: Sequence[ImageSpan], *, index: int = 0,
                    prefix: str = "", suffix: str = "", question: Optional[str] = None,
                    add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A prompt with `len(spans)` "<image>" markers -> (token ids [T], roles [T]).

  prefix / suffix: text the family's processor puts around every prompt (Emu3's BOS).
  question: the user's part of the prompt; its tokens get Role.TEXT and the other text tokens
    Role.TEMPLATE. Without it every text token is Role.TEXT.
  """
  markers = count_markers(prompt)
  if markers != len(spans):
    raise ValueError(f"prompt {index} has {markers} {IMAGE_MARKER} marker(s) but "
                     f"{len(spans)} image(s) were given for it")
  text, ranges, shifts = _expand(prompt, spans, prefix, suffix)
  asked = _question_range(prompt, question, shifts, index)
  enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int64)
  offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
  # Tokens the tokenizer adds itself (BOS) cover no text: offset (0, 0). Keep them out of spans.
  starts = np.where(offsets[:, 1] > offsets[:, 0], offsets[:, 0], -1)

  roles = np.full(ids.shape, Role.TEXT if asked is None else Role.TEMPLATE, np.int32)
  if asked is not None:
    roles[(starts >= asked[0]) & (starts < asked[1])] = Role.TEXT
  bos = getattr(tokenizer, "bos_token_id", None)
  if ids.size and ids[0] == bos:
    roles[0] = Role.BOS

  for span, (lo, hi) in zip(spans, ranges):
    inside = np.flatnonzero((starts >= lo) & (starts < hi))
    slots = inside[ids[inside] == span.placeholder_id]
    if slots.size != span.ids.size:
      raise ValueError(f"prompt {index}: the image span tokenized into {slots.size} placeholders, "
                       f"expected {span.ids.size}")
    roles[inside[inside < slots[0]]] = Role.IMAGE_START
    roles[inside[inside > slots[-1]]] = Role.IMAGE_END
    ids[slots] = span.ids
    roles[slots] = span.roles
  return ids, roles
