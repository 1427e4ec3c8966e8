"""Scores of generated text: pure functions, strings in, numbers out; numpy and the stdlib only.

Narrow Gate (NG) study, PROTOCOLS.md §2(d) (Table 1, evaluation under attention knockout):
  vqa    official VQA accuracy and answer normalisation (`vqa_accuracy`, `vqa_score`,
         `normalize_answer`), and `extract_answer` for generated text
  cider  CIDEr-D as pycocoevalcap computes it (`cider_d`, `cider_d_scores`)
"""

from narrowgate_jax.evaluation.cider import cider_d, cider_d_scores
from narrowgate_jax.evaluation.vqa import (extract_answer, normalize_answer, vqa_accuracy,
                                           vqa_score)

__all__ = [
    "cider_d", "cider_d_scores", "extract_answer", "normalize_answer", "vqa_accuracy", "vqa_score",
]
