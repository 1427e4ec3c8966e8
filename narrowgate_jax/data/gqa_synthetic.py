"""A small synthetic GQA fixture, written in both formats `narrowgate_jax.data.gqa` reads.

Each image is two shapes (a square and a circle, in one of four colours) on a grey background,
one in the left half and one in the right, at a few sizes; its scene graph gives their boxes.
Question i asks about image i, its task cycling through the study's six (ChooseAttr, ChooseCat,
ChooseRel, CompareAttr, LogicalObj, QueryAttr), with GQA's types, annotations (question token ->
object id) and program. Every third image also gets a "verifyAttr" question that belongs to no
task. Files written:

  questions.json, scene_graphs.json   the official formats
  images/<image id>.jpg
  GQA_synthetic_<Task>.csv           the study's per-task CSV format (`gqa.CSV_COLUMNS`), the
                                     boxes of the annotated objects in question order

With include_bad=True the fixture also holds two bad ChooseAttr questions about one extra image:
"bad-box" refers to an object whose box runs past the image's right edge, "bad-noref" has no
annotations (in its CSV row: "-" for the central object). Everything comes from one seeded
generator, and all questions and answers use only the words in `WORDS` (so tests can build
word-level tokenizers that cover them and the study's prompt).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from narrowgate_jax.data.gqa import CSV_COLUMNS, TASKS

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 70, 220),
           "yellow": (235, 205, 40)}
SHAPES = ("square", "circle")
ABSENT_SHAPE = "triangle"  # named by some LogicalObj questions, never drawn
BACKGROUNDS = ((128, 128, 128), (200, 200, 200), (90, 90, 90))
SIZES = ((64, 96), (96, 64), (80, 80))  # (height, width)
# Every word of the questions, the answers and the study's prompt, lower-cased, punctuation apart.
WORDS = ("is", "the", "or", "a", "what", "do", "and", "have", "in", "common", "there", "that",
         "on", "which", "side", "of", "image", "shape", "colour", "left", "right", "above",
         "below", "yes", "no", *COLOURS, *SHAPES, ABSENT_SHAPE, "answer", "question", "using",
         "single", "word", "phrase", "?", ".", ",")
QUESTIONS_FILE = "questions.json"
SCENE_GRAPHS_FILE = "scene_graphs.json"
IMAGES_DIR = "images"
FIRST_IMAGE_ID = 2300000
BAD_IMAGE_ID = "2399999"


@dataclasses.dataclass(frozen=True)
class _Shape:
  id: str
  name: str
  colour: str
  x: int
  y: int
  w: int
  h: int

  @property
  def centre_x(self) -> float:
    return self.x + self.w / 2

  def graph(self) -> dict:
    return {"name": self.name, "x": self.x, "y": self.y, "w": self.w, "h": self.h,
            "attributes": [self.colour], "relations": []}


@dataclasses.dataclass(frozen=True)
class _Question:
  """One question: text, answer, GQA types, program, and the objects its words refer to."""

  question: str
  answer: str
  detailed: str
  semantic_type: str
  structural: str
  program: list
  refs: tuple[tuple[int, _Shape], ...]  # (word index in the question, object)
  options: tuple[str, ...] = ()
  absent: tuple[str, ...] = ()  # names the question asks about that the image lacks


def _select(shape: _Shape) -> dict:
  return {"operation": "select", "dependencies": [], "argument": f"{shape.name} ({shape.id})"}


def _pair(rng: np.random.Generator, first: str, second: str) -> tuple[str, str]:
  return (first, second) if rng.integers(2) else (second, first)


def _other_colour(rng: np.random.Generator, *avoid: str) -> str:
  names = [c for c in COLOURS if c not in avoid]
  return names[int(rng.integers(len(names)))]


def _choose_attr(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  c1, c2 = _pair(rng, a.colour, _other_colour(rng, a.colour))
  program = [_select(a), {"operation": "choose color", "dependencies": [0],
                          "argument": f"{c1}|{c2}"}]
  return _Question(f"is the {a.name} {c1} or {c2}?", a.colour, "chooseAttr", "attr", "choose",
                   program, ((2, a),), (a.colour, c2 if c1 == a.colour else c1))


def _choose_cat(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  n1, n2 = _pair(rng, a.name, b.name)
  program = [{"operation": "select", "dependencies": [], "argument": f"shape ({a.id})"},
             {"operation": "filter color", "dependencies": [0], "argument": a.colour},
             {"operation": "choose name", "dependencies": [1], "argument": f"{n1}|{n2}"}]
  return _Question(f"is the {a.colour} shape a {n1} or a {n2}?", a.name, "categoryThatChoose",
                   "cat", "choose", program, ((3, a),), (a.name, b.name))


def _choose_rel(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  answer, other = ("left", "right") if a.centre_x < b.centre_x else ("right", "left")
  r1, r2 = _pair(rng, "left", "right")
  rels = "|".join(f"to the {r} of" for r in (r1, r2))
  program = [_select(b), {"operation": "choose rel", "dependencies": [0],
                          "argument": f"{a.name},{rels},s ({a.id})"}]
  return _Question(f"is the {a.name} {r1} or {r2} of the {b.name}?", answer, "relChooser", "rel",
                   "choose", program, ((2, a), (8, b)), (answer, other))


def _compare_attr(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  program = [_select(a), _select(b),
             {"operation": "common", "dependencies": [0, 1], "argument": ""}]
  return _Question(f"what do the {a.name} and the {b.name} have in common?", "colour",
                   "twoCommon", "attr", "compare", program, ((3, a), (6, b)))


def _logical_obj(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  # Even k: both named shapes are in the image; odd k: the second one is not.
  second = b if k % 2 == 0 else None
  second_name = b.name if second else ABSENT_SHAPE
  yes = bool(rng.integers(2))
  colour = a.colour if yes else _other_colour(rng, a.colour, b.colour)
  program = [_select(a), {"operation": "filter color", "dependencies": [0], "argument": colour},
             {"operation": "exist", "dependencies": [1], "argument": "?"},
             {"operation": "select", "dependencies": [],
              "argument": f"{second_name} ({second.id if second else '-'})"},
             {"operation": "filter color", "dependencies": [3], "argument": colour},
             {"operation": "exist", "dependencies": [4], "argument": "?"},
             {"operation": "or", "dependencies": [2, 5], "argument": ""}]
  refs = ((3, a),) + (((6, second),) if second else ())
  return _Question(f"is there a {a.name} or a {second_name} that is {colour}?",
                   "yes" if yes else "no", "existThatOr", "obj", "logical", program, refs,
                   absent=() if second else (ABSENT_SHAPE,))


def _query_attr(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  answer = "left" if a.centre_x < b.centre_x else "right"  # a and b sit in opposite halves
  program = [_select(a), {"operation": "query", "dependencies": [0], "argument": "hposition"}]
  return _Question(f"on which side of the image is the {a.name}?", answer, "positionQuery",
                   "attr", "query", program, ((8, a),))


def _verify_attr(rng, a: _Shape, b: _Shape, k: int) -> _Question:
  colour = a.colour if rng.integers(2) else _other_colour(rng, a.colour)
  program = [_select(a), {"operation": "verify color", "dependencies": [0], "argument": colour}]
  return _Question(f"is the {a.name} {colour}?", "yes" if colour == a.colour else "no",
                   "verifyAttr", "attr", "verify", program, ((2, a),))


BUILDERS: dict[str, Callable[..., _Question]] = {
    "ChooseAttr": _choose_attr, "ChooseCat": _choose_cat, "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr, "LogicalObj": _logical_obj, "QueryAttr": _query_attr}


def _box(rng: np.random.Generator, height: int, width: int, left: bool) -> tuple[int, ...]:
  """(x, y, w, h) of a shape inside the left or right half, one pixel from every edge."""
  side = int(rng.integers(12, min(height, width // 2) // 2 + 1))
  half = width // 2
  x = int(rng.integers(1, half - side)) if left else int(rng.integers(half + 1, width - side))
  return x, int(rng.integers(1, height - side)), side, side


def _shapes(rng: np.random.Generator, image_index: int, height: int, width: int,
            same_colour: bool) -> tuple[_Shape, _Shape]:
  """Two shapes (a, b): different names, a on a random side, b on the other."""
  name_a, name_b = _pair(rng, *SHAPES)
  colour_a = _other_colour(rng)
  colour_b = colour_a if same_colour else _other_colour(rng, colour_a)
  a_left = bool(rng.integers(2))
  first = FIRST_IMAGE_ID + image_index
  a = _Shape(f"{first}1", name_a, colour_a, *_box(rng, height, width, a_left))
  b = _Shape(f"{first}2", name_b, colour_b, *_box(rng, height, width, not a_left))
  return a, b


def _draw(path: str, height: int, width: int, background: tuple, shapes: tuple) -> None:
  """A JPEG of the shapes, each filling [x, x + w) x [y, y + h) (clipped at the edges)."""
  image = Image.new("RGB", (width, height), background)
  draw = ImageDraw.Draw(image)
  for s in shapes:
    box = (s.x, s.y, s.x + s.w - 1, s.y + s.h - 1)  # PIL includes the last pixel
    if s.name == "circle":
      draw.ellipse(box, fill=COLOURS[s.colour])
    else:
      draw.rectangle(box, fill=COLOURS[s.colour])
  image.save(path, quality=95)


def _official(q: _Question, image_id: str) -> dict:
  spans = {str(index): shape.id for index, shape in q.refs}
  return {"imageId": image_id, "question": q.question, "answer": q.answer,
          "fullAnswer": f"the answer is {q.answer}.", "isBalanced": True,
          "types": {"structural": q.structural, "semantic": q.semantic_type,
                    "detailed": q.detailed},
          "annotations": {"question": spans, "answer": {}, "fullAnswer": {}},
          "semantic": q.program}


def _csv_row(task: str, qid: str, q: _Question, image_id: str, size: tuple[int, int],
             shapes: tuple[_Shape, ...]) -> dict[str, Any]:
  """A row of the study's CSV for `task` (columns it cannot know: plausible fillers)."""
  objects = [shape for _, shape in q.refs]
  values = {
      "question_id": qid, "img_id": image_id, "question": q.question, "answer": q.answer,
      "type_detailed": q.detailed, "type_semantic": q.semantic_type,
      "type_structural": q.structural, "operations": repr(q.program), "image_w": size[1],
      "image_h": size[0], "question word": "common", "full answer": f"the answer is {q.answer}.",
      "all objects": ", ".join(s.name for s in shapes),
      "all objects attributes": ", ".join(s.colour for s in shapes)}
  row: dict[str, Any] = {key: values.get(key, "") for key in CSV_COLUMNS[task]}
  if q.options:
    row["true option"], row["false option"] = q.options
  steps = [[step["operation"], step["argument"]] for step in q.program]
  if "operation_1" in row:
    row["operation_1"], row["operation_2"] = repr(steps[0]), repr(steps[-1])
  prefixes = ["central object"] if "central object id" in row else ["object1", "object2"]
  names = [s.name for s in objects] + list(q.absent)
  for i, prefix in enumerate(prefixes):
    shape = objects[i] if i < len(objects) else None
    row[f"{prefix} name"] = shape.name if shape else (names[i] if i < len(names) else "-")
    row[f"{prefix} id"] = shape.id if shape else "-"
    for key in "xywh":
      row[f"{prefix} {key}"] = getattr(shape, key) if shape else "-"
  if "central object attributes" in row and objects:
    row["central object attributes"] = objects[0].colour
    row["central object question attribute"] = q.answer
  return row


def _bad_cases(rng: np.random.Generator, directory: str) -> tuple[dict, list]:
  """The bad image's scene graph entry and [(question id, question, shapes)] about it."""
  height, width = SIZES[0]
  inside = _Shape(f"{BAD_IMAGE_ID}1", "circle", "blue", 4, 4, 20, 20)
  outside = _Shape(f"{BAD_IMAGE_ID}2", "square", "red", width - 10, 30, 20, 20)
  shapes = (inside, outside)
  _draw(os.path.join(directory, IMAGES_DIR, f"{BAD_IMAGE_ID}.jpg"), height, width,
        BACKGROUNDS[0], shapes)
  graph = {"width": width, "height": height, "objects": {s.id: s.graph() for s in shapes}}
  bad_box = _choose_attr(rng, outside, inside, 0)
  no_ref = dataclasses.replace(_choose_attr(rng, inside, outside, 0), refs=())
  return graph, [("bad-box", bad_box, shapes), ("bad-noref", no_ref, shapes)]


def write_synthetic_gqa(directory: str | os.PathLike, num_questions: int = 12, seed: int = 0,
                        include_bad: bool = False) -> dict[str, Any]:
  """Writes the fixture into `directory`; returns its paths: {"directory", "questions",
  "scene_graphs", "images" (the folder), "csv": {task: path}}.

  Question i (id f"{i:08d}", image FIRST_IMAGE_ID + i) belongs to task i % 6 in `TASKS` order;
  images i with i % 3 == 0 also get a verifyAttr question (id f"{50000 + i:08d}", no task).
  """
  if num_questions < 1:
    raise ValueError(f"num_questions must be >= 1, got {num_questions}")
  directory = os.fspath(directory)
  os.makedirs(os.path.join(directory, IMAGES_DIR), exist_ok=True)
  rng = np.random.default_rng(seed)
  questions: dict[str, dict] = {}
  graphs: dict[str, dict] = {}
  rows: dict[str, list] = {task: [] for task in TASKS}
  task_names = tuple(TASKS)
  for i in range(num_questions):
    task = task_names[i % len(task_names)]
    height, width = SIZES[i % len(SIZES)]
    image_id = str(FIRST_IMAGE_ID + i)
    shapes = _shapes(rng, i, height, width, same_colour=task == "CompareAttr")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    _draw(os.path.join(directory, IMAGES_DIR, f"{image_id}.jpg"), height, width, background,
          shapes)
    graphs[image_id] = {"width": width, "height": height,
                        "objects": {s.id: s.graph() for s in shapes}}
    q = BUILDERS[task](rng, *shapes, i // len(task_names))
    questions[f"{i:08d}"] = _official(q, image_id)
    rows[task].append(_csv_row(task, f"{i:08d}", q, image_id, (height, width), shapes))
    if i % 3 == 0:
      questions[f"{50000 + i:08d}"] = _official(_verify_attr(rng, *shapes, i), image_id)
  if include_bad:
    graphs[BAD_IMAGE_ID], bad = _bad_cases(rng, directory)
    for qid, q, shapes in bad:
      questions[qid] = _official(q, BAD_IMAGE_ID)
      rows["ChooseAttr"].append(_csv_row("ChooseAttr", qid, q, BAD_IMAGE_ID, SIZES[0], shapes))
  paths: dict[str, Any] = {
      "directory": directory, "questions": os.path.join(directory, QUESTIONS_FILE),
      "scene_graphs": os.path.join(directory, SCENE_GRAPHS_FILE),
      "images": os.path.join(directory, IMAGES_DIR), "csv": {}}
  for key, data in (("questions", questions), ("scene_graphs", graphs)):
    with open(paths[key], "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1)
  for task, task_rows in rows.items():
    path = os.path.join(directory, f"GQA_synthetic_{task}.csv")
    with open(path, "w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS[task])
      writer.writeheader()
      writer.writerows(task_rows)
    paths["csv"][task] = path
  return paths
