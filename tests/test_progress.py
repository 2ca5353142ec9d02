"""Progress lines: x/N, percent, rates, elapsed and ETA; a resumed job's rate counts only its own
work; durations past a day; phases log their start and their time."""

import logging
import types

import pytest

from lvm_jax import progress


@pytest.fixture
def clock(monkeypatch) -> list[float]:
  """progress.py's clock, set by the test: now[0] is the time in seconds."""
  now = [100.0]
  monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  return now


@pytest.mark.parametrize("seconds,text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
                                          (90061, "1d 1:01:01"), (-3, "0:00:00")])
def test_duration(seconds, text):
  assert progress.duration(seconds) == text


def test_line_has_count_percent_rates_elapsed_and_eta(clock):
  p = progress.Progress("train", 100, per_unit={"tokens": 2048})
  assert p.line(0) == "train: step 0/100 (0%), elapsed 0:00:00"  # no rate, so no ETA, yet
  clock[0] += 20
  assert p.line(40, "loss 2.5") == ("train: step 40/100 (40%), 2 steps/s, 4.1k tokens/s, elapsed 0:00:20, "
                                    "ETA 0:00:30; loss 2.5")
  clock[0] += 30
  assert p.line(100) == "train: step 100/100 (100%), 2 steps/s, 4.1k tokens/s, elapsed 0:00:50"  # done: no ETA


def test_slow_work_is_rated_per_unit(clock):
  p = progress.Progress("tokenizing", 10, unit="shard")
  clock[0] += 84
  assert p.line(2) == "tokenizing: shard 2/10 (20%), 42 s/shard, elapsed 0:01:24, ETA 0:05:36"


def test_a_resumed_job_rates_only_its_own_work(clock):
  p = progress.Progress("train", 1000, start=900)
  clock[0] += 10
  # 900 steps were done before this run: 5 steps/s, not 90.5; 50 steps left.
  assert p.line(950) == "train: step 950/1000 (95%), 5 steps/s, elapsed 0:00:10, ETA 0:00:10"


def test_log_and_phase_are_absl_info_lines(clock, caplog):
  with caplog.at_level(logging.INFO, logger="absl"):
    with progress.phase("compiling the step"):
      assert caplog.messages == ["compiling the step..."]  # at once, before the work
      clock[0] += 12.34
    progress.Progress("eval", 4, unit="batch").log(0)
    with pytest.raises(ValueError), progress.phase("restoring"):
      raise ValueError("damaged")
  assert caplog.messages == ["compiling the step...", "compiling the step: 12.3 s",
                             "eval: batch 0/4 (0%), elapsed 0:00:00", "restoring..."]  # no time for a failure
  # absl's prefix names the caller's file and line, not progress.py's.
  assert {(r.name, r.filename) for r in caplog.records} == {("absl", "test_progress.py")}
