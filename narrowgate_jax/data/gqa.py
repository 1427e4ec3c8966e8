"""GQA questions for the cross-modal window-knockout study (PROTOCOLS.md §3), in two formats.

Official GQA files (https://cs.stanford.edu/people/dorarad/gqa):

  questions   {question_id: {"imageId", "question", "answer", "fullAnswer",
                             "types": {"structural", "semantic", "detailed"},
                             "annotations": {"question": {"<token span>": "<object id>"}, ...},
                             "semantic": [{"operation", "dependencies", "argument"}, ...], ...}}
  scene graphs  {image_id: {"width", "height",
                             "objects": {object_id: {"name", "x", "y", "w", "h", ...}}}}
  images      <images_dir>/<imageId>.jpg

and the study's per-task CSV files (FightingFighting/cross-modal-information-flow-in-MLLM,
datasets/GQA_val_correct_question_with_<types>_<Task>.csv; `CSV_COLUMNS` lists their columns).

Every question becomes an `Example` with the study's prompt (`PROMPT`, the chat template is the
model's business), the raw question inside it, the GQA answer, and meta:

  task        the study's task name (a key of `TASKS`)
  image_id    GQA's image id (str)
  boxes       [[x0, y0, x1, y1], ...] of the objects the question refers to, in pixels of the
              original image, x1 = x + w and y1 = y + h: the tuple the study hands to PIL's
              ImageDraw.rectangle, which fills both corners, so a box paints w + 1 columns
              (`narrowgate_jax.processing.anyres.box_canvas` draws them the same way). Official
              files: the objects of annotations["question"], in question order; CSV files: the
              "central object" or "object1"/"object2" columns, in column order.
  object_ids  the GQA ids of those objects, aligned with boxes
  image_size  [height, width] of the original image
  types       {"structural", "semantic", "detailed"} (empty strings where the CSV lacks them)
  options     [true option, false option] of a Choose question, when known (absent otherwise)

Bad input. Always an error (naming the file and the question): a missing field, an image file
that does not exist, an image missing from the scene graphs, an image whose size differs from
the one the files give (`check_image_size`), an unknown task. Per question, chosen by `on_bad`
("raise", the default: an error naming the question; "skip": skipped and counted under its
reason): a box outside the image ("box_outside_image"), a box of zero or negative size
("empty_box"), an annotation naming an object the scene graph lacks ("unknown_object"). With
`require_boxes=True` (the related-patch flows need boxes) a question without any box is always
skipped and counted ("no_boxes"). The counts are `GqaDataset.skipped`; `skip_log` says which
question went for what. Only questions of the requested task(s) are read; the others are not
counted.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from PIL import Image

from narrowgate_jax.data.examples import Example, ListDataset
from narrowgate_jax.data.ng_common import read_json
from narrowgate_jax.processing.prompts import IMAGE_MARKER

# The study's prompt (its InformationFlow.py: DEFAULT_IMAGE_TOKEN + "\n" + question + " \nAnswer
# the question using a single word or phrase."), before the model's chat template.
PROMPT = IMAGE_MARKER + "\n{question} \nAnswer the question using a single word or phrase."
ON_BAD = ("raise", "skip")
MISSING = ("", "-")  # how the study's CSVs write an absent object or value


@dataclasses.dataclass(frozen=True)
class GqaTask:
  """One of the study's tasks: the GQA questions whose `types` match.

  Attributes:
    name: the study's name (the suffix of its CSV file names).
    structural, semantic: GQA's types["structural"] and types["semantic"].
    detailed: the allowed types["detailed"] values, or None for any.
  """

  name: str
  structural: str
  semantic: str
  detailed: Optional[tuple[str, ...]] = None

  def matches(self, types: Mapping[str, Any]) -> bool:
    if types.get("structural") != self.structural or types.get("semantic") != self.semantic:
      return False
    return self.detailed is None or types.get("detailed") in self.detailed


# The study's six tasks. The study's filtering script is not public; its CSV files are, and these
# rules are read from them: the file name names the detailed types
# (GQA_val_correct_question_with_<types>_<Task>.csv) and every row has type_detailed,
# type_semantic and type_structural columns.
#   ChooseAttr  file "..._choose_ChooseAttr.csv"; rows seen: chooseAttr, materialChoose,
#               activityChoose, typeChoose (all structural "choose", semantic "attr"), so every
#               choose/attr question is taken (GQA's positionChoose would be one too; unverified).
#   ChooseCat   "..._categoryThatThisChoose_objThisChoose_...": categoryThisChoose,
#               categoryThatChoose, objThisChoose (choose/cat).
#   ChooseRel   "..._relChooser_...": relChooser (choose/rel).
#   CompareAttr "..._twoCommon_...": twoCommon (compare/attr).
#   LogicalObj  "..._existThatOr_...": existThatOr and existThatOrC (logical/obj).
#   QueryAttr   "..._positionQuery_...": positionQuery (query/attr).
TASKS: dict[str, GqaTask] = {t.name: t for t in (
    GqaTask("ChooseAttr", "choose", "attr"),
    GqaTask("ChooseCat", "choose", "cat",
            ("categoryThisChoose", "categoryThatChoose", "objThisChoose")),
    GqaTask("ChooseRel", "choose", "rel", ("relChooser",)),
    GqaTask("CompareAttr", "compare", "attr", ("twoCommon",)),
    GqaTask("LogicalObj", "logical", "obj", ("existThatOr", "existThatOrC")),
    GqaTask("QueryAttr", "query", "attr", ("positionQuery",)),
)}

# The columns of the study's CSV file for each task, in its order. The loader needs only
# question_id, img_id, question and answer; it reads the others when they are there.
_TYPES = ("type_detailed", "type_semantic", "type_structural")
_CENTRAL = ("central object name", "central object id")
_PAIR = ("object1 name", "object1 id", "object2 name", "object2 id")
_CENTRAL_BOX = ("central object w", "central object h", "central object x", "central object y")
_PAIR_BOX = ("object1 w", "object1 h", "object1 x", "object1 y",
             "object2 w", "object2 h", "object2 x", "object2 y")
_HEAD = ("question_id", "img_id", "question", "answer")
_OPTIONS = ("true option", "false option")
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "ChooseAttr": (*_HEAD, *_OPTIONS, *_CENTRAL, "central object attributes",
                   "central object question attribute", "all objects", "all objects attributes",
                   *_TYPES, "operations", "operation_1", "operation_2", "captions", "image_w",
                   "image_h", *_CENTRAL_BOX, "full answer"),
    "ChooseCat": (*_HEAD, *_OPTIONS, *_CENTRAL, *_TYPES, "operations", "captions", "image_w",
                  "image_h", *_CENTRAL_BOX),
    "ChooseRel": (*_HEAD, *_OPTIONS, *_PAIR, *_TYPES, "operations", "captions", "image_w",
                  "image_h", *_PAIR_BOX),
    "CompareAttr": (*_HEAD, *_PAIR, "question word", *_TYPES, "operations", "captions", "image_w",
                    "image_h", *_PAIR_BOX),
    "LogicalObj": (*_HEAD, *_PAIR, "question word", *_TYPES, "operations", "captions", "image_w",
                   "image_h", *_PAIR_BOX),
    "QueryAttr": (*_HEAD, *_CENTRAL, "question word", *_TYPES, "operations", "captions",
                  "image_w", "image_h", *_CENTRAL_BOX),
}
CSV_OBJECTS = ("central object", "object1", "object2")  # column prefixes of an object's fields


def prompt_for(question: str) -> str:
  """The study's prompt for a GQA question (before the chat template)."""
  return PROMPT.format(question=question)


def resolve_tasks(task: Union[None, str, GqaTask]) -> tuple[GqaTask, ...]:
  """None -> all six tasks; a name -> its task; a `GqaTask` -> itself (a custom filter)."""
  if task is None:
    return tuple(TASKS.values())
  if isinstance(task, GqaTask):
    return (task,)
  if task not in TASKS:
    raise ValueError(f"unknown GQA task {task!r}; expected one of {', '.join(TASKS)}")
  return (TASKS[task],)


class GqaDataset(ListDataset):
  """A `ListDataset` of GQA examples that also says what was skipped and why.

  Attributes:
    skipped: reason -> how many questions were skipped for it ({} when none was).
    skip_log: (question id, message) of every skipped question, in file order.
  """

  def __init__(self, name: str, examples: Sequence[Example], skipped: Mapping[str, int],
               skip_log: Sequence[tuple[str, str]] = ()):
    super().__init__(name, examples)
    self.skipped = dict(skipped)
    self.skip_log = tuple(skip_log)

  def __repr__(self) -> str:
    return f"GqaDataset({self.name!r}, {len(self)} examples, skipped {self.skipped})"


# ------------------------------------------------------------------------- shared checks


@dataclasses.dataclass(frozen=True)
class _Object:
  id: str
  x: int
  y: int
  w: int
  h: int


@dataclasses.dataclass(frozen=True)
class _Record:
  """One question, parsed from either format, before the checks that can skip it."""

  where: str
  id: str
  image_id: str
  question: str
  answer: str
  task: str
  types: dict
  objects: tuple[_Object, ...]
  size: Optional[tuple[int, int]]  # (height, width); None: read it from the image file
  options: Optional[list[str]] = None


class _Skips:
  """Counts skipped questions, or raises for a bad one when on_bad == "raise"."""

  def __init__(self, on_bad: str):
    if on_bad not in ON_BAD:
      raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    self.on_bad = on_bad
    self.counts: dict[str, int] = {}
    self.log: list[tuple[str, str]] = []

  def skip(self, record: _Record, reason: str, message: str) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    self.log.append((record.id, f"{reason}: {message}"))

  def bad(self, record: _Record, reason: str, message: str) -> None:
    if self.on_bad == "raise":
      raise ValueError(f"{record.where}: {message} (on_bad='skip' skips such questions)")
    self.skip(record, reason, message)


def _box_problem(obj: _Object, height: int, width: int) -> Optional[tuple[str, str]]:
  """(reason, message) when the object's box is empty or leaves the image, else None."""
  box = [obj.x, obj.y, obj.x + obj.w, obj.y + obj.h]
  if obj.w <= 0 or obj.h <= 0:
    return "empty_box", f"object {obj.id} has an empty box (w={obj.w}, h={obj.h})"
  if obj.x < 0 or obj.y < 0 or box[2] > width or box[3] > height:
    return ("box_outside_image", (f"object {obj.id} box {box} (x0, y0, x + w, y + h) lies "
                                  f"outside the {width}x{height} (width x height) image"))
  return None


class _Images:
  """Image paths, checked to exist (and their sizes read once per image when asked)."""

  def __init__(self, images_dir: str | os.PathLike, check_size: bool):
    self.root = os.fspath(images_dir)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"GQA images directory {self.root!r} does not exist")
    self.check_size = check_size
    self._sizes: dict[str, tuple[int, int]] = {}

  def path(self, record: _Record) -> str:
    name = record.image_id if record.image_id.endswith(".jpg") else record.image_id + ".jpg"
    path = os.path.abspath(os.path.join(self.root, name))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{record.where}: image file {name!r} does not exist ({path})")
    return path

  def size(self, path: str) -> tuple[int, int]:
    """(height, width) of the image file."""
    if path not in self._sizes:
      with Image.open(path) as image:
        self._sizes[path] = (image.height, image.width)
    return self._sizes[path]


def _has_bad_box(record: _Record, size: tuple[int, int], skips: _Skips) -> bool:
  """Whether one of the record's boxes is bad (raises for it unless on_bad == "skip")."""
  for obj in record.objects:
    problem = _box_problem(obj, *size)
    if problem:
      skips.bad(record, *problem)
      return True
  return False


def _to_example(record: _Record, images: _Images, skips: _Skips,
                require_boxes: bool) -> Optional[Example]:
  """The checked `Example` of a record, or None when it is skipped."""
  if record.size is not None and _has_bad_box(record, record.size, skips):
    return None
  if require_boxes and not record.objects:
    skips.skip(record, "no_boxes", "the question refers to no object with a box")
    return None
  path = images.path(record)
  size = record.size
  if size is None:
    size = images.size(path)
    if _has_bad_box(record, size, skips):
      return None
  elif images.check_size and images.size(path) != tuple(size):
    h, w = images.size(path)
    raise ValueError(f"{record.where}: image file {path} is {w}x{h} (width x height) but the "
                     f"data gives {size[1]}x{size[0]}; boxes would not match the image")
  if not record.question or IMAGE_MARKER in record.question:
    raise ValueError(f"{record.where}: question {record.question!r} is empty or holds "
                     f"{IMAGE_MARKER!r}")
  meta: dict[str, Any] = {
      "task": record.task, "image_id": record.image_id,
      "boxes": [[o.x, o.y, o.x + o.w, o.y + o.h] for o in record.objects],
      "object_ids": [o.id for o in record.objects], "image_size": [int(size[0]), int(size[1])],
      "types": dict(record.types)}
  if record.options is not None:
    meta["options"] = list(record.options)
  return Example(id=record.id, prompt=prompt_for(record.question), images=(path,),
                 question=record.question, answer=record.answer, answers=(record.answer,),
                 meta=meta)


def _collect(records: Iterator[_Record], images: _Images, skips: _Skips, require_boxes: bool,
             limit: Optional[int]) -> list[Example]:
  if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
    raise ValueError(f"limit must be a positive int or None, got {limit!r}")
  examples = []
  for record in records:
    if limit is not None and len(examples) >= limit:
      break
    example = _to_example(record, images, skips, require_boxes)
    if example is not None:
      examples.append(example)
  return examples


def _int(value: Any, where: str, field: str) -> int:
  """An integer field: a JSON int (or integral float), or a CSV cell of an integer."""
  if isinstance(value, bool):
    raise ValueError(f"{where}: field {field!r} must be an integer, got {value!r}")
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str):
    try:
      number = float(value.strip())
    except ValueError:
      number = None
    if number is not None and number.is_integer():
      return int(number)
  raise ValueError(f"{where}: field {field!r} must be an integer, got {value!r}")


def _str(record: Mapping, key: str, where: str) -> str:
  if key not in record:
    raise ValueError(f"{where}: missing field {key!r}")
  value = record[key]
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {key!r} must be str, got {type(value).__name__}")
  return value


def _read_json(path: str | os.PathLike, what: str) -> dict:
  data = read_json(path, f"GQA {what}")
  if not isinstance(data, dict):
    raise ValueError(f"{os.fspath(path)}: expected a JSON object keyed by id, got "
                     f"{type(data).__name__}")
  return data


# ------------------------------------------------------------------------- official format


def _graph(graphs: dict, image_id: str, graphs_path: str, where: str) -> dict:
  graph = graphs.get(image_id)
  if graph is None:
    raise ValueError(f"{where}: image {image_id!r} is not in the scene graphs file {graphs_path}")
  if not isinstance(graph, dict) or not isinstance(graph.get("objects"), dict):
    raise ValueError(f"{graphs_path}: image {image_id!r}: expected an object with 'objects'")
  return graph


def _graph_size(graph: dict, image_id: str, graphs_path: str) -> tuple[int, int]:
  where = f"{graphs_path}: image {image_id!r}"
  return (_int(graph.get("height"), where, "height"), _int(graph.get("width"), where, "width"))


def _graph_object(graph: dict, object_id: str, where: str) -> Optional[_Object]:
  obj = graph["objects"].get(object_id)
  if obj is None:
    return None
  at = f"{where}: object {object_id}"
  return _Object(object_id, *(_int(obj.get(k), at, k) for k in ("x", "y", "w", "h")))


def _span_start(span: str) -> int:
  head = span.split(":")[0]
  return int(head) if head.isdigit() else 1 << 30


def _annotated_ids(question: dict, where: str) -> list[str]:
  """The object ids of annotations["question"], in question order, each once."""
  annotations = question.get("annotations") or {}
  spans = (annotations.get("question") or {}) if isinstance(annotations, dict) else None
  if not isinstance(spans, dict):
    raise ValueError(f"{where}: field 'annotations' must map 'question' to {{span: object id}}")
  ids: list[str] = []
  for span in sorted(spans, key=_span_start):
    object_id = str(spans[span])
    if object_id not in ids:
      ids.append(object_id)
  return ids


def _differing_words(phrase: str, other: str) -> str:
  """The words of `phrase` that `other` lacks ("to the left of" vs "to the right of" -> left)."""
  words = [w for w in phrase.split() if w not in other.split()]
  return " ".join(words) or phrase


def choose_options(semantic: Any, answer: str) -> Optional[list[str]]:
  """[answer, the other option] of a GQA choose question, from the last "choose ..." step of its
  program (argument "a|b"; "choose rel": "subject,to the left of|to the right of,s (id)", whose
  options become the words that differ: left, right). None when it cannot be read."""
  if not isinstance(semantic, list):
    return None
  steps = [s for s in semantic if isinstance(s, dict)
           and str(s.get("operation", "")).startswith("choose")]
  if not steps:
    return None
  argument = str(steps[-1].get("argument", ""))
  if steps[-1].get("operation") == "choose rel":
    parts = argument.split(",")
    argument = parts[1] if len(parts) >= 3 else argument
  choices = [c.strip() for c in argument.split("|")]
  if len(choices) != 2 or not all(choices):
    return None
  words = [_differing_words(a, b) for a, b in (choices, choices[::-1])]
  for forms in (choices, words):
    if answer in forms:
      return [answer, forms[1 - forms.index(answer)]]
  return None


def _official_records(questions: dict, graphs: dict, paths: tuple[str, str],
                      tasks: tuple[GqaTask, ...], skips: _Skips) -> Iterator[_Record]:
  questions_path, graphs_path = paths
  for qid, question in questions.items():
    where = f"{questions_path}: question {qid!r}"
    if not isinstance(question, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(question).__name__}")
    types = question.get("types")
    if not isinstance(types, dict):
      raise ValueError(f"{where}: missing field 'types' ({{structural, semantic, detailed}})")
    task = next((t for t in tasks if t.matches(types)), None)
    if task is None:
      continue
    image_id = _str(question, "imageId", where)
    answer = _str(question, "answer", where)
    graph = _graph(graphs, image_id, graphs_path, where)
    objects, missing = [], []
    for object_id in _annotated_ids(question, where):
      obj = _graph_object(graph, object_id, where)
      (objects if obj else missing).append(obj or object_id)
    record = _Record(
        where=where, id=str(qid), image_id=image_id, question=_str(question, "question", where),
        answer=answer, task=task.name,
        types={k: str(types.get(k, "")) for k in ("structural", "semantic", "detailed")},
        objects=tuple(objects), size=_graph_size(graph, image_id, graphs_path),
        options=(choose_options(question.get("semantic"), answer)
                 if task.structural == "choose" else None))
    if missing:
      skips.bad(record, "unknown_object", f"annotation names object(s) {', '.join(missing)} "
                f"that image {image_id!r} of {graphs_path} does not have")
      continue
    yield record


def load_gqa(questions_json: str | os.PathLike, scene_graphs_json: str | os.PathLike,
             images_dir: str | os.PathLike, task: Union[None, str, GqaTask] = None,
             limit: Optional[int] = None, *, on_bad: str = "raise", require_boxes: bool = False,
             check_image_size: bool = True, name: Optional[str] = None) -> GqaDataset:
  """The questions of `task` (all six when None) from the official GQA files, in file order.

  limit: keep the first `limit` questions that pass (skip counts cover the questions read).
  on_bad, require_boxes: see the module docstring. check_image_size: open each image (its
  header only) and require the scene graph's width and height.
  """
  tasks = resolve_tasks(task)
  skips = _Skips(on_bad)
  images = _Images(images_dir, check_image_size)
  paths = (os.fspath(questions_json), os.fspath(scene_graphs_json))
  questions = _read_json(paths[0], "questions")
  graphs = _read_json(paths[1], "scene graphs")
  records = _official_records(questions, graphs, paths, tasks, skips)
  examples = _collect(records, images, skips, require_boxes, limit)
  name = name or ("gqa" if task is None else f"gqa-{tasks[0].name}")
  return GqaDataset(name, examples, skips.counts, skips.log)


# ------------------------------------------------------------------------- the study's CSVs


def csv_task(csv_path: str | os.PathLike, task: Union[None, str, GqaTask] = None) -> str:
  """The task of a study CSV: its file name's last "_" part (as the study reads it), or `task`
  (which must agree when the file name names one)."""
  stem = os.path.splitext(os.path.basename(os.fspath(csv_path)))[0]
  from_name = stem.split("_")[-1]
  from_name = from_name if from_name in TASKS else None
  if task is None:
    if from_name is None:
      raise ValueError(f"{os.fspath(csv_path)}: cannot tell the task from the file name (it "
                       f"should end in _<Task>.csv); pass task= one of {', '.join(TASKS)}")
    return from_name
  given = resolve_tasks(task)[0].name
  if from_name is not None and from_name != given:
    raise ValueError(f"{os.fspath(csv_path)}: the file name says task {from_name!r} but "
                     f"task={given!r} was given")
  return given


def _cell(row: Mapping[str, Optional[str]], key: str) -> str:
  return (row.get(key) or "").strip()


def _csv_objects(row: Mapping, header: Sequence[str], graph: Optional[dict],
                 where: str) -> tuple[list[_Object], list[str]]:
  """(objects with a box, ids the scene graph lacks) of a CSV row's object columns."""
  objects, missing = [], []
  for prefix in CSV_OBJECTS:
    object_id = _cell(row, f"{prefix} id")
    if f"{prefix} x" in header and _cell(row, f"{prefix} x") not in MISSING:
      fields = [_int(_cell(row, f"{prefix} {k}"), where, f"{prefix} {k}") for k in "xywh"]
      objects.append(_Object(object_id, *fields))
    elif object_id not in MISSING and graph is not None:
      obj = _graph_object(graph, object_id, where)
      (objects if obj else missing).append(obj or object_id)
  return objects, missing


def _csv_records(csv_path: str, task: str, graphs: Optional[dict], graphs_path: Optional[str],
                 skips: _Skips) -> Iterator[_Record]:
  with open(csv_path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    header = list(reader.fieldnames or [])
    for key in _HEAD:
      if key not in header:
        raise ValueError(f"{csv_path}:1: missing column {key!r}")
    seen: dict[str, int] = {}
    while True:
      lineno = reader.line_num + 1
      row = next(reader, None)
      if row is None:
        break
      where = f"{csv_path}:{lineno}"
      qid = _cell(row, "question_id")
      if not qid:
        raise ValueError(f"{where}: empty question_id")
      if qid in seen:
        raise ValueError(f"{where}: question_id {qid!r} already used on line {seen[qid]}")
      seen[qid] = lineno
      image_id = _cell(row, "img_id")
      if not image_id:
        raise ValueError(f"{where}: empty img_id")
      image_id = image_id.removesuffix(".jpg")
      graph = _graph(graphs, image_id, graphs_path, where) if graphs is not None else None
      size = None
      if _cell(row, "image_w") not in MISSING and _cell(row, "image_h") not in MISSING:
        size = (_int(_cell(row, "image_h"), where, "image_h"),
                _int(_cell(row, "image_w"), where, "image_w"))
      elif graph is not None:
        size = _graph_size(graph, image_id, graphs_path)
      objects, missing = _csv_objects(row, header, graph, where)
      options = [_cell(row, k) for k in _OPTIONS]
      record = _Record(
          where=where, id=qid, image_id=image_id,
          question=row.get("question") or "", answer=_cell(row, "answer"), task=task,
          types={k: _cell(row, f"type_{k}") for k in ("structural", "semantic", "detailed")},
          objects=tuple(objects), size=size,
          options=options if all(o not in MISSING for o in options) else None)
      if missing:
        skips.bad(record, "unknown_object", f"object(s) {', '.join(missing)} are not in image "
                  f"{image_id!r} of {graphs_path}")
        continue
      yield record


def load_gqa_csv(csv_path: str | os.PathLike, images_dir: str | os.PathLike,
                 task: Union[None, str, GqaTask] = None, limit: Optional[int] = None, *,
                 scene_graphs_json: Optional[str | os.PathLike] = None, on_bad: str = "raise",
                 require_boxes: bool = False, check_image_size: bool = True,
                 name: Optional[str] = None) -> GqaDataset:
  """The questions of one of the study's per-task CSV files, in file order.

  Needs the columns question_id (kept as written: leading zeros stay), img_id, question, answer;
  reads when present type_*, image_w/image_h, "true option"/"false option" and the boxes of the
  "central object" or "object1"/"object2" columns (x, y, w, h; "-" for an absent object). Where
  a row has no box columns, the boxes come from `scene_graphs_json` by the object id columns;
  where it has no image size, from the scene graphs or else the image file. The task comes from
  the file name (..._<Task>.csv) unless given. Other arguments as `load_gqa`.
  """
  path = os.fspath(csv_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GQA CSV file {path!r} does not exist")
  task_name = csv_task(path, task)
  skips = _Skips(on_bad)
  images = _Images(images_dir, check_image_size)
  graphs_path = os.fspath(scene_graphs_json) if scene_graphs_json is not None else None
  graphs = _read_json(graphs_path, "scene graphs") if graphs_path is not None else None
  records = _csv_records(path, task_name, graphs, graphs_path, skips)
  examples = _collect(records, images, skips, require_boxes, limit)
  name = name or os.path.splitext(os.path.basename(path))[0]
  return GqaDataset(name, examples, skips.counts, skips.log)

