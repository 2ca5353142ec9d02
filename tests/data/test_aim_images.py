"""AIM's image batches: deterministic per index, crops within the scale range, prefixes in [1, N-1]."""

import ml_collections
import numpy as np
import pytest

from lvm_jax.data import aim_images, sources


def config(source: dict, global_batch: int, image_size: int, threads: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(global_batch=global_batch, model=dict(image_size=image_size, patch=4),
                                        data=dict(source=source, scale=(0.4, 1.0), seed=0, threads=threads)))


def folder(root) -> dict:
  return dict(kind="image_folder", root=str(root))


def test_random_resized_crop_keeps_the_scale_range():
  image = np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3) % 251
  rng = np.random.default_rng(0)
  for _ in range(20):
    out = aim_images.random_resized_crop(image.astype(np.uint8), 16, (0.4, 1.0), rng)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_batches_are_deterministic_with_valid_prefixes(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  (tmp_path / "bad.jpg").write_bytes(b"not an image")
  c = config(folder(tmp_path), 8, 16)
  a = next(aim_images.make_iterator(c, np.arange(8)))
  c.data.threads = 4  # more decode threads, the same batches
  b = next(aim_images.make_iterator(c, np.arange(8)))
  assert a["images"].shape == (8, 16, 16, 3) and a["prefix"].dtype == np.int32
  np.testing.assert_array_equal(a["images"], b["images"])
  assert a["prefix"].min() >= 1 and a["prefix"].max() <= 15
  rows = next(aim_images.make_iterator(c, np.array([2, 5])))  # a process's rows equal those of the whole batch
  np.testing.assert_array_equal(rows["images"], a["images"][[2, 5]])


def test_batches_from_a_tfds_source(tfds_dir):
  """AIM reads prepared TFDS datasets (array_record, no TensorFlow) like folders: each crop is of
  one record (the records are flat greys 0, 50, ..., 200), every record once per epoch."""
  c = config(dict(kind="tfds_source", name="lvm_sources_tiny", split="train", data_dir=tfds_dir), 10, 8, threads=2)
  images = next(aim_images.make_iterator(c, np.arange(10)))["images"]
  assert images.shape == (10, 8, 8, 3)
  records = sources.TfdsSource("lvm_sources_tiny", "train", 8, data_dir=tfds_dir)
  greys = {records.load(k)[0, 0, 0, 0] for k in records.keys()}
  assert set(images[:5, 0, 0, 0]) == set(images[5:, 0, 0, 0]) == greys  # each epoch sees every record
  assert all(len(np.unique(im)) == 1 for im in images)


def test_every_epoch_is_a_new_permutation(tmp_path):
  """Files sorted by class would make batches of one class: the order is shuffled, anew each epoch."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in range(8):
    Image.new("RGB", (20, 20), (i * 30,) * 3).save(tmp_path / f"class{i // 4}_{i}.png")
  c = config(folder(tmp_path), 8, 8)
  it = aim_images.make_iterator(c, np.arange(8))
  epochs = [tuple(next(it)["images"][:, 0, 0, 0] // 30) for _ in range(3)]
  assert all(sorted(e) == list(range(8)) for e in epochs) and len(set(epochs)) == 3
  assert epochs[0] != tuple(range(8))


def test_a_folder_of_broken_files_stops_with_the_reason(tmp_path):
  for i in range(aim_images.MAX_BAD_IN_A_ROW + 5):
    (tmp_path / f"{i:03d}.jpg").write_bytes(b"")
  c = config(folder(tmp_path), 2, 8)
  with pytest.raises(ValueError, match="100 images in a row could not be loaded; the last: not an image: empty file"):
    next(aim_images.make_iterator(c, np.arange(2)))


def test_identity_records_the_source_as_json_reads_it_back():
  c = config(dict(kind="builtin_images", names=("chelsea", "coffee")), 2, 8)
  assert aim_images.identity(c) == {"source": {"kind": "builtin_images", "names": ["chelsea", "coffee"]}}
