"""The tokenizer's image crops: shrunk pictures, crops that are windows of them, batches that depend
on the global index alone, a fixed held-out grid."""

import ml_collections
import numpy as np

from lvm_jax.data import images

# Small pictures, so an iterator test does not decode the large ones (retina is 1411 x 1411).
SMALL = ("chelsea", "coffee", "colorwheel")


def coordinates(h: int, w: int) -> np.ndarray:
  """A picture whose pixel (y, x) holds (y, x, 7): a crop says where it was cut."""
  y, x = np.mgrid[:h, :w]
  return np.stack([y, x, np.full_like(y, 7)], -1).astype(np.uint8)


def config(global_batch: int = 4, image_size: int = 16, shrink: int = 4) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(global_batch=global_batch, image_size=image_size, seed=3,
                                        data=dict(name="images", shrink=shrink)))


def test_pictures_are_box_filtered_by_the_shrink_factor():
  shapes = [p.shape for p in images.pictures(images.TRAIN, 4)]
  assert shapes == [(75, 112, 3), (100, 150, 3), (106, 160, 3), (218, 250, 3), (128, 128, 3), (352, 352, 3),
                    (92, 92, 3)]
  [full], [small] = images.pictures(("chelsea",), 1), images.pictures(("chelsea",), 3)
  assert full.shape == (300, 451, 3) and small.shape == (100, 150, 3) and small.dtype == np.uint8
  # Each pixel is the rounded mean of its 3 x 3 block (the last odd column is dropped).
  block = full[3:6, 6:9].astype(np.float64).mean((0, 1))
  np.testing.assert_array_equal(small[1, 2], np.round(block))


def test_random_crop_is_a_window_fixed_by_seed_and_index():
  pics = [coordinates(20, 30), coordinates(12, 12)]
  offsets, flips = set(), 0
  for index in range(0, 400, 2):  # even indices: the first picture
    crop = images.random_crop(pics, index, 8, seed=0)
    np.testing.assert_array_equal(crop, images.random_crop(pics, index, 8, seed=0))
    flipped = crop[0, 0, 1] > crop[0, -1, 1]
    flips += int(flipped)
    y, x = int(crop[0, 0, 0]), int(crop[0, -1 if flipped else 0, 1])
    window = pics[0][y:y + 8, x:x + 8]
    np.testing.assert_array_equal(crop, window[:, ::-1] if flipped else window)
    offsets.add((y, x))
  ys, xs = zip(*offsets)
  assert (min(ys), max(ys), min(xs), max(xs)) == (0, 12, 0, 22)  # every position in range, none outside
  assert 70 < flips < 130  # a fair coin over 200 crops
  assert np.all(images.random_crop(pics, 1, 8, seed=0)[..., 0] < 12)  # odd indices: the 12 x 12 picture
  assert not np.array_equal(images.random_crop(pics, 0, 8, seed=0), images.random_crop(pics, 0, 8, seed=1))


def test_batches_depend_on_the_global_index_alone(monkeypatch):
  monkeypatch.setattr(images, "TRAIN", SMALL)
  c = config()
  whole, second = images.make_iterator(c, np.arange(4)), images.make_iterator(c, np.array([1, 3]))
  pics = images.pictures(SMALL, 4)
  for step in range(2):
    w, s = next(whole), next(second)
    assert list(w) == ["images"] and w["images"].shape == (4, 16, 16, 3) and w["images"].dtype == np.uint8
    np.testing.assert_array_equal(s["images"], w["images"][[1, 3]])  # half the processes, the same rows
    np.testing.assert_array_equal(w["images"][2], images.random_crop(pics, step * 4 + 2, 16, 3))


def test_held_out_is_a_fixed_grid_of_astronaut_crops():
  [pic] = images.pictures(images.HELD_OUT, 2)
  crops = images.held_out(32, 2)
  assert crops.shape == (16, 32, 32, 3) and crops.dtype == np.uint8 and pic.shape == (256, 256, 3)
  np.testing.assert_array_equal(crops[0], pic[:32, :32])
  np.testing.assert_array_equal(crops[15], pic[-32:, -32:])
  np.testing.assert_array_equal(crops[1], pic[:32, 74:106])  # linspace(0, 224, 4) = 0, 74, 149, 224
  five = images.held_out(32, 2, per_picture=5)  # the first five of a 3 x 3 grid
  assert five.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(five[4], pic[112:144, 112:144])


def test_identity_names_the_pictures():
  assert images.identity(config(shrink=2)) == {
      "source": {"kind": "builtin_images", "names": list(images.TRAIN)}, "shrink": 2}
