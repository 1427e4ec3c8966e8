"""Evaluation metrics against the official implementations, on the same inputs.

VQA accuracy: the official vqaEval.py (verbatim in tests/references/vqa_eval_official.py) run on a
fixture built to hit every normalisation rule. CIDEr-D: pycocoevalcap's `Cider` scorer (its pure
Python scorer only; its PTB tokenizer needs Java and is not used).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import time

import numpy as np
import pytest
# The reference CIDEr-D: pycocoevalcap's scorer (pure Python; the test extra installs it).
from pycocoevalcap.cider.cider import Cider

from narrowgate_jax.evaluation import (cider_d, cider_d_scores, extract_answer, normalize_answer,
                                       vqa_accuracy, vqa_score)
from narrowgate_jax.evaluation import vqa as vqa_mod

_REFERENCE = os.path.join(os.path.dirname(__file__), "references", "vqa_eval_official.py")


def _official_module():
  spec = importlib.util.spec_from_file_location("vqa_eval_official", _REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Store:
  """The two attributes of the official VQA API object that VQAEval reads."""

  def __init__(self, qa):
    self.qa = qa

  def getQuesIds(self):  # the official API's name
    return list(self.qa)


def official_accuracies(predictions, answers_list) -> list[float]:
  """Per-question accuracy from the official VQAEval.evaluate, unrounded, on fresh copies.

  Annotations are laid out as in the VQAv2 files: each answer a dict with its own answer_id.
  """
  VQAEval = _official_module().VQAEval

  class Recording(VQAEval):
    # evaluate() hands every question's raw accuracy to setEvalQA before rounding it.
    def setEvalQA(self, quesId, acc):
      self.raw[quesId] = acc
      super().setEvalQA(quesId, acc)

  gts, res = {}, {}
  for qid, (pred, answers) in enumerate(zip(predictions, answers_list)):
    gts[qid] = {"question_id": qid, "question_type": "what", "answer_type": "other",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(answers)]}
    res[qid] = {"question_id": qid, "answer": pred}
  evaluator = Recording(_Store(copy.deepcopy(gts)), _Store(res))
  evaluator.raw = {}
  evaluator.evaluate()
  return [evaluator.raw[qid] for qid in range(len(predictions))]


def _ten(*groups):
  """(answer, count) pairs -> the 10 human answers."""
  answers = [a for a, count in groups for _ in range(count)]
  assert len(answers) == 10
  return answers


# (name, prediction, 10 human answers, expected official accuracy or None when only compared).
VQA_CASES = [
    ("unanimous exact", "yes", _ten(("yes", 10)), 1.0),
    ("unanimous, case differs: no normalisation", "Yes", _ten(("yes", 10)), 0.0),
    ("unanimous, trailing period kept", "yes.", _ten(("yes", 10)), 0.0),
    ("unanimous, number word kept", "two", _ten(("2", 10)), 0.0),
    ("unanimous, whitespace still stripped", "\tyes \n", _ten(("yes", 10)), 1.0),
    ("1 human -> 0.3", "red", _ten(("red", 1), ("blue", 9)), 0.3),
    ("2 humans -> 0.6", "red", _ten(("red", 2), ("blue", 8)), 0.6),
    ("3 humans -> 0.9", "red", _ten(("red", 3), ("blue", 7)), 0.9),
    ("4 humans -> 1", "red", _ten(("red", 4), ("blue", 6)), 1.0),
    ("no human", "green", _ten(("red", 4), ("blue", 6)), 0.0),
    ("case folded when humans disagree", "Red", _ten(("red", 2), ("blue", 8)), 0.6),
    ("articles", "a dog", _ten(("the dog", 2), ("dog", 1), ("an dog", 1), ("cat", 6)), 1.0),
    ("number words", "two", _ten(("2", 2), ("two", 1), ("3", 7)), 0.9),
    ("none -> 0 (issue #7)", "none", _ten(("none", 1), ("nothing", 9)), 0.3),
    ("zero and ten", "zero or ten", _ten(("0 or 10", 3), ("no", 7)), 0.9),
    ("contractions", "dont know", _ten(("don't know", 2), ("dont know", 1), ("no", 7)), 0.9),
    ("capitalised contraction keys never match", "Im here",
     _ten(("I'm here", 2), ("im here", 1), ("here", 7)), 0.3),
    ("apostrophe kept, curly one too", "don’t", _ten(("don’t", 2), ("don't", 8)), 0.6),
    ("hyphen spaced out", "t-shirt", _ten(("t shirt", 3), ("tshirt", 2), ("shirt", 5)), 0.9),
    ("mark next to a space is deleted", "yes !", _ten(("yes", 2), ("yes!", 1), ("no", 7)), 0.9),
    ("comma between digits deletes every mark", "1,000-2", _ten(("10002", 3), ("1000 2", 7)), 0.9),
    ("thousands separator", "1,000", _ten(("1000", 2), ("1,000", 2), ("many", 6)), 1.0),
    ("decimal point kept", "3.5", _ten(("3.5", 2), ("35", 2), ("3", 6)), 0.6),
    ("abbreviation periods deleted", "a.m.", _ten(("am", 2), ("morning", 8)), 0.6),
    ("at most 32 periods deleted", "yes" + "." * 40,
     _ten(("yes", 3), ("yes" + "." * 40, 2), ("no", 5)), 0.6),
    ("slash and brackets", "black/white (striped)",
     _ten(("black white striped", 3), ("black and white", 7)), 0.9),
    ("many marks", 'a "b" [c] {d} e=f+g\\h_i>j<k@l`m?n!o;p',
     _ten(("b c d e f g h i j k l m n o p", 1), ("x", 9)), 0.3),
    ("colon kept", "12:30", _ten(("12:30", 2), ("1230", 2), ("noon", 6)), 0.6),
    ("only an article -> empty string", "the", _ten(("a", 1), ("nothing", 9)), 0.3),
    ("empty prediction", "", _ten(("yes", 5), ("no", 5)), 0.0),
    ("whitespace inside answers", "  fire\thydrant\n",
     _ten(("fire  hydrant", 2), ("fire\nhydrant", 1), ("hydrant", 7)), 0.9),
    ("answers with tabs disagreeing only before clean-up", "Blue",
     _ten(("blue", 9), ("\tblue", 1)), 0.0),
    ("non-ASCII text", "café", _ten(("Café", 2), ("cafe", 8)), 0.6),
]


def test_vqa_fixture_covers_enough_cases():
  assert len(VQA_CASES) >= 20


@pytest.mark.parametrize("name,prediction,answers,expected", VQA_CASES,
                         ids=[c[0] for c in VQA_CASES])
def test_vqa_accuracy_expected_values(name, prediction, answers, expected):
  assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_equals_official_code(capsys):
  predictions = [c[1] for c in VQA_CASES]
  answers_list = [c[2] for c in VQA_CASES]
  official = official_accuracies(predictions, answers_list)
  ours = [vqa_accuracy(p, a) for p, a in zip(predictions, answers_list)]
  assert ours == official  # bit for bit: same operations in the same order
  result = vqa_score(predictions, answers_list)
  assert result["count"] == len(VQA_CASES)
  assert result["per_question"] == official
  assert result["accuracy"] == pytest.approx(sum(official) / len(official), abs=1e-15)


def test_vqa_accuracy_equals_official_code_on_random_answers(capsys):
  """Random mixtures of answer variants and agreement levels, against the official code."""
  rng = random.Random(0)
  variants = ["yes", "Yes", "yes.", "no", "two", "2", "the cat", "cat", "a cat!", "t-shirt",
              "t shirt", "1,000", "1000", "dont", "don't", "none", "0", "3.5", "left / right",
              "left right", "", " red ", "red\n"]
  predictions, answers_list = [], []
  for _ in range(300):
    pool = rng.sample(variants, rng.randint(1, 4))
    answers_list.append([rng.choice(pool) for _ in range(10)])
    predictions.append(rng.choice(variants))
  official = official_accuracies(predictions, answers_list)
  assert [vqa_accuracy(p, a) for p, a in zip(predictions, answers_list)] == official


def test_normalize_answer_equals_official_processing():
  evaluator = _official_module().VQAEval(_Store({}), _Store({}))
  texts = [c[1] for c in VQA_CASES] + [a for c in VQA_CASES for a in c[2]]
  for text in texts:
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    expected = evaluator.processDigitArticle(evaluator.processPunctuation(cleaned))
    assert normalize_answer(text) == expected, text


def test_tables_equal_official():
  evaluator = _official_module().VQAEval(_Store({}), _Store({}))
  assert vqa_mod._CONTRACTIONS == evaluator.contractions
  assert vqa_mod._MANUAL_MAP == evaluator.manualMap
  assert list(vqa_mod._ARTICLES) == evaluator.articles
  assert list(vqa_mod._PUNCT) == evaluator.punct
  assert vqa_mod._PERIOD_STRIP.pattern == evaluator.periodStrip.pattern
  assert vqa_mod._COMMA_STRIP.pattern == evaluator.commaStrip.pattern


def test_normalize_unanimous_is_the_study_reading():
  # The Narrow Gate code normalises even when all ten humans agree.
  assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0
  assert vqa_accuracy("Yes.", ["yes"] * 10, normalize_unanimous=True) == 1.0
  assert vqa_accuracy("two", ["2"] * 10, normalize_unanimous=True) == 1.0
  score = vqa_score(["Yes", "two"], [["yes"] * 10, ["2"] * 10], normalize_unanimous=True)
  assert score["accuracy"] == 1.0


def test_vqa_argument_errors():
  with pytest.raises(ValueError, match="non-empty"):
    vqa_accuracy("yes", [])
  with pytest.raises(ValueError, match="non-empty"):
    vqa_accuracy("yes", "yes")
  with pytest.raises(TypeError):
    vqa_accuracy(None, ["yes"])
  with pytest.raises(ValueError, match="2 predictions but 1"):
    vqa_score(["a", "b"], [["a"] * 10])
  with pytest.raises(ValueError, match="at least one"):
    vqa_score([], [])


@pytest.mark.parametrize("generated,answer", [
    (" Yes.\nQuestion: is it red?", "Yes"),
    ("\n\n two dogs \n", "two dogs"),
    ("3.5.", "3.5"),
    ("red", "red"),
    ("...", ".."),
    ("", ""),
    ("  \n", ""),
    ("The man .", "The man"),
])
def test_extract_answer(generated, answer):
  assert extract_answer(generated) == answer


# ----------------------------------------------------------------------------------------------
# CIDEr-D

_WORDS = ("a an the man woman dog dogs cat child is are sitting running on in at near with red "
          "blue green ball frisbee grass park street beach water two three of and playing").split()


def _sentence(rng, low=0, high=16, words=_WORDS):
  return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def _caption_fixture():
  """24 images, 5 references each, built to hit the CIDEr-D corner cases."""
  rng = random.Random(42)
  refs = {f"img{i}": [_sentence(rng, 6, 14) for _ in range(5)] for i in range(20)}
  cands = {i: _sentence(rng, 4, 16) for i in refs}
  cands["img0"] = refs["img0"][2]  # identical to one reference
  cands["img1"] = ""  # empty candidate
  cands["img2"] = "dog"  # one word: no bigrams, length 0
  cands["img3"] = " ".join(refs["img3"][0].split() * 3)  # long repetition: clipping + penalty
  cands["img4"] = "A Man Riding A Horse"  # case: lower-cased before tokenising
  refs["img4"] = ["a man riding a horse", "A man rides a horse .", "a person on a horse",
                  "a man on a brown horse", "man riding horse in a field"]
  refs["img5"] = ["x"] + refs["img5"][1:]  # one-word reference
  refs["img6"] = [""] + refs["img6"][1:]  # empty reference (counts in the mean over references)
  refs["img7"] = ["zebra"] * 5  # n-gram only this image has
  cands["img7"] = "zebra zebra zebra"
  cands["img8"] = "unseen words everywhere here"  # no n-gram in any reference: df 0
  refs["dup"] = list(refs["img9"])  # two images with the same references
  cands["dup"] = cands["img9"]
  refs[17] = ["mixed id types are fine", "a b c d", "a b c", "a b", "a"]
  cands[17] = "a b c d e"
  refs["tabs"] = ["a\tdog  on\nthe grass"] * 5  # any whitespace separates words
  cands["tabs"] = "a dog on the grass"
  refs["punct"] = ["a dog on the grass.", "a dog, on the grass", "dogs !", "grass", "a dog"]
  cands["punct"] = "a dog on the grass ."
  return cands, refs


def _pycocoevalcap(cands, refs):
  # pycocoevalcap's scorer expects tokenised (PTB: lower-cased) text; we lower-case, as cider_d.
  gts = {i: [r.lower() for r in refs[i]] for i in refs}
  res = {i: [cands[i].lower()] for i in refs}
  mean, scores = Cider().compute_score(gts, res)
  return mean, dict(zip(gts, (float(s) for s in scores)))


def test_cider_d_equals_pycocoevalcap():
  cands, refs = _caption_fixture()
  assert len(refs) >= 20 and all(len(r) == 5 for r in refs.values())
  mean, per_id = cider_d(cands, refs)
  ref_mean, ref_per_id = _pycocoevalcap(cands, refs)
  assert per_id.keys() == ref_per_id.keys()
  for i in refs:
    assert per_id[i] == pytest.approx(ref_per_id[i], abs=1e-9), i
  assert mean == pytest.approx(ref_mean, abs=1e-9)
  # The corner cases are not degenerate: scores vary, and the identical caption scores well.
  assert per_id["img1"] == 0.0 and per_id["img8"] == 0.0
  assert per_id["img0"] > 1.0 and max(per_id.values()) <= 10.0
  assert per_id["dup"] == pytest.approx(per_id["img9"], abs=1e-12)


def test_cider_d_equals_pycocoevalcap_on_random_sets():
  rng = random.Random(7)
  for num_images in (1, 2, 3, 60):
    refs = {i: [_sentence(rng) for _ in range(rng.randint(1, 6))] for i in range(num_images)}
    cands = {i: _sentence(rng) for i in refs}
    mean, per_id = cider_d(cands, refs)
    ref_mean, ref_per_id = _pycocoevalcap(cands, refs)
    assert mean == pytest.approx(ref_mean, abs=1e-9)
    np.testing.assert_allclose([per_id[i] for i in refs], [ref_per_id[i] for i in refs],
                               rtol=0, atol=1e-9)


def test_cider_d_options():
  cands, refs = _caption_fixture()
  mean, per_id = cider_d(cands, refs)
  bounded_mean, bounded = cider_d(cands, refs, bounded=True)
  assert bounded_mean == pytest.approx(mean / 10, abs=1e-15)
  assert all(bounded[i] == pytest.approx(per_id[i] / 10, abs=1e-15) for i in refs)
  # Without lower-casing "A Man Riding A Horse" shares fewer n-grams with its references.
  _, cased = cider_d(cands, refs, lowercase=False)
  assert cased["img4"] < per_id["img4"]
  # Without the length penalty (huge sigma) the repeated caption scores higher.
  _, loose = cider_d(cands, refs, sigma=1e9)
  assert loose["img3"] > per_id["img3"]
  scores = cider_d_scores([cands[i] for i in refs], [refs[i] for i in refs])
  assert scores.tolist() == [per_id[i] for i in refs]


def test_cider_d_argument_errors():
  with pytest.raises(ValueError, match="ids differ"):
    cider_d({1: "a"}, {2: ["a"]})
  with pytest.raises(ValueError, match="non-empty list"):
    cider_d({1: "a"}, {1: []})
  with pytest.raises(ValueError, match="non-empty list"):
    cider_d({1: "a"}, {1: "a"})
  with pytest.raises(ValueError, match="at least one"):
    cider_d({}, {})


def test_cider_d_speed():
  """2,000 captions x 5 references (the study's subset size) in about a second on one core."""
  rng = random.Random(3)
  vocab = [f"w{i}" for i in range(4000)] + list(_WORDS)
  refs = {i: [_sentence(rng, 8, 18, vocab) for _ in range(5)] for i in range(2000)}
  cands = {i: _sentence(rng, 5, 40, vocab) for i in refs}
  cider_d(cands, refs)  # warm-up (imports, allocator)
  start = time.perf_counter()
  cider_d(cands, refs)
  assert time.perf_counter() - start < 3.0  # generous: 2 shared CPU cores
