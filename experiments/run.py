"""Runs an experiment from its config: the one entry point for every study's figure and table.

  python -m experiments.run --config=configs/experiments/first_token_knockout.py:demo \
      --config.batch_size=4 --workdir=results/demo_knockout [--dry_run]
  python -m experiments.run --config=configs/from_json.py:results/demo_knockout/config.json \
      --workdir=results/rerun          # reproduce a run from what it wrote

The workdir receives config.json (the resolved config and provenance), records.jsonl (one line
per example and condition, appended as the run goes), metrics.json, figures/ and report.md. A run
restarted with the same workdir resumes; with a different config it refuses. Bad input (an
unknown config field, a missing model or dataset, an unwritable workdir) is one line on stderr
and exit status 2, before anything compiles.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

# Importing an experiment module registers it.
from experiments import cross_modal, first_token, narrow_gate  # noqa: F401
from narrowgate_jax.runs import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (file.py:arg).",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes (and resumes from).")
flags.DEFINE_bool("dry_run", False, "Print the resolved config, the shapes that will compile and "
                  "the memory estimate, then stop.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.workdir is None and not FLAGS.dry_run:
    raise app.UsageError("--workdir is required")
  try:
    metrics = loop.run(_CONFIG.value, FLAGS.workdir, dry_run=FLAGS.dry_run,
                       progress=FLAGS.progress)
  except (ValueError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if metrics is not None:
    print(f"wrote {FLAGS.workdir}: {metrics.get('records')} records")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override (an unknown field, a value of the
  wrong type) reported in one line and exit status 2."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    cause = e if isinstance(e, KeyError) else (e.__cause__ or e.__context__)
    if isinstance(cause, KeyError):  # ml_collections: a field the config does not have
      message = "unknown config field " + " ".join(str(cause.args[0]).split())
    else:
      message = "bad flag or config override: " + " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
