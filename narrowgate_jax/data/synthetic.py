"""A small synthetic dataset for tests and smoke runs: one coloured shape on a plain background.

Each image is a circle, square or triangle in red, green, blue or yellow on a grey-scale
background, at the sizes given (cycled, non-square by default, so image-size handling is
exercised). The prompts ask the shape's colour in several phrasings and lengths, some with text
before the image. Everything comes from one seeded generator: the same seed writes byte-identical
files. Prompts use only the words in `WORDS`, so tests can build word-level tokenizers that cover
them.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from narrowgate_jax.data.examples import Example
from narrowgate_jax.data.jsonl import EXAMPLES_FILE, write_jsonl

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 70, 220),
           "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
# Neutral greys, so no background can be read as one of the answer colours.
BACKGROUNDS = ((255, 255, 255), (230, 230, 230), (190, 190, 190), (128, 128, 128), (40, 40, 40))
# (height, width): square and non-square, small enough for fast tests.
DEFAULT_SIZES = ((64, 64), (48, 80), (96, 64), (32, 32), (56, 112))
MIN_SIDE = 16

# (prompt with "<image>", the question inside it): varied lengths, the image first, in the middle
# or after a text prefix.
TEMPLATES = (
    ("<image>What colour is the shape?", "What colour is the shape?"),
    ("<image>What colour is this shape? Answer using a single word.",
     "What colour is this shape?"),
    ("<image>Answer the question using a single word or phrase. What colour is the shape in the "
     "picture?", "What colour is the shape in the picture?"),
    ("What is in the picture? <image> What colour is the shape?", "What colour is the shape?"),
    ("Question: <image> what colour is the shape in the provided image? Answer:",
     "what colour is the shape in the provided image?"),
    ("This image: <image> Provide the shape colour using a single word.",
     "Provide the shape colour using a single word."),
)
# Every word of TEMPLATES and the answers, lower-cased, punctuation split off.
WORDS = ("what", "is", "in", "the", "picture", "answer", "a", "this", "shape", "colour", "image",
         "question", "using", "single", "word", "or", "phrase", "provide", "provided", ":", ".",
         "?", *COLOURS, *SHAPES)


def draw_shape(height: int, width: int, shape: str, colour: tuple, background: tuple,
               box: tuple[int, int, int, int]) -> Image.Image:
  """An RGB image [height, width] of `shape` filling `box` = (x0, y0, x1, y1), x1/y1 exclusive.

  PIL draws without anti-aliasing, so every pixel is exactly `colour` or `background`.
  """
  image = Image.new("RGB", (width, height), background)
  draw = ImageDraw.Draw(image)
  x0, y0, x1, y1 = box
  # PIL's boxes include their last pixel; ours exclude it.
  if shape == "circle":
    draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
  elif shape == "square":
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
  elif shape == "triangle":
    draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) // 2, y0)], fill=colour)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
  return image


def synthetic_examples(directory: str, num_examples: int = 50, seed: int = 0,
                       sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES) -> list[Example]:
  """Draws the images into `directory`/images/ and returns the examples (paths absolute)."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if not sizes:
    raise ValueError("sizes is empty; give at least one (height, width)")
  for h, w in sizes:
    if min(h, w) < MIN_SIDE:
      raise ValueError(f"size ({h}, {w}) is too small; both sides must be >= {MIN_SIDE}")
  rng = np.random.default_rng(seed)
  image_dir = os.path.join(directory, "images")
  os.makedirs(image_dir, exist_ok=True)
  colour_names = tuple(COLOURS)
  examples = []
  for i in range(num_examples):
    height, width = (int(v) for v in sizes[i % len(sizes)])
    colour = colour_names[int(rng.integers(len(colour_names)))]
    label = int(rng.integers(len(SHAPES)))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    short = min(height, width)
    side = int(rng.integers(short // 4, short * 3 // 4 + 1))
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    prompt, question = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    path = os.path.join(image_dir, f"{i:04d}.png")
    draw_shape(height, width, SHAPES[label], COLOURS[colour], background, box).save(path)
    examples.append(Example(
        id=f"synthetic-{i:04d}", prompt=prompt, images=(os.path.abspath(path),),
        question=question, answer=colour, answers=(colour,), label=label,
        meta={"bbox": list(box), "colour": colour, "shape": SHAPES[label],
              "size": [height, width]}))
  return examples


def write_synthetic(directory: str | os.PathLike, num_examples: int = 50, seed: int = 0,
                    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES) -> str:
  """Writes PNG images and `examples.jsonl` into `directory`; returns the JSONL file's path.

  Example i has size sizes[i % len(sizes)] (height, width); answer its colour word, label its
  shape's index in `SHAPES`, meta {"bbox": [x0, y0, x1, y1] (pixels, x1/y1 exclusive), "colour",
  "shape", "size": [height, width]}. Load it with `load_dataset(directory)`.
  """
  directory = os.fspath(directory)
  examples = synthetic_examples(directory, num_examples, seed, sizes)
  return write_jsonl(os.path.join(directory, EXAMPLES_FILE), examples)
