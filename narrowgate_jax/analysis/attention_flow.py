"""Cross-modal attention (the Narrow Gate study's Fig. 3, PROTOCOLS.md §2(b)): how the attention
that text after the image pays to the image span splits between EOI, the last image token, any
positions a user names, and the other image tokens.

Input is what `Capture(received_from="text_after_image")` returns, computed inside the layer scan:
received [L, B, N, S], for every layer, example, head and key the attention summed over the text
queries after the image (post-softmax weights, or value-norm weighted: `received_weighting`).
No [L, N, T, S] tensor is ever formed.

f^l_j = (1/C)(1/|H|) sum_h sum_{i > EOI} A^{l,h}_{i,j}: averaged over heads and examples, then
normalised per layer over the image span (image tokens, row breaks and EOI: BOS and the
image-start tokens are dropped), so the categories of a layer sum to 1.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from narrowgate_jax.processing.roles import select

SPAN = ("image", "image_break", "eoi")


def category_masks(roles: np.ndarray,
                   extra: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
  """roles [B, T] -> {"eoi", "last_image", <extra names>, "other_image"}: disjoint [B, T] bool
  masks covering the image span (later names take precedence over "other_image" only)."""
  span = select(list(SPAN), roles, what="attention flow span")
  # LLaVA-1.5-style spans have no end-of-image token: its share is then 0, not an error.
  masks = {"eoi": select("eoi", roles, allow_empty=True),
           "last_image": select("last_image", roles)}
  for name, mask in (extra or {}).items():
    mask = np.asarray(mask, bool)
    if mask.shape != span.shape:
      raise ValueError(f"positions {name!r}: shape {mask.shape}, the batch is {span.shape}")
    masks[name] = mask & span & ~masks["eoi"] & ~masks["last_image"]
  named = np.any(np.stack(list(masks.values())), axis=0)
  masks["other_image"] = span & ~named
  return masks


def category_sums(received: np.ndarray, roles: np.ndarray,
                  extra: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
  """received [L, B, N, S] -> {category: [L, B]}: per layer and example, the head-averaged
  attention its category receives, and "span" (the whole image span's). Sums over examples of
  these make the study's ratio of means (`flow_shares`)."""
  per_head = np.asarray(received, np.float64).mean(axis=2)  # [L, B, S]
  masks = category_masks(np.asarray(roles), extra)
  out = {name: np.einsum("LBS,BS->LB", per_head, mask) for name, mask in masks.items()}
  out["span"] = np.einsum("LBS,BS->LB", per_head, select(list(SPAN), roles))
  return out


def flow_shares(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{category: [L, B]} (`category_sums`, examples possibly concatenated from many batches) ->
  {category: [L]}: mean over examples, normalised by the span's mean, per layer."""
  span = np.asarray(sums["span"]).mean(axis=1)
  if np.any(span <= 0):
    raise ValueError("a layer pays no attention to the image span: shares are undefined")
  return {name: np.asarray(v).mean(axis=1) / span for name, v in sums.items() if name != "span"}
