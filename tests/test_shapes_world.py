"""The shapes world: determinism, balance, pixels that agree with the scene, text, files, errors.

The pixel checks use only facts read off the image (which pixels differ from the background,
their centroid, which RGB channel dominates), never the generator's own geometry or colour table.
"""

import collections
import dataclasses
import os
import re

import numpy as np
import pytest
from PIL import Image

from narrowgate_jax.data import load_dataset
from narrowgate_jax.data import shapes_world as world
from narrowgate_jax.data.shapes_world import Scene

GREY = (128, 128, 128)
# The cell (row, column) of the 3x3 grid each position name means.
CELLS = {"top": (0, 1), "left": (1, 0), "centre": (1, 1), "right": (1, 2), "bottom": (2, 1)}


def _words(text):
  return re.findall(r"\w+|[^\w\s]", text.replace("<image>", " ").lower())


def _colour_name(rgb):
  """A colour word from the RGB channels' order alone (no palette)."""
  r, g, b = (int(v) for v in rgb)
  if r > 150 and g > 150 and b < 100:
    return "yellow"
  return {0: "red", 1: "green", 2: "blue"}[int(np.argmax((r, g, b)))]


def _mask(image, background=GREY):
  return (image != np.array(background, np.uint8)).any(axis=-1)


def _values(scenes, attribute):
  return collections.Counter(getattr(s, attribute) for s in scenes)


# ------------------------------------------------------------------------------ scenes & text


def test_vocabulary_is_one_word_answers():
  assert len(world.SHAPES) == len(world.COLOURS) == 4 and len(world.SIZES) == 2
  assert set(world.POSITIONS) == set(CELLS)
  for values in (world.SHAPES, world.COLOURS, world.POSITIONS, world.SIZES):
    assert all(len(_words(v)) == 1 for v in values)
  assert world.WORDS == tuple(sorted(set(world.WORDS)))
  words = set(world.WORDS)
  for scene in world.ALL_SCENES:
    assert set(_words(world.caption(scene))) <= words
  for attribute, questions in world.QUESTIONS.items():
    assert len(questions) >= 2 and all(set(_words(q)) <= words for q in questions)
    assert set(_words(world.CLASSIFY_PROMPTS[attribute])) <= words
  assert set(_words(world.CAPTION_PROMPT)) <= words
  # Nothing but the marker is left out: "image" is no word of this world's text.
  assert "image" not in words and "<" not in words


def test_caption_answers_and_labels():
  scene = Scene("circle", "red", "left", "big")
  assert world.caption(scene) == "a big red circle on the left"
  assert world.caption(Scene("cross", "blue", "centre", "small")) == (
      "a small blue cross in the centre")
  assert world.caption(Scene("square", "yellow", "top", "big")) == "a big yellow square at the top"
  pairs = world.qa_pairs(scene)
  assert [(a, ans) for a, _, ans in pairs] == [("shape", "circle"), ("colour", "red"),
                                              ("position", "left"), ("size", "big")]
  assert [q for _, q, _ in pairs] == [world.QUESTIONS[a][0] for a, _, _ in pairs]
  seen = {q for seed in range(30)
          for _, q, _ in world.qa_pairs(scene, np.random.default_rng(seed))}
  assert len(seen) > 4 and seen <= {q for qs in world.QUESTIONS.values() for q in qs}
  for s in world.ALL_SCENES:
    for attribute, values in world.VALUES.items():
      assert values[world.class_label(s, attribute)] == world.answer(s, attribute)
  assert world.class_label(scene) == world.SHAPES.index("circle")


def test_sample_scenes_is_deterministic_and_balanced():
  a, b = world.sample_scenes(320, seed=3), world.sample_scenes(320, seed=3)
  assert a == b and a != world.sample_scenes(320, seed=4)
  # Each pass covers every scene once.
  assert sorted(map(repr, a[:160])) == sorted(map(repr, world.ALL_SCENES))
  assert collections.Counter(a) == {s: 2 for s in world.ALL_SCENES}
  # Every prefix is near-balanced, in every attribute.
  for n in (8, 20, 40, 97):
    for attribute in world.VALUES:
      counts = [_values(a[:n], attribute)[v] for v in world.VALUES[attribute]]
      assert max(counts) - min(counts) <= 2, (n, attribute, counts)
  # Prefixes agree across lengths; the unbalanced mode is seeded too.
  assert world.sample_scenes(50, seed=3) == a[:50]
  assert world.sample_scenes(50, 1, balanced=False) == world.sample_scenes(50, 1, balanced=False)
  assert world.sample_scenes(0, 1) == []


# -------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("size", [16, 32, 45])
def test_render_agrees_with_the_scene(size):
  counts = {}
  for scene in world.ALL_SCENES:
    image = world.render(scene, size)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    mask = _mask(image)
    ys, xs = np.nonzero(mask)
    assert ys.size > 0
    # Two colours only (no anti-aliasing); the shape's is the named one.
    assert (image[~mask] == GREY).all()
    assert len({tuple(p) for p in image[mask]}) == 1
    assert _colour_name(image[ys[0], xs[0]]) == scene.colour
    # The centroid pixel is the shape's, and lies in the named cell.
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    assert mask[int(cy), int(cx)], scene
    assert (int(3 * cy // size), int(3 * cx // size)) == CELLS[scene.position], scene
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    if scene.shape == "square":
      assert ys.size == box_area
    else:
      assert ys.size < 0.9 * box_area, scene
    counts[scene] = (ys.size, mask.tobytes())
  for scene, (n, _) in counts.items():
    if scene.size == "big":
      small = Scene(scene.shape, scene.colour, scene.position, "small")
      assert n > 1.5 * counts[small][0], scene
  # No shape is cut by the image edge: each shape and size has the same pixel count everywhere.
  for shape in world.SHAPES:
    for size_name in world.SIZES:
      ns = {counts[Scene(shape, "red", p, size_name)][0] for p in world.POSITIONS}
      assert len(ns) == 1, (shape, size_name, ns)
  # The four shapes are told apart by their pixels.
  for size_name in world.SIZES:
    masks = {counts[Scene(s, "green", "centre", size_name)][1] for s in world.SHAPES}
    assert len(masks) == len(world.SHAPES)


def test_colour_classifier_is_not_trivial():
  # The test's own colour reader must tell the four colours apart on rendered pixels.
  names = set()
  for colour in world.COLOURS:
    image = world.render(Scene("square", colour, "centre", "big"))
    names.add(_colour_name(image[16, 16]))
    assert _colour_name(image[16, 16]) == colour
  assert len(names) == 4


def test_render_batch_and_backgrounds():
  scenes = world.sample_scenes(6, seed=0)
  batch = world.render_batch(scenes, 24)
  assert batch.shape == (6, 24, 24, 3) and batch.dtype == np.uint8
  for image, scene in zip(batch, scenes):
    np.testing.assert_array_equal(image, world.render(scene, 24))
  assert world.render_batch([], 20).shape == (0, 20, 20, 3)
  dark = world.render(scenes[0], background=(96, 96, 96))
  plain = world.render(scenes[0])
  assert (dark[0, 0] == 96).all() and (_mask(dark, (96,) * 3) == _mask(plain)).all()
  assert not np.array_equal(world.render_batch(world.sample_scenes(6, seed=1), 24), batch)


# ------------------------------------------------------------------------------------ examples


def test_examples_for_each_task():
  size = 20
  vqa = world.examples(12, seed=5, task="vqa", attribute="position", image_size=size)
  cap = world.examples(12, seed=5, task="caption", image_size=size)
  cls = world.examples(12, seed=5, task="classify", attribute="shape", image_size=size)
  words = set(world.WORDS)
  for v, c, k in zip(vqa, cap, cls):
    scene = Scene(*(v.meta[a] for a in ("shape", "colour", "position", "size")))
    # One seed, the same scenes in every task.
    assert v.meta == c.meta == k.meta and v.id == c.id == k.id
    pixels = np.asarray(v.images[0])
    assert isinstance(v.images[0], Image.Image) and pixels.shape == (size, size, 3)
    np.testing.assert_array_equal(pixels, world.render(scene, size))
    assert v.images[0] == c.images[0] == k.images[0]
    x0, y0, x1, y1 = v.meta["bbox"]
    ys, xs = np.nonzero(_mask(pixels))
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    assert v.prompt == "<image>" + v.question and v.question in world.QUESTIONS["position"]
    assert v.answer == scene.position and v.answers == (v.answer,) * 10 and v.num_markers == 1
    assert v.label == world.POSITIONS.index(scene.position)
    assert c.prompt == "<image>a picture of" and c.answers == (world.caption(scene),)
    assert c.label is None and c.question is None
    assert k.prompt == "<image>this shape is a" and k.answer == scene.shape
    assert world.SHAPES[k.label] == scene.shape
    for e in (v, c, k):
      assert set(_words(e.prompt)) | {w for a in e.answers for w in _words(a)} <= words
  assert len({v.question for v in vqa}) > 1
  # Deterministic to the question phrasing; another seed, other scenes.
  again = world.examples(12, seed=5, task="vqa", attribute="position", image_size=size)
  assert again == vqa and world.examples(12, seed=6, attribute="position", image_size=size) != vqa
  assert len({v.id for v in vqa}) == 12
  custom = world.examples(2, 0, prompt_template="<image>question: {question} answer:")
  assert custom[0].prompt == f"<image>question: {custom[0].question} answer:"
  greys = world.examples(30, 0, backgrounds=world.BACKGROUNDS)
  assert {tuple(e.meta["background"]) for e in greys} == set(world.BACKGROUNDS)
  for e in greys[:6]:
    # The background is the image's most common colour.
    pixels = collections.Counter(map(tuple, np.asarray(e.images[0]).reshape(-1, 3).tolist()))
    assert list(pixels.most_common(1)[0][0]) == e.meta["background"]


def test_write_world_round_trip_and_bytes(tmp_path):
  args = dict(num=9, seed=2, task="classify", attribute="colour", image_size=24)
  path = world.write_world(tmp_path / "a", **args)
  world.write_world(tmp_path / "b", **args)
  world.write_world(tmp_path / "c", **{**args, "seed": 3})
  assert os.path.basename(path) == "examples.jsonl"

  def read(directory, name):
    with open(tmp_path / directory / name, "rb") as f:
      return f.read()

  names = ["examples.jsonl"] + [f"images/{n}" for n in sorted(os.listdir(tmp_path / "a/images"))]
  assert len(names) == 10
  for name in names:
    assert read("a", name) == read("b", name), name
  assert read("a", "examples.jsonl") != read("c", "examples.jsonl")
  assert any(read("a", n) != read("c", n) for n in names[1:])

  loaded = list(load_dataset(tmp_path / "a"))
  made = world.examples(**args)
  assert len(loaded) == len(made)
  for disk, memory in zip(loaded, made):
    assert disk.images == (str(tmp_path / "a" / "images" / f"{memory.id}.png"),)
    with Image.open(disk.images[0]) as png:
      np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(memory.images[0]))
    assert disk == dataclasses.replace(memory, images=disk.images)


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, message", [
    (lambda: Scene("hexagon", "red", "top", "big"), r"unknown shape 'hexagon'"),
    (lambda: Scene("circle", "purple", "top", "big"), r"unknown colour 'purple'"),
    (lambda: Scene("circle", "red", "top left", "big"), r"unknown position 'top left'"),
    (lambda: Scene("circle", "red", "top", "huge"), r"unknown size 'huge'"),
    (lambda: world.render(world.ALL_SCENES[0], 15), r"image_size 15 is too small.*>= 16"),
    (lambda: world.render(world.ALL_SCENES[0], 32.0), r"image_size must be an int"),
    (lambda: world.render(world.ALL_SCENES[0], background=(255, 0, 0)), r"not a neutral grey"),
    (lambda: world.render(world.ALL_SCENES[0], background=(1, 2)), r"3 ints in \[0, 255\]"),
    (lambda: world.answer(world.ALL_SCENES[0], "texture"), r"unknown attribute 'texture'"),
    (lambda: world.class_label(world.ALL_SCENES[0], "hue"), r"unknown attribute 'hue'"),
    (lambda: world.sample_scenes(-1, 0), r"num must be an int >= 0"),
    (lambda: world.examples(0, 0), r"num must be an int >= 1"),
    (lambda: world.examples(2, 0, task="segment"), r"unknown task 'segment'"),
    (lambda: world.examples(2, 0, attribute="texture"), r"unknown attribute 'texture'"),
    (lambda: world.examples(2, 0, image_size=8), r"image_size 8 is too small"),
    (lambda: world.examples(2, 0, prompt_template="{question}"), r"exactly one <image>"),
    (lambda: world.examples(2, 0, prompt_template="<image>colour?"), r"must hold '\{question\}'"),
    (lambda: world.examples(2, 0, task="caption", prompt_template="<image>{question}"),
     r"must not hold '\{question\}'"),
    (lambda: world.examples(2, 0, backgrounds=()), r"non-empty sequence of greys"),
])
def test_bad_inputs_raise_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_qa_pairs_rejects_a_seed_for_rng():
  with pytest.raises(TypeError, match="numpy Generator"):
    world.qa_pairs(world.ALL_SCENES[0], rng=3)
