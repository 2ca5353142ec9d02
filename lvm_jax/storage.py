"""Riding out storage outages: retry with backoff up to a deadline, then one line of error.

A run writes its metrics to a bucket for days; a bucket (or the network to it) that
is unreachable for a few minutes should cost a pause, not the run. `retry` retries what looks
like an outage (refused or reset connections, timeouts, HTTP 408/429/5xx) and raises at once
what retrying cannot fix (403, a missing bucket or object, a bad argument, a full disk).

Errors are told apart by class (and HTTP status), never by message, with one exception that
gcsfs forces (see `_permanent_os_error`). The client libraries are looked up in sys.modules
only: an exception of a library that was never imported cannot occur, and this module then
imports none of them.

`read_bytes` / `write_bytes` do one attempt each, for `retry` to wrap. gs:// goes through
google-cloud-storage with its own retries off, so that `retry` is the only retry loop: gcsfs
(behind etils.epath) retries every request 6 times over ~33 s by itself and cannot be told
not to, which makes deadlines inexact and outages invisible until they exceed its budget.
"""

import errno
import functools
import logging as std_logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from absl import logging

T = TypeVar("T")

# gcsfs logs a traceback for every request it gives up on; `retry` reports each attempt in one
# line, and errors still reach the caller.
std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)

# How long an outage a write waits out before the run gives up; callers (and tests) pass
# their own `deadline_s` to `retry` to change it for one call.
DEADLINE_S = 600.0
# HTTP statuses that mean "try again later": timeout, rate limit, server errors (not 501).
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# OSErrors that a retry cannot fix: permissions, missing or misplaced paths, a full or read-only
# disk, a bad argument. Any other OSError (ECONNREFUSED, ETIMEDOUT, EIO, ...) is retried.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.EISDIR,
                               errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EINVAL,
                               errno.ENAMETOOLONG, errno.EBADF})


class StorageError(OSError):
  """Storage stayed unreachable past the deadline; the message is one line."""


def _loaded(module: str, *names: str) -> tuple[type, ...]:
  """Classes of an already imported module; none when it was never imported."""
  classes = (getattr(sys.modules.get(module), n, None) for n in names)
  return tuple(c for c in classes if c is not None)


def _http_status(e: BaseException) -> int | None:
  """The HTTP status an error carries, for the libraries that reach GCS."""
  if isinstance(e, _loaded("aiohttp", "ClientResponseError")):  # gcsfs's transport
    return e.status
  # google.api_core's GoogleAPICallError (google-cloud-storage), gcsfs's HttpError, urllib's
  # HTTPError carry `.code`; requests' HTTPError and google-cloud-storage's InvalidResponse carry
  # the response.
  http_errors = (_loaded("google.api_core.exceptions", "GoogleAPICallError")
                 + _loaded("gcsfs.retry", "HttpError") + _loaded("urllib.error", "HTTPError"))
  if isinstance(e, http_errors) and isinstance(getattr(e, "code", None), int):
    return e.code
  status = getattr(getattr(e, "response", None), "status_code", None)
  return status if isinstance(status, int) else None


def _permanent_os_error(e: OSError) -> bool:
  if isinstance(e, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                    NotADirectoryError)) or e.errno in _PERMANENT_ERRNOS:
    return True
  # gcsfs turns a 403 into a bare OSError("Forbidden: <path>\n...") with no code or errno: its
  # message is all there is to tell it from an outage.
  return str(e).startswith("Forbidden")


def is_transient(e: BaseException) -> bool:
  """Whether `e` looks like an outage that waiting may cure."""
  if isinstance(e, StorageError):  # an OSError, but one whose deadline was already waited out
    return False
  if isinstance(e, _loaded("google.api_core.exceptions", "RetryError")):
    # google-cloud-storage's own retry gave up (only when a caller leaves it on): judge the cause.
    return e.cause is None or is_transient(e.cause)
  status = _http_status(e)
  if status is not None:
    return status in _TRANSIENT_STATUS
  if isinstance(e, ValueError):  # bad URLs and arguments (requests' InvalidURL, gcsfs's 400s)
    return False
  if isinstance(e, OSError):  # ConnectionError, TimeoutError, aiohttp's ClientOSError, requests'
    return not _permanent_os_error(e)  # ConnectionError and Timeout (all OSErrors)
  transient = (_loaded("aiohttp", "ClientError")  # ServerDisconnectedError, ClientPayloadError
               + _loaded("requests.exceptions", "RequestException")
               + _loaded("urllib3.exceptions", "HTTPError")  # ProtocolError: connection aborted
               + _loaded("http.client", "HTTPException")  # IncompleteRead, BadStatusLine
               + _loaded("gcsfs.retry", "ChecksumError")  # corrupted in transit
               + _loaded("google.auth.exceptions", "TransportError"))  # token server unreachable
  if isinstance(e, transient):
    return True
  # A token refresh that failed for a reason that may pass (google-auth decides which).
  return isinstance(e, _loaded("google.auth.exceptions", "GoogleAuthError")) and bool(
      getattr(e, "retryable", False))


def first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def retry(fn: Callable[[], T], *, what: str, deadline_s: float = DEADLINE_S, first_delay_s: float = 1.0,
          max_delay_s: float = 30.0) -> T:
  """fn(), retried while it fails with transient errors, for up to `deadline_s` seconds.

  Waits grow exponentially from `first_delay_s` to `max_delay_s`, each drawn from [d/2, d] so
  that the processes of a job do not all retry in step. Each retry logs one warning line; past
  the deadline, StorageError says what failed and how. Other errors are raised at once.
  """
  start, attempt = time.monotonic(), 0
  while True:
    attempt += 1
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e):
        raise
      waited = time.monotonic() - start
      if waited >= deadline_s:
        raise StorageError(f"{what}: storage unreachable for {waited:.0f} s: {first_line(e)}") from e
      step = min(max_delay_s, first_delay_s * 2.0 ** min(attempt - 1, 30))
      delay = min(random.uniform(step / 2, step), deadline_s - waited)  # the last try is at the deadline
      logging.warning("%s: attempt %d failed (%s); retrying in %.1f s", what, attempt, first_line(e), delay)
      time.sleep(delay)


@functools.cache
def _gcs_client(endpoint: str | None):  # one client per endpoint: tests switch emulators
  del endpoint  # the client reads $STORAGE_EMULATOR_HOST itself
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client(project=None)  # object reads and writes need no project: do not look one up


def _blob(path: str):
  bucket, name = path[len("gs://"):].split("/", 1)
  return _gcs_client(os.environ.get("STORAGE_EMULATOR_HOST")).bucket(bucket).blob(name)


def read_bytes(path: str, timeout_s: float = 60.0) -> bytes | None:
  """A local or gs:// file's bytes, or None when it does not exist; one attempt."""
  if path.startswith("gs://"):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      return _blob(path).download_as_bytes(retry=None, timeout=timeout_s)
    except exceptions.NotFound:
      return None
  if "://" in path:  # other filesystems: whatever etils.epath (fsspec) does
    from etils import epath  # pylint: disable=g-import-not-at-top
    p = epath.Path(path)
    return p.read_bytes() if p.exists() else None
  return Path(path).read_bytes() if os.path.exists(path) else None


def write_bytes(path: str, data: bytes, timeout_s: float = 60.0) -> None:
  """Replaces a local or gs:// file whole, so that an interrupted write leaves the old one; one
  attempt."""
  if path.startswith("gs://"):
    _blob(path).upload_from_string(data, retry=None, timeout=timeout_s)
  elif "://" in path:
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).write_bytes(data)
  else:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
      Path(tmp).write_bytes(data)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)


def append(path: str, pending: bytearray) -> None:
  """Appends `pending` to a local file and empties it as bytes land, so that a retry after a
  partial write neither loses nor repeats any; one attempt."""
  with open(path, "ab", buffering=0) as f:
    while pending:
      del pending[:f.write(pending)]
