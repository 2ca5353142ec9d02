"""Checkpoint integrity: fingerprints catch any changed bit; damaged steps are moved aside (never
deleted) and the run resumes from the newest step that verifies, on the real trainer and orbax."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import checkpoint, train


def test_fingerprint_sees_every_flipped_bit_and_moved_element():
  rng = np.random.default_rng(0)
  state = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
           "h": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16), "n": jnp.int32(3)}
  base, bad = checkpoint.fingerprint(state)
  assert bad == [] and set(base) == {"['w']", "['h']", "['n']"}
  w = np.asarray(state["w"]).view(np.uint32).copy()
  for index, bit in ((0, 0), (17, 31), (29, 12)):
    flipped = w.copy()
    flipped.flat[index] ^= np.uint32(1 << bit)
    prints, _ = checkpoint.fingerprint({**state, "w": jnp.asarray(flipped.view(np.float32))})
    assert prints["['w']"] != base["['w']"] and prints["['h']"] == base["['h']"]
  swapped = np.asarray(state["w"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert checkpoint.fingerprint({**state, "w": jnp.asarray(swapped)})[0]["['w']"] != base["['w']"]
  # Sharded over 8 devices: the same numbers (integer sums do not depend on reduction order).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
  big = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  sharded = jax.device_put(big, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  assert checkpoint.fingerprint({"x": sharded})[0] == checkpoint.fingerprint({"x": big})[0]
  _, bad = checkpoint.fingerprint({**state, "w": state["w"].at[2, 3].set(jnp.nan)})
  assert bad == ["['w']"]


def test_non_finite_state_is_never_saved(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=3, every=1) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r"step 1: not saved, the state holds NaN or inf in \['w'\]"):
      ckpt.save(1, {"w": jnp.array([1.0, jnp.inf])}, None)
    ckpt.wait()
  assert not any(p.name.isdigit() for p in (tmp_path / "ckpt").iterdir())


def test_readable_but_wrong_arrays_are_caught_by_the_fingerprint(tmp_path):
  """Bytes that still decode (another save's data over this one's) restore without any error
  from orbax; only the fingerprint sees them."""
  abstract = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  for name, seed in (("a", 0), ("b", 1)):
    with checkpoint.Checkpointer(str(tmp_path / name), keep=3, every=1) as ckpt:
      ckpt.save(1, {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(64, 32)), jnp.float32)}, None)
  shutil.rmtree(tmp_path / "a" / "1" / "state")
  shutil.copytree(tmp_path / "b" / "1" / "state", tmp_path / "a" / "1" / "state")
  with checkpoint.Checkpointer(str(tmp_path / "a"), keep=3, every=1) as ckpt:
    with pytest.raises(checkpoint.Damaged, match=r"1 array\(s\) differ from what was saved \(\['w'\]\)"):
      ckpt.restore(1, abstract)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* verifies"):
    checkpoint.read_weights(str(tmp_path / "a"), "w", abstract["w"])  # the tools' path verifies too
  assert (tmp_path / "a" / "1").is_dir()  # and moves nothing


def test_read_weights_reads_one_item_of_the_newest_step_that_verifies(tmp_path, monkeypatch):
  """Tools read the weights alone (not the optimizer's moments), as numpy, from the newest step
  whose arrays match their fingerprints; a damaged newer step is passed over, not moved."""
  rng = np.random.default_rng(0)
  state = lambda: {"params": {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.arange(3.0)},
                   "opt_state": {"mu": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  saved = {}
  with checkpoint.Checkpointer(str(tmp_path), keep=3, every=1) as ckpt:
    for step in (1, 2):
      saved[step] = state()
      ckpt.save(step, saved[step], None, wait=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved[1]["params"])
  weights, step = checkpoint.read_weights(str(tmp_path), "params", abstract)
  assert step == 2 and all(isinstance(x, np.ndarray) for x in jax.tree.leaves(weights))
  jax.tree.map(np.testing.assert_array_equal, weights, jax.device_get(saved[2]["params"]))
  shutil.rmtree(tmp_path / "2" / "state")  # step 2 unreadable: step 1 is read, step 2 stays
  shutil.copytree(tmp_path / "1" / "state", tmp_path / "2" / "state")
  weights, step = checkpoint.read_weights(str(tmp_path), "params", abstract)
  assert step == 1 and (tmp_path / "2").is_dir()
  jax.tree.map(np.testing.assert_array_equal, weights, jax.device_get(saved[1]["params"]))
  monkeypatch.chdir(tmp_path.parent)  # a workdir named relative to the current directory, as typed
  weights, step = checkpoint.read_weights(tmp_path.name, "params", abstract)
  assert step == 1
  wrong = {**abstract, "w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  with pytest.raises(checkpoint.CheckpointError, match=r"params/w is \(8, 4\) in the checkpoint, \(4, 4\) in this config"):
    checkpoint.read_weights(str(tmp_path), "params", wrong)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An 8-step tiny run with checkpoints at 4 and 8, copied fresh for each test."""
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  c = load_config("lvm_tiny", "test")
  c.steps = 8
  root = tmp_path_factory.mktemp("trained")
  state = train.train(c, str(root))
  return c, root, jax.tree.map(np.asarray, state)


def _copy(trained, tmp_path):
  c, root, state = trained
  shutil.copytree(root, tmp_path / "w")
  return c, tmp_path / "w", state


def _data_files(workdir, step):
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size)


def _overwrite_4k(path):
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    f.seek(max(0, size // 2 - 2048))
    f.write(np.random.default_rng(1).integers(0, 256, min(4096, size), np.uint8).tobytes())


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(16)


@pytest.mark.parametrize("damage", [_overwrite_4k, pytest.param(_truncate, marks=pytest.mark.slow),
                                    pytest.param(os.remove, marks=pytest.mark.slow)])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_resumes(trained, tmp_path, damage, caplog):
  c, workdir, _ = _copy(trained, tmp_path)
  damage(_data_files(workdir, 8)[-1])
  c = c.copy_and_resolve_references()
  c.steps = 10
  with caplog.at_level(logging.INFO):
    state = train.train(c, str(workdir))
  # The phase's closing line, with its time, comes only from a restore that verified.
  assert "checkpoint step 8 is damaged" in caplog.text and re.search(r"restoring step 4 from .*: \d+\.\d s",
                                                                     caplog.text), caplog.text
  assert int(state["step"]) == 10
  assert (workdir / "checkpoints.damaged" / "8").is_dir()  # renamed, never deleted
  assert (workdir / "checkpoints.damaged" / "8.reason.txt").read_text().strip()  # why, for the user
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [4, 8, 10]  # 8 trained again from 4
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 11))  # the rows after step 4 were redone


def test_fallback_resume_equals_the_uninterrupted_run(trained, tmp_path):
  """Resuming from the previous checkpoint after damage retraces the lost steps exactly."""
  c, workdir, straight = _copy(trained, tmp_path)
  _overwrite_4k(_data_files(workdir, 8)[-1])
  again = train.train(c.copy_and_resolve_references(), str(workdir))
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_every_checkpoint_damaged_is_one_line_and_nothing_is_deleted(trained, tmp_path):
  c, workdir, _ = _copy(trained, tmp_path)
  for step in (4, 8):
    _truncate(_data_files(workdir, step)[-1])
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* verifies \(steps 8, 4 moved") as e:
    train.train(c.copy_and_resolve_references(), str(workdir))
  assert "\n" not in str(e.value)
  assert sorted(p.name for p in (workdir / "checkpoints.damaged").iterdir() if p.is_dir()) == ["4", "8"]


def test_damaged_step_on_gcs_is_moved_aside_and_the_previous_restores(gcs_emulator, monkeypatch):
  """gs:// has no directories: the move copies the step's objects, then deletes them, and orbax's
  cached listing forgets the step."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from tests import gcs  # pylint: disable=g-import-not-at-top
  for k, v in gcs_emulator.items():
    monkeypatch.setenv(k, v)
  root = "gs://lvm-test/checkpoint_test"
  abstract = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  with checkpoint.Checkpointer(root, keep=3, every=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {"w": jnp.full((64, 32), float(step))}, None)
  kv = ts.KvStore.open({"driver": "gcs", "bucket": "lvm-test", "path": ""}).result()
  for name in gcs.list_objects(gcs_emulator, root + "/2/state/"):
    if "/d/" in name:
      kv.write(name, b"not what was written").result()
  with checkpoint.Checkpointer(root, keep=3, every=1) as ckpt:
    state, step = ckpt.restore_or_init(abstract, None, lambda: None)
    assert step == 1 and float(state["w"][0, 0]) == 1.0 and ckpt.manager.all_steps() == [1]
    assert ckpt.due(2)  # step 2 can be saved again
  names = gcs.list_objects(gcs_emulator, root)
  assert not any(n.startswith("checkpoint_test/2/") for n in names)
  assert any(n.startswith("checkpoint_test.damaged/2/state/") for n in names)
  assert "checkpoint_test.damaged/2.reason.txt" in names


@pytest.mark.slow  # ~14 s: the CLI in a subprocess
def test_a_damaged_step_costs_one_warning_line_on_the_command_line(trained, tmp_path):
  """The reads still in flight when one fails used to print ~70 'Event loop is closed' tracebacks
  and a TensorStore spec each; the user sees one warning and the run goes on."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  _, workdir, _ = _copy(trained, tmp_path)
  os.remove(_data_files(workdir, 8)[-1])
  cmd = [sys.executable, "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py:test", f"--workdir={workdir}",
         "--config.steps=9"]
  out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  # Everything but absl's INFO lines (lvm_jax's progress: orbax's are filtered out).
  noise = [line for line in out.stderr.splitlines() if line.strip() and not re.match(r"I\d{4} ", line)]
  assert len(noise) == 1 and "checkpoint step 8 is damaged" in noise[0], out.stderr[-3000:]
  assert re.search(r"restoring step 4 from .*: \d+\.\d s", out.stderr), out.stderr[-3000:]
  assert "CheckpointManager" not in out.stderr, out.stderr[-3000:]  # orbax's INFO lines are filtered out
