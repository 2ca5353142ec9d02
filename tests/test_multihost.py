"""Two processes x 4 CPU devices (jax.distributed over gloo) train like one process x 8."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def _run(workdir, nproc, devices):
  cmd = ["bash", os.path.join(REPO, "launch/local.sh"), str(nproc), str(devices), "--",
         sys.executable, "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py:test",
         f"--workdir={workdir}", "--config.steps=6", "--config.mesh.ici.tensor=2"]
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path):
  one = _run(tmp_path / "one", 1, 8)
  two = _run(tmp_path / "two", 2, 4)
  assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)
  # Each process wrote its own data-iterator state next to the shared arrays.
  data_dir = tmp_path / "two" / "checkpoints" / "6" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
