"""The benchmark scripts still run (at toy sizes) and report agreement with transformers.

Their timings are not tested (tests check correctness, not time); this only keeps the scripts
working as the library changes, and checks that both sides computed the same thing.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LM = ["--hidden", "64", "--layers", "1", "--heads", "4", "--kv_heads", "2",
           "--intermediate", "96", "--vocab", "300", "--repeats", "1"]


def _run(script, args, tmp_path):
  out = tmp_path / "result.json"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args,
                         "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_forward_benchmark_runs(tmp_path):
  stdout, _ = _run("forward.py", TINY_LM + ["--tokens", "32", "--settings", "logits,+resid+attn"],
                   tmp_path)
  assert "ratio" in stdout and "logits" in stdout


@pytest.mark.parametrize("family", ["chameleon", "emu3"])
def test_native_benchmark_runs_and_agrees(family, tmp_path):
  args = TINY_LM + ["--family", family, "--batch", "1", "--codebook", "64", "--vq_channels", "32",
                    "--vq_blocks", "1", "--image_side", "32", "--settings", "prepare,logits",
                    "--no-breakdown"]
  _, result = _run("native.py", args, tmp_path)
  prepare, logits = result["results"]["prepare"]["agreement"], result["results"]["logits"]["agreement"]
  assert prepare["prompt_ids_equal"] and prepare["image_ids_equal"]
  assert logits["suppressed_equal"] and logits["logits"] < 1e-4


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_nonnative_benchmark_runs_and_agrees(family, tmp_path):
  args = TINY_LM + ["--family", family, "--batch", "1", "--vision_hidden", "32",
                    "--vision_layers", "2", "--vision_heads", "2", "--vision_intermediate", "64",
                    "--image_side", "28", "--patch", "7", "--settings", "prepare,logits",
                    "--no-breakdown"]
  _, result = _run("nonnative.py", args, tmp_path)
  prepare = result["results"]["prepare"]["agreement"]
  logits = result["results"]["logits"]["agreement"]
  assert prepare["image_tokens_equal"] and prepare["features"] < 1e-4
  assert logits["logits"] < 1e-4
  if family == "llava":  # OneVision's processor needs torchvision: its torch side takes our ids
    assert prepare["prompt_ids_equal"] and logits["prompt_ids_equal"]


def test_window_knockout_benchmark_runs_and_agrees(tmp_path):
  """The window-knockout sweep (six flows, every window centre): ours against transformers' eager
  attention with the blocked edges in the window's layers, one full forward per condition."""
  args = TINY_LM + ["--layers", "3", "--examples", "1", "--window", "2", "--vision_hidden", "32",
                    "--vision_layers", "2", "--vision_heads", "2", "--vision_intermediate", "64",
                    "--image_side", "28", "--patch", "7", "--no-breakdown"]
  _, result = _run("window_knockout.py", args, tmp_path)
  agreement = result["results"]["all"]["agreement"]
  assert agreement["top_equal"] and agreement["prompt_ids_equal"]
  assert agreement["conditions"] == 1 + 6 * 3
  assert agreement["p_within_tolerance"]  # each p(t*): within 1e-5 absolute or 1e-4 relative
  assert agreement["relative_change_max_abs"] > 0  # the knockouts change something


def test_knockout_eval_benchmark_runs_and_agrees(tmp_path):
  """The Narrow Gate knockout evaluation: ours (two generate calls over the batch) against one
  transformers generate per example and condition, the knockout in an attention function."""
  args = TINY_LM + ["--layers", "2", "--examples", "2", "--new_tokens", "4", "--codebook", "64",
                    "--vq_channels", "32", "--vq_blocks", "1", "--image_side", "32",
                    "--no-breakdown"]
  _, result = _run("knockout_eval.py", args, tmp_path)
  agreement = result["results"]["post_softmax"]["agreement"]
  assert agreement["pairs"] == 8 * 2  # none, eoi, image->text, last, all image, 3 random draws
  assert agreement["tokens_equal"] and agreement["mismatched_pairs"] == 0
  assert agreement["sets_equal"] and agreement["prompt_ids_equal"]
  assert agreement["image_ids_equal"]
  assert agreement["changed_vs_none"] > 0  # the knockouts change what is generated


def test_attention_flow_memory_benchmark_prints_its_numbers(tmp_path):
  """Peak memory of the in-scan attention flow, against one layer's [B, H, T, T] float32."""
  args = TINY_LM + ["--tokens", "128", "--text_tokens", "8", "--codebook", "64"]
  stdout, result = _run("attention_flow_memory.py", args, tmp_path)
  assert "peak RSS" in stdout and "XLA temp" in stdout and "bound 4x" in stdout
  assert set(result["results"]) == {"logits", "probability", "value_norm"}
  assert result["meta"]["layer_bytes"] == 1 * 4 * 128 * 128 * 4
  for name in ("probability", "value_norm"):
    r = result["results"][name]
    assert r["peak_rss_mib"] is not None and r["rss_over_layer"] is not None
    assert r["check"]["finite"] and r["check"]["received_shape"] == [1, 1, 4, 128]
  assert result["results"]["probability"]["check"]["row_sum_max_rel_dev"] < 1e-5
  assert result["results"]["value_norm"]["check"]["non_negative"]
