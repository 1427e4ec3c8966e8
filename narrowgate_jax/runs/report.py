"""What a run leaves besides its records and metrics: figures in the studies' plain style, and
report.md putting the tables and figures together."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

from narrowgate_jax.runs.workdir import Workdir


@contextlib.contextmanager
def figure(path: str, width: float = 5.0, height: float = 3.2) -> Iterator:
  """A matplotlib (figure, axes) in the studies' plain style, saved to `path` (PNG) and beside it
  as PDF on exit. Uses the non-interactive Agg backend: runs work without a display."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  style = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
           "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False,
           "savefig.bbox": "tight", "savefig.dpi": 150}
  with plt.rc_context(style):
    fig, ax = plt.subplots(figsize=(width, height))
    try:
      yield fig, ax
      fig.savefig(path)
      fig.savefig(os.path.splitext(path)[0] + ".pdf")
    finally:
      plt.close(fig)


def layer_axis(ax, label: str = "layer") -> None:
  """Labels the x axis as layers, with whole-number ticks only (small models have few layers)."""
  from matplotlib.ticker import MaxNLocator

  ax.set_xlabel(label)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """Rows of dicts -> a markdown table with `columns` (floats to 4 significant digits)."""
  def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def write_report(workdir: Workdir, experiment, metrics: dict, figures: Sequence[str]) -> None:
  """report.md: what ran (experiment, model, data), then the experiment's own section and its
  figures."""
  config = workdir.config()
  head = [f"# {experiment.name}", "",
          f"- model: `{config['model']['path']}`",
          f"- data: `{config['data']['path']}`",
          f"- records: {metrics.get('records', '?')}",
          "- config: `config.json` (resolved config and provenance; reproduces this run)", ""]
  body = experiment.report(metrics, figures)
  pictures = [f"![{name}](figures/{name})" for name in figures if name.endswith(".png")]
  with open(workdir.report_md, "w") as f:
    f.write("\n".join(head + [body, ""] + pictures) + "\n")
