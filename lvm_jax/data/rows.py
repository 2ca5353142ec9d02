"""The one way data modules serve batches: a grain iterator over this process's rows of every
global batch, each example a function of its global index alone.

Row r of global batch s is example s * global_batch + r, so any process count sees the same
global batch, and the iterator state (checkpointed with the train state) is one index.

Every data module a trainer picks by config.data.name (synthetic, pipeline, aim_images, images)
exports make_iterator(c, rows), this process's rows of every global batch as a checkpointable
grain iterator, and identity(c) -> dict | None, what the data is: the workdir records it and a
resume is checked against it (workdir.check_data).
"""

from typing import Callable, Iterator

import grain
import numpy as np


def iterate(rows: np.ndarray, global_batch: int, example_at: Callable[[int], dict], threads: int = 1) -> Iterator[dict]:
  """`rows` from sharding.local_rows; yields dicts of arrays with a leading [len(rows)] axis.
  `threads` call example_at concurrently (grain keeps the order)."""
  local = len(rows)

  def row_at(i: int) -> dict:
    step, j = divmod(i, local)
    return example_at(step * global_batch + int(rows[j]))

  ds = grain.MapDataset.range(np.iinfo(np.int64).max).map(row_at)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * local, threads)))
  return iter(ds.batch(local, drop_remainder=True))


def shuffle_seed(seed: int, *salt: int) -> int:
  """A seed for grain's MapDataset.shuffle, which shuffles epoch e with seed + e: hashed, so that
  seeds 0 and 1 (or two mixture components) do not replay each other's orders an epoch apart."""
  return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])
