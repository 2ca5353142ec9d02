"""Digits in clutter: a labeled task where raw pixels are a poor basis (the `digits` source with
clutter=True, data/sources.py).

Each image is a crop of one of the demo's pictures (data/demo.py) with one of its digits pasted
on top: the digit at a random scale (half to all of the image's side) and position, its strokes
(the upsampled 8x8 intensities) blended as opacity, in the corner of the RGB cube farthest from
the mean colour it covers, so that every digit stays legible whatever lies under it. The class
is the digit; its pixels move, grow and change colour from image to image, and the background
is a scene, so a linear map of the pixels has little to hold on to.

The held-out split takes the demo's held-out digit samples and held-out pictures: no digit
sample and no picture is in both splits. Everything is a function of (split, size, index):
positions and scales are drawn as fractions of the side, so a split at 64 pixels shows the same
scenes as at 32, sharper (the AIM trainer reads its sources at twice the model's size).
"""

import functools
from typing import NamedTuple

import numpy as np
import PIL.Image

from lvm_jax.data import demo

SEED = 2024  # fixed: the task is a data set, not a sample of one
SCALE = (0.5, 1.0)  # the digit's side as a fraction of the image's


class Cluttered(NamedTuple):
  images: np.ndarray  # uint8 [N, size, size, 3]
  labels: np.ndarray  # int32 [N]: the digit
  pictures: tuple[str, ...]  # [N] the picture each background is cropped from
  digits: np.ndarray  # int [N] the load_digits sample pasted on it


def _strokes(image_8x8: np.ndarray, side: int) -> np.ndarray:
  """A digit's 0-16 intensities upsampled bilinearly to side x side, as opacity in [0, 1]."""
  big = PIL.Image.fromarray(image_8x8.astype(np.float32) / 16.0).resize((side, side), PIL.Image.Resampling.BILINEAR)
  return np.clip(np.asarray(big), 0.0, 1.0)


def _compose(background: np.ndarray, alpha: np.ndarray, y: int, x: int) -> np.ndarray:
  """The digit's opacity at (y, x) over the background, in the colour farthest from what it covers."""
  out = background.astype(np.float32)
  d = alpha.shape[0]
  under = out[y:y + d, x:x + d]
  colour = np.where(under.reshape(-1, 3).mean(0) > 127.5, 0.0, 255.0)
  out[y:y + d, x:x + d] = under * (1 - alpha[..., None]) + colour * alpha[..., None]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@functools.cache
def cluttered_digits(split: str, size: int) -> Cluttered:
  """Every digit sample of the demo's `split`, each pasted on a crop of one of the split's pictures."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  pics = demo.pictures(split, size)  # [P, 4S, 4S, 3]: a crop of S sees a sixteenth of a scene
  names = demo.PICTURES[split]
  samples = demo.digit_samples(split)
  digits = load_digits()
  images, which = [], []
  for i, sample in enumerate(samples):
    rng = np.random.default_rng([SEED, demo.SPLITS.index(split), i])
    p = int(rng.integers(len(pics)))
    top, left = (rng.random(2) * (pics.shape[1] - size)).astype(int)
    background = pics[p, top:top + size, left:left + size]
    if rng.random() < 0.5:
      background = background[:, ::-1]
    side = max(4, int(round(size * rng.uniform(*SCALE))))
    y, x = (rng.random(2) * (size - side + 1)).astype(int)
    images.append(_compose(background, _strokes(digits.images[sample], side), y, x))
    which.append(names[p])
  return Cluttered(np.stack(images), digits.target[samples].astype(np.int32), tuple(which), samples)
