"""End-to-end trainer: loss falls, metrics are written, resume is exact, bad input fails early."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lvm_jax import config as config_lib, sharding, train
from tests import gcs
from tests.conftest import REPO, load_config, sigterm_on


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_state_is_sharded_as_declared_and_donated(tiny_config):
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from lvm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  c = tiny_config
  c.mesh.ici = dict(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(c.mesh)
  b = train.build(c, mesh)
  batch_sharding = b.batch_sharding
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    state = jax.jit(b.init, out_shardings=b.state_shardings)(jax.random.key(0))
    wq = state["params"]["layers"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    adam = state["opt_state"][1][0]
    assert adam.mu["layers"]["wq"].sharding.spec == wq.sharding.spec
    assert adam.nu["lm_head"].sharding.spec == P("fsdp", "tensor")
    local = next(synthetic.make_iterator(c, sharding.local_rows(batch_sharding, c.global_batch)))
    batch = sharding.global_batch_array(local, batch_sharding, c.global_batch)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"))  # rows over data x fsdp, tokens whole
    new_state, _ = train.jit_train_step(c, b)(state, batch)
  assert wq.is_deleted()  # donated: the step updated the state in place
  assert new_state["params"]["layers"]["wq"].sharding == wq.sharding


def test_loss_falls_and_metrics_are_logged(tiny_config, tmp_path):
  c = tiny_config
  c.steps = 30
  c.mesh.ici = dict(data=2, fsdp=2, tensor=2)  # every mesh axis in use
  c.peak_tflops = 0.0  # measure the host's peak, as a CPU run does
  train.train(c, str(tmp_path))
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 31))
  for key in ("loss", "perplexity", "grad_norm", "learning_rate", "tokens_per_sec", "step_time", "mfu"):
    assert all(np.isfinite(r[key]) for r in rows), key
  first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
  assert first > np.log(c.model.vocab_size) - 0.5  # starts near uniform
  assert last < first - 1.5, (first, last)
  # MFU is a fraction of a measured peak (all 8 fake devices share the host's cores).
  assert all(0 < r["mfu"] < 1 for r in rows[1:]), [r["mfu"] for r in rows]
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [24, 28, 30]


def test_resume_is_exact(tiny_config, tmp_path):
  """12 steps straight == 4 steps, stop, restart, 8 more: same losses and parameters."""
  straight = train.train(tiny_config, str(tmp_path / "a"))
  train.train(tiny_config, str(tmp_path / "b"), stop_at=4)
  assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4]
  with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then killed
    f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")
  again = train.train(tiny_config, str(tmp_path / "b"), stop_at=4)  # a rerun of a finished budget
  assert int(again["step"]) == 4 and [r["step"] for r in _metrics(tmp_path / "b")][-1] == 5
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer put it back
  resumed = train.train(tiny_config, str(tmp_path / "b"))
  a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
  assert [r["step"] for r in b] == list(range(1, 13))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # ~25 s, a subprocess; test_loop's SIGTERM tests stay in the default suite
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  cmd = [sys.executable, "-m", "lvm_jax.train", "--config", os.path.join(REPO, "configs/lvm_tiny.py"),
         f"--workdir={tmp_path}", "--config.steps=100000", "--config.log_every=1",
         "--config.ckpt_every=0", "--config.peak_tflops=1"]
  returncode, out = sigterm_on(cmd, "train: step 3/", dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert returncode == 0, out
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3, (saved, out)
  assert f"saved step {saved[0]}" in out


@pytest.mark.parametrize("change,error", [
    (lambda c: c.update(seq_len=100), "seq_len=100 is not a multiple of tokens_per_image=8"),
    (lambda c: c.mesh.ici.update(data=3), "8 devices are not divisible by 3"),
    (lambda c: c.update(global_batch=12), "global_batch=12 is not divisible by data x fsdp"),
    (lambda c: c.model.update(remat="some"), "model.remat='some'"),
    (lambda c: c.model.update(attention="pallas"), "model.attention='pallas'"),
    (lambda c: c.model.update(attention_block=100), "model.attention_block=100"),
])
def test_bad_config_fails_in_one_line_before_compiling(tiny_config, tmp_path, change, error):
  change(tiny_config)
  with pytest.raises((config_lib.ConfigError, sharding.MeshError), match=error) as e:
    train.train(tiny_config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_checkpoint_of_another_model_fails_in_one_line_and_stays(tiny_config, tmp_path):
  """A config that does not match the checkpoint is the config's fault: one line, nothing moved,
  config.json left as the checkpoint's (tests/test_checkpoint.py covers damaged files)."""
  from lvm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  tiny_config.steps = 4
  train.train(tiny_config, str(tmp_path))
  saved = (tmp_path / "config.json").read_text()
  tiny_config.model.d_model = 32
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"cannot restore step 4 .*params/embed is \(256, 64\) in the checkpoint, \(256, 32\)") as e:
    train.train(tiny_config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert (tmp_path / "checkpoints" / "4").exists() and not (tmp_path / "checkpoints.damaged").exists()
  assert (tmp_path / "config.json").read_text() == saved


def test_unwritable_workdir_fails_in_one_line(tiny_config, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError, match="is not writable"):
    train.train(tiny_config, str(blocker / "run"))


@pytest.mark.slow  # ~30 s: two training processes on the GCS emulator
def test_gs_workdir_trains_resumes_and_logs(gcs_emulator, tmp_path):
  """The same run on gs:// (local emulator): checkpoints, resume, metrics.jsonl and TensorBoard."""
  workdir = "gs://lvm-test/runs/tiny"
  cmd = [sys.executable, "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py:test",
         f"--workdir={workdir}", "--config.steps=6"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **gcs_emulator)
  for extra in (["--stop_at=3"], []):
    out = subprocess.run(cmd + extra, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
  assert "restored step 3" in out.stderr  # the log
  rows = [json.loads(line) for line in gcs.read(gcs_emulator, workdir + "/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 7))
  names = gcs.list_objects(gcs_emulator, workdir + "/")
  assert any(n.startswith("runs/tiny/checkpoints/6/state/") for n in names)
  assert any(n.startswith("runs/tiny/checkpoints/6/data/process_0-of-1") for n in names)
  assert any("/tensorboard/events.out.tfevents" in n for n in names)
  # A bucket that does not exist: a one-line error before anything compiles.
  bad = subprocess.run(cmd[:-2] + ["--workdir=gs://no-such-bucket/run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert "error: workdir gs://no-such-bucket/run is not writable" in bad.stderr.splitlines()[-1]


@pytest.mark.slow  # ~35 s; AIM's model tests stay in the default suite
def test_aim_pretrains_on_the_same_trainer(tmp_path):
  """The AIM objective through train(): prefix-causal next-patch loss falls, state checkpointed."""
  c = load_config("aim_tiny", "test")
  train.train(c, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 7)) and "perplexity" not in rows[0]
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
  assert 0 < rows[-1]["mfu"] < 1 and (tmp_path / "checkpoints" / "6").exists()


@pytest.mark.slow  # ~60 s in the suite: evaluation and a profiler trace on top of training
def test_a_run_shows_progress_evaluates_profiles_and_logs_its_config(tmp_path, caplog):
  """What a person watches: x/N progress lines with an ETA, held-out evaluation every eval_every
  steps (AIM: validation loss) kept out of the step time, the data wait per step, the config as
  TensorBoard text, and a profiler trace of the chosen steps."""
  import glob  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from tests.conftest import events  # pylint: disable=g-import-not-at-top
  c = load_config("aim_tiny", "test")
  c.steps, c.log_every, c.eval_every, c.profile_steps = 4, 1, 2, (2, 3)
  c.eval_data.images = 32
  with caplog.at_level(logging.INFO):
    train.train(c, str(tmp_path))
  lines = [m for m in caplog.messages if m.startswith("train: step ")]
  assert [m.split()[2] for m in lines] == ["1/4", "2/4", "3/4", "4/4"], lines
  assert lines[0].startswith("train: step 1/4 (25%), ") and "tokens/s" in lines[1] and "ETA" in lines[1]
  assert any(m.startswith("compiling the step and running it once: ") for m in caplog.messages)
  rows = _metrics(tmp_path)
  evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
  assert sorted(evals) == [2, 4] and all(0 < v < 2 for v in evals.values()), evals
  assert all(0 <= r["data_wait"] <= r["step_time"] for r in rows)
  [tb] = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  found = events(open(tb, "rb").read())
  assert {(s, t) for s, t, _ in found if t == "eval/loss"} == {(2, "eval/loss"), (4, "eval/loss")}
  [config_text] = [v for _, t, v in found if t.startswith("config")]
  assert '"model_name": "aim"' in config_text
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
