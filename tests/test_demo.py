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
  assert all(k.endswith("_held_out/" + k.split("/")[1]) for k in result["perplexity"])
  for path in ("vqgan/checkpoints", "store/manifest.json", "lvm/metrics.jsonl", "eval.json", "prompts/counting.png"):
    assert os.path.exists(tmp_path / path), path
  assert json.load(open(tmp_path / "eval.json")) == json.loads(json.dumps(result))
