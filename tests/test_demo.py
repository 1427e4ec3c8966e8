"""The README's quick start: the demo job runs, and CI runs exactly the README's test command."""

import json
import math
import pathlib
import re

from experiments import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_and_reports_finite_numbers(tmp_path):
  results = demo.run(str(tmp_path), seed=0)
  assert (tmp_path / "checkpoint" / "narrowgate.json").exists()
  layers = demo.CONFIG.num_layers
  assert len(results["resid_norm_last_position_per_layer"]) == layers + 1
  assert len(results["kl_window2_knockout_by_start_layer"]) == layers
  received = results["attention_from_last_to_first_half_per_layer"]
  assert all(0.0 < r < 1.0 for r in received)  # a share of the attention, averaged over heads
  kls = results["kl_knockout_first_half_all_layers_pre_softmax"] + list(
      results["kl_steer_by_alpha"].values())
  assert all(math.isfinite(k) and k >= 0 for k in kls)
  steer = results["kl_steer_by_alpha"]
  assert steer["1.0"] < steer["4.0"] < steer["16.0"]  # a larger push moves the output further
  json.dumps(results)


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
  test_command = next(c for c in commands if "pytest" in c)
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
  assert ci[-1] == test_command
