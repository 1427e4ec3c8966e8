"""GQA input for the cross-modal study: the official files, the study's CSVs, the synthetic
fixture, task filters, boxes, prompts, and every bad-input behaviour."""

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from narrowgate_jax.data import TASKS, GqaTask, load_gqa, load_gqa_csv, write_synthetic_gqa
from narrowgate_jax.data import gqa, gqa_synthetic

SIX = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  return write_synthetic_gqa(tmp_path_factory.mktemp("gqa_clean"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  return write_synthetic_gqa(tmp_path_factory.mktemp("gqa_bad"), include_bad=True)


def _official(paths, **kwargs):
  return load_gqa(paths["questions"], paths["scene_graphs"], paths["images"], **kwargs)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f)


def _rewrite_csv(path, out, drop=(), edit=None):
  """Copies a CSV without the columns in `drop`, passing each row through `edit`."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    columns = [c for c in reader.fieldnames if c not in drop]
    rows = [edit(r) if edit else r for r in reader]
  with open(out, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return str(out)


# ------------------------------------------------------------------------------ tasks, formats


def test_tasks_are_the_studys_six():
  assert tuple(TASKS) == SIX == tuple(gqa.CSV_COLUMNS) == tuple(gqa_synthetic.BUILDERS)
  assert TASKS["LogicalObj"].detailed == ("existThatOr", "existThatOrC")
  assert TASKS["ChooseAttr"].matches({"structural": "choose", "semantic": "attr",
                                      "detailed": "materialChoose"})
  assert not TASKS["ChooseAttr"].matches({"structural": "verify", "semantic": "attr",
                                          "detailed": "verifyAttr"})
  assert not TASKS["ChooseCat"].matches({"structural": "choose", "semantic": "cat",
                                         "detailed": "somethingElse"})


def test_both_formats_load_the_same_examples(clean):
  everything = _official(clean)
  assert len(everything) == 12 and everything.skipped == {}
  for task in SIX:
    official = _official(clean, task=task)
    from_csv = load_gqa_csv(clean["csv"][task], clean["images"])
    assert len(official) == 2 and from_csv.skipped == {}
    assert list(official) == list(from_csv), task
    assert official.name == f"gqa-{task}" and from_csv.name == f"GQA_synthetic_{task}"


def test_task_filters_select_the_right_questions(clean):
  questions = _read_json(clean["questions"])
  for k, task in enumerate(SIX):
    ds = _official(clean, task=task)
    assert [e.id for e in ds] == [f"{i:08d}" for i in range(12) if i % 6 == k]
    for e in ds:
      assert e.meta["task"] == task
      assert e.meta["types"] == questions[e.id]["types"] and TASKS[task].matches(e.meta["types"])
  everything = _official(clean)
  assert [e.id for e in everything] == [f"{i:08d}" for i in range(12)]
  # The verifyAttr questions belong to no task and are not read.
  distractors = [q for q, v in questions.items() if v["types"]["detailed"] == "verifyAttr"]
  assert len(distractors) == 4 and not set(distractors) & {e.id for e in everything}
  custom = GqaTask("Verify", "verify", "attr", ("verifyAttr",))
  assert sorted(e.id for e in _official(clean, task=custom)) == sorted(distractors)


def test_boxes_match_the_scene_graph_and_the_image(clean):
  questions, graphs = _read_json(clean["questions"]), _read_json(clean["scene_graphs"])
  for e in _official(clean):
    q = questions[e.id]
    graph = graphs[q["imageId"]]
    spans = q["annotations"]["question"]
    ids = [spans[s] for s in sorted(spans, key=int)]
    assert e.meta["object_ids"] == ids and e.meta["image_id"] == q["imageId"]
    objects = [graph["objects"][i] for i in ids]
    assert e.meta["boxes"] == [[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]]
                               for o in objects]
    assert e.meta["image_size"] == [graph["height"], graph["width"]]
    pixels = np.asarray(Image.open(e.images[0]), np.int32)
    assert pixels.shape[:2] == tuple(e.meta["image_size"])
    for o in objects:  # the box's centre shows the object's colour (JPEG: approximately)
      colour = gqa_synthetic.COLOURS[o["attributes"][0]]
      centre = pixels[o["y"] + o["h"] // 2, o["x"] + o["w"] // 2]
      assert np.abs(centre - colour).max() < 30, (e.id, o)


def test_prompt_question_answer_and_options(clean):
  words = set(gqa_synthetic.WORDS)
  for e in _official(clean):
    assert e.prompt == ("<image>\n" + e.question +
                        " \nAnswer the question using a single word or phrase.")
    assert e.question in e.prompt and e.num_markers == 1 and e.answers == (e.answer,)
    assert e.images == (os.path.join(clean["images"], e.meta["image_id"] + ".jpg"),)
    text = (e.prompt.replace("<image>", "") + " " + e.answer).lower()
    assert set(re.findall(r"\w+|[^\w\s]", text)) <= words
    if e.meta["task"].startswith("Choose"):
      answer, other = e.meta["options"]
      assert answer == e.answer and other != answer and other in e.question
    else:
      assert "options" not in e.meta
  assert gqa.prompt_for("is it?") == ("<image>\nis it? \nAnswer the question using a single "
                                     "word or phrase.")


def test_choose_options_from_gqa_programs():
  rel = [{"operation": "select", "argument": "toilet (1)"},
         {"operation": "choose rel", "argument": "faucet,to the left of|to the right of,s (2)"}]
  assert gqa.choose_options(rel, "left") == ["left", "right"]
  attr = [{"operation": "choose color", "argument": "black|blue"}]
  assert gqa.choose_options(attr, "blue") == ["blue", "black"]
  assert gqa.choose_options(attr, "red") is None and gqa.choose_options(None, "x") is None


def test_limit_and_leading_zero_ids(clean):
  ds = load_gqa_csv(clean["csv"]["ChooseRel"], clean["images"], limit=1)
  assert [e.id for e in ds] == ["00000002"]  # read as text: the zeros stay
  assert len(_official(clean, limit=5)) == 5
  with pytest.raises(ValueError, match="limit must be a positive int"):
    _official(clean, limit=0)


def test_synthetic_fixture_is_deterministic(tmp_path):
  a = write_synthetic_gqa(tmp_path / "a", seed=3)
  b = write_synthetic_gqa(tmp_path / "b", seed=3)
  c = write_synthetic_gqa(tmp_path / "c", seed=4)
  def read(path):
    with open(path, "rb") as f:
      return f.read()
  for key in ("questions", "scene_graphs"):
    assert read(a[key]) == read(b[key]) != read(c[key])
  for task in SIX:
    assert read(a["csv"][task]) == read(b["csv"][task])
  names = sorted(os.listdir(a["images"]))
  assert names == sorted(os.listdir(b["images"])) and len(names) == 12
  assert all(read(os.path.join(a["images"], n)) == read(os.path.join(b["images"], n))
             for n in names)
  with pytest.raises(ValueError, match="num_questions must be >= 1"):
    write_synthetic_gqa(tmp_path / "d", num_questions=0)


def test_csv_with_the_studys_own_rows(tmp_path):
  """Rows in the study's exact layout (copied from its LogicalObj file, captions cut): an absent
  second object is "-", ids keep their leading zeros."""
  header = ",".join(gqa.CSV_COLUMNS["LogicalObj"])
  rows = [
      ("12824169,2350927,Is there any grass or mud that is not brown?,no,grass,3899215,mud,-,"
       "common,existThatOrC,obj,logical,\"[{'operation': 'select'}]\",the cloud in the sky .,"
       "334,500,214,147,32,312,-,-,-,-"),
      ("04250744,2361804,Are there either coats or bags that are yellow?,yes,coat,3530379,bag,"
       "3342466,common,existThatOr,obj,logical,\"[]\",\"a, b. c\",500,375,71,92,0,96,104,158,"
       "196,215")]
  path = tmp_path / "GQA_val_correct_question_with_existThatOr_LogicalObj.csv"
  path.write_text("\n".join([header, *rows]) + "\n")
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (334, 500)).save(images / "2350927.jpg")
  Image.new("RGB", (500, 375)).save(images / "2361804.jpg")
  first, second = load_gqa_csv(path, images)
  assert first.id == "12824169" and second.id == "04250744"
  assert first.meta["boxes"] == [[32, 312, 246, 459]] and first.meta["object_ids"] == ["3899215"]
  assert second.meta["boxes"] == [[0, 96, 71, 188], [196, 215, 300, 373]]
  assert second.meta["image_size"] == [375, 500] and second.answer == "yes"
  assert first.meta["types"] == {"structural": "logical", "semantic": "obj",
                                 "detailed": "existThatOrC"}
  assert first.meta["task"] == "LogicalObj" and "options" not in first.meta


def test_csv_without_boxes_takes_them_from_the_scene_graphs(clean, tmp_path):
  drop = [c for c in gqa.CSV_COLUMNS["ChooseRel"]
          if c.startswith("image_") or c.endswith((" x", " y", " w", " h"))]
  path = _rewrite_csv(clean["csv"]["ChooseRel"], tmp_path / "rel_ChooseRel.csv", drop)
  expected = list(_official(clean, task="ChooseRel"))
  assert list(load_gqa_csv(path, clean["images"], scene_graphs_json=clean["scene_graphs"])) == \
      expected
  no_graph = load_gqa_csv(path, clean["images"])
  assert [e.meta["boxes"] for e in no_graph] == [[], []]
  assert [e.meta["image_size"] for e in no_graph] == [e.meta["image_size"] for e in expected]
  skipped = load_gqa_csv(path, clean["images"], require_boxes=True)
  assert len(skipped) == 0 and skipped.skipped == {"no_boxes": 2}


def test_csv_task_from_the_file_name(clean, tmp_path):
  assert gqa.csv_task("x/GQA_val_correct_question_with_relChooser_ChooseRel.csv") == "ChooseRel"
  with pytest.raises(ValueError, match="file name says task 'ChooseRel' but task='QueryAttr'"):
    load_gqa_csv(clean["csv"]["ChooseRel"], clean["images"], task="QueryAttr")
  renamed = _rewrite_csv(clean["csv"]["QueryAttr"], tmp_path / "questions.csv")
  with pytest.raises(ValueError, match="cannot tell the task from the file name"):
    load_gqa_csv(renamed, clean["images"])
  ds = load_gqa_csv(renamed, clean["images"], task="QueryAttr")
  assert list(ds) == list(_official(clean, task="QueryAttr"))


# ------------------------------------------------------------------------------------ bad input


def test_box_outside_the_image_raises_or_is_counted(bad):
  pattern = r"question 'bad-box'.*object 23999992 box \[86, 30, 106, 50\].*outside the 96x64"
  with pytest.raises(ValueError, match=pattern):
    _official(bad)
  with pytest.raises(ValueError, match=r"GQA_synthetic_ChooseAttr.csv:\d+: object 23999992"):
    load_gqa_csv(bad["csv"]["ChooseAttr"], bad["images"])
  for ds in (_official(bad, task="ChooseAttr", on_bad="skip"),
             load_gqa_csv(bad["csv"]["ChooseAttr"], bad["images"], on_bad="skip")):
    assert ds.skipped == {"box_outside_image": 1}
    assert [i for i, _ in ds.skip_log] == ["bad-box"] and "outside" in ds.skip_log[0][1]
    # Without require_boxes the question with no annotations is kept, with no boxes.
    assert [e.id for e in ds] == ["00000000", "00000006", "bad-noref"]
    assert ds[-1].meta["boxes"] == [] and ds[-1].meta["object_ids"] == []
  with pytest.raises(ValueError, match="on_bad must be one of"):
    _official(bad, on_bad="ignore")


def test_questions_without_boxes_are_skipped_and_counted(bad):
  official = _official(bad, task="ChooseAttr", on_bad="skip", require_boxes=True)
  from_csv = load_gqa_csv(bad["csv"]["ChooseAttr"], bad["images"], on_bad="skip",
                          require_boxes=True)
  for ds in (official, from_csv):
    assert [e.id for e in ds] == ["00000000", "00000006"]
    assert ds.skipped == {"box_outside_image": 1, "no_boxes": 1}
    assert dict(ds.skip_log)["bad-noref"].startswith("no_boxes")
  assert list(official) == list(from_csv)
  # Skipping for missing boxes needs no on_bad="skip": it is not an error.
  clean_noref = _official(bad, task="ChooseCat", require_boxes=True)
  assert len(clean_noref) == 2 and clean_noref.skipped == {}
  assert "no_boxes" in repr(official)


def test_empty_box_and_unknown_object(clean, tmp_path):
  graphs = _read_json(clean["scene_graphs"])
  graphs["2300000"]["objects"]["23000001"]["w"] = 0
  graphs["2300000"]["objects"]["23000002"]["w"] = 0
  questions = _read_json(clean["questions"])
  questions["00000001"]["annotations"]["question"] = {"3": "424242"}
  _write_json(tmp_path / "g.json", graphs)
  _write_json(tmp_path / "q.json", questions)
  def load(**kwargs):
    return load_gqa(tmp_path / "q.json", tmp_path / "g.json", clean["images"], **kwargs)
  with pytest.raises(ValueError, match=r"question '00000000'.*empty box \(w=0"):
    load()
  with pytest.raises(ValueError, match="question '00000001'.*object.*424242.*does not have"):
    load(task="ChooseCat")
  ds = load(on_bad="skip")
  assert ds.skipped == {"empty_box": 1, "unknown_object": 1} and len(ds) == 10


def test_missing_image_file_is_an_error(tmp_path):
  paths = write_synthetic_gqa(tmp_path)
  os.remove(os.path.join(paths["images"], "2300003.jpg"))
  with pytest.raises(FileNotFoundError, match=r"question '00000003'.*'2300003.jpg' does not"):
    _official(paths)
  with pytest.raises(FileNotFoundError, match=r"CompareAttr.csv:2: image file '2300003.jpg'"):
    load_gqa_csv(paths["csv"]["CompareAttr"], paths["images"])
  assert len(_official(paths, task="ChooseAttr")) == 2  # other tasks do not need it
  with pytest.raises(FileNotFoundError, match="images directory"):
    load_gqa(paths["questions"], paths["scene_graphs"], tmp_path / "nowhere")


def test_unknown_task_lists_the_six(clean):
  message = "unknown GQA task 'ChooseColour'; expected one of " + ", ".join(SIX)
  with pytest.raises(ValueError, match=re.escape(message)):
    _official(clean, task="ChooseColour")
  with pytest.raises(ValueError, match=re.escape(message)):
    load_gqa_csv(clean["csv"]["ChooseAttr"], clean["images"], task="ChooseColour")


def test_image_size_disagreeing_with_the_data(tmp_path):
  paths = write_synthetic_gqa(tmp_path)
  Image.new("RGB", (10, 12)).save(os.path.join(paths["images"], "2300001.jpg"))
  with pytest.raises(ValueError, match=r"question '00000001'.*is 10x12.*gives 64x96"):
    _official(paths)
  with pytest.raises(ValueError, match=r"ChooseCat.csv:2: image file .* is 10x12"):
    load_gqa_csv(paths["csv"]["ChooseCat"], paths["images"])
  assert len(_official(paths, check_image_size=False)) == 12


def test_malformed_files_name_the_place(clean, tmp_path):
  path = _rewrite_csv(clean["csv"]["QueryAttr"], tmp_path / "a_QueryAttr.csv", drop=["img_id"])
  with pytest.raises(ValueError, match=r"a_QueryAttr.csv:1: missing column 'img_id'"):
    load_gqa_csv(path, clean["images"])
  path = _rewrite_csv(clean["csv"]["QueryAttr"], tmp_path / "b_QueryAttr.csv",
                      edit=lambda r: {**r, "central object x": "left"})
  with pytest.raises(ValueError, match=r"b_QueryAttr.csv:2: field 'central object x' must be an "
                                       r"integer, got 'left'"):
    load_gqa_csv(path, clean["images"])
  path = _rewrite_csv(clean["csv"]["QueryAttr"], tmp_path / "c_QueryAttr.csv",
                      edit=lambda r: {**r, "question_id": "7"})
  with pytest.raises(ValueError, match=r"c_QueryAttr.csv:3: question_id '7' already used on "
                                       r"line 2"):
    load_gqa_csv(path, clean["images"])
  questions = _read_json(clean["questions"])
  del questions["00000002"]["imageId"]
  _write_json(tmp_path / "q.json", questions)
  with pytest.raises(ValueError, match=r"q.json: question '00000002': missing field 'imageId'"):
    load_gqa(tmp_path / "q.json", clean["scene_graphs"], clean["images"])
  graphs = _read_json(clean["scene_graphs"])
  del graphs["2300004"]
  _write_json(tmp_path / "g.json", graphs)
  with pytest.raises(ValueError, match=r"question '00000004': image '2300004' is not in the "
                                       r"scene graphs file"):
    load_gqa(clean["questions"], tmp_path / "g.json", clean["images"])
  (tmp_path / "broken.json").write_text("{\n  \"a\": \n")
  with pytest.raises(ValueError, match=r"broken.json:3: not valid JSON"):
    load_gqa(tmp_path / "broken.json", clean["scene_graphs"], clean["images"])
