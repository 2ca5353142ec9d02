"""Image crops for tokenizer training, from pictures that ship inside scikit-image (no downloads).

Training crops are random (position, horizontal flip) and depend only on (seed, index), served
through a checkpointable grain iterator; the held-out set is a fixed grid of crops of pictures
that training never sees.
"""

from typing import Any, Iterator

import numpy as np

from lvm_jax.data import rows as rows_lib

TRAIN = ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
HELD_OUT = ("astronaut",)


def pictures(names: tuple[str, ...], shrink: int) -> list[np.ndarray]:
  """uint8 RGB pictures, each shrunk by an integer factor (box filter) so crops hold scenes."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  out = []
  for name in names:
    im = np.asarray(getattr(skimage.data, name)())[..., :3].astype(np.float32)
    h, w = (im.shape[0] // shrink) * shrink, (im.shape[1] // shrink) * shrink
    im = im[:h, :w].reshape(h // shrink, shrink, w // shrink, shrink, 3).mean((1, 3))
    out.append(np.round(im).astype(np.uint8))
  return out


def random_crop(pics: list[np.ndarray], index: int, size: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, index])
  pic = pics[index % len(pics)]
  y, x = rng.integers(0, pic.shape[0] - size + 1), rng.integers(0, pic.shape[1] - size + 1)
  crop = pic[y:y + size, x:x + size]
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def identity(c: Any) -> dict:
  """The pictures that training crops, in the terms of data/sources.py (no tokenizer to check)."""
  return {"source": {"kind": "builtin_images", "names": list(TRAIN)}, "shrink": c.data.shrink}


def make_iterator(c: Any, rows: np.ndarray) -> Iterator[dict]:
  """This process's rows of every global batch: {"images": uint8 [local, S, S, 3]}."""
  pics = pictures(TRAIN, c.data.shrink)
  return rows_lib.iterate(rows, c.global_batch,
                          lambda index: {"images": random_crop(pics, index, c.image_size, c.seed)})


def held_out(size: int, shrink: int, per_picture: int = 16) -> np.ndarray:
  """A fixed grid of crops of the held-out pictures: uint8 [N, size, size, 3]."""
  crops = []
  for pic in pictures(HELD_OUT, shrink):
    side = int(np.ceil(np.sqrt(per_picture)))
    ys = np.linspace(0, pic.shape[0] - size, side).astype(int)
    xs = np.linspace(0, pic.shape[1] - size, side).astype(int)
    crops += [pic[y:y + size, x:x + size] for y in ys for x in xs][:per_picture]
  return np.stack(crops)


def evaluation_images(c: Any) -> np.ndarray:
  """What train_vqgan reports held-out PSNR on when it trains on this module's pictures."""
  return held_out(c.image_size, c.data.shrink)
