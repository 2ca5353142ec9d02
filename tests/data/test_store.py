"""Token store contracts on a local path and on gs:// (fake-gcs-server): exact round trip, only
complete shards visible, one-line errors for mismatched or missing stores."""

import numpy as np
import pytest

from lvm_jax.data import store

MANIFEST = store.Manifest(tokens_per_image=4, vocab=300, tokenizer="test-vqgan")


def write_store(root: str, shards: dict[str, list[tuple[np.ndarray, str, str]]]) -> None:
  store.create(root, MANIFEST)
  for name, sentences in shards.items():
    writer = store.ShardWriter(root, name, MANIFEST)
    for tokens, dataset, task in sentences:
      writer.add(tokens, dataset, task)
    writer.close()


def random_sentences(rng, n: int, dataset: str, task: str) -> list:
  return [(rng.integers(0, 300, 4 * int(rng.integers(1, 5))), dataset, task) for _ in range(n)]


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path, monkeypatch):
  if request.param == "local":
    return str(tmp_path / "store")
  env = request.getfixturevalue("gcs_emulator")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  return f"gs://lvm-test/{request.node.name.replace('[', '_').replace(']', '')}/{tmp_path.name}"


def test_round_trip_across_shards_with_names_remapped(root):
  rng = np.random.default_rng(0)
  a = random_sentences(rng, 5, "kitti", "depth") + random_sentences(rng, 2, "coco", "seg")
  b = random_sentences(rng, 3, "coco", "seg") + random_sentences(rng, 1, "coco", "depth")
  write_store(root, {"00000": a, "00001": b})
  s = store.Store(root)
  assert len(s) == 11 and s.manifest == MANIFEST
  for i, (tokens, dataset, task) in enumerate(a + b):
    got = s[i]
    np.testing.assert_array_equal(got["tokens"], tokens)
    assert got["tokens"].dtype == np.uint16
    assert (got["dataset"], got["task"], got["images"]) == (dataset, task, len(tokens) // 4)
  np.testing.assert_array_equal(s.indices(dataset="coco"), [5, 6, 7, 8, 9, 10])
  np.testing.assert_array_equal(s.indices(dataset="coco", task="depth"), [10])
  np.testing.assert_array_equal(s.indices(dataset="k*"), [0, 1, 2, 3, 4])
  with pytest.raises(store.StoreError, match=r"no dataset 'imagenet' \(has \['kitti', 'coco'\]\)"):
    s.indices(dataset="imagenet")


def test_a_shard_without_its_done_marker_is_invisible(root):
  rng = np.random.default_rng(1)
  write_store(root, {"00000": random_sentences(rng, 4, "d", "t")})
  # A job killed after writing a shard's arrays but before its marker: arrays exist, no marker.
  writer = store.ShardWriter(root, "00001", MANIFEST)
  for tokens, dataset, task in random_sentences(rng, 6, "d", "t"):
    writer.add(tokens, dataset, task)
  writer.close()
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kv = ts.KvStore.open(store.kvstore(root)).result()
  kv.delete_range(ts.KvStore.KeyRange("done/00001.json", "done/00001.json\0")).result()
  assert len(store.Store(root)) == 4
  markers = store.done_markers(root, ["00000", "00001"])
  assert markers["00000"] is not None and markers["00001"] is None


def test_bad_stores_and_sentences_are_one_line(tmp_path):
  root = str(tmp_path / "s")
  with pytest.raises(store.StoreError, match="no manifest.json; not a token store"):
    store.Store(root)
  store.create(root, MANIFEST)
  with pytest.raises(store.StoreError, match="has no complete shard yet"):
    store.Store(root)
  store.create(root, MANIFEST)  # the same manifest again is fine
  with pytest.raises(store.StoreError, match=r"made differently \(tokenizer='test-vqgan'\)"):
    store.create(root, store.Manifest(tokens_per_image=4, vocab=300, tokenizer="other"))
  with pytest.raises(store.StoreError, match="does not fit uint16"):
    store.create(str(tmp_path / "t"), store.Manifest(tokens_per_image=4, vocab=70_000, tokenizer="x"))
  writer = store.ShardWriter(root, "0", MANIFEST)
  with pytest.raises(store.StoreError, match="6 tokens is not a whole number of 4-token images"):
    writer.add(np.zeros(6, np.int32), "d", "t")
  with pytest.raises(store.StoreError, match=r"outside the vocabulary \[0, 300\)"):
    writer.add(np.full(4, 300), "d", "t")
  writer.add(np.zeros(4, np.int32), "d", "t")
  writer.close()
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / "s" / "shards" / "0" / "offsets")  # damaged after the fact
  with pytest.raises(store.StoreError, match="cannot read shards/0/offsets"):
    store.Store(root)
