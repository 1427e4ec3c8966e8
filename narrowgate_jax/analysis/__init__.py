"""Pure analysis functions: arrays (and model callables) in, arrays out; no model state.

Cross-modal (CM) study, PROTOCOLS.md §3:
  windows     layer windows of the window-knockout sweep (`window_layers`, `all_windows`)
  stats       the knockout metric and its band (`relative_change`, `bootstrap_band`,
              `first_token_probability`)
  logit_lens  answer formation across depth (`logit_lens`, `token_trajectories`)
"""

from narrowgate_jax.analysis.logit_lens import (NO_TOKEN, gather_position, logit_lens,
                                                token_trajectories)
from narrowgate_jax.analysis.stats import (bootstrap_band, bootstrap_indices,
                                           first_token_probability, relative_change)
from narrowgate_jax.analysis.windows import all_windows, window_layers

__all__ = [
    "NO_TOKEN", "all_windows", "bootstrap_band", "bootstrap_indices", "first_token_probability",
    "gather_position", "logit_lens", "relative_change", "token_trajectories", "window_layers",
]
from narrowgate_jax.analysis.attention_flow import (category_masks, category_sums,  # noqa: E402
                                                    flow_shares)
