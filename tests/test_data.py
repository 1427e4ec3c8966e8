"""Datasets (JSONL format, its errors, synthetic data, shards) and shape bucketing."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from narrowgate_jax.data import (SHAPES, WORDS, Example, JsonlDataset, ListDataset,
                                 check_unique_ids, load_dataset, shard, write_jsonl,
                                 write_synthetic)
from narrowgate_jax.data import synthetic
from narrowgate_jax.runs.batching import (FILLER, BatchPlan, bucket_length, count_shapes,
                                          default_buckets, plan_batches)

# The word list the brief gives prompt writers (word-level test tokenizers cover it).
ALLOWED = set("what is in the picture answer a an cat dog red blue green shape colour this animal "
              "provide one sentence caption for provided image question using single word or "
              "phrase : . ? 0 1 2 3 4 5 6 7 8 9 yellow circle square triangle".split())


def _png(path, size=(8, 6)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (10, 20, 30)).save(path)


def _write_lines(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
  return str(path)


# ------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
  _png(str(tmp_path / "imgs" / "a.png"))
  _png(str(tmp_path / "imgs" / "b.png"))
  _write_lines(tmp_path / "examples.jsonl", [
      {"id": "x", "prompt": "<image>What is this?", "image": "imgs/a.png",
       "question": "What is this?", "answer": "cat", "answers": ["cat", "a cat"], "label": 3,
       "bbox": [1, 2, 3, 4], "split": "val"},
      "",  # blank lines are skipped
      {"id": 7, "prompt": "<image> and <image>", "images": ["imgs/a.png", "imgs/b.png"],
       "answer": "dog"},
      {"id": "t", "prompt": "text only", "label": "animal"},
  ])
  ds = load_dataset(tmp_path)  # the directory form
  assert ds.name == tmp_path.name and len(ds) == 3
  x, y, t = ds
  assert x.images == (str(tmp_path / "imgs" / "a.png"),)
  assert (x.question, x.answer, x.answers, x.label) == ("What is this?", "cat", ("cat", "a cat"), 3)
  assert x.meta == {"bbox": [1, 2, 3, 4], "split": "val"}
  assert y.id == "7" and y.answers == ("dog",) and len(y.images) == 2 and y.num_markers == 2
  assert t.images == () and t.label == "animal" and t.answer is None and t.meta == {}
  assert ds[-1] is t
  with pytest.raises(IndexError, match="index 3 out of range"):
    ds[3]

  # Written elsewhere, the images stay where they are: paths are rewritten relative to the new file.
  out = write_jsonl(tmp_path / "copy" / "examples.jsonl", list(ds))
  assert json.loads(open(out).readline())["image"] == os.path.join("..", "imgs", "a.png")
  again = load_dataset(out, name="copy")
  assert again.name == "copy" and list(again) == list(ds)
  # A .jsonl file of any name; its stem names the dataset.
  os.rename(tmp_path / "examples.jsonl", tmp_path / "probe.jsonl")
  assert JsonlDataset(tmp_path / "probe.jsonl").name == "probe"


def test_write_rejects_pil_images_and_reserved_meta(tmp_path):
  with pytest.raises(ValueError, match="image 0 is a PIL image"):
    write_jsonl(tmp_path / "e.jsonl", [Example("a", "<image>", images=(Image.new("RGB", (2, 2)),))])
  with pytest.raises(ValueError, match="meta key 'label' is a reserved"):
    write_jsonl(tmp_path / "e.jsonl", [Example("a", "p", meta={"label": 1})])


@pytest.mark.parametrize("lines, error, message", [
    (["{not json"], ValueError, r":1: not valid JSON"),
    ([{"id": "a", "prompt": "p"}, "[1, 2]"], ValueError, r":2: expected a JSON object"),
    ([{"prompt": "p"}], ValueError, r":1: missing field 'id'"),
    ([{"id": "a", "prompt": "p"}, {"id": "b"}], ValueError, r":2: missing field 'prompt'"),
    ([{"id": "a", "prompt": 3}], ValueError, r":1: field 'prompt' must be str, got int"),
    ([{"id": "a", "prompt": "p", "label": True}], ValueError, r":1: field 'label' must be int"),
    ([{"id": "a", "prompt": "p", "answers": ["x", 2]}], ValueError,
     r":1: field 'answers' item 1 must be str"),
    ([{"id": "a", "prompt": "<image>p", "image": "missing.png"}], FileNotFoundError,
     r":1: image file 'missing.png' does not exist"),
    ([{"id": "a", "prompt": "p"},
      {"id": "b", "prompt": "<image>p", "images": ["ok.png", "no.png"]}], FileNotFoundError,
     r":2: image file 'no.png' does not exist"),
    ([{"id": "a", "prompt": "<image><image>p", "image": "ok.png"}], ValueError,
     r":1: prompt has 2 <image> marker\(s\) but 1 image\(s\)"),
    ([{"id": "a", "prompt": "p", "image": "ok.png"}], ValueError,
     r":1: prompt has 0 <image> marker\(s\) but 1 image"),
    ([{"id": "a", "prompt": "<image>p", "image": "ok.png", "images": ["ok.png"]}], ValueError,
     r":1: give either 'image' or 'images'"),
    ([{"id": "a", "prompt": "<image>p q", "image": "ok.png", "question": "r"}], ValueError,
     r":1: field 'question' 'r' is not"),
    ([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}], ValueError,
     r":2: id 'a' already used on line 1"),
    (["", "  "], ValueError, r"' has no examples"),
])
def test_jsonl_errors(tmp_path, lines, error, message):
  _png(str(tmp_path / "ok.png"))
  path = _write_lines(tmp_path / "d.jsonl", lines)
  with pytest.raises(error, match=re.escape(path) + message):
    JsonlDataset(path)


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset file .*nope.jsonl' does not exist"):
    load_dataset(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="dataset directory .* has no examples.jsonl"):
    load_dataset(tmp_path)
  (tmp_path / "data.csv").write_text("id,prompt\n")
  with pytest.raises(ValueError, match="expected a .jsonl file"):
    load_dataset(tmp_path / "data.csv")


# ------------------------------------------------------------------- datasets in memory, shards


def test_list_dataset_unique_ids_and_shards():
  examples = [Example(f"e{i}", "p", answers=["a"]) for i in range(11)]
  ds = ListDataset("mem", examples)
  assert len(ds) == 11 and ds[4].answers == ("a",)  # lists become tuples
  check_unique_ids(ds)
  with pytest.raises(ValueError, match=r"id 'e3' occurs twice \(examples 3 and 11\)"):
    check_unique_ids(ListDataset("dup", examples + [Example("e3", "q")]))
  with pytest.raises(TypeError, match="images must be a sequence"):
    Example("a", "<image>", images="cat.png")
  with pytest.raises(TypeError, match="answers must be a sequence"):
    Example("a", "p", answers="cat")
  with pytest.raises(TypeError, match="item 1 is a dict"):
    ListDataset("bad", [examples[0], {"id": "x"}])

  for count in (1, 2, 3, 4, 11, 13):
    shards = [shard(ds, h, count) for h in range(count)]
    ids = [e.id for s in shards for e in s]
    assert sorted(ids) == sorted(e.id for e in examples) and len(ids) == len(examples)
    for h, s in enumerate(shards):
      assert s.name == "mem"
      assert [s.parent_index(j) for j in range(len(s))] == list(range(h, 11, count))
      assert [e.id for e in s] == [e.id for e in shard(ds, h, count)]  # deterministic
  with pytest.raises(ValueError, match=r"shard index must be in \[0, 3\)"):
    shard(ds, 3, 3)
  with pytest.raises(ValueError, match="shard count must be a positive int"):
    shard(ds, 0, 0)


# ---------------------------------------------------------------------------------- synthetic


def _files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      full = os.path.join(root, n)
      out[os.path.relpath(full, directory)] = open(full, "rb").read()
  return out


def test_synthetic_deterministic_and_varied(tmp_path):
  path = write_synthetic(tmp_path / "a", num_examples=30, seed=0)
  write_synthetic(tmp_path / "b", num_examples=30, seed=0)
  write_synthetic(tmp_path / "c", num_examples=30, seed=1)
  assert os.path.basename(path) == "examples.jsonl"
  a, b, c = (_files(tmp_path / d) for d in "abc")
  assert a == b and len(a) == 31  # byte-identical: 30 PNGs and the JSONL
  assert a != c

  ds = load_dataset(tmp_path / "a")
  assert len(ds) == 30 and ds.name == "a"
  check_unique_ids(ds)
  sizes, prompts, colours, labels = set(), set(), set(), set()
  for e in ds:
    image = np.asarray(Image.open(e.images[0]))
    h, w = image.shape[:2]
    assert [h, w] == e.meta["size"] and image.shape[2] == 3
    assert e.answer == e.meta["colour"] and e.answers == (e.answer,)
    assert SHAPES[e.label] == e.meta["shape"]
    assert e.question in e.prompt and e.num_markers == 1
    # The box is exact: every shape pixel inside it, the shape's colour in it, background outside.
    x0, y0, x1, y1 = e.meta["bbox"]
    colour = np.asarray(synthetic.COLOURS[e.answer], np.uint8)
    is_shape = np.all(image == colour, axis=-1)
    assert is_shape[y0:y1, x0:x1].any() and is_shape.sum() == is_shape[y0:y1, x0:x1].sum()
    assert len(np.unique(image.reshape(-1, 3), axis=0)) == 2
    sizes.add((h, w))
    prompts.add(e.prompt)
    colours.add(e.answer)
    labels.add(e.label)
    words = re.findall(r"\w+|[^\w\s]+", e.prompt.replace("<image>", " ").lower())
    assert set(words) <= set(WORDS), set(words) - set(WORDS)
  assert len(sizes) == 5 and any(h != w for h, w in sizes)
  assert len(prompts) >= 4 and len({len(p) for p in prompts}) >= 4
  assert any(not e.prompt.startswith("<image>") for e in ds)  # text before the image
  assert colours == set(synthetic.COLOURS) and labels == {0, 1, 2}
  assert set(WORDS) <= ALLOWED


def test_synthetic_sizes_and_errors(tmp_path):
  write_synthetic(tmp_path, num_examples=3, seed=2, sizes=((20, 40),))
  assert {Image.open(e.images[0]).size for e in load_dataset(tmp_path)} == {(40, 20)}
  with pytest.raises(ValueError, match=r"size \(8, 40\) is too small"):
    write_synthetic(tmp_path, sizes=((8, 40),))
  with pytest.raises(ValueError, match="num_examples must be >= 1"):
    write_synthetic(tmp_path, num_examples=0)


# ---------------------------------------------------------------------------------- bucketing


def test_bucket_length():
  buckets = (16, 32, 64)
  assert [bucket_length(n, buckets) for n in (0, 1, 16, 17, 32, 33, 64)] == [16] * 3 + [32] * 2 + [
      64] * 2
  with pytest.raises(ValueError, match=r"length 65 exceeds the largest bucket \(64\)"):
    bucket_length(65, buckets)
  with pytest.raises(ValueError, match="strictly increasing"):
    bucket_length(3, (32, 16))
  with pytest.raises(ValueError, match="buckets is empty"):
    bucket_length(3, ())


def test_default_buckets_bound_padding():
  buckets = default_buckets(4096)
  assert buckets[0] == 64 and buckets[-1] == 4096 and len(buckets) < 25
  assert all(b % 16 == 0 for b in buckets) and list(buckets) == sorted(set(buckets))
  for n in range(65, 4097):
    assert bucket_length(n, buckets) < 1.25 * n + 16
  assert default_buckets(50) == (50,) and default_buckets(100, ratio=2.0) == (64, 100)
  with pytest.raises(ValueError, match="ratio must be > 1"):
    default_buckets(100, ratio=1.0)


def test_plan_batches():
  rng = np.random.default_rng(0)
  lengths = rng.integers(20, 300, size=50).tolist()
  buckets = default_buckets(512, min_length=32)
  plans = plan_batches(lengths, 8, buckets)
  used = {bucket_length(n, buckets) for n in lengths}
  assert count_shapes(plans) <= len(used) and count_shapes(plans) == len(used) > 1
  slots = [i for p in plans for i in p.indices]
  assert sorted(i for i in slots if i != FILLER) == list(range(50))  # each exactly once
  assert all(len(p.indices) == 8 for p in plans)
  for length in used:
    group = [p for p in plans if p.length == length]
    members = [i for p in group for i in p.real]
    assert members == sorted(members)  # dataset order within a bucket
    assert all(bucket_length(lengths[i], buckets) == length for i in members)
    assert all(FILLER not in p.indices for p in group[:-1])  # fillers only in the last batch,
    last = group[-1].indices
    assert list(last) == sorted(last, key=lambda i: i == FILLER)  # and at its end
  assert [p.length for p in plans] == sorted((p.length for p in plans), reverse=True)
  assert plans == plan_batches(lengths, 8, buckets)  # deterministic

  p = BatchPlan((5, 9, FILLER, FILLER), 64)
  assert p.real == (5, 9) and p.mask == (True, True, False, False) and p.filled == (5, 9, 5, 5)
  assert plan_batches([], 4, buckets) == []
  with pytest.raises(ValueError, match=r"example 2: length 600 exceeds the largest bucket"):
    plan_batches([10, 20, 600], 4, buckets)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    plan_batches([10], 0, buckets)
