"""Files under a root, a local directory or gs://bucket/prefix: listing and reading for sources.

Local roots use the OS: os.walk prunes hidden and unreadable folders without entering them and
keeps any file name, and a local video streams from its open file. gs:// roots go through
TensorStore's gcs kvstore, the client the token store already uses (its retries, credentials,
TENSORSTORE_GCS_HTTP_URL). A problem with one file raises OSError, which sources report as a
skipped input; anything else (credentials, an unreachable bucket) raises ValueError and stops
the job, since skipping would silently drop every file.
"""

import functools
import io
import os
from typing import BinaryIO

import tensorstore as ts

from lvm_jax.data import store


def is_remote(root: str) -> bool:
  return root.startswith("gs://")


def join(root: str, name: str) -> str:
  return f"{root.rstrip('/')}/{name}" if is_remote(root) else os.path.join(root, name)


@functools.lru_cache(maxsize=64)
def _kv(root: str) -> ts.KvStore:
  return ts.KvStore.open(store.kvstore(root)).result()


def _hidden(path: str) -> bool:
  # macOS writes '._name.jpg' AppleDouble files that carry image extensions but no image.
  return any(part.startswith(".") for part in path.split("/"))


def list_files(root: str, exts: tuple[str, ...]) -> list[str]:
  """Paths of files ending in `exts` (any case) relative to root, '/'-separated, sorted; hidden
  entries skipped. ValueError if root is empty, a missing directory, or a prefix with no objects."""
  if not root:
    raise ValueError("root is empty: set the source's root to a directory or gs://bucket/prefix")
  if is_remote(root):
    keys = [k.decode() for k in _kv(root).list().result()]  # GCS object names are UTF-8
    if not keys:
      raise ValueError(f"{root}: no objects under this prefix")
  elif not os.path.isdir(root):
    raise ValueError(f"{root}: no such directory")
  else:
    keys = []
    for d, dirs, names in os.walk(root):  # unreadable folders are skipped (onerror=None)
      dirs[:] = [n for n in dirs if not n.startswith(".")]
      rel = os.path.relpath(d, root)
      keys += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in names]
  return sorted(k for k in keys if k.lower().endswith(exts) and not _hidden(k))


def read(root: str, path: str) -> bytes:
  """The file's bytes; OSError for a problem of this file (gone, unreadable, a folder)."""
  if not is_remote(root):
    with open(os.path.join(root, path), "rb") as f:
      return f.read()
  try:
    result = _kv(root).read(path).result()
  except ValueError as e:  # TensorStore has retried transient errors already
    raise ValueError(f"reading {join(root, path)}: {str(e).strip().splitlines()[0]}") from None
  if result.state != "value":
    raise FileNotFoundError(f"{join(root, path)}: deleted since listing")
  return result.value


def open_binary(root: str, path: str) -> BinaryIO:
  """A readable binary file: streamed from a local disk, whole in memory from GCS."""
  return open(os.path.join(root, path), "rb") if not is_remote(root) else io.BytesIO(read(root, path))
