"""Deterministic synthetic visual sentences with a learnable structure, served through grain.

Each sentence is a short "video" of 2-4 images. The first image is random codes from a small
alphabet; every next image is the previous one with each code shifted by one (mod alphabet).
A model that attends one image back predicts every image after the first exactly, so the loss
has a known floor and falls only if attention, RoPE and the packing masks work.

Sentences are packed into rows of seq_len tokens with segment ids (0 = padding), positions that
restart per sentence, and a loss mask. Row r of the global batch at step s depends only on
(seed, s * global_batch + r), so any process count produces the same global batch.
"""

from typing import Any, Iterator

import numpy as np

from lvm_jax import config as config_lib
from lvm_jax.data import rows as rows_lib


def make_row(index: int, seq_len: int, tokens_per_image: int, codes: int,
             images: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
  """One packed row: sentences appended while they fit, the rest padding."""
  rng = np.random.default_rng([seed, index])
  row = {k: np.zeros(seq_len, np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  start, segment = 0, 1
  while True:
    n_images = int(rng.integers(images[0], images[1] + 1))
    length = n_images * tokens_per_image
    if start + length > seq_len:
      if segment > 1:
        break
      n_images, length = seq_len // tokens_per_image, seq_len  # always at least one sentence
    first = rng.integers(0, codes, tokens_per_image)
    sentence = (first[None, :] + np.arange(n_images)[:, None]) % codes
    sl = slice(start, start + length)
    row["tokens"][sl] = sentence.reshape(-1)
    row["segment_ids"][sl] = segment
    row["positions"][sl] = np.arange(length)
    row["loss_mask"][sl] = 1
    start, segment = start + length, segment + 1
  return row


def make_iterator(c: Any, rows: np.ndarray) -> Iterator[dict]:
  """Grain iterator over this process's rows of every global batch (`rows` from sharding.local_rows).

  Its state (get_state/set_state) is checkpointed with the train state.
  """
  if c.tokens_per_image <= 0:
    raise config_lib.ConfigError(f"tokens_per_image={c.tokens_per_image}: synthetic images need > 0 tokens")
  d = c.data
  return rows_lib.iterate(rows, c.global_batch, lambda index: make_row(
      index, c.seq_len, c.tokens_per_image, d.codes, tuple(d.images_per_sentence), c.seed))
