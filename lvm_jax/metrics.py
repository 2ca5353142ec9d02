"""Training metrics: metrics.jsonl, TensorBoard, and model FLOPs utilization.

MFU counts model FLOPs only (each family's flops_per_step: forward + backward matmuls, no remat
recompute, as in the PaLM paper, causal attention at half the full product as MaxText counts it)
over the devices' peak: a table for TPUs and GPUs, a measured matmul rate on CPUs.

Every write to the workdir goes through storage.retry: an outage shorter than the deadline costs
a pause and loses no row; a longer one ends the run with a one-line StorageError.
"""

import json
import os
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lvm_jax import progress, storage

# Dense bf16 peak TFLOP/s per chip, by a substring of `device_kind`.
PEAK_TFLOPS = (("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0),
               ("v5p", 459.0), ("v5", 459.0), ("v4", 275.0), ("v3", 123.0),
               ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0))


def measured_peak_flops(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of large jitted matmuls run on all local devices at once.

  Fake CPU devices share the host's cores, so one matmul per device, concurrently, measures
  what the host can do however many devices it is split into.
  """
  devices = jax.local_devices()
  n = n if len(devices) == 1 else n // 2
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  x = jax.device_put(jnp.ones((len(devices), n, n), dtype),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a))
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * len(devices) * n**3 / best


def workdir_peak(workdir: str, peak_tflops_per_device: float, dtype: str) -> float:
  """peak_flops_total, measured at most once per workdir: a CPU's measured rate moves with the
  load of the machine, and a resume must report the MFU of an unchanged step time unchanged, so
  the first measurement is kept in <workdir>/peak_flops.json (for the same devices and dtype)."""
  devices = jax.devices()
  if peak_tflops_per_device > 0 or _table_tflops(devices[0]):
    return peak_flops_total(peak_tflops_per_device, dtype)
  path = os.path.join(workdir, "peak_flops.json")
  key = {"device_kind": devices[0].device_kind, "devices": len(devices), "processes": jax.process_count(),
         "dtype": dtype}
  kept = storage.retry(lambda: storage.read_bytes(path, 60.0), what=f"reading {path}")
  record = json.loads(kept) if kept else {}
  if record.get("key") == key:
    return float(record["flops"])
  with progress.phase("measuring this host's matmul peak for the MFU (once per workdir)"):
    flops = measured_peak_flops(dtype) * jax.process_count()
  if jax.process_index() == 0:
    record = json.dumps({"key": key, "flops": flops, "note": "measured matmul rate; delete to measure again"})
    storage.retry(lambda: storage.write_bytes(path, record.encode(), 60.0), what=f"writing {path}")
  return flops


def _table_tflops(device: jax.Device) -> float | None:
  """The PEAK_TFLOPS entry of an accelerator's device_kind; None for CPUs and unknown kinds."""
  if device.platform == "cpu":
    return None
  return next((tflops for key, tflops in PEAK_TFLOPS if key.lower() in device.device_kind.lower()), None)


def peak_flops_total(peak_tflops_per_device: float, dtype: str) -> float:
  """Peak FLOP/s of the whole job."""
  devices = jax.devices()
  tflops = peak_tflops_per_device if peak_tflops_per_device > 0 else _table_tflops(devices[0])
  if tflops:
    return tflops * 1e12 * len(devices)
  # CPUs: the host's measured matmul rate, times the hosts.
  return measured_peak_flops(dtype) * jax.process_count()


def _step_of(line: str) -> float:
  """A row's step; a line torn by a kill mid-write counts as past every checkpoint."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


class _NoEvents:
  """What a disabled Writer has for `tb`: the same methods, doing nothing."""

  name = file = ""

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    pass

  def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
    pass

  def add_text(self, tag: str, text: str, step: int) -> None:
    pass

  def flush(self) -> None:
    pass


class _Events(_NoEvents):
  """A TensorBoard event file written on the caller's thread, in tensorboardX's record format.

  Not tensorboardX's SummaryWriter: it writes (and, for gs://, uploads) from a daemon thread, and
  an error there (a bucket that is down) kills that thread with a traceback no caller sees, after
  which add_scalar blocks forever on its full queue; its GCS writer also uploads again from
  __del__, holding up the exit for 120 s when the bucket is down. Here events collect in memory
  and `flush` appends them to a local file, which a gs:// Writer then uploads.
  """

  def __init__(self, local_dir: str):
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event = event_pb2.Event
    os.makedirs(local_dir, exist_ok=True)
    # Microseconds in the name: a Writer reopened within the second starts a file of its own.
    self.name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
    self.file = os.path.join(local_dir, self.name)
    self.pending = bytearray()
    self._add(self._event(file_version="brain.Event:2"))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    self._add(self._event(step=int(step), summary=summary.scalar(tag, float(value))))

  def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
    """A uint8 image, or a float one in [0, 1]."""
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    self._add(self._event(step=int(step), summary=summary.image(tag, np.asarray(image), dataformats=dataformats)))

  def add_text(self, tag: str, text: str, step: int) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    self._add(self._event(step=int(step), summary=summary.text(tag, text)))

  def _add(self, event: Any) -> None:
    from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
    event.wall_time = time.time()
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self.pending += header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))

  def flush(self) -> None:
    """One attempt at appending what is pending; what lands is never written twice."""
    storage.append(self.file, self.pending)


# How often TensorBoard events reach the workdir (tensorboardX's flush_secs before).
TB_SYNC_S = 30.0


class Writer:
  """One JSON object per logged step in workdir/metrics.jsonl, plus TensorBoard scalars and images.

  The workdir may be local or gs://. Rows logged after the checkpoint a run resumes from
  belong to steps it will redo, so they are dropped on start. Storage that stays unreachable
  for `deadline_s` seconds ends the run with storage.StorageError; shorter outages are waited
  out. A disabled Writer (processes other than 0) has the same attributes and does nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0, *,
               deadline_s: float = storage.DEADLINE_S):
    self.enabled, self.deadline_s = enabled, deadline_s
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.local = "://" not in workdir
    self.lines: list[str] = []
    self.tb: _NoEvents = _NoEvents()
    self._unsaved = bytearray()  # local rows not yet appended
    self._tb_remote = None if self.local else os.path.join(workdir, "tensorboard")
    self._staging = ""  # where event files are written: the workdir's, or a local temp dir
    self._synced = -float("inf")  # when events last reached the workdir (monotonic)
    self._failed = self._closed = False
    self._timeout = min(60.0, deadline_s)  # per request: a hung one must not outlast the deadline
    if not enabled:
      return
    old = self._retry(lambda: storage.read_bytes(self.path, self._timeout), f"reading {self.path}")
    old_lines = old.decode().splitlines() if old else []
    self.lines = [line for line in old_lines if _step_of(line) <= resume_step]
    if len(self.lines) != len(old_lines):
      self._retry(self._rewrite, f"writing {self.path}")
    self._staging = os.path.join(workdir, "tensorboard") if self.local else tempfile.mkdtemp(prefix="lvm_tb_")
    self.tb = _Events(self._staging)

  def _retry(self, fn: Any, what: str) -> Any:
    try:
      return storage.retry(fn, what=what, deadline_s=self.deadline_s)
    except storage.StorageError:
      self._failed = True
      raise

  def _rewrite(self) -> None:
    # Objects in a bucket cannot be appended to: all rows are written again, whole.
    storage.write_bytes(self.path, "".join(line + "\n" for line in self.lines).encode(), self._timeout)

  def _sync_tb(self, force: bool) -> None:
    """Appends pending events to the local event file and uploads it to a gs:// workdir, at
    most every TB_SYNC_S seconds unless forced."""
    if not force and time.monotonic() - self._synced < TB_SYNC_S:
      return
    self._retry(self.tb.flush, f"writing {self.tb.file}")
    if self._tb_remote is not None:
      remote = os.path.join(self._tb_remote, self.tb.name)
      self._retry(lambda: storage.write_bytes(remote, Path(self.tb.file).read_bytes(), self._timeout),
                  f"writing {remote}")
    self._synced = time.monotonic()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    self.lines.append(row)
    for k, v in scalars.items():  # in memory first, so that a failed write below loses none
      self.tb.add_scalar(k, float(v), int(step))
    if self.local:
      self._unsaved += (row + "\n").encode()
      self._retry(lambda: storage.append(self.path, self._unsaved), f"appending to {self.path}")
    else:
      self._retry(self._rewrite, f"writing {self.path}")
    self._sync_tb(force=False)

  def image(self, tag: str, image: Any, step: int) -> None:
    """Logs an HWC image (uint8, or float in [0, 1]) to TensorBoard."""
    if self.enabled:
      self.tb.add_image(tag, image, int(step), dataformats="HWC")
      self._sync_tb(force=False)

  def text(self, tag: str, text: str, step: int) -> None:
    """Logs text to TensorBoard's Text tab (markdown; indented by 4 it shows as written)."""
    if self.enabled:
      self.tb.add_text(tag, "\n".join("    " + line for line in text.splitlines()), int(step))
      self._sync_tb(force=False)

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def close(self) -> None:
    if not self.enabled or self._closed:
      return
    self._closed = True
    if self._failed:
      # Storage already stayed down past the deadline: waiting again would only delay the exit.
      if not self.local:
        self.tb.flush()  # to the local staging file, not to the bucket that is down
        logging.warning("TensorBoard events not uploaded to %s are kept in %s", self._tb_remote, self._staging)
      return
    self._sync_tb(force=True)
    if not self.local:
      shutil.rmtree(self._staging, ignore_errors=True)
