"""The README's quick start: the demo job runs, and CI runs exactly the README's test command."""

import pathlib
import re

from experiments import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_the_suite_on_the_organisms_and_writes_the_report(tmp_path):
  """A small demo (8 examples, one native and the non-native organism): every run's workdir, the
  side-by-side figures and a report that links them."""
  summaries = demo.run(str(tmp_path), str(ROOT / "organisms"), examples=8,
                       only=["chameleon_gate", "llava"], progress=False)
  assert set(summaries) == {"chameleon_gate", "llava"}
  for name, summary in summaries.items():
    values = [v for v in summary.values() if v is not None]
    assert values and all(0.0 <= v <= 1.0 for v in values), (name, summary)
  assert "eoi_knockout" in summaries["chameleon_gate"]
  assert summaries["llava"]["eoi_knockout"] is None  # no end-of-image token to knock out
  report = (tmp_path / "report.md").read_text()
  assert "| chameleon_gate |" in report and "figures/knockout_by_organism.png" in report
  for figure in ("knockout_by_organism.png", "eoi_share_by_organism.png"):
    assert (tmp_path / "figures" / figure).stat().st_size > 10_000
  for experiment in demo.run_configs("chameleon_gate", "", {"vqa": "", "caption": ""}):
    assert (tmp_path / "runs" / "chameleon_gate" / experiment / "report.md").exists()


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
  test_command = next(c for c in commands if "pytest" in c)
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
  assert ci[-1] == test_command
