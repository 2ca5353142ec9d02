"""Training metrics: stdout, metrics.jsonl, TensorBoard, and model FLOPs utilization.

MFU counts model FLOPs only (forward + backward matmuls, no remat recompute, as in the PaLM
paper) with causal attention counted at half the full product (MaxText's convention), over the
devices' peak: a table for TPUs and GPUs, a measured matmul rate on CPUs.
"""

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

# Dense bf16 peak TFLOP/s per chip, by a substring of `device_kind`.
PEAK_TFLOPS = (("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0),
               ("v5p", 459.0), ("v5", 459.0), ("v4", 275.0), ("v3", 123.0),
               ("H100", 989.0), ("A100", 312.0))


def train_flops_per_token(m: Any, seq_len: int) -> float:
  """6 x matmul params (fwd + bwd) plus causal attention, per trained token."""
  d, f, n, v = m.d_model, m.ffn, m.layers, m.vocab_size
  matmul_params = n * (4 * d * d + 3 * d * f) + d * v  # the embedding gather is no matmul
  attention = 6 * n * seq_len * d  # 12 L D per layer, halved by the causal mask
  return 6.0 * matmul_params + attention


def train_flops_per_step(m: Any, seq_len: int, global_batch: int) -> float:
  if hasattr(m, "patch"):  # an AIM config: seq_len counts patches
    from lvm_jax.models import aim  # pylint: disable=g-import-not-at-top
    return aim.train_flops_per_image(m) * global_batch
  return train_flops_per_token(m, seq_len) * seq_len * global_batch


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


def peak_flops_total(peak_tflops_per_device: float, dtype: str) -> float:
  """Peak FLOP/s of the whole job."""
  devices = jax.devices()
  if peak_tflops_per_device > 0:
    return peak_tflops_per_device * 1e12 * len(devices)
  kind = devices[0].device_kind
  for key, tflops in PEAK_TFLOPS:
    if devices[0].platform != "cpu" and key.lower() in kind.lower():
      return tflops * 1e12 * len(devices)
  # CPUs: the host's measured matmul rate, times the hosts.
  return measured_peak_flops(dtype) * jax.process_count()


def _step_of(line: str) -> float:
  """A row's step; a line torn by a kill mid-write counts as past every checkpoint."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


class Writer:
  """One JSON object per logged step in workdir/metrics.jsonl, plus TensorBoard scalars.

  The workdir may be local or gs://. Rows logged after the checkpoint a run resumes from
  belong to steps it will redo, so they are dropped on start.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.local = "://" not in workdir
    old = self.path.read_text().splitlines() if self.path.exists() else []
    self.lines = [line for line in old if _step_of(line) <= resume_step]
    if len(self.lines) != len(old):
      self._rewrite()
    # Local files are appended to; objects in a bucket cannot be, so they are rewritten whole.
    self.jsonl = open(self.path, "a", buffering=1) if self.local else None
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), flush_secs=30)

  def _rewrite(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text("".join(line + "\n" for line in self.lines))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    self.lines.append(row)
    if self.jsonl is not None:
      self.jsonl.write(row + "\n")
    else:
      self._rewrite()
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))
    shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    print(f"step {step}: {shown}", flush=True)

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def close(self) -> None:
    if self.enabled:
      if self.jsonl is not None:
        self.jsonl.close()
      self.tb.close()
