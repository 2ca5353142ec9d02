"""Pipeline contracts: packing keeps whole sentences apart, weights mix, every epoch is a new
permutation of every sentence, the iterator state resumes exactly, gs:// equals local."""

import collections
import itertools

import ml_collections
import numpy as np
import pytest

from lvm_jax.config import ConfigError
from lvm_jax.data import pipeline, store
from tests.data.test_store import MANIFEST, write_store


def numbered_store(root: str, first: int, n: int, images: tuple[int, int] = (1, 4), seed: int = 0) -> dict:
  """Sentence k's tokens all equal first + k (so every packed segment names its sentence)."""
  rng = np.random.default_rng(seed)
  sentences = {first + k: np.full(4 * int(rng.integers(images[0], images[1] + 1)), first + k) for k in range(n)}
  write_store(root, {"00000": [(t, "d", "t") for t in sentences.values()]})
  return sentences


def config(mixture: dict, seq_len: int = 16, bos: int = -1) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seq_len, c.tokens_per_image = seq_len, MANIFEST.tokens_per_image
  c.data = dict(name="pipeline", seed=3, threads=2, bos=bos, mixture=mixture)
  return c


def segments(batch: dict) -> list[np.ndarray]:
  """Every packed sentence of a batch, checking the row layout on the way."""
  out = []
  for tokens, seg, pos, mask in zip(batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"]):
    np.testing.assert_array_equal(mask, seg > 0)
    assert np.all(np.diff(seg[seg > 0]) >= 0) and np.all(seg[np.argmax(seg == 0):] == 0 if (seg == 0).any() else True)
    for s in np.unique(seg[seg > 0]):
      where = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))
      out.append(tokens[where])
  return out


def test_pack_row_stops_at_the_first_sentence_that_does_not_fit():
  sentences = [np.array([5, 6, 7]), np.array([8, 9]), np.array([1, 2, 3, 4]), np.array([1])]
  row = pipeline.pack_row(sentences, 8)
  assert set(row) == set(pipeline.FIELDS) and all(v.dtype == np.int32 for v in row.values())
  np.testing.assert_array_equal(row["tokens"], [5, 6, 7, 8, 9, 0, 0, 0])  # [1] would fit: not first-fit
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
  endless = pipeline.pack_row(itertools.repeat(np.arange(4)), 8)  # fills exactly, reads no further
  np.testing.assert_array_equal(endless["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 2])
  for first in (np.arange(9), np.arange(0)):
    with pytest.raises(ValueError, match="first sentence is empty or longer than seq_len=8"):
      pipeline.pack_row(itertools.repeat(first), 8)


def test_rows_pack_whole_sentences_and_cut_long_ones_at_image_boundaries(tmp_path):
  sentences = numbered_store(str(tmp_path / "s"), 1, 30, images=(1, 6))
  it = pipeline.make_iterator(config({"main": dict(path=str(tmp_path / "s"))}, seq_len=16), np.arange(4))
  batch = next(it)
  assert set(batch) == set(pipeline.FIELDS) and all(v.shape == (4, 16) and v.dtype == np.int32 for v in batch.values())
  for seg in segments(batch):
    full = sentences[int(seg[0])]
    assert np.all(seg == seg[0]) and len(seg) == min(len(full), 16) and len(seg) % 4 == 0


def test_max_sentences_caps_the_sentences_of_a_row(tmp_path):
  """model.max_sentences sizes cuDNN's run table: the packer must never put more in a row, and
  without the cap single-image sentences fill a row with more."""
  sentences = numbered_store(str(tmp_path / "s"), 1, 64, images=(1, 1))  # 4 tokens each: 8 fit in 32
  c = config({"main": dict(path=str(tmp_path / "s"))}, seq_len=32)
  per_row = lambda c: [len(np.unique(seg[seg > 0])) for b in itertools.islice(pipeline.make_iterator(c, np.arange(4)), 6)
                       for seg in b["segment_ids"]]
  assert max(per_row(c)) == 8
  c.model = dict(max_sentences=3)
  capped = per_row(c)
  assert max(capped) == 3 and min(capped) >= 1
  seen = [int(s[0]) for b in itertools.islice(pipeline.make_iterator(c, np.arange(4)), 4) for s in segments(b)]
  assert set(seen) <= set(sentences) and len(seen) == len(set(seen))  # whole sentences, none twice in an epoch


def test_bos_starts_every_sentence(tmp_path):
  numbered_store(str(tmp_path / "s"), 1, 10)
  it = pipeline.make_iterator(config({"main": dict(path=str(tmp_path / "s"))}, bos=299), np.arange(2))
  for seg in segments(next(it)):
    assert seg[0] == 299 and len(seg) - 1 <= 15 and (len(seg) - 1) % 4 == 0 and np.all(seg[1:] != 299)


def test_loss_from_image_leaves_each_sentences_first_image_out_of_the_targets(tmp_path):
  """data.loss_from_image=1: the same rows, but no token of a packed sentence's first image (nor its
  BOS) is a target; every later token is."""
  numbered_store(str(tmp_path / "s"), 1, 30, images=(1, 3))
  tpi = MANIFEST.tokens_per_image
  for bos in (-1, 299):
    c = config({"main": dict(path=str(tmp_path / "s"))}, seq_len=32, bos=bos)
    every = next(pipeline.make_iterator(c, np.arange(4)))
    c.data.loss_from_image = 1
    batch = next(pipeline.make_iterator(c, np.arange(4)))
    for k in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(batch[k], every[k])
    first = tpi + (bos >= 0)
    np.testing.assert_array_equal(batch["loss_mask"], (batch["segment_ids"] > 0) & (batch["positions"] >= first))
    assert 0 < batch["loss_mask"].sum() < every["loss_mask"].sum()


def test_every_epoch_is_a_fresh_permutation_of_all_sentences(tmp_path):
  numbered_store(str(tmp_path / "s"), 1, 12, images=(4, 4))  # one sentence per row
  it = pipeline.make_iterator(config({"main": dict(path=str(tmp_path / "s"))}), np.arange(3))
  order = [int(seg[0]) for _ in range(8) for seg in segments(next(it))]
  first, second = order[:12], order[12:24]
  assert sorted(first) == sorted(second) == list(range(1, 13)) and first != second


def test_mixture_follows_the_weights(tmp_path):
  numbered_store(str(tmp_path / "a"), 1, 20, images=(1, 1))
  numbered_store(str(tmp_path / "b"), 101, 20, images=(1, 1))
  mixture = {"a": dict(path=str(tmp_path / "a"), weight=3.0), "b": dict(path=str(tmp_path / "b"), weight=1.0)}
  it = pipeline.make_iterator(config(mixture), np.arange(8))
  counts = collections.Counter(int(seg[0]) > 100 for _ in range(10) for seg in segments(next(it)))
  share_b = counts[True] / sum(counts.values())
  assert 0.2 <= share_b <= 0.3, counts


def test_iterator_state_resumes_exactly(tmp_path):
  numbered_store(str(tmp_path / "s"), 1, 25)
  c = config({"main": dict(path=str(tmp_path / "s"))})
  it = pipeline.make_iterator(c, np.arange(2))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = pipeline.make_iterator(c, np.arange(2))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_selection_and_mismatch_errors(tmp_path):
  root = str(tmp_path / "s")
  store.create(root, MANIFEST)
  w = store.ShardWriter(root, "0", MANIFEST)
  for i in range(6):
    w.add(np.full(4, i), "kitti" if i < 4 else "coco", "depth")
  w.close()
  it = pipeline.make_iterator(config({"main": dict(path=root, dataset="coco")}), np.arange(2))
  assert {int(seg[0]) for seg in segments(next(it))} <= {4, 5}
  c = config({"main": dict(path=root)})
  c.tokens_per_image = 8
  with pytest.raises(ConfigError, match="has 4 tokens per image, the config tokens_per_image=8"):
    pipeline.make_iterator(c, np.arange(2))
  with pytest.raises(ConfigError, match="weights must be > 0"):
    pipeline.make_iterator(config({"a": dict(path=root, weight=0.0), "b": dict(path=root)}), np.arange(2))
  with pytest.raises(ConfigError, match="data.mixture.main.path is empty"):
    pipeline.make_iterator(config({"main": dict(path="")}), np.arange(2))
  with pytest.raises(store.StoreError, match="no task 'seg'"):
    pipeline.make_iterator(config({"main": dict(path=root, task="seg")}), np.arange(2))


def test_gcs_store_gives_the_same_batches_as_local(tmp_path, gcs_emulator, monkeypatch):
  for k, v in gcs_emulator.items():
    monkeypatch.setenv(k, v)
  numbered_store(str(tmp_path / "s"), 1, 20)
  numbered_store("gs://lvm-test/pipeline/s", 1, 20)
  local = pipeline.make_iterator(config({"main": dict(path=str(tmp_path / "s"))}), np.arange(4))
  remote = pipeline.make_iterator(config({"main": dict(path="gs://lvm-test/pipeline/s")}), np.arange(4))
  for _ in range(3):
    a, b = next(local), next(remote)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
