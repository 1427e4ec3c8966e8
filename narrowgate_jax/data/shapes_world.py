"""Shapes world: a synthetic image-text world for training and studying tiny vision-language models.

A scene is one shape on a plain grey background, described by four attributes:

  shape     circle, square, triangle, cross
  colour    red, green, blue, yellow         (the RGB values of `data.synthetic`)
  position  top, left, centre, right, bottom
  size      small, big

Positions: the image is split into a 3x3 grid of equal cells. A shape sits in the middle cell of
an edge (top, left, right, bottom) or in the centre cell. The four corner cells are left out on
purpose: their names need two words ("top left"), and every answer of this world is one word, so
that a model's answer is one next-token prediction and a probe's class is one token.

Geometry (image side S >= 16, everything in pixels): a shape fills a square box of odd side
2h + 1, with h = round(0.2 S) for big and round(0.1 S) for small (at least 3 and 2), so the box has
a centre pixel and the drawing is symmetric about it. The box is centred on the centre pixel of
its cell, moved inwards just enough to lie fully inside the image; the shape's pixel centroid stays
in its cell. PIL draws without anti-aliasing, so every pixel is exactly the shape's colour or the
background's, and a pixel's colour tells whether it belongs to the shape.

Text: captions ("a big red circle on the left"), questions with one-word answers (several
phrasings per attribute), and prompts for three tasks (`examples`):

  vqa       "<image>" + question             answer: the attribute's value
  caption   "<image>a picture of"            answer: the caption
  classify  "<image>this shape is a" (...)   answer: the class word, label: its index

Every word of all of these is in `WORDS`. Everything is deterministic from a seed: the same seed
gives the same scenes for every task (so vqa, caption and classify sets of one seed show the same
images), and `write_world` writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from narrowgate_jax.data.examples import Example
from narrowgate_jax.data.jsonl import EXAMPLES_FILE, write_jsonl
from narrowgate_jax.data.synthetic import COLOURS as COLOUR_RGB
from narrowgate_jax.data.synthetic import draw_shape
from narrowgate_jax.processing.prompts import IMAGE_MARKER

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = tuple(COLOUR_RGB)  # ("red", "green", "blue", "yellow")
POSITIONS = ("top", "left", "centre", "right", "bottom")
SIZES = ("small", "big")
ATTRIBUTES = ("shape", "colour", "position", "size")
VALUES: Mapping[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS,
                                         "position": POSITIONS, "size": SIZES}
# (row, column) of each position's cell in the 3x3 grid.
POSITION_CELLS = {"top": (0, 1), "left": (1, 0), "centre": (1, 1), "right": (1, 2),
                  "bottom": (2, 1)}
# Captions read naturally with a preposition per position.
_PREPOSITIONS = {"top": "at", "bottom": "at", "left": "on", "right": "on", "centre": "in"}

# Neutral greys only, so no background can be read as one of the colour answers.
BACKGROUND = (128, 128, 128)
BACKGROUNDS = ((128, 128, 128), (96, 96, 96), (160, 160, 160))
MIN_IMAGE_SIZE = 16
TASKS = ("vqa", "caption", "classify")
VQA_ANNOTATORS = 10  # answers per VQA question, as VQAv2 has

# Several phrasings per attribute; the answer to each is the attribute's value (one word).
QUESTIONS: Mapping[str, tuple[str, ...]] = {
    "colour": ("what colour is the shape ?", "what is the colour of the shape ?",
               "which colour does the shape have ?"),
    "shape": ("what shape is in the picture ?", "what is the shape ?",
              "which shape is in the picture ?"),
    "position": ("where is the shape ?", "where in the picture is the shape ?",
                 "in which part of the picture is the shape ?"),
    "size": ("what size is the shape ?", "how big is the shape ?",
             "is the shape big or small ?"),
}
VQA_TEMPLATE = IMAGE_MARKER + "{question}"
CAPTION_PROMPT = IMAGE_MARKER + "a picture of"
# Each prompt is completed by the class word (the attribute's value).
CLASSIFY_PROMPTS: Mapping[str, str] = {
    "shape": IMAGE_MARKER + "this shape is a",
    "colour": IMAGE_MARKER + "the colour of this shape is",
    "position": IMAGE_MARKER + "this shape is at the",
    "size": IMAGE_MARKER + "this shape is",
}


def _check_value(field: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {field} {value!r}; expected one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class Scene:
  """One shape on a plain background; every field is one of its tuple's values (`VALUES`)."""

  shape: str
  colour: str
  position: str
  size: str

  def __post_init__(self):
    for attribute in ATTRIBUTES:
      _check_value(attribute, getattr(self, attribute), VALUES[attribute])

  def attributes(self) -> dict[str, str]:
    """{"shape": ..., "colour": ..., "position": ..., "size": ...}."""
    return {a: getattr(self, a) for a in ATTRIBUTES}


# Every scene of the world, in attribute order; [len(ALL_SCENES), 4] value indices beside it.
ALL_SCENES = tuple(Scene(*values) for values in itertools.product(*VALUES.values()))
_CODES = np.array([[VALUES[a].index(getattr(s, a)) for a in ATTRIBUTES] for s in ALL_SCENES])


def _check_attribute(attribute: str) -> None:
  _check_value("attribute", attribute, ATTRIBUTES)


def _check_count(name: str, num: int, minimum: int) -> None:
  if not isinstance(num, (int, np.integer)) or isinstance(num, bool) or num < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {num!r}")


def _check_image_size(image_size: int) -> None:
  if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool):
    raise ValueError(f"image_size must be an int, got {image_size!r}")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size {image_size} is too small; it must be >= {MIN_IMAGE_SIZE}")


def _check_background(background) -> tuple[int, int, int]:
  """`background` as an (r, g, b) tuple of ints, checked to be a neutral grey."""
  try:
    rgb = tuple(int(v) for v in background)
  except (TypeError, ValueError):
    rgb = ()
  if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb) or rgb != tuple(background):
    raise ValueError(f"background must be 3 ints in [0, 255] (r, g, b), got {background!r}")
  # A coloured background could be mistaken for (or equal) a shape colour.
  if not rgb[0] == rgb[1] == rgb[2]:
    raise ValueError(f"background {rgb} is not a neutral grey (r == g == b)")
  return rgb


def _balanced_cycle(rng: np.random.Generator) -> np.ndarray:
  """One random order of `ALL_SCENES` [len(ALL_SCENES)] (indices) whose every prefix is balanced.

  Greedy: each step takes, uniformly at random, one of the unused scenes whose attribute values
  have been used least so far in this cycle. The random choice among ties keeps attributes from
  being confounded with each other in any prefix; the greedy rule keeps every attribute's value
  counts close to equal in every prefix (a plain shuffle only does so on average).
  """
  counts = np.zeros((len(ATTRIBUTES), max(len(v) for v in VALUES.values())), np.int64)
  unused = np.arange(len(ALL_SCENES))
  order = []
  columns = np.arange(len(ATTRIBUTES))
  while unused.size:
    codes = _CODES[unused]
    scores = counts[columns, codes].sum(axis=1)
    ties = np.flatnonzero(scores == scores.min())
    pick = int(ties[rng.integers(ties.size)])
    counts[columns, codes[pick]] += 1
    order.append(int(unused[pick]))
    unused = np.delete(unused, pick)
  return np.array(order)


def sample_scenes(num: int, seed: int, balanced: bool = True) -> list[Scene]:
  """`num` scenes, deterministic from `seed`.

  balanced: go through the full product of attribute values (`ALL_SCENES`, 160 scenes) again and
    again, each pass in a new seeded random order, so every scene occurs equally often over whole
    passes and every attribute value (near-)equally often in any prefix; else draw each attribute
    independently and uniformly.
  """
  _check_count("num", num, 0)
  rng = np.random.default_rng(seed)
  if not balanced:
    draws = [rng.integers(len(VALUES[a]), size=num) for a in ATTRIBUTES]
    return [Scene(*(VALUES[a][int(d[i])] for a, d in zip(ATTRIBUTES, draws))) for i in range(num)]
  order: list[int] = []
  while len(order) < num:
    order.extend(_balanced_cycle(rng).tolist())
  return [ALL_SCENES[i] for i in order[:num]]


def _half_side(size: str, image_size: int) -> int:
  """h: the shape's box has side 2h + 1 pixels (odd, so it has a centre pixel)."""
  if size == "big":
    return max(3, int(0.2 * image_size + 0.5))
  return max(2, int(0.1 * image_size + 0.5))


def shape_box(scene: Scene, image_size: int = 32) -> tuple[int, int, int, int]:
  """The scene's shape box (x0, y0, x1, y1) in pixels, x1/y1 exclusive, fully inside the image."""
  _check_image_size(image_size)
  h = _half_side(scene.size, image_size)
  row, col = POSITION_CELLS[scene.position]
  # The pixel nearest the cell's middle, moved inwards until the box fits in the image.
  cy, cx = ((2 * k + 1) * image_size // 6 for k in (row, col))
  cy, cx = (min(max(c, h), image_size - 1 - h) for c in (cy, cx))
  return (cx - h, cy - h, cx + h + 1, cy + h + 1)


def _draw(scene: Scene, image_size: int, background: tuple[int, int, int]) -> Image.Image:
  """The scene as a PIL RGB image [image_size, image_size] (background already checked)."""
  box = shape_box(scene, image_size)
  colour = COLOUR_RGB[scene.colour]
  if scene.shape != "cross":
    return draw_shape(image_size, image_size, scene.shape, colour, background, box)
  image = Image.new("RGB", (image_size, image_size), background)
  draw = ImageDraw.Draw(image)
  x0, y0, x1, y1 = box
  cx, cy = (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2
  # Bars about a third of the side thick (2 arm + 1: odd, so the cross is symmetric about the
  # centre pixel).
  arm = (x1 - x0) // 6
  draw.rectangle((x0, cy - arm, x1 - 1, cy + arm), fill=colour)
  draw.rectangle((cx - arm, y0, cx + arm, y1 - 1), fill=colour)
  return image


def render(scene: Scene, image_size: int = 32,
           background: Sequence[int] = BACKGROUND) -> np.ndarray:
  """The scene as a uint8 image [image_size, image_size, 3]; background is a grey (r, g, b)."""
  _check_image_size(image_size)
  return np.asarray(_draw(scene, image_size, _check_background(background)), dtype=np.uint8)


def render_batch(scenes: Iterable[Scene], image_size: int = 32,
                 background: Sequence[int] = BACKGROUND) -> np.ndarray:
  """The scenes as uint8 images [N, image_size, image_size, 3]."""
  _check_image_size(image_size)
  background = _check_background(background)
  images = [np.asarray(_draw(s, image_size, background), dtype=np.uint8) for s in scenes]
  if not images:
    return np.zeros((0, image_size, image_size, 3), np.uint8)
  return np.stack(images)


def caption(scene: Scene) -> str:
  """E.g. "a big red circle on the left", "a small blue cross in the centre"."""
  where = f"{_PREPOSITIONS[scene.position]} the {scene.position}"
  return f"a {scene.size} {scene.colour} {scene.shape} {where}"


def answer(scene: Scene, attribute: str) -> str:
  """The one-word answer to any of `QUESTIONS[attribute]`: the scene's value of `attribute`."""
  _check_attribute(attribute)
  return getattr(scene, attribute)


def qa_pairs(scene: Scene, rng: Optional[np.random.Generator] = None
             ) -> list[tuple[str, str, str]]:
  """(attribute, question, answer) for each attribute in `ATTRIBUTES` order.

  rng: picks each question's phrasing at random; None takes the first phrasing.
  """
  if rng is not None and not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
  pairs = []
  for attribute in ATTRIBUTES:
    phrasings = QUESTIONS[attribute]
    question = phrasings[0 if rng is None else int(rng.integers(len(phrasings)))]
    pairs.append((attribute, question, answer(scene, attribute)))
  return pairs


def class_label(scene: Scene, attribute: str = "shape") -> int:
  """The index of the scene's `attribute` value in its tuple (`SHAPES`, `COLOURS`, ...)."""
  _check_attribute(attribute)
  return VALUES[attribute].index(getattr(scene, attribute))


def text_words(text: str) -> list[str]:
  """The words of `text` as `WORDS` counts them: lower-cased, punctuation split off, "<image>"
  markers left out (a processor replaces them with image tokens)."""
  return re.findall(r"\w+|[^\w\s]", text.replace(IMAGE_MARKER, " ").lower())


def _all_texts() -> Iterable[str]:
  yield from (caption(s) for s in ALL_SCENES)
  for attribute in ATTRIBUTES:
    yield from QUESTIONS[attribute]
    yield from VALUES[attribute]
    yield CLASSIFY_PROMPTS[attribute]
  yield VQA_TEMPLATE.replace("{question}", "")
  yield CAPTION_PROMPT


# Every word of every caption, question, answer, class name and default prompt, sorted.
WORDS: tuple[str, ...] = tuple(sorted({w for text in _all_texts() for w in text_words(text)}))


def _prompt(task: str, attribute: str, prompt_template: Optional[str]) -> str:
  """The task's prompt template, checked: one "<image>", and "{question}" for vqa."""
  if prompt_template is None:
    return {"vqa": VQA_TEMPLATE, "caption": CAPTION_PROMPT,
            "classify": CLASSIFY_PROMPTS[attribute]}[task]
  if not isinstance(prompt_template, str):
    raise TypeError(f"prompt_template must be a str, got {type(prompt_template).__name__}")
  if prompt_template.count(IMAGE_MARKER) != 1:
    raise ValueError(f"prompt_template {prompt_template!r} must hold exactly one {IMAGE_MARKER}")
  has_question = "{question}" in prompt_template
  if (task == "vqa") != has_question:
    need = "must" if task == "vqa" else "must not"
    raise ValueError(f"prompt_template {prompt_template!r} {need} hold '{{question}}' for task "
                     f"{task!r}")
  return prompt_template


def _check_backgrounds(backgrounds: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
  if isinstance(backgrounds, (str, bytes)) or not len(backgrounds):
    raise ValueError(f"backgrounds must be a non-empty sequence of greys, got {backgrounds!r}")
  return [_check_background(b) for b in backgrounds]


def examples(num: int, seed: int, task: str = "vqa", attribute: str = "colour",
             image_size: int = 32, prompt_template: Optional[str] = None,
             backgrounds: Sequence[Sequence[int]] = (BACKGROUND,)) -> list[Example]:
  """`num` examples of `task`, images as PIL RGB images, deterministic from `seed`.

  The scenes are `sample_scenes(num, seed)` for every task and attribute.
    vqa: prompt = prompt_template with "{question}" replaced by one of QUESTIONS[attribute]
      (seeded choice), question = that question, answer = the attribute's value (answers: it ten
      times, VQAv2's unanimous annotators), label = its index.
    caption: prompt = prompt_template, answer = answers[0] = the caption, no label.
    classify: prompt = prompt_template, answer = the attribute's value (the class word),
      label = its index in VALUES[attribute].
  prompt_template: None for the task's default (VQA_TEMPLATE, CAPTION_PROMPT,
    CLASSIFY_PROMPTS[attribute]); one "<image>" marker. Words outside `WORDS` are the caller's.
  backgrounds: greys; with several, each image's is a seeded choice among them.
  meta: the four attributes, "bbox" [x0, y0, x1, y1] (pixels, x1/y1 exclusive), "boxes" (the
  same box as GQA writes object boxes, for the cross-modal flows) and "background" [r, g, b].
  """
  _check_count("num", num, 1)
  _check_value("task", task, TASKS)
  _check_attribute(attribute)
  _check_image_size(image_size)
  template = _prompt(task, attribute, prompt_template)
  greys = _check_backgrounds(backgrounds)
  scenes = sample_scenes(num, seed)
  # Separate streams, so the scenes of a seed do not depend on the task or the backgrounds.
  question_rng = np.random.default_rng([seed, 1])
  background_rng = np.random.default_rng([seed, 2])
  width = max(5, len(str(num - 1)))
  out = []
  for i, scene in enumerate(scenes):
    grey = greys[int(background_rng.integers(len(greys)))] if len(greys) > 1 else greys[0]
    x0, y0, x1, y1 = shape_box(scene, image_size)
    # "boxes" in GQA's convention ([x, y, x + w, y + h], drawn inclusive), so the cross-modal
    # experiment's related-patch flows read the shape as the question's object.
    meta = {**scene.attributes(), "bbox": [x0, y0, x1, y1], "boxes": [[x0, y0, x1 - 1, y1 - 1]],
            "background": list(grey)}
    fields: dict = {"prompt": template, "label": class_label(scene, attribute)}
    if task == "vqa":
      phrasings = QUESTIONS[attribute]
      question = phrasings[int(question_rng.integers(len(phrasings)))]
      fields.update(prompt=template.replace("{question}", question), question=question,
                    answer=answer(scene, attribute))
    elif task == "caption":
      fields.update(answer=caption(scene), label=None)
    else:
      fields.update(answer=answer(scene, attribute))
    # A VQA answer comes as VQAv2's ten human answers, here unanimous: the official accuracy
    # (leave one of ten out, min(1, matches / 3)) then scores the right answer 1, not 0.
    answers = (fields["answer"],) * (VQA_ANNOTATORS if task == "vqa" else 1)
    out.append(Example(id=f"shapes-{i:0{width}d}", images=(_draw(scene, image_size, grey),),
                       answers=answers, meta=meta, **fields))
  return out


def write_world(directory: str | os.PathLike, num: int, seed: int, task: str = "vqa",
                attribute: str = "colour", image_size: int = 32,
                prompt_template: Optional[str] = None,
                backgrounds: Sequence[Sequence[int]] = (BACKGROUND,)) -> str:
  """Writes `examples(...)` to `directory`: images/<id>.png and `examples.jsonl` (the format
  `data.jsonl.load_dataset(directory)` reads, image paths relative); returns the JSONL path.

  The same arguments write byte-identical files. Files of an earlier, larger world in the same
  directory are not removed (the JSONL names only this world's images).
  """
  directory = os.fspath(directory)
  made = examples(num, seed, task, attribute, image_size, prompt_template, backgrounds)
  image_dir = os.path.join(directory, "images")
  os.makedirs(image_dir, exist_ok=True)
  on_disk = []
  for example in made:
    path = os.path.join(image_dir, f"{example.id}.png")
    example.images[0].save(path, format="PNG")
    on_disk.append(dataclasses.replace(example, images=(os.path.abspath(path),)))
  return write_jsonl(os.path.join(directory, EXAMPLES_FILE), on_disk)
