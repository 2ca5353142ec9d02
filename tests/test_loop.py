"""The shared trainer loop: non-finite updates skipped and a diverged run stopped with its good
checkpoints kept; ids outside the model stop the run; SIGTERM from process start in every long
entry point; the VQGAN trainer's preemption and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import checkpoint, loop, sharding, train, train_vqgan
from tests.conftest import REPO, load_config, sigterm_on

ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_non_finite_step_changes_nothing_and_a_finite_one_resets_the_streak(tiny_config):
  """A token outside the vocabulary makes the loss NaN: that update is skipped (parameters and
  optimizer state bit-identical), counted, and reported as bad ids; the next good batch trains."""
  from lvm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  c = tiny_config
  mesh = sharding.make_mesh(c.mesh)
  b = train.build(c, mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    state = jax.jit(b.init, out_shardings=b.state_shardings)(jax.random.key(0))
    before = jax.tree.map(np.asarray, state)
    local = next(synthetic.make_iterator(c, sharding.local_rows(b.batch_sharding, c.global_batch)))
    good = sharding.global_batch_array(local, b.batch_sharding, c.global_batch)
    poked = np.array(local["tokens"])
    poked[0, 5] = c.model.vocab_size + 3
    bad = sharding.global_batch_array({**local, "tokens": poked}, b.batch_sharding, c.global_batch)
    step = train.jit_train_step(c, b)
    state, m = step(state, bad)
    m = jax.device_get(m)
    assert not np.isfinite(m["loss"]) and int(m["input_errors"]) == 1
    assert (int(m["skipped_steps"]), int(m["skip_streak"]), int(state["step"])) == (1, 1, 1)
    for k in ("params", "opt_state"):
      for x, y in zip(jax.tree.leaves(before[k]), jax.tree.leaves(state[k]), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    state, m = step(state, good)
    m = jax.device_get(m)
    assert np.isfinite(m["loss"]) and int(m["input_errors"]) == 0
    assert (int(m["skipped_steps"]), int(m["skip_streak"]), int(state["step"])) == (1, 0, 2)
    # The skipped update did not advance optax's count either: this first applied update is
    # warmup's step 0 (lr 0), so the moments moved and the parameters not yet.
    changed = [not np.array_equal(x, np.asarray(y)) for x, y in
               zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(state["opt_state"]))]
    assert any(changed)


def test_diverged_run_stops_non_zero_and_keeps_only_good_checkpoints(tmp_path):
  """lr=1e4: NaN gradients from a few steps in. The run stops after max_skipped_steps skips with
  one line and exit 2; every kept checkpoint verifies and is finite; the newest predates the skips."""
  cmd = [sys.executable, "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py:test", f"--workdir={tmp_path}",
         "--config.optim.lr=1e4", "--config.steps=40", "--config.ckpt_every=1", "--config.ckpt_keep=2",
         "--config.max_skipped_steps=3"]
  out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert "error: step" in last and "not finite for 3 steps in a row" in last, out.stderr[-2000:]
  rows = _rows(tmp_path)
  first_skip = min(r["step"] for r in rows if r["skipped_steps"] > 0)
  kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert kept and kept[-1] < first_skip, (kept, first_skip)
  c = load_config("lvm_tiny", "test")
  b = train.build(c, sharding.make_mesh(c.mesh))
  with checkpoint.Checkpointer(str(tmp_path / "checkpoints"), 2, 1) as ckpt:
    for step in kept:
      state = ckpt.restore(step, b.abstract_state)  # verifies the fingerprints
      assert checkpoint.fingerprint(state)[1] == []  # and nothing in it is NaN or inf


@pytest.mark.slow  # ~25 s: a training process (the step test covers the count)
def test_ids_outside_the_vocabulary_stop_the_run_unsaved(tiny_config, tmp_path):
  """Data the config check cannot see (synthetic codes here) is caught at run time, never a NaN."""
  tiny_config.model.vocab_size = 20  # the synthetic codes go to 31
  with pytest.raises(loop.RunError, match=r"step 1: the batch holds \d+ inputs the model cannot take \(token ids outside \[0, model.vocab_size\)"):
    train.train(tiny_config, str(tmp_path))
  assert not any(p.isdigit() for p in os.listdir(tmp_path / "checkpoints"))


@pytest.mark.parametrize("entry,args", [
    ("train", ["--config", "configs/lvm_tiny.py:test", "--workdir={tmp}"]),
    ("train_vqgan", ["--config", "configs/vqgan_tiny.py:test", "--workdir={tmp}"]),
    ("make_dataset", ["--config", "configs/dataset_demo.py:test", "--config.store={tmp}/store"]),
    ("evaluate", ["--workdir={tmp}"]),
])
def test_sigterm_while_starting_exits_0_with_one_line(tmp_path, entry, args):
  """0.4 s in, the process is importing JAX, long before it parses flags or touches the workdir."""
  cmd = [sys.executable, "-m", f"lvm_jax.{entry}", *(a.format(tmp=tmp_path) for a in args)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(0.4)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, (out, err[-2000:])
  assert out.strip().splitlines()[-1] == f"{entry}.py: SIGTERM before there was anything to save: exiting", out
  assert not os.path.exists(tmp_path / "checkpoints")


def test_sigterm_while_compiling_exits_0_with_one_line(tmp_path):
  """Later, while the first step compiles: nothing to save yet, or (on a fast machine) step 1 saved."""
  cmd = [sys.executable, "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py:test", f"--workdir={tmp_path}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (tmp_path / "config.json").exists() and time.time() < deadline:  # restored or initialised
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, (out, err[-2000:])
  last = out.strip().splitlines()[-1] if out.strip() else ""
  assert ("stopping early: saved step" in err  # the log
          or last.endswith("SIGTERM before there was anything to save: exiting")), (out, err[-2000:])


VQGAN_FLAGS = {"steps": 8, "gan.start": 3, "log_every": 1, "eval_every": 4, "ckpt_every": 0}


def _vqgan_config():
  c = load_config("vqgan_tiny", "test")  # the GAN and the discriminator's optimizer both in play by step 8
  c.steps, c.gan.start, c.log_every, c.eval_every, c.ckpt_every = VQGAN_FLAGS.values()
  return c


@pytest.mark.slow  # ~2 min: three compiles of the VQGAN step
def test_vqgan_sigterm_saves_exits_0_and_the_resume_equals_the_uninterrupted_run(tmp_path):
  cmd = [sys.executable, "-m", "lvm_jax.train_vqgan", "--config", "configs/vqgan_tiny.py:test",
         f"--workdir={tmp_path / 'b'}", "--cpu_devices=8", *(f"--config.{k}={v}" for k, v in VQGAN_FLAGS.items())]
  returncode, out = sigterm_on(cmd, "train: step 2/", ENV, timeout=300)
  assert returncode == 0, out[-3000:]
  saved = [int(s) for s in os.listdir(tmp_path / "b" / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 8 and f"saved step {saved[0]}" in out, (saved, out[-2000:])
  with pytest.warns(UserWarning, match="perceptual weight is 0"):
    resumed = train_vqgan.train_vqgan(_vqgan_config(), str(tmp_path / "b"))
    straight = train_vqgan.train_vqgan(_vqgan_config(), str(tmp_path / "a"))
  a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
  assert [r["step"] for r in b] == list(range(1, 9)) and "eval/psnr" in a[3] and "eval/psnr" in b[7]
  assert [r["loss"] for r in a] == [r["loss"] for r in b] and a[7]["eval/psnr"] == b[7]["eval/psnr"]
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_guard_keeps_every_state_entry_but_the_step():
  old = {"step": jnp.int32(4), "w": jnp.ones(3), "opt": (jnp.zeros(2),), **loop.counters()}
  new = {"w": jnp.full(3, 2.0), "opt": (jnp.ones(2),)}
  kept, count = loop.guard(old, new, jnp.bool_(False))
  assert int(kept["step"]) == 5 and float(kept["w"][0]) == 1.0 and float(kept["opt"][0][0]) == 0.0
  assert (int(count["skipped_steps"]), int(count["skip_streak"])) == (1, 1)
  took, count = loop.guard(kept, new, jnp.bool_(True))
  assert float(took["w"][0]) == 2.0 and (int(count["skipped_steps"]), int(count["skip_streak"])) == (1, 0)


def _train_on_restartable_gcs(tmp_path, *flags):
  """A tiny run on a gs:// workdir whose emulator is stopped after step 4 (and the process)."""
  from tests import gcs  # pylint: disable=g-import-not-at-top
  if gcs.binary() is None:
    pytest.skip("fake-gcs-server not installed")
  server = gcs.Restartable(tmp_path / "gcs")
  server.start()
  cmd = [sys.executable, "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py:test", "--workdir=gs://lvm-test/run",
         "--config.steps=10", "--config.ckpt_every=5", *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **server.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  for line in proc.stderr:  # the log
    if "train: step 4/" in line:
      server.stop()
      break
  return server, proc


@pytest.mark.slow  # ~20 s: a gs:// run with a restart
def test_a_gcs_outage_during_training_is_waited_out(tmp_path):
  from tests import gcs  # pylint: disable=g-import-not-at-top
  server, proc = _train_on_restartable_gcs(tmp_path)
  try:
    time.sleep(5)
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(x) for x in gcs.read(server.env, "gs://lvm-test/run/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    names = gcs.list_objects(server.env, "gs://lvm-test/run/checkpoints/")
    assert any(n.startswith("run/checkpoints/10/state/") for n in names)
  finally:
    proc.kill()
    server.stop()


@pytest.mark.slow  # ~50 s: gcsfs (behind orbax) retries a refused request for ~33 s before it fails
def test_a_gcs_outage_past_the_deadline_ends_in_one_line(tmp_path):
  server, proc = _train_on_restartable_gcs(tmp_path, "--config.storage_deadline_s=3")
  try:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "storage unreachable for" in err.strip().splitlines()[-1], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
  finally:
    proc.kill()
    server.stop()


@pytest.mark.parametrize("name", ["lvm_tiny", "aim_tiny", "vqgan_tiny"])
def test_the_data_module_yields_the_batch_its_model_family_declares(name, tmp_path):
  """The batch layout is declared once, by the family (batch_spec); the config's data module
  (loop.data) gives each process its rows of exactly that: names, dtypes, trailing shapes."""
  from lvm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = load_config(name, "test")
  mesh = loop.prepare(c, str(tmp_path))
  data_iter, _ = loop.data(c, mesh)
  batch = next(data_iter)
  spec = config_lib.model_module(c).batch_spec(c)
  assert sorted(batch) == sorted(spec)
  for k, x in spec.items():
    assert (batch[k].dtype, batch[k].shape) == (x.dtype, (c.global_batch // jax.process_count(), *x.shape[1:])), k
