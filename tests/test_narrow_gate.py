"""The Narrow Gate experiments end to end through the runner, on a tiny converted Chameleon and the
synthetic fixtures of the study's data formats (VQAv2 files, a Karpathy caption split, ImageNet
class folders): records for every example and condition, metrics, figures and the report."""

import json
import os

import numpy as np
import pytest
import transformers

import reference as R
from experiments import narrow_gate  # noqa: F401  (registers the experiments)
from narrowgate_jax.data.ng_synthetic import WORDS as NG_WORDS
from narrowgate_jax.data.ng_synthetic import write_ng_fixtures
from narrowgate_jax.runs import loop
from narrowgate_jax.runs.records import RecordStore

VQ = dict(embed_dim=4, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
          latent_channels=4, resolution=16, num_res_blocks=1, attn_resolutions=[8])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny Chameleon whose vocabulary covers the fixtures' words and the study's prompts."""
  words = tuple(dict.fromkeys(R.CHAMELEON_SPECIALS + R.WORDS + NG_WORDS + ("This", "Answer",
                                                                          "Provide")))
  codes = VQ["num_embeddings"]
  vocab = len(words) + codes + 3
  vmap = {w: i for i, w in enumerate(words)}
  letters = "ABCDEFGHIJ"
  for code in range(codes):
    vmap["IMGIMG" + "".join(letters[int(d)] for d in str(code)) + "Z"] = vocab - codes + code
  config = R.tiny_chameleon(vocab_size=vocab, vq_config=VQ, vocabulary_map=vmap,
                            max_position_embeddings=256)
  root = tmp_path_factory.mktemp("ng_model")
  R.build(config, root / "hf")
  R.chameleon_tokenizer(config).save_pretrained(root / "hf")
  transformers.ChameleonImageProcessorPil(size={"shortest_edge": 16},
                                          crop_size={"height": 16, "width": 16}).save_pretrained(
                                              root / "hf")
  from checkpoints_convert.convert import convert

  convert(str(root / "hf"), str(root / "ng"), progress=False)
  return str(root / "ng")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  return write_ng_fixtures(str(tmp_path_factory.mktemp("ng_data")), seed=0)


def _config(module, arg, model_dir, **data):
  import importlib

  config = importlib.import_module(f"configs.experiments.{module}").get_config(arg)
  config.model = __import__("configs.models", fromlist=["get"]).get("local")
  config.model.path = model_dir
  config.mesh.data, config.mesh.model = 1, 1
  config.batch_size = 4
  for key, value in data.items():
    config.data[key] = value
  return config


def _records(workdir):
  return RecordStore(os.path.join(workdir, "records.jsonl")).records()


def test_attention_flow(model_dir, fixtures, tmp_path):
  config = _config("ng_attention_flow", "local", model_dir, path=fixtures["imagenet"],
                   classes=0, per_class=0)
  config.experiment_config.hot = {"first_image": [0]}
  metrics = loop.run(config, str(tmp_path / "w"), progress=False)
  shares = metrics["shares"]
  assert set(shares) == {"eoi", "last_image", "first_image", "other_image"}
  np.testing.assert_allclose(np.sum([shares[k] for k in shares], axis=0), 1.0, rtol=1e-9)
  assert len(shares["eoi"]) == 3 and os.path.exists(tmp_path / "w" / "figures" /
                                                     "attention_flow.png")


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_knockout_evaluation(model_dir, fixtures, task, tmp_path):
  if task == "vqa":
    config = _config("ng_knockout", f"local,{task}", model_dir, path=fixtures["vqav2"],
                     sample=8)
  else:
    config = _config("ng_knockout", f"local,{task}", model_dir,
                     path=fixtures["coco_karpathy"], images=fixtures["coco_images"], first=0)
  config.experiment_config.max_new_tokens = 3
  config.experiment_config.random_tokens = 2
  config.experiment_config.random_repeats = 2
  workdir = str(tmp_path / "w")
  metrics = loop.run(config, workdir, progress=False)
  conditions = ["none", "eoi", "image_to_text", "random/0", "random/1", "last_image", "all_image"]
  assert sorted(metrics["scores"]) == sorted(conditions)
  examples = {r["example"] for r in _records(workdir)}
  assert len(_records(workdir)) == len(examples) * len(conditions)
  assert all(0 <= v for v in metrics["scores"].values()) and "random" in metrics
  stored = json.load(open(os.path.join(workdir, "metrics.json")))
  assert stored["task"] == task and os.path.exists(tmp_path / "w" / "figures" / "knockout.png")


def test_neighbourhood_overlap(model_dir, fixtures, tmp_path):
  config = _config("ng_overlap", "local", model_dir, path=fixtures["imagenet"], classes=0,
                   per_class=0)
  config.experiment_config.k = 2
  workdir = str(tmp_path / "w")
  metrics = loop.run(config, workdir, progress=False)
  for probe in ("eoi", "last_image", "image_mean"):
    chi = metrics["chi"][probe]
    assert len(chi) == 4 and all(0 <= c <= 1 for c in chi)
  assert os.listdir(os.path.join(workdir, "arrays"))  # the residuals live beside the records


@pytest.mark.parametrize("site", ["resid_pre", "attn_in"])
def test_patching(model_dir, fixtures, tmp_path, site):
  """Classes paired in label order (the fixture's third class has no partner and is left out);
  every image once recipient and once source; similarity and flip accuracy per layer."""
  config = _config("ng_patching", "local", model_dir, path=fixtures["imagenet"], classes=0,
                   per_class=0)
  config.experiment_config.site = site
  workdir = str(tmp_path / "w")
  metrics = loop.run(config, workdir, progress=False)
  assert len(metrics["similarity"]) == len(metrics["flip_accuracy"]) == 3
  assert all(0 <= v <= 1 for v in metrics["similarity"] + metrics["flip_accuracy"])
  assert 0 < metrics["pairs"] < 12  # the unpaired class's images are not measured
  assert os.path.exists(tmp_path / "w" / "figures" / "patching.png")


def test_patching_every_layer_equals_a_separate_patched_forward(model_dir, fixtures):
  """The stacked, shared-prefix patch at layer l equals one full forward with that patch."""
  import narrowgate_jax as ng
  from narrowgate_jax.data import load_imagenet_folders

  vlm = ng.load(model_dir)
  data = load_imagenet_folders(fixtures["imagenet"], classes=None, per_class=None)
  a, b = data[0], data[len(data) - 1]
  batch = vlm.prepare(images=[list(a.images), list(b.images)], prompts=[a.prompt, b.prompt])
  resid = np.asarray(vlm.forward(batch, capture=ng.Capture(resid_at="eoi")).resid)
  donor = np.array([1, 0])
  patches = [ng.patch(batch, at="eoi", values=resid[l:l + 1, donor], layers=[l])
             for l in range(vlm.num_layers)]
  attn_in = np.asarray(vlm.forward(batch, capture=ng.Capture(resid_at="eoi", attn_in=True)).attn_in)
  patches += [ng.patch(batch, at="eoi", values=attn_in[l:, donor],
                       layers=range(l, vlm.num_layers), site="attn_in")
              for l in range(vlm.num_layers)]
  for site in ("resid_pre", "attn_in"):
    chosen = [p for p in patches if p.site == site]
    shared = np.asarray(vlm.forward_from_prefix(batch, ng.stack_conditions(chosen)).logits)
    for l, p in enumerate(chosen):
      full = np.asarray(vlm.forward(batch, interventions=p).logits)[:, -1]
      np.testing.assert_allclose(shared[l], full, rtol=0, atol=1e-5 * np.abs(full).max())


def _modality_gap_config(model_dir, fixtures):
  """The study's config on the 5 captioned test images: 10 points per layer, so ADP with 8
  neighbours, GRIDE up to rank 8 at scale 1 (2nd vs 4th neighbour), density from 4."""
  config = _config("ng_modality_gap", "local", model_dir, path=fixtures["coco_karpathy"],
                   images=fixtures["coco_images"], first=0)
  config.experiment_config.update(maxk=8, gride_range_max=8, gride_scale=1, density_k=4)
  return config


def test_modality_gap(model_dir, fixtures, tmp_path):
  config = _modality_gap_config(model_dir, fixtures)
  metrics = loop.run(config, str(tmp_path / "w"), progress=False)
  cos = metrics["cosine"]
  assert len(cos["median"]) == 3
  assert all(0 <= lo <= mid <= hi <= 1 for lo, mid, hi in zip(cos["q25"], cos["median"],
                                                              cos["q75"]))
  assert len(metrics["homogeneity"]) == 3 and all(0 <= h <= 1 for h in metrics["homogeneity"])
  assert metrics["adp"] == dict(maxk=8, gride_range_max=8, gride_scale=1, density_k=4, z=1.65)
  assert os.path.exists(tmp_path / "w" / "figures" / "modality_gap.png")


def test_modality_gap_needs_more_points_than_maxk(model_dir, fixtures, tmp_path):
  """10 points per layer cannot have 128 neighbours: the error names the counts and the field,
  before any forward pass where `data.limit` already says so."""
  config = _modality_gap_config(model_dir, fixtures)
  config.experiment_config.maxk = 10
  with pytest.raises(ValueError, match=r"5 image and 5 text vectors \(10 points\) with "
                                       r"maxk=10 .* experiment_config.maxk"):
    loop.run(config, str(tmp_path / "w"), progress=False)
  config.data.limit = 2
  config.experiment_config.maxk = 128
  import experiments.narrow_gate as NG

  with pytest.raises(ValueError, match=r"\(4 points\) with maxk=128"):
    NG.NgModalityGap(config)


def test_modality_gap_resize_is_resizing_by_hand(model_dir, fixtures):
  """`resize` changes what the model sees exactly as resizing the images by hand with PIL's
  bilinear filter does (equal token ids, VQ image codes included); 0 keeps the originals."""
  import narrowgate_jax as ng
  from PIL import Image

  import experiments.narrow_gate as NG
  from narrowgate_jax.data import load_karpathy
  from narrowgate_jax.processing.images import load_image

  vlm = ng.load(model_dir)
  example = load_karpathy(fixtures["coco_karpathy"], fixtures["coco_images"], split="test")[0]
  captions = " ".join(example.answers[:5])
  prompts = ["<image>" + captions, captions + " <image>"]
  config = _modality_gap_config(model_dir, fixtures)

  def prepared(resize):
    config.experiment_config.resize = resize
    return np.asarray(NG.NgModalityGap(config).prepare(vlm, example).input_ids)

  by_hand = [load_image(image).resize((24, 24), Image.BILINEAR) for image in example.images]
  resized = np.asarray(vlm.prepare(images=[by_hand] * 2, prompts=prompts).input_ids)
  original = np.asarray(vlm.prepare(images=[list(example.images)] * 2, prompts=prompts).input_ids)
  np.testing.assert_array_equal(prepared(24), resized)
  np.testing.assert_array_equal(prepared(0), original)
  assert not np.array_equal(resized, original)  # the resize changed the image codes


def test_a_selector_matching_nothing_names_the_example(model_dir, fixtures, tmp_path):
  """A knockout of a role some example lacks (Chameleon has no image row breaks) fails before
  anything is written, naming the selector and the dataset example."""
  config = _config("ng_knockout", "local,vqa", model_dir, path=fixtures["vqav2"], sample=2)
  config.experiment_config.conditions = ["eoi"]
  config.experiment_config.max_new_tokens = 2
  import experiments.narrow_gate as NG

  original = NG.NgKnockoutEval._knockout
  NG.NgKnockoutEval._knockout = lambda self, vlm, batch, name, examples: vlm.knockout(
      batch, keys="image_break", queries="all", mode="post_softmax")
  try:
    with pytest.raises(ValueError, match=r"'image_break' matches no token .*row 0: '\d+'"):
      loop.run(config, str(tmp_path / "w"), progress=False)
  finally:
    NG.NgKnockoutEval._knockout = original


def test_knockout_overlap_progressive(model_dir, fixtures, tmp_path):
  config = _config("ng_knockout_overlap", "local", model_dir, path=fixtures["imagenet"],
                   classes=0, per_class=0)
  config.experiment_config.widths = ["all", "1"]
  config.experiment_config.random_tokens = 2
  config.experiment_config.k = 2
  metrics = loop.run(config, str(tmp_path / "w"), progress=False)
  expected = {"none"} | {f"{k}@{w}" for k in ("eoi", "image_to_text", "random/0")
                         for w in ("all", "1")}
  assert set(metrics["chi"]) == expected
  assert all(0 <= v <= 1 for v in metrics["chi"].values())


def test_steering(model_dir, fixtures, tmp_path):
  config = _config("ng_steering", "local", model_dir, path=fixtures["imagenet"], classes=0,
                   per_class=0)
  config.experiment_config.layer = 1
  config.experiment_config.alphas = [0.0, 8.0]
  metrics = loop.run(config, str(tmp_path / "w"), progress=False)
  assert metrics["alphas"] == [0.0, 8.0]
  assert all(0 <= v <= 1 for v in metrics["towards_source"] + metrics["similarity"])
  # alpha 0 adds nothing: as the clean recipient
  records = RecordStore(str(tmp_path / "w" / "records.jsonl")).records()
  zero = {r["example"]: r["difference"] for r in records if r["condition"] == "alpha/0"}
  clean = {r["example"]: r["clean_difference"] for r in records if r["condition"] == "clean"}
  for example, difference in zero.items():
    np.testing.assert_allclose(difference, clean[example], rtol=1e-4, atol=1e-5)


def test_datasets_library_formats(model_dir, fixtures, tmp_path):
  """The same configs on data saved with the `datasets` library: captions from parquet,
  ImageNet-style classes from a save_to_disk folder."""
  pytest.importorskip("datasets")
  config = _config("ng_knockout", "local,caption", model_dir)
  config.data = __import__("ml_collections").ConfigDict(dict(
      format="hf_datasets", path=fixtures["hf_parquet"], task="caption", split="", prompt="",
      limit=0))
  config.experiment_config.conditions = ["eoi"]
  config.experiment_config.max_new_tokens = 2
  metrics = loop.run(config, str(tmp_path / "captions"), progress=False)
  assert set(metrics["scores"]) == {"none", "eoi"}
  config = _config("ng_overlap", "local", model_dir)
  config.data = __import__("ml_collections").ConfigDict(dict(
      format="hf_datasets", path=fixtures["hf_disk"], task="classification", split="train",
      prompt="", limit=0))
  config.experiment_config.k = 1
  metrics = loop.run(config, str(tmp_path / "classes"), progress=False)
  assert len(metrics["chi"]["eoi"]) == 4
