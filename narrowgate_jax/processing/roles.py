"""What each token is (`Role`), and the named token selectors built on roles.

Experiments pick token sets by name ("eoi", "image", "question", "last", ...), never by counted
offsets: every prepared batch carries `roles` [B, T] produced by the family's prompt builder.
"""

from __future__ import annotations

import enum
from typing import Sequence, Union

import numpy as np


class Role(enum.IntEnum):
  PAD = 0
  BOS = 1
  TEXT = 2  # the user's own text (a question, a caption prompt)
  TEMPLATE = 3  # chat-template and instruction tokens around the user's text
  IMAGE_START = 4
  IMAGE = 5  # image content: VQ codes or patch features
  IMAGE_BREAK = 6  # row breaks / newline tokens inside the image span
  IMAGE_END = 7  # the end-of-image token(s): the "gate"
  GENERATED = 8


_IMAGE_SPAN = (Role.IMAGE_START, Role.IMAGE, Role.IMAGE_BREAK, Role.IMAGE_END)

Selector = Union[str, Sequence[str], np.ndarray]
SELECTOR_NAMES = ("all", "text", "image", "image_start", "image_break", "eoi", "last_image",
                  "text_after_image", "question", "last")


def _last_true(mask: np.ndarray) -> np.ndarray:
  """[B, T] bool -> [B, T] bool with only the last True of each row kept."""
  out = np.zeros_like(mask)
  rows = np.flatnonzero(mask.any(axis=1))
  last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)
  out[rows, last] = True
  return out


def _named_mask(name: str, roles: np.ndarray) -> np.ndarray:
  real = roles != Role.PAD
  in_image_span = np.isin(roles, _IMAGE_SPAN)
  if name == "all":
    return real
  if name == "text":
    return real & ~in_image_span
  if name == "image":
    return roles == Role.IMAGE
  if name == "image_start":
    return roles == Role.IMAGE_START
  if name == "image_break":
    return roles == Role.IMAGE_BREAK
  if name == "eoi":
    return roles == Role.IMAGE_END
  if name == "last_image":
    return _last_true(roles == Role.IMAGE)
  if name == "text_after_image":
    after_span = np.cumsum(_last_true(in_image_span)[:, ::-1], axis=1)[:, ::-1] == 0
    return real & ~in_image_span & after_span & in_image_span.any(axis=1, keepdims=True)
  if name == "question":
    return roles == Role.TEXT
  if name == "last":
    return _last_true(real & (roles != Role.GENERATED))
  raise ValueError(f"unknown token selector {name!r}; known: {', '.join(SELECTOR_NAMES)}")


def select(selector: Selector, roles, *, what: str = "selector",
           allow_empty: bool = False) -> np.ndarray:
  """Resolves a selector against roles [B, T] to a boolean mask [B, T].

  A selector is a name from SELECTOR_NAMES, a list of names (their union), or a boolean array
  [B, T]. A selector that matches nothing in some example raises, naming the example, unless
  `allow_empty` (training batches that mix sequences with and without the selected tokens).
  """
  roles = np.asarray(roles)
  if isinstance(selector, str):
    mask = _named_mask(selector, roles)
  elif isinstance(selector, (list, tuple)) and all(isinstance(s, str) for s in selector):
    if not selector:
      raise ValueError(f"{what}: an empty list of selector names selects nothing")
    mask = np.logical_or.reduce([_named_mask(s, roles) for s in selector])
  else:
    mask = np.asarray(selector)
    if mask.dtype != bool or mask.shape != roles.shape:
      raise ValueError(
          f"{what}: an explicit selector must be a boolean array of shape {roles.shape}, "
          f"got {mask.dtype} {mask.shape}")
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size and not allow_empty:
    raise ValueError(f"{what} {_describe(selector)} matches no token in example(s) "
                     f"{empty.tolist()}")
  return mask


def _describe(selector: Selector) -> str:
  return repr(selector) if isinstance(selector, (str, list, tuple)) else "(boolean array)"


def positions_of(mask: np.ndarray, *, fill: int) -> np.ndarray:
  """[B, T] bool -> [B, P] int32 indices of the True entries, rows padded with `fill`.

  P is the largest count over the batch; `fill` (usually T) is out of range, so scatters with
  mode="drop" and gathers with mode="fill" ignore the padding.
  """
  counts = mask.sum(axis=1)
  width = max(int(counts.max()), 1)
  out = np.full((mask.shape[0], width), fill, dtype=np.int32)
  for b, row in enumerate(mask):
    idx = np.flatnonzero(row)
    out[b, :idx.size] = idx
  return out
