"""The README's main job: the quick demo runs every stage and writes every artifact."""

import json
import os

import pytest

from lvm_jax import demo
from lvm_jax.data import demo as demo_data


@pytest.mark.slow  # ~2 min: every stage of the demo
def test_quick_demo_runs_every_stage(tmp_path):
  result = demo.demo(str(tmp_path), quick=True, count=2)
  assert set(result["tasks"]) == set(demo_data.TASKS)
  # Every held-out task, each with all of its sentences (2 in the quick store; the cap is per task).
  assert {k: v["sentences"] for k, v in result["perplexity"].items()} == {
      f"{t}_held_out/{t}": 2 for t in demo_data.TASKS}
  assert result["step"] == 6 and result["store"] == str(tmp_path / "store")
  assert result["task_settings"]["count"] == 2 and result["task_settings"]["temperature"] == 0.0
  for path in ("vqgan/checkpoints", "store/manifest.json", "lvm/metrics.jsonl", "eval.json", "prompts/counting.png"):
    assert os.path.exists(tmp_path / path), path
  assert json.load(open(tmp_path / "eval.json")) == json.loads(json.dumps(result))
