"""The Narrow Gate study's data loaders (VQAv2, Karpathy captions, ImageNet folders, `datasets`
folders and parquet) on their synthetic fixtures: contents, sampling determinism, every error."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from narrowgate_jax.data import (CAPTION_PROMPT, IMAGENET_PROMPT, VQA_PROMPT, NgDataset,
                                 check_unique_ids, load_hf_dataset, load_imagenet_folders,
                                 load_karpathy, load_vqav2, read_class_mapping, write_ng_fixtures)
from narrowgate_jax.data import ng_synthetic
from narrowgate_jax.data.vqav2 import ANNOTATIONS_FILE, QUESTIONS_FILE


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
  return write_ng_fixtures(tmp_path_factory.mktemp("ng"), seed=0)


def _words(text):
  return set(re.findall(r"\w+|[^\w\s]", text.replace("<image>", " ").lower()))


def _check(ds, name=None):
  assert isinstance(ds, NgDataset) and len(ds) > 0
  check_unique_ids(ds)
  if name is not None:
    assert ds.name == name
  for e in ds:
    assert e.num_markers == len(e.images) == 1
    assert e.question is None or e.question in e.prompt
    assert _words(" ".join([e.prompt, *e.answers])) <= set(ng_synthetic.WORDS), e
  return ds


def _copy(path, tmp_path):
  target = tmp_path / os.path.basename(path)
  (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, target)
  return str(target)


def _tree_hashes(root, skip=("hf_",)):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      rel = os.path.relpath(os.path.join(d, n), root)
      if not rel.startswith(skip):
        out[rel] = hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
  return out


# ------------------------------------------------------------------------------ fixtures


def test_fixtures_are_deterministic(fx, tmp_path):
  for key, path in fx.items():
    assert os.path.exists(path), key
  root = os.path.dirname(fx["vqav2"])
  same = write_ng_fixtures(tmp_path / "a", seed=0, hf=False)
  assert "hf_disk" not in same and _tree_hashes(root) == _tree_hashes(tmp_path / "a")
  write_ng_fixtures(tmp_path / "b", seed=1, hf=False)
  assert _tree_hashes(root) != _tree_hashes(tmp_path / "b")


def test_library_imports_without_datasets():
  code = ("import sys, narrowgate_jax.data; "
          "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ VQAv2


def test_vqav2_all_questions(fx):
  ds = _check(load_vqav2(fx["vqav2"], sample=None), "vqav2")
  questions = json.load(open(os.path.join(fx["vqav2"], QUESTIONS_FILE)))["questions"]
  annotations = {a["question_id"]: a
                 for a in json.load(open(os.path.join(fx["vqav2"], ANNOTATIONS_FILE)))[
                     "annotations"]}
  assert [e.id for e in ds] == [str(q["question_id"]) for q in questions]
  for e, q in zip(ds, questions):
    a = annotations[q["question_id"]]
    assert e.question == q["question"]
    assert e.prompt == VQA_PROMPT.replace("{question}", q["question"])
    assert e.answer == a["multiple_choice_answer"] and len(e.answers) == 10
    assert e.answers == tuple(x["answer"] for x in a["answers"])
    assert e.meta == {"question_id": q["question_id"], "image_id": q["image_id"],
                      "answer_type": a["answer_type"], "question_type": a["question_type"]}
    assert os.path.isfile(e.images[0]) and f"{q['image_id']:012d}.jpg" in e.images[0]
  names = {os.path.basename(e.images[0]) for e in ds}
  assert any(n.startswith("COCO_val2014_") for n in names)
  assert any(not n.startswith("COCO_") for n in names)  # the short name form is accepted


def test_vqav2_sampling(fx):
  full = load_vqav2(fx["vqav2"], sample=None)
  ds = load_vqav2(fx["vqav2"], sample=5)  # seed 42, the study's
  rows = sorted(np.random.default_rng(42).choice(len(full), size=5, replace=False))
  assert [e.id for e in ds] == [full[int(i)].id for i in rows]
  assert [e.id for e in load_vqav2(fx["vqav2"], sample=5, seed=42)] == [e.id for e in ds]
  others = {tuple(e.id for e in load_vqav2(fx["vqav2"], sample=5, seed=s)) for s in range(5)}
  assert len(others) > 1
  with pytest.raises(ValueError, match="sample of 2000 but there are only 12"):
    load_vqav2(fx["vqav2"])  # the study's 2,000 > the fixture's 12


def test_vqav2_template_and_names(fx, tmp_path):
  ds = load_vqav2(fx["vqav2"], sample=2, template="Q: {question} <image> A:", name="v")
  assert ds.name == "v" and ds[0].prompt == f"Q: {ds[0].question} <image> A:"
  with pytest.raises(ValueError, match="must hold {question} exactly once"):
    load_vqav2(fx["vqav2"], template="<image> caption")
  with pytest.raises(ValueError, match="exactly one <image>"):
    load_vqav2(fx["vqav2"], template="{question}")
  with pytest.raises(ValueError, match="sample must be a positive int"):
    load_vqav2(fx["vqav2"], sample=0)
  # Files named explicitly, the images folder elsewhere.
  root = _copy(fx["vqav2"], tmp_path)
  os.rename(os.path.join(root, QUESTIONS_FILE), tmp_path / "q.json")
  os.rename(os.path.join(root, "val2014"), tmp_path / "imgs")
  ds = load_vqav2(root, questions=tmp_path / "q.json", images=tmp_path / "imgs", sample=None)
  assert len(ds) == 12


def test_vqav2_errors(fx, tmp_path):
  root = _copy(fx["vqav2"], tmp_path)
  with pytest.raises(FileNotFoundError, match="VQAv2 folder .* does not exist"):
    load_vqav2(tmp_path / "nothing")
  os.rename(os.path.join(root, ANNOTATIONS_FILE), tmp_path / "a.json")
  with pytest.raises(FileNotFoundError, match=f"no annotations file '{ANNOTATIONS_FILE}'"):
    load_vqav2(root, sample=None)
  annotations = json.load(open(tmp_path / "a.json"))
  # A question without an annotation.
  dropped = annotations["annotations"].pop(3)
  json.dump(annotations, open(os.path.join(root, ANNOTATIONS_FILE), "w"))
  with pytest.raises(ValueError, match=rf"questions\[3\]: question_id {dropped['question_id']} "
                     "has no annotation"):
    load_vqav2(root, sample=None)
  annotations["annotations"].insert(3, dropped)
  annotations["annotations"][0]["multiple_choice_answer"] = 7
  json.dump(annotations, open(os.path.join(root, ANNOTATIONS_FILE), "w"))
  with pytest.raises(ValueError, match="question_id 1000: field 'multiple_choice_answer'"):
    load_vqav2(root, sample=None)
  annotations["annotations"][0]["multiple_choice_answer"] = "red"
  json.dump(annotations, open(os.path.join(root, ANNOTATIONS_FILE), "w"))
  # A missing image file.
  os.remove(os.path.join(root, "val2014", "COCO_val2014_000000000100.jpg"))
  with pytest.raises(FileNotFoundError, match="image file 'COCO_val2014_000000000100.jpg' "
                     r"\(or '000000000100.jpg'\) does not exist"):
    load_vqav2(root, sample=None)
  # A question missing a field, no questions, bad JSON.
  path = os.path.join(root, QUESTIONS_FILE)
  json.dump({"questions": [{"image_id": 101, "question_id": 1010}]}, open(path, "w"))
  with pytest.raises(ValueError, match=r"questions\[0\]: field 'question' must be a non-empty"):
    load_vqav2(root, sample=None)
  json.dump({"questions": []}, open(path, "w"))
  with pytest.raises(ValueError, match="has no questions"):
    load_vqav2(root, sample=None)
  open(path, "w").write('{"questions":\n [}')
  with pytest.raises(ValueError, match=re.escape(path) + ":2: not valid JSON"):
    load_vqav2(root, sample=None)


# ------------------------------------------------------------------------------ Karpathy


def test_karpathy_coco(fx):
  data = json.load(open(fx["coco_karpathy"]))
  test_rows = [r for r in data["images"] if r["split"] == "test"]
  ds = _check(load_karpathy(os.path.dirname(fx["coco_karpathy"]), fx["coco_images"]),
              "coco-test")
  assert [e.id for e in ds] == [str(r["cocoid"]) for r in test_rows]
  for e, r in zip(ds, test_rows):
    assert e.prompt == CAPTION_PROMPT and e.question is None and e.answer is None
    assert e.answers == tuple(s["raw"].strip() for s in r["sentences"]) and len(e.answers) == 5
    assert e.images == (os.path.join(fx["coco_images"], "val2014", r["filename"]),)
    assert e.meta["split"] == "test" and e.meta["cocoid"] == r["cocoid"]
  assert [e.id for e in load_karpathy(fx["coco_karpathy"], fx["coco_images"], first=2)] == \
      [e.id for e in ds][:2]
  assert len(load_karpathy(fx["coco_karpathy"], fx["coco_images"], split=None)) == 8
  assert len(load_karpathy(fx["coco_karpathy"], fx["coco_images"], split="restval")) == 1


def test_karpathy_flickr_and_flat_coco(fx, tmp_path):
  ds = _check(load_karpathy(fx["flickr_karpathy"], fx["flickr_images"]), "flickr30k-test")
  rows = [r for r in json.load(open(fx["flickr_karpathy"]))["images"] if r["split"] == "test"]
  assert [e.id for e in ds] == [os.path.splitext(r["filename"])[0] for r in rows]
  assert ds[0].images == (os.path.join(fx["flickr_images"], rows[0]["filename"]),)
  # COCO images in one flat folder (no val2014/ level) are found too.
  flat = _copy(os.path.join(fx["coco_images"], "val2014"), tmp_path)
  assert len(load_karpathy(fx["coco_karpathy"], flat)) == 5


def test_karpathy_errors(fx, tmp_path):
  with pytest.raises(ValueError, match=r"split 'nosuch' has no rows \(splits present: restval, "
                     r"test, train, val\)"):
    load_karpathy(fx["coco_karpathy"], fx["coco_images"], split="nosuch")
  with pytest.raises(FileNotFoundError, match="has no split file .*dataset_coco.json"):
    load_karpathy(tmp_path, fx["coco_images"])
  with pytest.raises(FileNotFoundError, match="caption images folder"):
    load_karpathy(fx["coco_karpathy"], tmp_path / "nothing")
  data = json.load(open(fx["coco_karpathy"]))
  path = str(tmp_path / "dataset_coco.json")
  missing = data["images"][0]["filename"]
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=rf"images\[0\]: image file .*{missing}.* does not "
                     "exist"):
    load_karpathy(fx["coco_karpathy"], empty)
  data["images"][2]["sentences"] = []
  json.dump(data, open(path, "w"))
  with pytest.raises(ValueError, match=r"images\[2\]: field 'sentences' must be a non-empty"):
    load_karpathy(path, fx["coco_images"])
  del data["images"][2]["filename"]
  json.dump(data, open(path, "w"))
  with pytest.raises(ValueError, match=r"images\[2\]: field 'filename'"):
    load_karpathy(path, fx["coco_images"])
  shutil.copy(fx["flickr_karpathy"], tmp_path)
  with pytest.raises(ValueError, match="has dataset_coco.json and dataset_flickr30k.json"):
    load_karpathy(tmp_path, fx["coco_images"])


# ------------------------------------------------------------------------------ ImageNet


def test_imagenet_all(fx):
  ds = _check(load_imagenet_folders(fx["imagenet"], classes=None, per_class=None), "imagenet")
  assert len(ds) == 12 and ds.skipped == {}
  # Labels follow the mapping file's order, whose first class has no folder.
  assert [e.label for e in ds] == [1] * 4 + [2] * 4 + [3] * 4
  assert [e.answer for e in list(ds)[::4]] == ["fish", "bird", "dog"]
  assert ds[0].answers == ("fish", "small fish") and ds[0].prompt == IMAGENET_PROMPT
  assert ds[0].id == "n10000001/n10000001_1" and ds[0].meta["folder"] == "n10000001"
  assert ds[0].images == (os.path.join(fx["imagenet"], "n10000001", "n10000001_1.JPEG"),)
  same = load_imagenet_folders(fx["imagenet"], mapping=fx["imagenet_json_mapping"],
                               classes=None, per_class=None)
  assert [(e.id, e.label, e.answers) for e in same] == [(e.id, e.label, e.answers) for e in ds]


def test_imagenet_selection(fx):
  full = load_imagenet_folders(fx["imagenet"], classes=None, per_class=None)
  ds = load_imagenet_folders(fx["imagenet"], classes=2, per_class=3, seed=5)
  rng = np.random.default_rng(5)
  chosen = [[1, 2, 3][i] for i in sorted(rng.choice(3, size=2, replace=False))]
  expected = []
  for label in chosen:
    members = [e.id for e in full if e.label == label]
    expected += [members[i] for i in sorted(rng.choice(4, size=3, replace=False))]
  assert [e.id for e in ds] == expected
  assert [e.id for e in load_imagenet_folders(fx["imagenet"], classes=2, per_class=3, seed=5)] \
      == expected
  picks = {tuple(e.id for e in load_imagenet_folders(fx["imagenet"], classes=2, per_class=2,
                                                      seed=s)) for s in range(6)}
  assert len(picks) > 1
  assert len(load_imagenet_folders(fx["imagenet"], classes=3, per_class=100)) == 12
  with pytest.raises(ValueError, match="asked for 100 classes but only 3 have images"):
    load_imagenet_folders(fx["imagenet"])  # the study's 100 > the fixture's 3


def test_imagenet_mapping_formats(fx, tmp_path):
  folders = ["n10000001", "n10000002"]
  keras = tmp_path / "imagenet_class_index.json"
  keras.write_text(json.dumps({"1": ["n10000002", "small_bird"], "0": ["n10000001", "fish"]}))
  assert read_class_mapping(keras) == {"n10000001": ("fish",), "n10000002": ("small bird",)}
  names = tmp_path / "names.json"
  names.write_text(json.dumps(["fish, small fish", ["bird"]]))
  assert read_class_mapping(names, folders) == {"n10000001": ("fish", "small fish"),
                                                "n10000002": ("bird",)}
  pairs = tmp_path / "pairs.json"
  pairs.write_text(json.dumps([["n10000002", "bird"], ["n10000001", ["fish", "small fish"]]]))
  assert list(read_class_mapping(pairs)) == ["n10000002", "n10000001"]
  # Folders named by class: no mapping needed.
  root = tmp_path / "other" / "named"  # no mapping file in it or its parent
  for folder in ("golden_retriever", "cat"):
    shutil.copytree(os.path.join(fx["imagenet"], "n10000001"), root / folder)
  ds = load_imagenet_folders(root, classes=None, per_class=2)
  assert [(e.label, e.answer) for e in ds] == [(0, "cat")] * 2 + [(1, "golden retriever")] * 2


def test_imagenet_errors(fx, tmp_path):
  root = tmp_path / "train"
  shutil.copytree(fx["imagenet"], root)
  with pytest.raises(FileNotFoundError, match="no class-name mapping file "
                     r"\(LOC_synset_mapping.txt or"):
    load_imagenet_folders(root, classes=None)
  shutil.copy(fx["imagenet_mapping"], tmp_path)  # found in the root's parent
  assert len(load_imagenet_folders(root, classes=None)) == 12
  # An empty class folder: skipped and counted, or an error naming it.
  (root / "n10000004").mkdir()
  (root / "n10000004" / "notes.txt").write_text("no images here")
  ds = load_imagenet_folders(root, classes=None)
  assert len(ds) == 12 and ds.skipped == {"empty_class": 1}
  assert str(root / "n10000004") in ds.skip_log[0][0]
  with pytest.raises(ValueError, match=f"class folder '{root / 'n10000004'}' holds no image"):
    load_imagenet_folders(root, classes=None, on_empty="raise")
  with pytest.raises(ValueError, match="on_empty must be one of"):
    load_imagenet_folders(root, on_empty="ignore")
  # A folder the mapping lacks; a malformed mapping line.
  (root / "n19999999").mkdir()
  with pytest.raises(ValueError, match="has no class for folder 'n19999999'"):
    load_imagenet_folders(root, classes=None)
  bad = tmp_path / "LOC_synset_mapping.txt"
  bad.write_text("n10000001 fish\n\nn10000002\n")
  with pytest.raises(ValueError, match=re.escape(str(bad)) + ":3: expected"):
    load_imagenet_folders(root, classes=None)
  bad.write_text("n10000001 fish\nn10000001 dog\n")
  with pytest.raises(ValueError, match=":2: class 'n10000001' already on line 1"):
    read_class_mapping(bad)
  with pytest.raises(ValueError, match="has no class folders"):
    load_imagenet_folders(tmp_path / "train" / "n10000004")
  with pytest.raises(FileNotFoundError, match="mapping file .* does not exist"):
    load_imagenet_folders(fx["imagenet"], mapping=tmp_path / "none.txt")


# ------------------------------------------------------------------------------ datasets


@pytest.fixture(scope="module")
def hf(fx):
  pytest.importorskip("datasets")
  assert "hf_disk" in fx
  return fx


def test_hf_disk_classification(hf, tmp_path):
  ds = _check(load_hf_dataset(hf["hf_disk"], "classification", split="validation"),
              "hf_disk-validation")
  assert [e.label for e in ds] == [0, 1, 2] * 2 and [e.id for e in ds] == [str(i) for i in range(6)]
  assert [e.answers for e in list(ds)[:3]] == [("fish", "small fish"), ("bird", "small bird"),
                                         ("dog", "small dog")]
  assert ds[0].prompt == IMAGENET_PROMPT and ds[0].meta == {"row": 0, "split": "validation"}
  assert all(isinstance(e.images[0], Image.Image) for e in ds)
  # Materialised to files: the same pixels.
  cached = load_hf_dataset(hf["hf_disk"], "classification", split="validation",
                           image_dir=tmp_path / "cache")
  assert cached[1].images == (str(tmp_path / "cache" / "00000001.png"),)
  for a, b in zip(ds, cached):
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(Image.open(b.images[0])))
  picked = load_hf_dataset(hf["hf_disk"], "classification", split="validation", classes=2,
                           per_class=1, seed=3)
  assert len(picked) == 2 and len({e.label for e in picked}) == 2
  again = load_hf_dataset(hf["hf_disk"], "classification", split="validation", classes=2,
                          per_class=1, seed=3)
  assert [e.id for e in again] == [e.id for e in picked]
  named = load_hf_dataset(hf["hf_disk"], "classification", split="train",
                          class_names=["a", "b", "c"])
  assert [e.answer for e in named] == ["a", "b", "c"]


def test_hf_parquet_captions(hf):
  ds = _check(load_hf_dataset(hf["hf_parquet"], "caption", split="test"), "hf_captions-test")
  assert [e.meta["row"] for e in ds] == [0, 2, 4, 5] and all(len(e.answers) == 5 for e in ds)
  assert ds[0].prompt == CAPTION_PROMPT and ds[0].answer is None
  assert [e.id for e in ds] == ["0", "2", "4", "5"]  # img_id
  assert ds[1].meta["filename"] == "2002.jpg"
  assert len(load_hf_dataset(hf["hf_parquet"], "caption", split="test", first=2)) == 2
  assert len(load_hf_dataset(hf["hf_parquet"], "caption")) == 6
  with pytest.raises(ValueError, match=r"split 'dev' has no rows \(splits present: test, train, "
                     r"val\)"):
    load_hf_dataset(hf["hf_parquet"], "caption", split="dev")


def test_hf_parquet_vqa(hf):
  ds = _check(load_hf_dataset(hf["hf_vqa"], "vqa", split="validation"), "hf_vqa-validation")
  assert len(ds) == 6 and all(len(e.answers) == 10 for e in ds)
  assert [e.id for e in ds] == [str(300 * 10 + i // 2 * 10 + i % 2) for i in range(6)]
  for e in ds:
    assert e.prompt == VQA_PROMPT.replace("{question}", e.question)
    assert e.meta["answer_type"] in ("other", "yes/no")
  sampled = load_hf_dataset(hf["hf_vqa"], "vqa", split="validation", sample=3)
  rows = sorted(np.random.default_rng(42).choice(6, size=3, replace=False))
  assert [e.id for e in sampled] == [ds[int(r)].id for r in rows]
  # Without the answer column, the most common human answer.
  no_mc = load_hf_dataset(hf["hf_vqa"], "vqa", columns={"answer": None})
  for e, f in zip(no_mc, ds):
    assert e.answer == max(set(f.answers), key=f.answers.count)
  with pytest.raises(ValueError, match="cannot pick split 'test'"):
    load_hf_dataset(hf["hf_vqa"], "vqa", split="test")


def test_hf_errors(hf, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  with pytest.raises(ValueError, match="has splits train, validation; pass split="):
    load_hf_dataset(hf["hf_disk"], "classification")
  with pytest.raises(ValueError, match=r"has no split 'test' \(splits: train, validation\)"):
    load_hf_dataset(hf["hf_disk"], "classification", split="test")
  # A save_to_disk folder without its state.json; a folder with nothing in it.
  broken = _copy(os.path.join(hf["hf_disk"], "train"), tmp_path)
  os.remove(os.path.join(broken, "state.json"))
  with pytest.raises(FileNotFoundError, match="holds .arrow files but no state.json"):
    load_hf_dataset(broken, "classification")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no state.json or dataset_dict.json"):
    load_hf_dataset(tmp_path / "empty", "caption")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_dataset(tmp_path / "nothing", "caption")
  # Columns: missing, unknown role, an explicit one that is absent.
  with pytest.raises(ValueError, match="has no captions column .*columns: image, label"):
    load_hf_dataset(hf["hf_disk"], "caption", split="train")
  with pytest.raises(ValueError, match="unknown role 'text'"):
    load_hf_dataset(hf["hf_parquet"], "caption", columns={"text": "caption"})
  with pytest.raises(ValueError, match="has no column 'words'"):
    load_hf_dataset(hf["hf_parquet"], "caption", columns={"captions": "words"})
  with pytest.raises(ValueError, match="give at most one of"):
    load_hf_dataset(hf["hf_parquet"], "caption", first=2, sample=2)
  with pytest.raises(ValueError, match="task 'classification' only"):
    load_hf_dataset(hf["hf_parquet"], "caption", classes=2)
  with pytest.raises(ValueError, match="unknown task"):
    load_hf_dataset(hf["hf_parquet"], "retrieval")
  # Cells: bytes that are no image, a path that does not exist, labels out of range.
  pq.write_table(pa.table({"image": [{"bytes": b"not an image", "path": None}], "label": [0]}),
                 tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match=r"bad.parquet: row 0: image column 'image' does not "
                     "decode"):
    load_hf_dataset(tmp_path / "bad.parquet", "classification", class_names=["a", "b"])
  pq.write_table(pa.table({"image": [{"bytes": None, "path": "missing.png"}], "label": [5]}),
                 tmp_path / "label.parquet")
  with pytest.raises(FileNotFoundError, match="row 0: image file 'missing.png' does not exist"):
    load_hf_dataset(tmp_path / "label.parquet", "classification")
  Image.new("RGB", (4, 4)).save(tmp_path / "missing.png")
  with pytest.raises(ValueError, match="row 0: label 5 .* only 2 class names"):
    load_hf_dataset(tmp_path / "label.parquet", "classification", class_names=["a", "b"])
  ds = load_hf_dataset(tmp_path / "label.parquet", "classification")  # no names: no answer
  assert ds[0].label == 5 and ds[0].answer is None
  assert ds[0].images == (str(tmp_path / "missing.png"),)
