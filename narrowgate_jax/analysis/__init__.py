"""Pure analysis functions: arrays (and model callables) in, arrays out; no model state.

Cross-modal (CM) study, PROTOCOLS.md §3:
  windows         layer windows of the window-knockout sweep (`window_layers`, `all_windows`)
  stats           the knockout metric and its band (`relative_change`, `bootstrap_band`,
                  `first_token_probability`)
  logit_lens      answer formation across depth (`logit_lens`, `token_trajectories`)
Narrow Gate (NG) study, PROTOCOLS.md §2:
  attention_flow  (b) the text's attention to EOI / last image token / other image tokens, from
                  in-scan received attention (`category_sums`, `flow_shares`)
  modality_gap    (a) image×text cosine quantiles (`cosine_quantiles`), ADP modality homogeneity
                  (`modality_homogeneity`, `adp_clusters`)
  adp             Advanced Density Peaks as DADApy 0.3.4 computes it, step by step
                  (`advanced_density_peaks`, `cosine_neighbours`, `remove_zero_distances`,
                  `gride_ids`, `knn_log_density`, `adp_labels`)
  overlap         (c) neighbourhood overlap with labels (`neighbourhood_overlap`, `..._per_layer`)
  patching        (e) EOI patching metrics (`distribution_similarity`, `flip_accuracy`,
                  `logit_difference`) and `steering_direction`
"""

from narrowgate_jax.analysis.adp import (ADPResult, adp_labels, advanced_density_peaks,
                                         cosine_neighbours, gride_ids, knn_log_density,
                                         remove_zero_distances)
from narrowgate_jax.analysis.attention_flow import category_masks, category_sums, flow_shares
from narrowgate_jax.analysis.logit_lens import (NO_TOKEN, gather_position, logit_lens,
                                                token_trajectories)
from narrowgate_jax.analysis.modality_gap import (adp_clusters, cosine_quantiles,
                                                  modality_homogeneity)
from narrowgate_jax.analysis.overlap import neighbourhood_overlap, neighbourhood_overlap_per_layer
from narrowgate_jax.analysis.patching import (distribution_similarity, flip_accuracy,
                                              logit_difference, steering_direction)
from narrowgate_jax.analysis.stats import (bootstrap_band, bootstrap_indices,
                                           first_token_probability, relative_change)
from narrowgate_jax.analysis.windows import all_windows, window_layers

__all__ = [
    "ADPResult", "NO_TOKEN", "adp_clusters", "adp_labels", "advanced_density_peaks",
    "all_windows", "bootstrap_band", "bootstrap_indices", "category_masks", "category_sums",
    "cosine_neighbours", "cosine_quantiles", "distribution_similarity",
    "first_token_probability", "flip_accuracy", "flow_shares", "gather_position", "gride_ids",
    "knn_log_density", "logit_difference", "logit_lens", "modality_homogeneity",
    "neighbourhood_overlap", "neighbourhood_overlap_per_layer", "relative_change",
    "remove_zero_distances", "steering_direction", "token_trajectories", "window_layers",
]
