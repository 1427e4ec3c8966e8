"""Prompts with images -> token ids and roles, for families that read images as tokens.

A family says what one image becomes in the text (`ImageSpan.text`: its start tokens,
`placeholder` tokens, its end tokens) and which ids (native families) or input embeddings
(non-native ones) replace the placeholders. The expanded text is tokenized by the checkpoint's own
tokenizer, exactly as the transformers processor does, so the ids match it by construction. Roles
come from where each token falls:

  before the image span / after it   BOS, or TEXT (the user's question) / TEMPLATE (the rest)
  span tokens before the first placeholder   IMAGE_START (Emu3: also its "h*w" size text)
  the placeholders                   the image's own roles (IMAGE; Emu3's row ends and LLaVA-NeXT's
                                     newlines IMAGE_BREAK)
  span tokens between placeholders   IMAGE_BREAK (Pixtral's [IMG_BREAK])
  span tokens after the last placeholder     IMAGE_END (the gate: Chameleon's <eoss>, Emu3's two,
                                     Pixtral's [IMG_END], Janus's <end_of_image>)
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
    features: [n, D] input embeddings of the placeholders (non-native families), or None.
    coords: [n, 3] (view, row, col) of each placeholder's patch, -1 where it has none, or None.
  """

  text: str
  placeholder_id: int
  ids: np.ndarray
  roles: np.ndarray
  features: Optional[np.ndarray] = None
  coords: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """One tokenized prompt.

  Attributes:
    ids: [T] token ids. roles: [T] `Role` values.
    features: [T, D] input embeddings where `feature_mask` is True (zeros elsewhere), or None
      when no image of the prompt brings embeddings.
    feature_mask: [T] bool, or None.
    coords: [T, 4] (image index in the prompt, view, row, col), -1 elsewhere, or None.
  """

  ids: np.ndarray
  roles: np.ndarray
  features: Optional[np.ndarray] = None
  feature_mask: Optional[np.ndarray] = None
  coords: Optional[np.ndarray] = None


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
                    add_special_tokens: bool = True,
                    wrappers: tuple[Optional[int], Optional[int]] = (None, None)) -> PromptTokens:
  """A prompt with `len(spans)` "<image>" markers -> its `PromptTokens`.

  prefix / suffix: text the family's processor puts around every prompt (Emu3's BOS).
  question: the user's part of the prompt; its tokens get Role.TEXT and the other text tokens
    Role.TEMPLATE. Without it every text token is Role.TEXT.
  wrappers: token ids that, right before / right after an image span, belong to it as its
    IMAGE_START / IMAGE_END (OneVision's <|im_start|> <image> <|im_end|>, as the Narrow Gate study
    wraps the image).
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

  with_features = any(span.features is not None for span in spans)
  width = next((span.features.shape[-1] for span in spans if span.features is not None), 0)
  features = np.zeros((ids.size, width), np.float32) if with_features else None
  feature_mask = np.zeros(ids.shape, bool) if with_features else None
  coords = (np.full((ids.size, 4), -1, np.int32)
            if any(span.coords is not None for span in spans) else None)
  for image, (span, (lo, hi)) in enumerate(zip(spans, ranges)):
    inside = np.flatnonzero((starts >= lo) & (starts < hi))
    is_slot = ids[inside] == span.placeholder_id
    slots = inside[is_slot]
    if slots.size != span.ids.size:
      raise ValueError(f"prompt {index}: the image span tokenized into {slots.size} placeholders, "
                       f"expected {span.ids.size}")
    roles[inside[inside < slots[0]]] = Role.IMAGE_START
    roles[inside[inside > slots[-1]]] = Role.IMAGE_END
    roles[inside[~is_slot & (inside > slots[0]) & (inside < slots[-1])]] = Role.IMAGE_BREAK
    _claim_wrappers(ids, roles, inside[0], inside[-1], wrappers)
    ids[slots] = span.ids
    roles[slots] = span.roles
    if span.features is not None:
      features[slots] = span.features
      feature_mask[slots] = True
    if span.coords is not None:
      coords[slots, 0] = np.where(span.coords[:, 0] >= 0, image, -1)
      coords[slots, 1:] = span.coords
  return PromptTokens(ids, roles, features, feature_mask, coords)


def _claim_wrappers(ids, roles, first: int, last: int, wrappers) -> None:
  """Template tokens `wrappers` right around a span [first, last] join it as its boundaries."""
  before, after = wrappers
  if before is not None and first > 0 and ids[first - 1] == before:
    roles[first - 1] = Role.IMAGE_START
  if after is not None and last + 1 < ids.size and ids[last + 1] == after:
    roles[last + 1] = Role.IMAGE_END


def apply_chat_template(tokenizer, template: str, prompt: str, image_text: str) -> str:
  """A prompt with "<image>" markers -> the same prompt in the checkpoint's chat template, as one
  user turn followed by the assistant's generation prompt.

  The template sees the images as {"type": "image"} content items, as the processor's
  `apply_chat_template` passes them, and writes `image_text` for each (LLaVA "<image>", Pixtral
  "[IMG]", Janus "<image_placeholder>"); those become "<image>" markers again.
  """
  content = []
  for i, piece in enumerate(prompt.split(IMAGE_MARKER)):
    if i:
      content.append({"type": "image"})
    if piece:
      content.append({"type": "text", "text": piece})
  text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                       chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
  templated = text.replace(image_text, IMAGE_MARKER)
  if count_markers(templated) != count_markers(prompt):
    raise ValueError(f"the chat template wrote {count_markers(templated)} image(s) for a prompt "
                     f"with {count_markers(prompt)}: {text!r}")
  return templated


def continuation_token(tokenizer, text: str) -> int:
  """The first token of `text` as the model would continue a prompt with it (a leading space,
  as after "Answer:", "ASSISTANT:" or "This animal is a"): the token whose probability the
  studies read at the last prompt position."""
  ids = tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
  if not ids:
    raise ValueError(f"{text!r} tokenizes to nothing")
  return int(ids[0])
