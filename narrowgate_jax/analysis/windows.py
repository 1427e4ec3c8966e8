"""Layer windows of the cross-modal (CM) window-knockout sweep (PROTOCOLS.md §3).

A window of k consecutive layers centred at layer ℓ of an L-layer model is

  layers max(0, ℓ − ⌊k/2⌋) … min(L, ℓ + ⌈k/2⌉) − 1,

so it is cut short (not shifted) at either end of the model: with k = 9 the window at ℓ = 0 is
layers 0..4 and the one at ℓ = L−1 is L−5..L−1. For odd k the centre sits in the middle; for even k
it is the first layer of the upper half (ℓ − k/2 … ℓ + k/2 − 1).

`all_windows` gives every centre's window as one padded [L, k] array, the form `Knockout.layers`
takes, so a whole sweep is one array (one condition per row).
"""

from __future__ import annotations

import operator

import numpy as np

from narrowgate_jax.interventions import NO_LAYER


def _check(k: int, num_layers: int) -> tuple[int, int]:
  k, num_layers = operator.index(k), operator.index(num_layers)
  if num_layers < 1:
    raise ValueError(f"num_layers must be at least 1, got {num_layers}")
  if k < 1:
    raise ValueError(f"window size k must be at least 1, got {k}")
  if k > num_layers:
    raise ValueError(f"window size k={k} is a window larger than the model "
                     f"({num_layers} layers)")
  return k, num_layers


def window_layers(centre: int, k: int, num_layers: int) -> list[int]:
  """The layers of the k-layer window centred at `centre` in a `num_layers`-layer model.

  Returns max(0, centre − ⌊k/2⌋), …, min(num_layers, centre + ⌈k/2⌉) − 1 (ascending); between
  ⌈k/2⌉ and k layers, fewer where the window meets either end of the model.
  """
  k, num_layers = _check(k, num_layers)
  centre = operator.index(centre)
  if not 0 <= centre < num_layers:
    raise ValueError(f"window centre {centre} out of range for a model with {num_layers} layers "
                     f"(valid: 0..{num_layers - 1})")
  first = max(0, centre - k // 2)
  stop = min(num_layers, centre + (k + 1) // 2)  # (k + 1) // 2 == ⌈k/2⌉
  return list(range(first, stop))


def all_windows(k: int, num_layers: int) -> np.ndarray:
  """Every centre's window: [L, k] int32, row ℓ = `window_layers(ℓ, k, L)` padded with NO_LAYER.

  The width is k (the longest window); rows cut short at the ends of the model are padded on the
  right with NO_LAYER (-1), which `Knockout` reads as "no layer".
  """
  k, num_layers = _check(k, num_layers)
  out = np.full((num_layers, k), NO_LAYER, np.int32)
  for centre in range(num_layers):
    layers = window_layers(centre, k, num_layers)
    out[centre, :len(layers)] = layers
  return out
