"""Shared by the bench/ scripts (run as `python bench/NAME.py`, so this directory is on sys.path)."""

import time
from typing import Callable

import numpy as np


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
  """Median wall time of `fn` over `reps` calls, after `warmup` calls (compilation, caches)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
