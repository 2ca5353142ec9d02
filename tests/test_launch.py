"""launch/*.sh under --dry_run: the exact gcloud / srun / process commands they would run.

A fake `gcloud` (and `ssh`, `srun`) that fails loudly comes first on PATH, so a dry run that
called one would fail the test; no network, no cloud account. Each printed line must be what
shlex.join makes of its argv, so the lines can be pasted into a shell as they are.
"""

import os
import shlex
import subprocess

import pytest

from tests.conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
GIT = "https://github.com/someone/lvm_jax.git"
LIBTPU = ("--xla_tpu_enable_async_collective_fusion=true "
          "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true")


@pytest.fixture
def env(tmp_path):
  """The environment of the scripts: fake gcloud/ssh/srun first on PATH, REPO set, nothing else
  of the scripts' settings inherited from whoever runs the tests."""
  fake = tmp_path / "bin"
  fake.mkdir()
  for tool in ("gcloud", "ssh", "srun", "sbatch"):
    path = fake / tool
    path.write_text(f"#!/bin/sh\necho 'FAKE {tool} CALLED: a dry run ran a command' >&2\nexit 97\n")
    path.chmod(0o755)
  e = {k: v for k, v in os.environ.items()
       if k not in ("ZONE", "VERSION", "SPOT", "PROJECT", "DRY_RUN_STATE", "PORT", "SLURM_SUBMIT_DIR")}
  e.update(PATH=f"{fake}{os.pathsep}{e['PATH']}", REPO=GIT)
  return e


def dry(env, script, *args, **extra):
  """Runs launch/<script> with args; returns the argv of each printed line."""
  r = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env={**env, **extra}, cwd=REPO,
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert "FAKE" not in r.stderr, r.stderr
  lines = r.stdout.splitlines()
  argvs = [shlex.split(line) for line in lines]
  for line, argv in zip(lines, argvs):
    assert shlex.join(argv) == line, line  # quoted exactly as shlex.quote would
  return argvs


def command_of(argv):
  """The --command given to `gcloud ... ssh`."""
  return argv[argv.index("--command") + 1]


def trainer_argv(remote):
  """The trainer's argv inside the remote command, and the environment assignments before it."""
  before, _, rest = remote.partition(" nohup ")
  assert rest, remote
  argv = shlex.split(rest.partition(" >> train.log")[0])
  env = dict(w.split("=", 1) for w in shlex.split(before.rpartition("; ")[2]))
  return argv, env


def test_the_fake_gcloud_fails_loudly(env):
  r = subprocess.run(["gcloud", "compute", "tpus", "list"], env=env, capture_output=True, text=True)
  assert r.returncode == 97 and "FAKE gcloud CALLED" in r.stderr


def test_one_slice_up_creates_a_tpu_vm_installs_and_trains_on_every_worker(env):
  cmds = dry(env, "tpu_pod.sh", "--dry_run", "up", "lvm7b", "v5p-128", "configs/lvm_7b.py",
             "gs://bucket/lvm_7b", "--config.steps=10")
  assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", v]
                                   for v in ("describe", "create", "ssh", "ssh")]
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lvm7b", "--zone", "us-east5-a",
                     "--format=value(state)"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lvm7b", "--zone", "us-east5-a",
                     "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5"]
  for c in cmds[2:]:
    assert c[5:9] == ["lvm7b", "--zone", "us-east5-a", "--worker=all"]
  setup = command_of(cmds[2])
  assert f"git clone -q {GIT} lvm_jax" in setup and "pip install -q -p .venv/bin/python -e '.[tpu]'" in setup
  argv, train_env = trainer_argv(command_of(cmds[3]))
  assert argv == [".venv/bin/python", "-m", "lvm_jax.train", "--config", "configs/lvm_7b.py",
                  "--workdir", "gs://bucket/lvm_7b", "--config.steps=10"]  # no DCN override for one slice
  assert train_env == {"LIBTPU_INIT_ARGS": LIBTPU}
  assert "echo $! > train.pid" in command_of(cmds[3])


def test_the_older_form_is_up(env):
  args = ["lvm7b", "v5p-128", "configs/lvm_7b.py", "gs://bucket/lvm_7b", "--config.steps=10"]
  assert dry(env, "tpu_pod.sh", "--dry_run", *args) == dry(env, "tpu_pod.sh", "--dry_run", "up", *args)


def test_two_slices_are_one_queued_resource_with_the_dcn_axis_across_them(env):
  cmds = dry(env, "tpu_pod.sh", "--slices=2", "--dry_run", "up", "lvm7b", "v5p-128", "configs/lvm_7b.py",
             "gs://bucket/lvm_7b_x2")
  assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "lvm7b", "--zone", "us-east5-a",
                     "--format=value(state.state)"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lvm7b", "--zone", "us-east5-a",
                     "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5",
                     "--node-count", "2", "--node-prefix", "lvm7b"]
  assert len(cmds) == 4
  for c in cmds[2:]:  # every worker of every node
    assert c[:10] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "lvm7b", "--zone", "us-east5-a",
                      "--node=all", "--worker=all"]
  argv, train_env = trainer_argv(command_of(cmds[3]))
  assert argv == [".venv/bin/python", "-m", "lvm_jax.train", "--config", "configs/lvm_7b.py",
                  "--workdir", "gs://bucket/lvm_7b_x2", "--config.mesh.dcn.data=2"]
  # GCP gives the nodes of a multislice queued resource the MEGASCALE_* variables; nothing overrides them.
  assert train_env == {"LIBTPU_INIT_ARGS": LIBTPU} and "MEGASCALE" not in command_of(cmds[3])


def test_a_dcn_layout_given_on_the_command_line_is_kept(env):
  cmds = dry(env, "tpu_pod.sh", "--slices=4", "--dry_run", "run", "big", "configs/lvm_7b.py", "gs://b/w",
             "--config.mesh.dcn.fsdp=2", "--config.mesh.dcn.data=2")
  argv, _ = trainer_argv(command_of(cmds[-1]))
  assert argv[-2:] == ["--config.mesh.dcn.fsdp=2", "--config.mesh.dcn.data=2"]
  assert "--config.mesh.dcn.data=4" not in argv


def test_run_alone_neither_queries_nor_creates(env):
  cmds = dry(env, "tpu_pod.sh", "run", "lvm7b", "configs/lvm_7b.py", "gs://b/w", "--dry_run")
  assert [c[4] for c in cmds] == ["ssh", "ssh"]
  argv, _ = trainer_argv(command_of(cmds[-1]))
  assert "--dry_run" not in argv  # taken by the script wherever it stands, never passed on


@pytest.mark.parametrize("slices,kind,state,delete", [
    ("1", "tpu-vm", "PREEMPTED", ["--quiet"]),
    ("2", "queued-resources", "SUSPENDED", ["--force", "--quiet"]),
    ("2", "queued-resources", "FAILED", ["--force", "--quiet"])])
def test_resume_after_a_preemption_recreates_then_trains(env, slices, kind, state, delete):
  cmds = dry(env, "tpu_pod.sh", f"--slices={slices}", "--dry_run", "resume", "r", "v5p-128",
             "configs/lvm_7b.py", "gs://b/w", DRY_RUN_STATE=state)
  assert [c[3:5] for c in cmds] == [[kind, v] for v in ("describe", "delete", "create", "ssh", "ssh")]
  assert cmds[1] == ["gcloud", "compute", "tpus", kind, "delete", "r", "--zone", "us-east5-a", *delete]
  argv, _ = trainer_argv(command_of(cmds[-1]))
  assert argv[:7] == [".venv/bin/python", "-m", "lvm_jax.train", "--config", "configs/lvm_7b.py", "--workdir", "gs://b/w"]


@pytest.mark.parametrize("slices,state", [("1", "READY"), ("2", "ACTIVE")])
def test_resume_reuses_slices_that_are_up(env, slices, state):
  cmds = dry(env, "tpu_pod.sh", f"--slices={slices}", "--dry_run", "resume", "r", "v5p-128",
             "configs/lvm_7b.py", "gs://b/w", DRY_RUN_STATE=state)
  assert [c[4] for c in cmds] == ["describe", "ssh", "ssh"]


@pytest.mark.parametrize("slices,expected", [
    ("1", ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lvm7b", "--zone", "us-east5-a", "--quiet"]),
    ("2", ["gcloud", "compute", "tpus", "queued-resources", "delete", "lvm7b", "--zone", "us-east5-a",
           "--force", "--quiet"])])
def test_delete(env, slices, expected):
  assert dry(env, "tpu_pod.sh", f"--slices={slices}", "--dry_run", "delete", "lvm7b") == [expected]


def test_logs_follow_worker_0_and_stop_signals_every_worker(env):
  (logs,) = dry(env, "tpu_pod.sh", "--slices=2", "--dry_run", "logs", "lvm7b")
  assert logs[4:10] == ["ssh", "lvm7b", "--zone", "us-east5-a", "--node=0", "--worker=0"]
  assert command_of(logs) == "tail -n 200 -F lvm_jax/train.log"
  (stop,) = dry(env, "tpu_pod.sh", "--dry_run", "stop", "lvm7b")
  assert "--worker=all" in stop and 'kill -TERM "$(cat train.pid)"' in command_of(stop)


def test_spot_project_zone_and_runtime_come_from_the_environment(env):
  cmds = dry(env, "tpu_pod.sh", "--slices=2", "--dry_run", "create", "q", "v5p-256",
             SPOT="1", PROJECT="my-proj", ZONE="europe-west4-b", VERSION="v2-alpha-tpuv5-x")
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q", "--zone", "europe-west4-b",
                     "--project", "my-proj", "--accelerator-type", "v5p-256", "--runtime-version", "v2-alpha-tpuv5-x",
                     "--node-count", "2", "--node-prefix", "q", "--spot"]


@pytest.mark.parametrize("args", [["strat", "lvm7b", "configs/lvm_7b.py", "gs://b/w"],  # a mistyped command
                                  ["--slices=0", "delete", "x"], ["delete"], []])
def test_bad_command_lines_print_usage_and_run_nothing(env, args):
  r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry_run", *args], env=env,
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and r.stdout == "" and "FAKE" not in r.stderr


def test_local_dry_run_prints_one_process_per_line(env):
  cmds = dry(env, "local.sh", "--dry_run", "2", "4", "--", "python", "-m", "lvm_jax.train", "--config",
             "configs/lvm_tiny.py", "--workdir", "/tmp/a b", PORT="23456")
  assert cmds == [["env", "JAX_PLATFORMS=cpu", "python", "-m", "lvm_jax.train", "--config", "configs/lvm_tiny.py",
                   "--workdir", "/tmp/a b", "--coordinator_address=127.0.0.1:23456", "--num_processes=2",
                   f"--process_id={i}", "--cpu_devices=4"] for i in range(2)]


def test_slurm_dry_run_prints_the_srun_line(env):
  cmds = dry(env, "slurm_gpu.sh", "configs/lvm_1b.py", "/shared/runs/lvm_1b", "--dry_run", "--config.steps=5")
  assert cmds == [["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "lvm_jax.train", "--distributed",
                   "--config", "configs/lvm_1b.py", "--workdir", "/shared/runs/lvm_1b", "--config.steps=5"]]


def test_every_launch_script_that_reaches_other_machines_has_a_dry_run():
  for name in sorted(os.listdir(LAUNCH)):
    text = open(os.path.join(LAUNCH, name)).read()
    if any(tool in text for tool in ("gcloud ", "srun ", "ssh ", "jax.distributed")):
      assert "--dry_run" in text, name


RECORDING_GCLOUD = r"""#!/usr/bin/env bash
# Appends its argv (fields split by \x1f) to $GCLOUD_LOG; keeps the resource's state in $GCLOUD_STATE.
(IFS=$'\x1f'; echo "$*") >> "$GCLOUD_LOG"
case " $* " in
  *" describe "*) s=$(cat "$GCLOUD_STATE"); [ -n "$s" ] || { echo "NOT_FOUND" >&2; exit 1; }; echo "$s" ;;
  *" create "*) [[ " $* " == *" queued-resources "* ]] && echo ACTIVE > "$GCLOUD_STATE" || echo READY > "$GCLOUD_STATE" ;;
  *" delete "*) : > "$GCLOUD_STATE" ;;
esac
"""


@pytest.mark.parametrize("slices,state", [("1", ""), ("1", "PREEMPTED"), ("2", ""), ("2", "SUSPENDED")])
def test_a_real_run_issues_the_commands_the_dry_run_printed(env, tmp_path, slices, state):
  """The script's own logic (up or re-create, then run) against a gcloud that only records and
  answers describe: the same commands as the dry run's, plus the wait for the slices to be up."""
  fake = tmp_path / "rec"
  fake.mkdir()
  (fake / "gcloud").write_text(RECORDING_GCLOUD)
  (fake / "gcloud").chmod(0o755)
  log, state_file = tmp_path / "calls", tmp_path / "state"
  state_file.write_text(state)
  args = [f"--slices={slices}", "resume", "r", "v5p-128", "configs/lvm_7b.py", "gs://b/w", "--config.steps=3"]
  real_env = {**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}", "GCLOUD_LOG": str(log), "GCLOUD_STATE": str(state_file)}
  r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args], env=real_env, cwd=REPO,
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  calls = [line.split("\x1f") for line in log.read_text().splitlines()]
  printed = dry(env, "tpu_pod.sh", "--dry_run", *args, DRY_RUN_STATE=state)
  wait = [printed[0][1:]]  # after create, one describe sees the slices up (a dry run does not wait)
  expected = [c[1:] for c in printed]
  assert calls == expected[:-2] + wait + expected[-2:]
