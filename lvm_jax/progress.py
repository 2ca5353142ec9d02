"""Progress of long work, as absl log lines (timestamped; --verbosity, --log_dir apply).

`phase("compiling the step")` says what starts, at once, and how long it took when it ends.
`Progress` turns "x of N done" into one line with the percentage, the rate (and any other
rates, e.g. tokens/s), the elapsed time and an ETA from the rate since the start (or resume),
in the spirit of big_vision's chrono: a person reading the log sees within a second what is
happening and, after the first updates, when it will end.
"""

import contextlib
import time
from typing import Iterator, Optional

from absl import logging


def duration(seconds: float) -> str:
  """'0:03:25', or '1d 2:00:00' past a day."""
  seconds = max(int(round(seconds)), 0)
  days, rest = divmod(seconds, 86400)
  h, rest = divmod(rest, 3600)
  text = f"{h}:{rest // 60:02d}:{rest % 60:02d}"
  return f"{days}d {text}" if days else text


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
  """Logs `what...` now and `what: 12.3 s` when the block ends (not if it raised)."""
  # stacklevel: the line names the caller's file and line, past this generator and contextlib's
  # __enter__ / __exit__.
  logging.info("%s...", what, stacklevel=3)
  start = time.perf_counter()
  yield
  logging.info("%s: %.1f s", what, time.perf_counter() - start, stacklevel=3)


class Progress:
  """'train: step 40/100 (40%), 2.1 steps/s, 4.3k tokens/s, elapsed 0:00:19, ETA 0:00:28'.

  `unit` names what is counted (step, shard, sentence); `per_unit` gives other rates
  ({"tokens": tokens per step}); `start` is where a resumed job begins, so its rate and ETA
  count only this run's work.
  """

  def __init__(self, what: str, total: int, unit: str = "step", start: int = 0,
               per_unit: Optional[dict[str, float]] = None):
    self.what, self.total, self.unit, self.start = what, total, unit, start
    self.per_unit = per_unit or {}
    self.t0 = self.rate_t0 = time.perf_counter()

  def rebase(self, done: int) -> None:
    """Rates and ETA count from here on: after a one-off cost (compiling the step), which the
    rate of the work that follows should not carry. The elapsed time still counts from the start."""
    self.start, self.rate_t0 = done, time.perf_counter()

  def line(self, done: int, extra: str = "") -> str:
    now = time.perf_counter()
    elapsed, timed = now - self.t0, now - self.rate_t0
    rate = (done - self.start) / timed if timed > 0 and done > self.start else 0.0
    parts = [f"{self.unit} {done}/{self.total} ({100.0 * done / max(self.total, 1):.0f}%)"]
    if rate:
      # Slow work reads better per unit: "42 s/shard", not "0.0238 shards/s".
      parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
      parts += [f"{_si(rate * n)} {name}/s" for name, n in self.per_unit.items()]
    parts.append(f"elapsed {duration(elapsed)}")
    if rate and done < self.total:
      parts.append(f"ETA {duration((self.total - done) / rate)}")
    return f"{self.what}: {', '.join(parts)}" + (f"; {extra}" if extra else "")

  def log(self, done: int, extra: str = "") -> None:
    logging.info("%s", self.line(done, extra), stacklevel=2)  # the line names the caller's file


def _si(x: float) -> str:
  for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.3g}{suffix}"
  return f"{x:.3g}"
