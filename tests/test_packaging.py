"""The package as a user installs it: a wheel, its console scripts, built-in configs, --help."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvm_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("lvm-train", "lvm-train-vqgan", "lvm-make-dataset", "lvm-evaluate", "lvm-prompt", "lvm-compile",
           "lvm-demo", "lvm-scaling", "lvm-aim-curve", "lvm-convert-hf-llama", "lvm-convert-aim", "lvm-convert-vqgan",
           "lvm-convert-lpips", "lvm-tokenizer-report")


def test_setup_declares_one_script_per_entry_point():
  setup = (ROOT / "setup.py").read_text()
  for name in SCRIPTS:
    assert f'"{name}":' in setup, name
  assert "lvm-train_vqgan" not in setup and "lvm-export-hf" not in setup  # one naming style


def test_builtin_config_names_resolve_to_the_shipped_files():
  assert {"lvm_tiny", "lvm_300m", "lvm_7b", "aim_tiny", "vqgan_tiny"} <= set(config_lib.builtin_configs())
  path, _, arg = config_lib.config_path("lvm_tiny:test").partition(":")
  assert Path(path).name == "lvm_tiny.py" and Path(path).exists() and arg == "test"
  assert config_lib.config_path("configs/lvm_tiny.py") == "configs/lvm_tiny.py"  # paths pass through
  with pytest.raises(Exception, match="no built-in config of that name.*lvm_300m"):
    config_lib.config_path("lvm_300")


def test_a_directory_named_like_a_builtin_config_does_not_hide_it(tmp_path, monkeypatch):
  """A workdir called lvm_demo in the current directory (the demo's own commands make such
  names) once made --config lvm_demo fail with 'config file lvm_demo does not exist'."""
  (tmp_path / "lvm_demo").mkdir()
  monkeypatch.chdir(tmp_path)
  path = config_lib.config_path("lvm_demo:long").partition(":")[0]
  assert Path(path).name == "lvm_demo.py" and Path(path).is_file()
  assert config_lib.load_file("lvm_demo:long").steps > 0


def _run(args, cwd, env, timeout=600):
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~2 min: builds a wheel, trains 5 steps, asks every script for --help
def test_a_wheel_trains_from_any_directory_and_every_script_explains_itself(tmp_path):
  """The wheel (no checkout on the path) carries the configs: lvm-train --config lvm_tiny runs
  from another directory; every console script's --help names --config or its own flags."""
  dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  build = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                str(ROOT)], tmp_path, os.environ)
  assert build.returncode == 0, build.stderr[-2000:]
  wheel = next(dist.glob("lvm_jax-*.whl"))
  install = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                  str(wheel)], tmp_path, os.environ)
  assert install.returncode == 0, install.stderr[-2000:]
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  where = _run([sys.executable, "-c", "import lvm_jax; print(lvm_jax.__file__)"], elsewhere, env)
  assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not the checkout
  shipped = _run([sys.executable, "-c", "from lvm_jax.data import demo; print(demo.TOKENIZER); print(demo.LVM)"],
                 elsewhere, env)
  tokenizer, lvm = shipped.stdout.split()
  assert tokenizer.startswith(str(site)) and os.path.getsize(tokenizer) > 1e6  # the demo tokenizer
  assert lvm.startswith(str(site)) and os.path.getsize(os.path.join(lvm, "model.safetensors")) > 1e6  # and LVM
  assert os.path.exists(os.path.join(lvm, "config.json"))

  train = _run([str(site / "bin" / "lvm-train"), "--config", "lvm_tiny", "--config.steps=5",
                "--workdir", str(tmp_path / "run")], elsewhere, env)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "train: step 5/5" in train.stderr

  for name in SCRIPTS:
    out = _run([str(site / "bin" / name), "--help"], elsewhere, env, timeout=120)
    assert out.returncode == 0, (name, out.stderr[-1000:])
    flags_part = out.stdout.split("\nflags:\n", 1)[1].split("\n\n")[0]
    assert flags_part.startswith("  --"), (name, out.stdout[:500])  # its own flags, one line each
    if name in ("lvm-train", "lvm-train-vqgan", "lvm-make-dataset", "lvm-compile"):
      assert "  --config: " in flags_part, name
