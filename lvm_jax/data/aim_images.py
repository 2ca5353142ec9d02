"""AIM pretraining batches: random resized crops and flips of a source's images, with prefixes.

Each example is a function of its global index alone (data/rows.py): an image of the source
(data/sources.py: image folders, local or gs://, tfds, built-in pictures, ...) in an order
shuffled anew each epoch, a crop of 40-100% of its area at an aspect ratio in [3/4, 4/3]
(RandomResizedCrop, scale (0.4, 1.0)), resized bicubic to the model's size, flipped with
probability 1/2, and a prefix length uniform in [1, N - 1]. Sources load images with their
aspect ratio kept and their shorter side brought down to at most twice the model's size (mode
short_side): crops keep detail, a typical photo is resampled once, and the aspect jitter is the
only distortion. An image that fails to load is replaced by the next index's, so a bad file
never stops training. Decoding runs in `data.threads` threads (PIL releases the GIL while
decoding and resampling); the batches do not depend on their number.
"""

import json
from typing import Any, Iterator

import grain
import numpy as np
import PIL.Image

from lvm_jax.data import rows as rows_lib, sources


# More unusable images in a row than this means the data, not a file, is broken: stop and say so.
MAX_BAD_IN_A_ROW = 100


def random_resized_crop(image_HW3: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
  """A crop of `scale` of the area at an aspect in [3/4, 4/3], resized bicubic to size x size."""
  H, W = image_HW3.shape[:2]
  for _ in range(10):  # torchvision's rejection sampling, then the whole image
    area = H * W * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < w <= W and 0 < h <= H:
      y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
      break
  else:
    y, x, h, w = 0, 0, H, W
  crop = PIL.Image.fromarray(image_HW3[y:y + h, x:x + w]).resize((size, size), PIL.Image.BICUBIC)
  return np.asarray(crop)


def identity(c: Any) -> dict:
  """The source config, recorded in the workdir; pixels have no tokenizer to check. Through JSON,
  so tuples compare equal to the record read back on resume."""
  return {"source": json.loads(json.dumps(dict(c.data.source)))}


def make_iterator(c: Any, rows: np.ndarray) -> Iterator[dict]:
  """This process's rows of every global batch: images uint8 [local, S, S, 3], prefix int32 [local]."""
  m, d = c.model, c.data
  source = sources.open_source({**dict(d.source), "size": 2 * m.image_size, "mode": "short_side"})
  keys = source.keys()
  if not keys:
    raise ValueError(f"data.source {dict(d.source)} has no images")
  patches = (m.image_size // m.patch) ** 2
  # A fresh permutation of the images every epoch: folders are sorted by class, and batches of
  # consecutive files would each hold a class or two.
  order = grain.MapDataset.range(len(keys)).shuffle(seed=rows_lib.shuffle_seed(d.seed)).repeat(None)

  def example_at(index: int) -> dict:
    rng = np.random.default_rng([d.seed, index])
    for attempt in range(min(len(keys), MAX_BAD_IN_A_ROW)):
      try:
        image = source.load(keys[order[index + attempt]])[0]
        break
      except sources.BadInput as e:
        reason = str(e)
    else:
      raise ValueError(f"data.source {dict(d.source)}: {attempt + 1} images in a row could not be loaded; "
                       f"the last: {reason}")
    crop = random_resized_crop(image, m.image_size, tuple(d.scale), rng)
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    return {"images": np.ascontiguousarray(crop), "prefix": np.int32(rng.integers(1, patches))}

  return rows_lib.iterate(rows, c.global_batch, example_at, threads=d.threads)
