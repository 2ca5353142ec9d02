"""Deterministic synthetic visual sentences with a learnable structure, served through grain.

Each sentence is a short "video" of 2-4 images. The first image is random codes from a small
alphabet; every next image is the previous one with each code shifted by one (mod alphabet).
A model that attends one image back predicts every image after the first exactly, so the loss
has a known floor and falls only if attention, RoPE and the packing masks work.

Yields the pipeline's packed rows (data/pipeline.py: FIELDS, int32 [local rows, seq_len]): a
row is sentences appended while they fit (pipeline.pack_row), the rest padding. Row r of the
global batch at step s depends only on (seed, s * global_batch + r), so any process count
produces the same global batch.
"""

from typing import Any, Iterator

import numpy as np

from lvm_jax import config as config_lib
from lvm_jax.data import pipeline, rows as rows_lib


def sentences(rng: np.random.Generator, seq_len: int, tokens_per_image: int, codes: int,
              images: tuple[int, int]) -> Iterator[np.ndarray]:
  """Endless sentences of `images` (an inclusive range) images, cut to the whole images that fit
  seq_len, as the pipeline cuts store sentences: a row always holds at least one."""
  while True:
    n_images = min(int(rng.integers(images[0], images[1] + 1)), seq_len // tokens_per_image)
    first = rng.integers(0, codes, tokens_per_image)
    yield ((first[None, :] + np.arange(n_images)[:, None]) % codes).reshape(-1)


def make_row(index: int, seq_len: int, tokens_per_image: int, codes: int,
             images: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
  """Example `index`: one packed row, a function of (seed, index) alone."""
  rng = np.random.default_rng([seed, index])
  return pipeline.pack_row(sentences(rng, seq_len, tokens_per_image, codes, images), seq_len)


def identity(c: Any) -> dict:
  """Generated codes, no tokenizer: recorded so that a workdir trained on them is not resumed on
  a store's tokens (workdir.check_data) without data.allow_new_tokenizer."""
  return {"tokenizer": "synthetic", "tokens_per_image": c.tokens_per_image, "vocab": c.data.codes}


def make_iterator(c: Any, rows: np.ndarray) -> Iterator[dict]:
  """Grain iterator over this process's rows of every global batch (`rows` from sharding.local_rows).

  Its state (get_state/set_state) is checkpointed with the train state.
  """
  if not 0 < c.tokens_per_image <= c.seq_len:
    raise config_lib.ConfigError(f"tokens_per_image={c.tokens_per_image}: synthetic images need between 1 and "
                                 f"seq_len={c.seq_len} tokens")
  d = c.data
  return rows_lib.iterate(rows, c.global_batch, lambda index: make_row(
      index, c.seq_len, c.tokens_per_image, d.codes, tuple(d.images_per_sentence), c.seed))
