"""VQA accuracy, exactly as the official evaluation code computes it (NG Table 1, VQAv2 column).

PROTOCOLS.md §2(d): VQAv2 answers are scored with the official VQA accuracy, min(#humans agreeing
/ 3, 1) averaged over the 10 leave-one-out subsets of the 10 human answers, with the official
answer normalisation. The reference is GT-Vision-Lab/VQA
`PythonEvaluationTools/vqaEvaluation/vqaEval.py` at a013f0043c1e2cdc995922dfe257f7149aa9af06 (its
master; kept verbatim in tests/references/vqa_eval_official.py, which the tests run on the same
inputs).

What that code does to one question, and so what `vqa_accuracy` does:
  1. every human answer and the prediction: newlines and tabs become spaces, then `strip()`;
  2. only if the human answers (after step 1) are not all the same string: every human answer and
     the prediction go through `normalize_answer` (punctuation, then digits/articles/contractions).
     When all humans agree, nothing more is done to either side, so "Yes" or "yes." against ten
     "yes" scores 0 (the authors' reason: not to touch answers to OCR questions; GT-Vision-Lab/VQA
     issue #14). The Narrow Gate code comments that test out and always normalises; that reading
     is `normalize_unanimous=True`;
  3. for each human answer i: k_i = how many of the *other* answers equal the prediction; the
     accuracy is the mean over i of min(1, k_i / 3). With m matching answers out of 10 that is
     0, 0.3, 0.6, 0.9 for m = 0..3 and 1 from m = 4.

`normalize_answer` keeps the official quirks on purpose (they change scores):
  - a punctuation mark is deleted (not replaced by a space) when the *input* has it next to a space,
    and every mark is deleted when the input has a digit,digit comma anywhere ("1,000" -> "1000");
    otherwise it becomes a space ("t-shirt" -> "t shirt"); ' and : are not in the list;
  - a period not followed by a digit is deleted ("3.5" keeps its), at most 32 of them: the code
    passes `re.UNICODE` (32) where `re.sub` takes `count`;
  - lower-case, split on whitespace, number words zero..ten and "none" -> digits, articles a/an/the
    dropped, then the contractions map (its capitalised keys such as "Im" can never match after
    lower-casing; kept as they are).

`extract_answer` is separate from all of this: it turns a model's generated text into its answer
string (strip, first line, one trailing period dropped) before scoring. It is not part of the
official evaluation, which receives answers already extracted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Tables copied from the official vqaEval.py (a013f00); tests check them against the reference.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
               "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
# The official regular expressions as written. `(?!<=\d)` is a negative *lookahead* for the text
# "<=digit" (a typo of a lookbehind), so it never fires: a period is deleted unless a digit follows.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`.
_PERIOD_COUNT = int(re.UNICODE)


def _clean_whitespace(text: str) -> str:
  """Step 1 of the official code, applied to every answer: newlines/tabs to spaces, stripped."""
  return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: delete or space out punctuation, then delete periods."""
  out = text
  # The official code checks the unedited input for every mark, not the text edited so far.
  delete_all = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT:
    if delete_all or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lower-cased words, number words to digits, no articles, then
  the contractions map."""
  words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
  """The official answer normalisation: whitespace clean-up, punctuation, digits/articles.

  This is what vqaEval.py applies to both the prediction and the human answers when the humans
  disagree (see the module docstring for when it is not applied).
  """
  return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *,
                 normalize_unanimous: bool = False) -> float:
  """The official VQA accuracy of one prediction against the human answers (10 in VQAv2).

  Mean over the leave-one-out subsets (each answer left out in turn) of min(1, matches / 3), where
  matches counts the remaining human answers equal to the prediction after the official processing
  (module docstring). The official annotations give every answer its own `answer_id`, so exactly
  one answer is left out each time, duplicates included; that is what this computes.

  normalize_unanimous: False (official) compares the prediction and the answers without
  `normalize_answer` when all answers are the same string; True normalises always (the Narrow Gate
  code's reading).
  """
  if not isinstance(prediction, str):
    raise TypeError(f"prediction must be str, got {type(prediction).__name__}")
  if isinstance(answers, str) or not answers:
    raise ValueError("answers must be a non-empty sequence of strings (the human answers)")
  gts = [_clean_whitespace(a) for a in answers]
  pred = _clean_whitespace(prediction)
  if normalize_unanimous or len(set(gts)) > 1:
    gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
    pred = _process_digit_article(_process_punctuation(pred))
  hits = [g == pred for g in gts]
  matches = sum(hits)
  # Summed in answer order as the official code does, so the float is the same bit for bit.
  return float(sum(min(1, float(matches - hit) / 3) for hit in hits)) / len(hits)


def vqa_score(predictions: Sequence[str], answers_list: Sequence[Sequence[str]], *,
              normalize_unanimous: bool = False) -> dict:
  """VQA accuracy over questions: {"accuracy": mean, "count": n, "per_question": [n floats]}.

  predictions[i] is scored against answers_list[i] with `vqa_accuracy`; "accuracy" is the plain
  mean on the 0-1 scale (vqaEval.py reports 100 x this, rounded to 2 decimals). Predictions should
  already be answers (see `extract_answer` for generated text).
  """
  if len(predictions) != len(answers_list):
    raise ValueError(f"{len(predictions)} predictions but {len(answers_list)} answer lists")
  if not predictions:
    raise ValueError("vqa_score needs at least one question")
  per_question = [vqa_accuracy(p, a, normalize_unanimous=normalize_unanimous)
                  for p, a in zip(predictions, answers_list)]
  return {"accuracy": float(sum(per_question)) / len(per_question), "count": len(per_question),
          "per_question": per_question}


def extract_answer(generated: str) -> str:
  """A model's generated text -> its answer string, before any official processing.

  Strips surrounding whitespace, keeps the first line (greedy decoding runs on past the answer, up
  to the 20-token budget), strips again and drops one trailing period ("Yes." -> "Yes"). Case and
  everything else are left to the official evaluation: with unanimous humans it compares strings
  as they are, so this helper deliberately does not lower-case. Not part of the official code.
  """
  text = generated.strip()
  text = text.split("\n", 1)[0].strip()
  if text.endswith("."):
    text = text[:-1].rstrip()
  return text
