"""The data module contract, the shared batch iterator and shuffle seeds."""

import importlib

import grain
import numpy as np
import pytest

from lvm_jax.data import rows


def epochs(seed: int, n: int = 50, count: int = 3) -> list[list[int]]:
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
  return [[ds[e * n + i] for i in range(n)] for e in range(count)]


def test_nearby_seeds_do_not_replay_each_other():
  assert epochs(0)[1] == epochs(1)[0]  # grain's own seeds: seed 1 is seed 0 an epoch later
  a, b = epochs(rows.shuffle_seed(0)), epochs(rows.shuffle_seed(1))
  assert not any(x == y for x in a for y in b)
  assert rows.shuffle_seed(0, 1) != rows.shuffle_seed(1, 0)  # (seed, component) pairs too


def test_rows_are_slices_of_the_global_batch():
  it = rows.iterate(np.array([1, 3]), 4, lambda i: {"i": np.int64(i)}, threads=2)
  np.testing.assert_array_equal([next(it)["i"] for _ in range(2)], [[1, 3], [5, 7]])


@pytest.mark.parametrize("name", ["synthetic", "pipeline", "aim_images", "images"])
def test_every_data_module_serves_and_names_its_data(name):
  """train.py and train_vqgan.py call these two by config.data.name, with no fallback."""
  module = importlib.import_module(f"lvm_jax.data.{name}")
  assert callable(module.make_iterator) and callable(module.identity) and module.__doc__
