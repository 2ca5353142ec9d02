"""Readable pictures: rows of labeled cells in one uint8 image (prompt grids, TensorBoard images).

Model images are small (32x32 in the demo), so every cell is enlarged by an integer nearest-
neighbour factor, which keeps each code's pixels sharp and countable, and carries its label in a
white strip above it.
"""

import functools
import math
from typing import Sequence

import numpy as np

GAP = 4  # white pixels between cells and between rows
STRIP = 16  # height of the white label strip above each cell: the default font is ~10 px high
WHITE = 255


@functools.cache
def _font():
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  return ImageFont.load_default()


def _uint8_rgb(image: np.ndarray) -> np.ndarray:
  """HWC (or HW) uint8, or floats in [0, 1] -> uint8 [H, W, 3]."""
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f"a cell must be an [H, W, 3] or [H, W, 1] image, got shape {x.shape}")
  if x.dtype != np.uint8:
    x = np.round(np.clip(x.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _cell(label: str, image: np.ndarray, min_cell: int) -> np.ndarray:
  """The label strip above the image, enlarged so that its shorter side is >= min_cell."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  x = _uint8_rgb(image)
  factor = max(1, math.ceil(min_cell / min(x.shape[:2])))
  x = np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)
  strip = Image.new("RGB", (x.shape[1], STRIP), (WHITE,) * 3)
  ImageDraw.Draw(strip).text((2, 2), label, fill=(0, 0, 0), font=_font())  # clipped by the cell's width
  return np.concatenate([np.asarray(strip), x], axis=0)


def _white(height: int, width: int) -> np.ndarray:
  return np.full((height, width, 3), WHITE, np.uint8)


def _pad(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """x in the top-left corner of a white [height, width, 3]."""
  out = _white(height, width)
  out[:x.shape[0], :x.shape[1]] = x
  return out


def grid(rows: Sequence[Sequence[tuple[str, np.ndarray]]], min_cell: int = 128) -> np.ndarray:
  """uint8 [H, W, 3]: each row's (label, image) cells left to right, rows top to bottom, GAP white
  pixels between; shorter rows and smaller cells are padded with white. Images are HWC uint8, or
  floats in [0, 1]."""
  if not rows or not all(rows):
    raise ValueError("grid needs at least one row, and at least one cell in every row")
  lines = []
  for row in rows:
    cells = [_cell(label, image, min_cell) for label, image in row]
    height = max(c.shape[0] for c in cells)
    spaced = [piece for c in cells for piece in (_pad(c, height, c.shape[1]), _white(height, GAP))]
    lines.append(np.concatenate(spaced[:-1], axis=1))
  width = max(line.shape[1] for line in lines)
  spaced = [piece for line in lines for piece in (_pad(line, line.shape[0], width), _white(GAP, width))]
  return np.concatenate(spaced[:-1], axis=0)
