"""Entry points fail on bad flags and configs with one line on stderr and status 2."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("module,args,message", [
    ("train", ["--config", "configs/lvm_tiny.py", "--config.optim.learning_rate=1"],
     "error: unknown config key in --config.optim.learning_rate=1"),
    ("train", ["--config", "configs/lvm_tiny.py", "--config.global_batch=x"],
     "error: flag --config.global_batch=x: invalid literal for int()"),
    ("train", ["--config", "configs/lvm_tiny.py:bogus"], "unknown arg 'bogus' (expected 'test' or nothing)"),
    ("train", ["--config", "configs/nope.py"], "error: cannot load --config: "),
    ("train", ["--config", "configs/lvm_tiny.py", "--config.seq_len=100"],
     "error: seq_len=100 is not a multiple of tokens_per_image=16"),
    ("demo", ["--quik"], "Unknown command line flag 'quik'"),
    ("make_dataset", ["--config", "configs/dataset_demo.py", "--config.store="], "error: store is empty"),
    ("prompt", ["--images=a.png", "--out=o.png"], "error: give exactly one of --workdir and --hf"),
    ("evaluate", ["--store=/nonexistent"], "config.json does not exist"),
    ("compile", ["--config", "configs/lvm_tiny.py", "--topology", "v9-8"], "error: --topology='v9-8'"),
])
def test_bad_input_is_one_line(tmp_path, module, args, message):
  cmd = [sys.executable, "-m", f"lvm_jax.{module}", *args]
  if module not in ("compile", "make_dataset", "prompt"):
    cmd.append(f"--workdir={tmp_path / 'run'}")
  out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert message in last and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()
