"""storage.retry: what it retries, what it raises at once, and how it gives up."""

import asyncio
import errno
import logging

import aiohttp
import gcsfs.retry
import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from lvm_jax import storage
from tests import gcs


def _failing(errors: list[BaseException]):
  """A function that raises `errors` in turn, then returns "done"; `calls` counts its calls."""
  def fn():
    fn.calls += 1
    if errors:
      raise errors.pop(0)
    return "done"
  fn.calls = 0
  return fn


def test_a_transient_error_is_retried_until_it_passes(caplog):
  fn = _failing([ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TimeoutError("timed out")])
  with caplog.at_level(logging.WARNING):
    assert storage.retry(fn, what="writing x", first_delay_s=0.01) == "done"
  assert fn.calls == 3
  warnings = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
  assert len(warnings) == 2 and warnings[0].startswith("writing x: attempt 1 failed (ConnectionRefusedError: ")


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "denied"), FileNotFoundError("gone"),
                                   ValueError("bad argument"), api_exceptions.Forbidden("403"),
                                   api_exceptions.NotFound("no such bucket")])
def test_a_non_transient_error_is_raised_at_once(error):
  fn = _failing([error])
  with pytest.raises(type(error)):
    storage.retry(fn, what="writing x", first_delay_s=0.01)
  assert fn.calls == 1


def test_past_the_deadline_storage_error_says_what_in_one_line():
  fn = _failing([ConnectionResetError(errno.ECONNRESET, "reset\nby peer")] * 1000)
  with pytest.raises(storage.StorageError) as e:
    storage.retry(fn, what="writing gs://b/metrics.jsonl", deadline_s=0.3, first_delay_s=0.05)
  assert str(e.value) == ("writing gs://b/metrics.jsonl: storage unreachable for 0 s: "
                          "ConnectionResetError: [Errno 104] reset")
  assert 2 < fn.calls < 10


def _response(status: int) -> requests.Response:
  r = requests.Response()
  r.status_code = status
  return r


@pytest.mark.parametrize("error,transient", [
    (api_exceptions.from_http_status(503, "unavailable"), True),
    (api_exceptions.from_http_status(429, "slow down"), True),
    (api_exceptions.from_http_status(500, "internal"), True),
    (api_exceptions.from_http_status(403, "forbidden"), False),
    (api_exceptions.from_http_status(404, "no such bucket"), False),
    (api_exceptions.from_http_status(400, "bad"), False),
    (api_exceptions.RetryError("gave up", ConnectionError("refused")), True),
    (api_exceptions.RetryError("gave up", api_exceptions.Forbidden("403")), False),
    (requests.HTTPError(response=_response(502)), True),
    (requests.HTTPError(response=_response(401)), False),
    (aiohttp.ClientResponseError(None, (), status=429), True),
    (aiohttp.ClientResponseError(None, (), status=404), False),
    (aiohttp.ServerDisconnectedError(), True),
    (auth_exceptions.TransportError("metadata server unreachable"), True),
    (auth_exceptions.DefaultCredentialsError("no credentials"), False),
    # gcsfs: its 403 is a bare OSError, its 404 FileNotFoundError, other statuses HttpError.
    (gcsfs.retry.HttpError({"code": 503, "message": "unavailable"}), True),
    (gcsfs.retry.HttpError({"code": 401, "message": "unauthorized"}), False),
    (OSError("Forbidden: lvm-test/x\nno access"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError(errno.EIO, "I/O error"), True),
    (storage.StorageError("writing x: storage unreachable for 600 s: ..."), False),  # not twice
    (KeyError("bug"), False),
])
def test_errors_are_told_apart_by_class_and_status(error, transient):
  assert storage.is_transient(error) == transient


def test_what_an_unreachable_server_raises_is_transient(monkeypatch):
  """The real errors of a refused connection, from each client that reaches GCS."""
  url = f"http://127.0.0.1:{gcs.free_port()}"  # nothing listens there

  async def aiohttp_get():  # gcsfs's transport (etils.epath), before gcsfs's own retries
    async with aiohttp.ClientSession() as s:
      await s.get(url)

  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  calls = [lambda: asyncio.run(aiohttp_get()), lambda: requests.get(url, timeout=5),
           lambda: storage.write_bytes("gs://lvm-test/x", b"x")]  # google-cloud-storage
  for call in calls:
    with pytest.raises(Exception) as e:
      call()
    assert storage.is_transient(e.value), repr(e.value)


def test_a_missing_bucket_is_not_waited_for(gcs_emulator, monkeypatch):
  for k, v in gcs_emulator.items():
    monkeypatch.setenv(k, v)
  fn = _failing([])
  def write():
    fn()
    storage.write_bytes("gs://no-such-bucket/x", b"x")
  with pytest.raises(api_exceptions.NotFound):
    storage.retry(write, what="writing gs://no-such-bucket/x")
  assert fn.calls == 1
