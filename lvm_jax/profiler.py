"""A jax.profiler trace of chosen training steps: config.profile_steps = (first, last).

The trace goes to <workdir>/profile (TensorBoard's profile plugin reads it under the workdir:
`tensorboard --logdir W`; Perfetto opens its .trace.json.gz), on CPU, GPU and TPU alike. A gs://
workdir's trace is written to a local temporary directory, whose path is logged, since the
profiler writes files directly. Steps are dispatched asynchronously, so the last traced step
is waited for before the trace stops: the trace holds the device work of every traced step.
"""

import os
import tempfile
from typing import Any, Sequence

import jax
from absl import logging


class Window:
  """Starts the trace before step `first` and stops it after step `last` (inclusive)."""

  def __init__(self, steps: Sequence[int], workdir: str):
    self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
    local = "://" not in workdir
    self.dir = os.path.join(workdir, "profile") if local else tempfile.mkdtemp(prefix="lvm_profile_")
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.dir)
      self.active = True
      logging.info("profiling steps %d-%d into %s", self.first, self.last, self.dir)

  def after(self, step: int, state: Any) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    """Stops a trace still running (a run that ended or stopped inside the window)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile written to %s (tensorboard --logdir %s, Profile tab)", self.dir,
                   os.path.dirname(self.dir))
