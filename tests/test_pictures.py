"""Readable pictures: labeled cells enlarged by exact nearest neighbour, laid out in rows."""

import numpy as np
import pytest

from lvm_jax import pictures

GAP, STRIP = pictures.GAP, pictures.STRIP


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_cells_are_enlarged_by_exact_nearest_neighbour_under_a_label_strip():
  a, b = image(32, 32), image(32, 32, seed=1)
  g = pictures.grid([[("prompt 1", a), ("answer", b)]], min_cell=100)  # 100 / 32 -> factor 4
  assert g.shape == (STRIP + 128, 2 * 128 + GAP, 3) and g.dtype == np.uint8
  np.testing.assert_array_equal(g[STRIP:, :128], np.kron(a, np.ones((4, 4, 1), np.uint8)))
  np.testing.assert_array_equal(g[STRIP:, 128 + GAP:], b.repeat(4, 0).repeat(4, 1))
  assert np.all(g[:, 128:128 + GAP] == 255)  # the gap between the cells is white
  strip = g[:STRIP, :128]
  assert 20 < np.sum(strip.min(-1) < 100) < strip.size // 6  # dark text on white, not a filled bar
  assert np.all(g[:STRIP, 128 + GAP + 70:] == 255)  # "answer" is shorter than the cell


def test_a_cell_already_large_enough_keeps_its_size():
  g = pictures.grid([[("x", image(40, 60))]], min_cell=40)
  assert g.shape == (STRIP + 40, 60, 3)
  np.testing.assert_array_equal(g[STRIP:], image(40, 60))
  # The shorter side decides: 20 x 50 needs a factor of 2 for both sides to reach 40.
  assert pictures.grid([[("x", image(20, 50))]], min_cell=40).shape == (STRIP + 40, 100, 3)


def test_float_and_grey_images_are_scaled_to_uint8():
  x = np.array([[0.0, 0.5], [1.0, 1.7]], np.float32)[..., None]  # out of range clips
  g = pictures.grid([[("f", x)]], min_cell=2)
  np.testing.assert_array_equal(g[STRIP:, :, 0], [[0, 128], [255, 255]])
  assert np.all(g[STRIP:, :, 0:1] == g[STRIP:, :, 1:])  # grey -> three equal channels
  with pytest.raises(ValueError, match="shape"):
    pictures.grid([[("bad", np.zeros((4, 4, 2)))]])


def test_rows_of_different_lengths_are_padded_with_white():
  a = image(8, 8)
  g = pictures.grid([[("p1", a), ("p2", a), ("p3", a)], [("g1", a)]], min_cell=16)
  cell = STRIP + 16
  assert g.shape == (2 * cell + GAP, 3 * 16 + 2 * GAP, 3)
  assert np.all(g[cell:cell + GAP] == 255)  # the gap between rows
  np.testing.assert_array_equal(g[cell + GAP + STRIP:, :16], a.repeat(2, 0).repeat(2, 1))
  assert np.all(g[cell + GAP:, 16:] == 255)  # right of the short row's only cell
