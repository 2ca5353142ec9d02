"""Entry points fail on bad flags and configs with one line on stderr and status 2; they log as
absl programs do (--verbosity, --log_dir, --alsologtostderr), without the INFO lines of libraries."""

import glob
import logging
import os
import subprocess
import sys

import pytest
from absl import logging as absl_logging

from lvm_jax import cli
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
    ("make_dataset", ["--config", "configs/dataset_demo.py", "--log_dir=setup.py/logs"],
     "error: --log_dir=setup.py/logs: Not a directory"),
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


def test_below_warning_only_lvm_jax_scripts_and_configs_pass_unless_verbosity_is_debug():
  def passes(path: str, level: int = logging.INFO) -> bool:
    return cli.LibraryInfoFilter().filter(logging.LogRecord("absl", level, path, 1, "m", (), None))

  library = os.path.join(os.path.dirname(absl_logging.__file__), "x.py")  # an installed package's file
  assert not passes(library) and not passes(library, logging.DEBUG) and passes(library, logging.WARNING)
  assert passes(cli.__file__) and passes(os.path.join(REPO, "configs", "lvm_tiny.py"))
  absl_logger = logging.getLogger("absl")
  before = absl_logger.level  # restored as it was (NOTSET in tests): pytest's caplog then sees INFO
  try:
    absl_logging.set_verbosity(absl_logging.DEBUG)
    assert passes(library, logging.DEBUG)
  finally:
    absl_logger.setLevel(before)


# An entry point in miniature: one INFO line of its own, a Python warning, a checkpoint (orbax logs
# its INFO lines), one warning.
SCRIPT = """
import warnings
import jax.numpy as jnp
from absl import logging
from lvm_jax import checkpoint, cli

def main(argv):
  logging.info("own info line")
  warnings.warn("a python warning")
  with checkpoint.Checkpointer(argv[1], keep=1, every=1) as ckpt:
    ckpt.save(1, {"w": jnp.zeros(4)}, None, wait=True)
  logging.warning("own warning line")

cli.run(main, required=[])
"""


def test_verbosity_log_dir_and_alsologtostderr_work_as_in_absl_programs(tmp_path):
  (tmp_path / "entry.py").write_text(SCRIPT)
  runs = {"default": [], "files": [f"--log_dir={tmp_path / 'logs'}"],
          "debug": [f"--log_dir={tmp_path / 'logs2'}", "--alsologtostderr", "--verbosity=1"]}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = {k: subprocess.Popen([sys.executable, str(tmp_path / "entry.py"), *args, str(tmp_path / k)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k, args in runs.items()}  # at once: each spends seconds importing JAX
  err = {}
  for k, proc in procs.items():
    out, err[k] = proc.communicate(timeout=120)
    assert proc.returncode == 0 and not out, err[k][-3000:]
  own = ("] starting: entry.py", "] own info line", "UserWarning: a python warning", "] own warning line")
  assert all(line in err["default"] for line in own), err["default"]
  # With files, stderr shows warnings and worse, and everything with --alsologtostderr.
  log = open(glob.glob(str(tmp_path / "logs" / "*.INFO"))[0]).read()
  assert all(line in log for line in own[:2] + own[3:]) and "CheckpointManager" not in log, log
  assert "own info line" not in err["files"] and "] own warning line" in err["files"], err["files"]
  assert all(line in err["debug"] for line in own), err["debug"]
  assert "CheckpointManager" not in err["default"] and "CheckpointManager" in err["debug"]  # orbax's INFO lines
