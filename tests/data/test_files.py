"""Listing and reading files under a local root and a gs:// root (fake-gcs-server): the same
names, extension filter and hidden-file rule, bytes and errors on both."""

import os

import pytest
import tensorstore as ts

from lvm_jax.data import files, store

# Relative path -> bytes. Hidden folders and macOS '._' files carry image extensions on purpose.
TREE = {"a.JPG": b"a", "b.png": b"bb", "notes.txt": b"n", "sub/c.jpg": b"ccc", "sub/deeper/d.jpeg": b"d",
        "sub/._c.jpg": b"apple double", ".cache/e.jpg": b"e", "._f.png": b"f"}
IMAGES = [".jpg", ".jpeg", ".png"]
LISTED = ["a.JPG", "b.png", "sub/c.jpg", "sub/deeper/d.jpeg"]


def test_local_listing_filters_extensions_and_skips_hidden(tmp_path):
  for name, data in TREE.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
  root = str(tmp_path)
  assert files.list_files(root, tuple(IMAGES)) == LISTED
  assert files.list_files(root + "/", (".txt",)) == ["notes.txt"]
  assert files.list_files(str(tmp_path / "sub"), (".jpg",)) == ["c.jpg"]
  assert files.read(root, "sub/c.jpg") == b"ccc"
  with files.open_binary(root, "sub/deeper/d.jpeg") as f:
    assert f.read() == b"d" and f.name == os.path.join(root, "sub/deeper/d.jpeg")  # streamed, not copied


def test_local_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="root is empty"):
    files.list_files("", (".jpg",))
  with pytest.raises(ValueError, match="no such directory"):
    files.list_files(str(tmp_path / "missing"), (".jpg",))
  (tmp_path / "folder").mkdir()
  with pytest.raises(FileNotFoundError):
    files.read(str(tmp_path), "gone.jpg")
  with pytest.raises(IsADirectoryError):  # an OSError: sources skip this one input
    files.read(str(tmp_path), "folder")


def test_join_and_is_remote():
  assert files.is_remote("gs://b/p") and not files.is_remote("/data/gs://") and not files.is_remote("b/p")
  assert files.join("gs://b/p/", "x/y.jpg") == "gs://b/p/x/y.jpg"
  assert files.join("gs://b", "y.jpg") == "gs://b/y.jpg"
  assert files.join("/data/images", "x/y.jpg") == os.path.join("/data/images", "x/y.jpg")


def test_gcs_root_lists_and_reads_like_a_local_one(gcs_emulator, monkeypatch, tmp_path):
  for k, v in gcs_emulator.items():
    monkeypatch.setenv(k, v)
  root = f"gs://lvm-test/files/{tmp_path.name}"
  kv = ts.KvStore.open(store.kvstore(root)).result()
  for name, data in TREE.items():
    kv.write(name, data).result()
  assert files.list_files(root, tuple(IMAGES)) == LISTED
  assert files.read(root, "sub/c.jpg") == b"ccc"
  assert files.open_binary(root, "b.png").read() == b"bb"
  with pytest.raises(FileNotFoundError, match=f"{root}/gone.jpg: deleted since listing"):
    files.read(root, "gone.jpg")
  with pytest.raises(ValueError, match="no objects under this prefix"):
    files.list_files(root + "-empty", (".jpg",))
