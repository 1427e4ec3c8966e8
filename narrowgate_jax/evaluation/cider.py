"""CIDEr-D of generated captions, as pycocoevalcap's `Cider` scorer computes it (NG Table 1).

PROTOCOLS.md §2(d): Flickr30k and COCO captions are scored with CIDEr-D (σ = 6), document
frequencies over the evaluated subset, whitespace tokenisation. For one image with candidate c and
references r_1..r_m, with g^k(s) the tf-idf vector of the k-grams of s (k = 1..4):

  tf-idf   g^k_w(s) = tf_w(s) · (log N − log max(1, df_w)),  N = number of images evaluated,
           df_w = number of images whose references (any of them) contain the n-gram w
  CIDEr-D  10 · (1/4) Σ_k (1/m) Σ_j exp(−Δ_j² / 2σ²) · Σ_w min(g^k_w(c), g^k_w(r_j)) g^k_w(r_j)
                                                       / (‖g^k(c)‖ ‖g^k(r_j)‖)

with Δ_j the difference in *bigram counts* of c and r_j (pycocoevalcap's "length" adds up the
term frequencies of 2-grams, i.e. words − 1), and the quotient left undivided where a norm is 0.
The `min` is the clipping; the Gaussian is the length penalty; both make CIDEr-D out of CIDEr.

Tokenisation. pycocoevalcap's scorer splits each string on whitespace and nothing else; its
pipeline feeds it the output of its PTB tokenizer (Stanford CoreNLP, Java), which lower-cases and
removes punctuation. We do not run that tokenizer: as PROTOCOLS says, text is lower-cased and split
on whitespace (`lowercase=False` keeps case, as the Narrow Gate code did by passing raw captions),
so "yard." and "yard" are different words here, as in the study.

Scale. pycocoevalcap multiplies the mean clipped cosine by 10, so a score lies in [0, 10]; papers
usually print 100 × pycocoevalcap's value (117.6 for 1.176). The study's Table 1 ("0–1 scale": .23,
.35, .60, ...) shows pycocoevalcap's value itself: the Narrow Gate code (Tab1_AblationCaptioning.py)
prints `Cider(backend="pycocoeval").compute_score(...)` as it comes, and reading the table as
pycocoevalcap / 10 would put Pixtral's COCO score at 6.0 pycocoevalcap units, far above any
published captioner (about 1.4) or human captions scored against each other (about 0.85). So the
default returns pycocoevalcap's value; `bounded=True` divides it by 10 (the mean clipped cosine,
at most 1).

The n-gram bookkeeping is vectorised: words become integer ids, k-grams are numbered by pairing a
(k−1)-gram's id with the next word, and counts, document frequencies, norms and the clipped dot
products are bincounts and a sorted join over those ids, so no Python loop runs per n-gram.

Axis legend: S sentences (candidates first, then every reference) · E (sentence, n-gram) entries ·
K n-gram orders · R references (all images together) · I images.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

SIGMA = 6.0
MAX_ORDER = 4


def _tokenize(text: str, lowercase: bool) -> list[str]:
  """Whitespace tokenisation (str.split, as pycocoevalcap's precook), lower-cased when asked."""
  return (text.lower() if lowercase else text).split()


def _ngram_entries(sentences: Sequence[list[str]], max_order: int):
  """Distinct (sentence, n-gram) pairs of every sentence, with their counts.

  Returns (sent [E], gram [E], order [E], tf [E], G): int64 arrays sorted by (sentence, gram),
  where `gram` numbers every distinct n-gram of any order once (the same n-gram in two sentences
  has the same number) and G is how many there are, and `order` is k − 1.
  """
  lengths = np.array([len(s) for s in sentences], np.int64)
  vocab: dict[str, int] = {}
  words = np.array([vocab.setdefault(w, len(vocab)) for s in sentences for w in s], np.int64)
  sent_of = np.repeat(np.arange(len(sentences), dtype=np.int64), lengths)
  total = words.size
  sents, grams, orders = [], [], []
  key, offset = words, 0  # key[t]: id of the (k−1)-gram starting at token t (unigrams: word id)
  for k in range(1, max_order + 1):
    starts = np.arange(max(total - k + 1, 0))
    # A k-gram starting at t exists if its last token is in the same sentence.
    starts = starts[sent_of[starts + k - 1] == sent_of[starts]]
    if k > 1:
      # (k−1)-gram id × vocabulary + next word numbers the k-grams without collisions; both
      # factors are below the token count T, so the product stays below T² ≪ 2^63.
      pair = key[starts] * len(vocab) + words[starts + k - 1]
      uniq, inv = np.unique(pair, return_inverse=True)
      key = np.zeros(total, np.int64)
      key[starts] = inv
      ids = inv.reshape(-1)
      count = uniq.size
    else:
      ids = words[starts]
      count = len(vocab)
    sents.append(sent_of[starts])
    grams.append(ids + offset)
    orders.append(np.full(starts.size, k - 1, np.int64))
    offset += count
  sent = np.concatenate(sents)
  gram = np.concatenate(grams)
  order = np.concatenate(orders)
  # Distinct (sentence, n-gram) pairs, sorted by sentence then n-gram, and their term frequencies.
  _, first, tf = np.unique(sent * offset + gram, return_index=True, return_counts=True)
  return sent[first], gram[first], order[first], tf.astype(np.int64), offset


def cider_d_scores(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                   sigma: float = SIGMA, max_order: int = MAX_ORDER,
                   lowercase: bool = True) -> np.ndarray:
  """[I] float64 CIDEr-D of candidates[i] against references[i], pycocoevalcap's scale (×10).

  Document frequencies come from the references given (the evaluated subset), N = len(candidates).
  """
  num_images = len(candidates)
  if len(references) != num_images:
    raise ValueError(f"{num_images} candidates but {len(references)} reference lists")
  if num_images == 0:
    raise ValueError("CIDEr-D needs at least one image")
  if max_order < 1:
    raise ValueError(f"max_order must be at least 1, got {max_order}")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"image {i}: references must be a non-empty list of strings")
  num_refs = np.array([len(r) for r in references], np.int64)  # [I]
  ref_image = np.repeat(np.arange(num_images, dtype=np.int64), num_refs)  # [R]
  sentences = ([_tokenize(c, lowercase) for c in candidates]
               + [_tokenize(r, lowercase) for refs in references for r in refs])
  num_sent = len(sentences)
  sent, gram, order, tf, num_grams = _ngram_entries(sentences, max_order)  # [E] each
  is_ref = sent >= num_images
  image = np.where(is_ref, ref_image[np.maximum(sent - num_images, 0)], sent)  # [E]

  # Document frequency: images whose references (together) contain the n-gram; candidates never
  # count. log max(1, df) makes an n-gram no reference has weigh log N, like one seen once.
  ref_pairs = np.unique(image[is_ref] * num_grams + gram[is_ref])
  df = np.bincount(ref_pairs % num_grams, minlength=num_grams).astype(np.float64)
  weight = tf * (np.log(float(num_images)) - np.log(np.maximum(df, 1.0))[gram])  # [E]

  norm = np.sqrt(np.bincount(sent * max_order + order, weight * weight,
                             minlength=num_sent * max_order)).reshape(num_sent, max_order)  # [S,K]
  # pycocoevalcap's length: the summed term frequencies of the 2-grams.
  bigram = order == 1
  length = np.bincount(sent[bigram], tf[bigram], minlength=num_sent)  # [S]

  # Clipped dot product of each reference with its image's candidate: join reference entries to
  # candidate entries on (image, n-gram). Candidate entries are sorted by (sentence = image, gram).
  cand_key = sent[~is_ref] * num_grams + gram[~is_ref]
  ref_key = image[is_ref] * num_grams + gram[is_ref]
  ref_weight = weight[is_ref]
  # An empty placeholder entry keeps the lookup valid when no candidate has any n-gram.
  cand_key = np.append(cand_key, -1)
  cand_weight = np.append(weight[~is_ref], 0.0)
  pos = np.searchsorted(cand_key[:-1], ref_key)
  hit = cand_key[pos] == ref_key
  clipped = np.where(hit, np.minimum(cand_weight[pos], ref_weight), 0.0)
  ref_row = sent[is_ref] - num_images
  dot = np.bincount(ref_row * max_order + order[is_ref], clipped * ref_weight,
                    minlength=ref_image.size * max_order).reshape(-1, max_order)  # [R,K]

  denom = norm[ref_image] * norm[num_images:]  # [R,K] candidate norm × reference norm
  cosine = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot)
  delta = length[ref_image] - length[num_images:]  # [R]
  penalty = np.exp(-(delta * delta) / (2.0 * sigma * sigma))
  per_ref = cosine * penalty[:, None]  # [R,K]
  summed = np.stack([np.bincount(ref_image, per_ref[:, k], minlength=num_images)
                     for k in range(max_order)], axis=1)  # [I,K]
  return summed.mean(axis=1) / num_refs * 10.0


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
            sigma: float = SIGMA, max_order: int = MAX_ORDER, lowercase: bool = True,
            bounded: bool = False) -> tuple[float, dict]:
  """CIDEr-D of a set of captions: (mean over ids, {id: score}).

  candidates: id -> the generated caption; references: id -> its reference captions (5 for COCO
  and Flickr30k). Both must have the same ids; the evaluated subset is exactly these ids (it sets
  the document frequencies). Scores are pycocoevalcap's (×10, the study's Table 1 scale);
  bounded=True divides them by 10. See the module docstring for tokenisation and scale.
  """
  if set(candidates) != set(references):
    missing = set(references) - set(candidates)
    extra = set(candidates) - set(references)
    raise ValueError(f"candidate and reference ids differ: {len(missing)} without a candidate, "
                     f"{len(extra)} without references")
  ids = list(references)
  scores = cider_d_scores([candidates[i] for i in ids], [references[i] for i in ids],
                          sigma=sigma, max_order=max_order, lowercase=lowercase)
  if bounded:
    scores = scores / 10.0
  return float(np.mean(scores)), {i: float(s) for i, s in zip(ids, scores)}
