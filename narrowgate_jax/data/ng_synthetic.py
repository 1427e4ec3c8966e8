"""Small synthetic fixtures of the Narrow Gate study's data, in every on-disk format its loaders
read, for tests and end-to-end smoke configs.

`write_ng_fixtures(directory, seed)` writes (keys of the returned dict -> paths):

  vqav2          vqav2/ with the official questions and annotations files (12 questions about 6
                 images, ten human answers each) and val2014/ (images named
                 COCO_val2014_<id>.jpg, every second one <id>.jpg)  -> `load_vqav2`
  coco_karpathy, coco_images
                 coco/dataset_coco.json (8 rows: 5 test, then train, val, restval mixed in) and
                 coco/images/val2014/...  -> `load_karpathy`
  flickr_karpathy, flickr_images
                 flickr30k/dataset_flickr30k.json (6 rows, 4 test) and flickr30k/flickr30k-images/
  imagenet, imagenet_mapping, imagenet_json_mapping
                 imagenet/train/<wnid>/*.JPEG (3 classes x 4 images), LOC_synset_mapping.txt in
                 imagenet/ (the root's parent; it lists a fourth class first, one without a
                 folder, so labels are 1, 2, 3) and the same names as imagenet/class_names.json
                 -> `load_imagenet_folders`
  hf_disk        a `datasets` DatasetDict saved with save_to_disk: splits train (3) and
                 validation (6), columns image (Image) and label (ClassLabel with the class
                 names)  -> `load_hf_dataset(..., "classification")`
  hf_parquet     a parquet file as nlphuji/flickr30k has it: image, caption (5 each), sentids,
                 split (4 test, 1 train, 1 val), img_id, filename  -> "caption"
  hf_vqa         a folder hf_vqa/data/validation-00000-of-00001.parquet as lmms-lab/VQAv2 has it:
                 image, question, answers ({answer, answer_confidence, answer_id} x 10),
                 multiple_choice_answer, question_id, image_id, question_type, answer_type (6 rows)

The hf_* fixtures need `datasets` (and pyarrow); without them those keys are left out. Images
are one shape in one colour on grey (`synthetic.draw_shape`): the VQA, caption and ImageNet
images JPEG, the hf_* ones PNG. Everything comes from one seeded generator. Every word of the
questions, answers, captions, class names and the study's prompts is in `WORDS` (lower-cased,
split as re.findall(r"\\w+|[^\\w\\s]", text)), so tests can build word-level tokenizers from it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import numpy as np
from PIL import Image

from narrowgate_jax.data.synthetic import COLOURS, draw_shape
from narrowgate_jax.data.vqav2 import ANNOTATIONS_FILE, IMAGE_NAMES, IMAGES_DIR, QUESTIONS_FILE

SHAPES = ("circle", "square", "triangle")
GREY = (128, 128, 128)
SIZES = ((48, 64), (64, 48), (56, 56))  # (height, width)
# Class folder (WordNet-style id) -> synonyms; the mapping file lists them in this order and the
# first has no folder.
CLASSES = {"n10000004": ("cat", "house cat"), "n10000001": ("fish", "small fish"),
           "n10000002": ("bird", "small bird"), "n10000003": ("dog", "small dog")}
CLASS_SHAPES = {"n10000001": "circle", "n10000002": "triangle", "n10000003": "square"}
IMAGES_PER_CLASS = 4
CAPTIONS = ("a {colour} {shape} on a grey background", "a picture of a {colour} {shape}",
            "the {shape} is {colour}", "one {colour} {shape} in the image",
            "a small {colour} {shape}")
# Every word of the fixtures and of the study's three prompts.
WORDS = ("what", "is", "the", "shape", "in", "image", "colour", "yes", "no", "a", "of", "on",
         "grey", "background", "picture", "one", "small", "answer", "question", "using", "single",
         "word", "or", "phrase", "provide", "-", "sentence", "caption", "for", "provided", "this",
         "animal", "cat", "house", "fish", "bird", "dog", "?", ".", ":", *COLOURS, *SHAPES)
VQA_COCO_FIRST_ID = 100


class _Draw:
  """The fixture's seeded image and answer choices, in a fixed order."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.count = 0

  def pick(self, options):
    return options[int(self.rng.integers(len(options)))]

  def image(self, shape: str, colour: str) -> Image.Image:
    height, width = SIZES[self.count % len(SIZES)]
    self.count += 1
    side = int(self.rng.integers(min(height, width) // 2, min(height, width) - 3))
    x0 = int(self.rng.integers(0, width - side + 1))
    y0 = int(self.rng.integers(0, height - side + 1))
    return draw_shape(height, width, shape, COLOURS[colour], GREY, (x0, y0, x0 + side, y0 + side))


def _save_jpeg(image: Image.Image, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format="JPEG", quality=95)


def _write_json(path: str, data: Any) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)
  return path


# ------------------------------------------------------------------------------ VQAv2


def _vqa_question(kind: str, shape: str, colour: str, asked: str) -> tuple[str, str, str, str]:
  """(question, correct answer, answer_type, question_type)."""
  if kind == "colour":
    return "what colour is the shape?", colour, "other", "what colour is the"
  if kind == "shape":
    return "what shape is in the image?", shape, "other", "what shape is"
  return f"is the shape {asked}?", "yes" if asked == colour else "no", "yes/no", "is the"


def _human_answers(draw: _Draw, correct: str, options: tuple[str, ...]) -> list[dict]:
  """Ten answers: mostly the correct one, a few others from `options`."""
  wrong = int(draw.rng.integers(0, 4))
  answers = [correct] * (10 - wrong) + [draw.pick([o for o in options if o != correct])
                                        for _ in range(wrong)]
  order = draw.rng.permutation(10)
  return [{"answer": answers[int(k)], "answer_confidence": draw.pick(("yes", "maybe")),
           "answer_id": j + 1} for j, k in enumerate(order)]


def _vqa_records(draw: _Draw, image_id: int) -> tuple[Image.Image, list, list]:
  shape, colour = draw.pick(SHAPES), draw.pick(tuple(COLOURS))
  image = draw.image(shape, colour)
  kinds = [("colour", "shape", "yes_no")[int(k)] for k in draw.rng.permutation(3)[:2]]
  questions, annotations = [], []
  for k, kind in enumerate(kinds):
    qid = image_id * 10 + k
    asked = draw.pick(tuple(COLOURS))
    text, correct, answer_type, question_type = _vqa_question(kind, shape, colour, asked)
    options = {"colour": tuple(COLOURS), "shape": SHAPES, "yes_no": ("yes", "no")}[kind]
    answers = _human_answers(draw, correct, options)
    texts = [a["answer"] for a in answers]
    common = max(texts, key=lambda t: (texts.count(t), t == correct))
    questions.append({"image_id": image_id, "question": text, "question_id": qid})
    annotations.append({"question_id": qid, "image_id": image_id, "answers": answers,
                        "multiple_choice_answer": common, "answer_type": answer_type,
                        "question_type": question_type})
  return image, questions, annotations


def write_vqav2(directory: str, draw: _Draw, num_images: int = 6) -> str:
  root = os.path.join(directory, "vqav2")
  questions, annotations = [], []
  for i in range(num_images):
    image_id = VQA_COCO_FIRST_ID + i
    image, qs, anns = _vqa_records(draw, image_id)
    _save_jpeg(image, os.path.join(root, IMAGES_DIR, IMAGE_NAMES[i % 2].format(image_id)))
    questions += qs
    annotations += anns
  info = {"description": "synthetic VQAv2-format fixture", "data_subtype": "val2014"}
  _write_json(os.path.join(root, QUESTIONS_FILE), {"info": info, "task_type": "Open-Ended",
                                                   "questions": questions})
  _write_json(os.path.join(root, ANNOTATIONS_FILE), {"info": info, "annotations": annotations})
  return root


# ------------------------------------------------------------------------------ Karpathy


def _sentences(draw: _Draw, shape: str, colour: str, first_id: int) -> list[dict]:
  sentences = []
  for j, pattern in enumerate(CAPTIONS):
    text = pattern.format(shape=shape, colour=colour)
    raw = text[0].upper() + text[1:] + draw.pick((".", "", " ."))
    sentences.append({"raw": raw, "tokens": text.split(), "imgid": None, "sentid": first_id + j})
  return sentences


def _karpathy_rows(draw: _Draw, splits: tuple[str, ...], coco: bool,
                   images_root: str) -> list[dict]:
  rows = []
  for imgid, split in enumerate(splits):
    shape, colour = draw.pick(SHAPES), draw.pick(tuple(COLOURS))
    sentences = _sentences(draw, shape, colour, imgid * len(CAPTIONS))
    for s in sentences:
      s["imgid"] = imgid
    row: dict[str, Any] = {"split": split, "sentids": [s["sentid"] for s in sentences],
                           "sentences": sentences, "imgid": imgid}
    if coco:
      cocoid = 500 + imgid
      row.update(filepath="val2014", filename=f"COCO_val2014_{cocoid:012d}.jpg", cocoid=cocoid)
      image_path = os.path.join(images_root, "val2014", row["filename"])
    else:
      row["filename"] = f"{1000 + imgid * 7}.jpg"
      image_path = os.path.join(images_root, row["filename"])
    _save_jpeg(draw.image(shape, colour), image_path)
    rows.append(row)
  return rows


def write_karpathy(directory: str, draw: _Draw, coco: bool) -> tuple[str, str]:
  """(split file, images root) of a COCO or Flickr30k Karpathy fixture."""
  if coco:
    base, images_root, file = "coco", os.path.join("coco", "images"), "dataset_coco.json"
    splits = ("test", "train", "test", "val", "test", "restval", "test", "test")
  else:
    base, images_root = "flickr30k", os.path.join("flickr30k", "flickr30k-images")
    file, splits = "dataset_flickr30k.json", ("train", "test", "test", "val", "test", "test")
  images_root = os.path.join(directory, images_root)
  rows = _karpathy_rows(draw, splits, coco, images_root)
  path = _write_json(os.path.join(directory, base, file),
                     {"images": rows, "dataset": "coco" if coco else "flickr30k"})
  return path, images_root


# ------------------------------------------------------------------------------ ImageNet


def write_imagenet(directory: str, draw: _Draw) -> tuple[str, str, str]:
  """(root of the class folders, LOC_synset_mapping.txt, class_names.json)."""
  base = os.path.join(directory, "imagenet")
  root = os.path.join(base, "train")
  for wnid, shape in CLASS_SHAPES.items():
    for k in range(IMAGES_PER_CLASS):
      image = draw.image(shape, draw.pick(tuple(COLOURS)))
      _save_jpeg(image, os.path.join(root, wnid, f"{wnid}_{k + 1}.JPEG"))
  mapping = os.path.join(base, "LOC_synset_mapping.txt")
  with open(mapping, "w", encoding="utf-8") as f:
    f.writelines(f"{wnid} {', '.join(names)}\n" for wnid, names in CLASSES.items())
  names = _write_json(os.path.join(base, "class_names.json"),
                      {wnid: ", ".join(n) for wnid, n in CLASSES.items()})
  return root, mapping, names


# ------------------------------------------------------------------------------ datasets


def _png(image: Image.Image) -> dict:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return {"bytes": buffer.getvalue(), "path": None}


def _hf_classification(datasets: Any, draw: _Draw, path: str) -> str:
  wnids = list(CLASS_SHAPES)
  names = [", ".join(CLASSES[w]) for w in wnids]
  features = datasets.Features({"image": datasets.Image(),
                                "label": datasets.ClassLabel(names=names)})
  splits = {}
  for split, count in (("train", 3), ("validation", 6)):
    labels = [i % len(wnids) for i in range(count)]
    images = [_png(draw.image(CLASS_SHAPES[wnids[k]], draw.pick(tuple(COLOURS)))) for k in labels]
    splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels},
                                               features=features)
  datasets.DatasetDict(splits).save_to_disk(path)
  return path


def _hf_captions(datasets: Any, draw: _Draw, path: str) -> str:
  rows: dict[str, list] = {k: [] for k in ("image", "caption", "sentids", "split", "img_id",
                                           "filename")}
  for i, split in enumerate(("test", "train", "test", "val", "test", "test")):
    shape, colour = draw.pick(SHAPES), draw.pick(tuple(COLOURS))
    sentences = _sentences(draw, shape, colour, i * len(CAPTIONS))
    rows["image"].append(_png(draw.image(shape, colour)))
    rows["caption"].append([s["raw"] for s in sentences])
    rows["sentids"].append([str(s["sentid"]) for s in sentences])
    rows["split"].append(split)
    rows["img_id"].append(str(i))
    rows["filename"].append(f"{2000 + i}.jpg")
  features = datasets.Features({
      "image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
      "sentids": datasets.Sequence(datasets.Value("string")), "split": datasets.Value("string"),
      "img_id": datasets.Value("string"), "filename": datasets.Value("string")})
  datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
  return path


def _hf_vqa(datasets: Any, draw: _Draw, folder: str) -> str:
  keys = ("image", "question", "answers", "multiple_choice_answer", "question_id", "image_id",
          "question_type", "answer_type")
  rows: dict[str, list] = {k: [] for k in keys}
  for i in range(3):
    image_id = 300 + i
    image, questions, annotations = _vqa_records(draw, image_id)
    for q, a in zip(questions, annotations):
      rows["image"].append(_png(image))
      rows["question"].append(q["question"])
      for key in keys[2:]:
        rows[key].append(a[key])
  path = os.path.join(folder, "data", "validation-00000-of-00001.parquet")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(path)
  return folder


def write_hf(directory: str, draw: _Draw) -> dict[str, str]:
  """The hf_* fixtures ({} when `datasets` is not installed)."""
  try:
    import datasets
  except ImportError:
    return {}
  quiet = datasets.are_progress_bars_disabled()
  datasets.disable_progress_bars()
  try:
    return {"hf_disk": _hf_classification(datasets, draw, os.path.join(directory, "hf_disk")),
            "hf_parquet": _hf_captions(datasets, draw,
                                       os.path.join(directory, "hf_captions.parquet")),
            "hf_vqa": _hf_vqa(datasets, draw, os.path.join(directory, "hf_vqa"))}
  finally:
    if not quiet:
      datasets.enable_progress_bars()


def write_ng_fixtures(directory: str | os.PathLike, seed: int = 0,
                      hf: Optional[bool] = None) -> dict[str, str]:
  """Writes every fixture under `directory`; returns name -> path (see the module docstring).

  hf: write the `datasets` fixtures (None: when `datasets` can be imported; True: raise
  ImportError without it; False: never).
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  draw = _Draw(seed)
  paths = {"vqav2": write_vqav2(directory, draw)}
  paths["coco_karpathy"], paths["coco_images"] = write_karpathy(directory, draw, coco=True)
  paths["flickr_karpathy"], paths["flickr_images"] = write_karpathy(directory, draw, coco=False)
  (paths["imagenet"], paths["imagenet_mapping"],
   paths["imagenet_json_mapping"]) = write_imagenet(directory, draw)
  if hf is not False:
    written = write_hf(directory, draw)
    if hf and not written:
      raise ImportError("the hf_* fixtures need the 'datasets' package: pip install "
                        "'narrowgate-jax[data]'")
    paths.update(written)
  return paths
