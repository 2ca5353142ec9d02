"""Two processes x 4 CPU devices (jax.distributed over gloo) train like one process x 8."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO


def _run(workdir, nproc, devices, config="configs/lvm_tiny.py:test", *flags):
  cmd = ["bash", os.path.join(REPO, "launch/local.sh"), str(nproc), str(devices), "--",
         sys.executable, "-m", "lvm_jax.train", "--config", config, f"--workdir={workdir}", "--config.steps=6",
         *(flags or ["--config.mesh.ici.tensor=2"])]
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # ~40 s: 2 processes x 4 devices against 1 x 8
def test_two_processes_match_one(tmp_path):
  one = _run(tmp_path / "one", 1, 8)
  two = _run(tmp_path / "two", 2, 4)
  assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)
  # Each process wrote its own data-iterator state next to the shared arrays.
  data_dir = tmp_path / "two" / "checkpoints" / "6" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))


@pytest.mark.slow  # ~1 min: two AIM runs of 2 processes and of 1
def test_two_processes_pretrain_aim_like_one(tmp_path):
  """Each process decodes only its rows of every batch from an image folder; together they are the
  one process's batches (a corrupt file is replaced alike)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lvm_jax.data import demo  # pylint: disable=g-import-not-at-top
  digits, _ = demo.digit_images("train", 24)
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(12):  # varied aspect ratios: the crops read whole pictures
    Image.fromarray(digits[i]).resize((24 + 4 * i, 24)).save(folder / f"{i:02d}.png")
  (folder / "05b.jpg").write_bytes(b"truncated")
  config = tmp_path / "aim_folder.py"
  config.write_text(f"""from lvm_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.load_file({os.path.join(REPO, 'configs/aim_tiny.py:test')!r})
  c.data.source = dict(kind="image_folder", root={str(folder)!r})
  return c
""")
  one = _run(tmp_path / "one", 1, 8, str(config), "--config.data.threads=2")
  two = _run(tmp_path / "two", 2, 4, str(config), "--config.data.threads=2")
  assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)


@pytest.mark.slow  # ~20 s: two processes and a preemption
def test_sigterm_stops_both_processes_at_one_checkpoint(tmp_path):
  """The JAX coordinator makes both processes agree on the step they save at."""
  cmd = ["bash", os.path.join(REPO, "launch/local.sh"), "2", "2", "--", sys.executable, "-m",
         "lvm_jax.train", "--config", "configs/lvm_tiny.py:test", f"--workdir={tmp_path}",
         "--config.steps=100000", "--config.log_every=1", "--config.ckpt_every=0"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, XLA_FLAGS=""), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "train: step 3/" in line:
      proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
      break
  lines += proc.communicate(timeout=120)[0].splitlines()
  saved = [line.split("saved step ")[1].split()[0] for line in lines if "saved step" in line]
  assert len(saved) == 2 and saved[0] == saved[1], lines[-20:]
  assert os.listdir(tmp_path / "checkpoints") == [saved[0]]


@pytest.mark.slow  # ~20 s: two tokenizing processes
def test_two_processes_write_the_same_store_as_one(tmp_path):
  """Units are dealt to processes; the store is the same whichever process made a shard."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lvm_jax.convert import vqgan_torch  # pylint: disable=g-import-not-at-top
  from lvm_jax.data import store  # pylint: disable=g-import-not-at-top
  from lvm_jax.models import vqgan  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  cfg = vqgan.Config(**load_config("vqgan_tiny").model)
  weights = str(tmp_path / "vq.safetensors")
  vqgan_torch.save_safetensors(nnx.to_pure_dict(nnx.state(vqgan.Model(cfg, rngs=nnx.Rngs(0)), nnx.Param)), weights, cfg)
  for nproc in (1, 2):
    cmd = ["bash", os.path.join(REPO, "launch/local.sh"), str(nproc), "2", "--", sys.executable, "-m",
           "lvm_jax.make_dataset", "--config", "configs/dataset_demo.py:test", f"--config.store={tmp_path}/s{nproc}",
           f"--config.vqgan.weights={weights}", "--config.batch_size=8"]
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  one, two = store.Store(str(tmp_path / "s1")), store.Store(str(tmp_path / "s2"))
  assert len(one) == len(two) > 0 and one.manifest == two.manifest
  for i in range(len(one)):
    a, b = one[i], two[i]
    assert (a["dataset"], a["task"]) == (b["dataset"], b["task"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
