"""VQAv2 validation questions from the official files, for the Narrow Gate study's knockout
evaluation (PROTOCOLS.md §2 (d): 2,000 questions sampled with seed 42).

  <root>/v2_OpenEnded_mscoco_val2014_questions.json
      {"questions": [{"image_id", "question", "question_id"}, ...], ...}
  <root>/v2_mscoco_val2014_annotations.json
      {"annotations": [{"question_id", "image_id", "multiple_choice_answer", "answer_type",
                        "question_type", "answers": [{"answer", "answer_confidence",
                                                      "answer_id"}] x 10}, ...], ...}
  <root>/val2014/COCO_val2014_{image_id:012d}.jpg   (or {image_id:012d}.jpg)

Each file and folder can be named instead (relative to root, or absolute). The sample is
`ng_common.sample_rows` over the questions in the questions file's order: sorted(numpy
default_rng(seed).choice(#questions, sample, replace=False)), examples in file order. The study's
own sampler is not public in a form we can match and may pick other questions; the sample here is
reproducible, not the study's.

Each sampled question becomes an `Example`: id str(question_id), the prompt from `template` (the
study's `VQA_PROMPT` by default) with the raw question inside it, answer = multiple_choice_answer,
answers = the ten human answers (as written; the VQA metric normalises them), meta {"question_id",
"image_id", "answer_type", "question_type"}. Errors (naming the file and question): a folder
without its questions or annotations file, a missing field, a sampled question without an
annotation or whose annotation names another image, a missing image file, no questions at all.
Only the sampled questions are checked in detail and need their images.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from narrowgate_jax.data.examples import Example
from narrowgate_jax.data.ng_common import (VQA_PROMPT, NgDataset, check_folder, check_template,
                                           count_or_none, in_folder, question_prompt, read_json,
                                           sample_rows)

QUESTIONS_FILE = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS_FILE = "v2_mscoco_val2014_annotations.json"
IMAGES_DIR = "val2014"
IMAGE_NAMES = ("COCO_val2014_{:012d}.jpg", "{:012d}.jpg")


def _int_field(record: dict, key: str, where: str) -> int:
  value = record.get(key)
  if not isinstance(value, int) or isinstance(value, bool):
    got = "nothing" if key not in record else type(value).__name__
    raise ValueError(f"{where}: field {key!r} must be an int, got {got}")
  return value


def _list_of(data: Any, key: str, path: str) -> list:
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise ValueError(f"{path}: expected a JSON object with a list {key!r}")
  return data[key]


def _annotation_index(annotations: list, path: str) -> dict[int, dict]:
  """question_id -> annotation (only the ids are checked here)."""
  index = {}
  for i, record in enumerate(annotations):
    where = f"{path}: annotations[{i}]"
    if not isinstance(record, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    index[_int_field(record, "question_id", where)] = record
  return index


def _answers(annotation: dict, where: str) -> tuple[str, ...]:
  answers = annotation.get("answers")
  if not isinstance(answers, list) or not answers:
    raise ValueError(f"{where}: field 'answers' must be a non-empty list")
  texts = []
  for j, answer in enumerate(answers):
    text = answer.get("answer") if isinstance(answer, dict) else None
    if not isinstance(text, str):
      raise ValueError(f"{where}: answers[{j}] must be an object with a str 'answer'")
    texts.append(text)
  return tuple(texts)


def image_path(images_dir: str, image_id: int, where: str) -> str:
  """The image file of a COCO val2014 image id: COCO_val2014_<id>.jpg or <id>.jpg."""
  names = [pattern.format(image_id) for pattern in IMAGE_NAMES]
  for name in names:
    path = os.path.join(images_dir, name)
    if os.path.isfile(path):
      return os.path.abspath(path)
  raise FileNotFoundError(f"{where}: image file {names[0]!r} (or {names[1]!r}) does not exist "
                          f"in {images_dir}")


def _example(question: Any, annotations: dict[int, dict], paths: tuple[str, str, str],
             template: str, index: int) -> Example:
  questions_path, annotations_path, images_dir = paths
  where = f"{questions_path}: questions[{index}]"
  if not isinstance(question, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(question).__name__}")
  qid = _int_field(question, "question_id", where)
  image_id = _int_field(question, "image_id", where)
  prompt, text = question_prompt(template, question.get("question"), where)
  annotation = annotations.get(qid)
  if annotation is None:
    raise ValueError(f"{where}: question_id {qid} has no annotation in {annotations_path}")
  at = f"{annotations_path}: question_id {qid}"
  if _int_field(annotation, "image_id", at) != image_id:
    raise ValueError(f"{at}: image_id {annotation['image_id']} but the question file says "
                     f"{image_id}")
  answer = annotation.get("multiple_choice_answer")
  if not isinstance(answer, str):
    raise ValueError(f"{at}: field 'multiple_choice_answer' must be a str")
  meta = {"question_id": qid, "image_id": image_id,
          "answer_type": str(annotation.get("answer_type", "")),
          "question_type": str(annotation.get("question_type", ""))}
  return Example(id=str(qid), prompt=prompt, images=(image_path(images_dir, image_id, where),),
                 question=text, answer=answer, answers=_answers(annotation, at), meta=meta)


def _resolve_file(root: str, name: str | os.PathLike, what: str, argument: str) -> str:
  path = in_folder(root, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VQAv2 folder {root!r} has no {what} file {os.fspath(name)!r} "
                            f"(pass {argument}= to name it)")
  return path


def load_vqav2(root: str | os.PathLike, *, questions: str | os.PathLike = QUESTIONS_FILE,
               annotations: str | os.PathLike = ANNOTATIONS_FILE,
               images: str | os.PathLike = IMAGES_DIR, sample: Optional[int] = 2000,
               seed: int = 42, template: str = VQA_PROMPT,
               name: Optional[str] = None) -> NgDataset:
  """`sample` VQAv2 questions (all, in file order, when None) drawn with `seed`; see the module
  docstring. questions, annotations, images: names relative to `root`, or absolute paths."""
  root = check_folder(root, "VQAv2 folder")
  template = check_template(template, with_question=True)
  sample = count_or_none(sample, "sample")
  questions_path = _resolve_file(root, questions, "questions", "questions")
  annotations_path = _resolve_file(root, annotations, "annotations", "annotations")
  images_dir = check_folder(in_folder(root, images), "VQAv2 images folder")
  question_list = _list_of(read_json(questions_path, "VQAv2 questions"), "questions",
                           questions_path)
  if not question_list:
    raise ValueError(f"{questions_path}: has no questions")
  annotation_index = _annotation_index(
      _list_of(read_json(annotations_path, "VQAv2 annotations"), "annotations", annotations_path),
      annotations_path)
  rows = sample_rows(len(question_list), sample, seed, questions_path)
  paths = (questions_path, annotations_path, images_dir)
  examples = [_example(question_list[i], annotation_index, paths, template, i) for i in rows]
  seen: dict[str, int] = {}
  for i, example in zip(rows, examples):
    if example.id in seen:
      raise ValueError(f"{questions_path}: questions[{i}]: question_id {example.id} already used "
                       f"by questions[{seen[example.id]}]")
    seen[example.id] = i
  return NgDataset(name or "vqav2", examples)
