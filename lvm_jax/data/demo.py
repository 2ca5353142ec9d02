"""Built-in demo data: visual sentences of several tasks from pictures and digits that ship inside
scikit-image and scikit-learn (no downloads).

Tasks, each a name in TASKS:
  video-like    moving_crop, rotating_crop, zooming_crop (a window over a picture moves by whole
                tokens, turns a quarter or zooms from frame to frame); moving_digit (a digit
                drifting across a dark canvas)
  in-context    edges, segmentation, flip, invert: [x1, y1, x2, y2, ...] pairs through
                sentences.kshot_pairs, y = Sobel magnitude / regions of colour clusters (fixed palette) /
                horizontal flip / 255 - x
  restoration   colorization, inpainting (sentences.colorization / sentences.inpainting)
  reasoning     counting: digits d, d+1, d+2, ... (mod 10), each a random sample of that digit

The held-out split draws on source pictures and digit samples that train never uses; its pictures
are also outside data/images.py's TRAIN, so the demo tokenizer has not seen them either.
Everything is a function of (task, split, seed, count, size, images).
"""

import functools
import os
from typing import Any, Callable, Iterator

import numpy as np

from lvm_jax.data import sentences as sentences_lib

SPLITS = ("train", "held_out")
# The demo's tokenizer (configs/vqgan_demo.py trained on `frames`), shipped with the package; the
# command that made it is in lvm_jax/assets/README.md.
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                         "vqgan_demo.safetensors")
# The demo's LVM (configs/lvm_demo.py:long, then :continued and :focused, on dataset_demo.py:large), a
# LlamaForCausalLM directory (convert/hf_llama.py); the commands that made it are in
# lvm_jax/assets/README.md.
LVM = os.path.join(os.path.dirname(TOKENIZER), "lvm_demo")
# skimage.data names (the TRAIN / HELD_OUT of data/images.py) and sklearn sample images (*.jpg).
PICTURES = {
    "train": ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
              "colorwheel", "china.jpg"),
    "held_out": ("astronaut", "flower.jpg"),
}
DIGITS_HELD_OUT_EVERY = 5  # load_digits sample i is held out when i % 5 == 4: every digit in both splits
# Colours of the segmentation classes (colour clusters sorted dark to light), like the release's
# fixed class -> colour map (map_color.py).
PALETTE = np.array([[128, 0, 0], [0, 128, 0], [0, 0, 192], [230, 190, 0], [0, 200, 200],
                    [200, 0, 200], [255, 128, 64], [160, 255, 160]], np.uint8)
EDGE_GAIN = 0.5  # Sobel magnitude -> grey level; a 128-level step saturates at 255

Rng = np.random.Generator


def _picture(name: str) -> np.ndarray:
  if name.endswith(".jpg"):
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
    return load_sample_image(name)
  import skimage.data  # pylint: disable=g-import-not-at-top
  return np.asarray(getattr(skimage.data, name)())[..., :3]


@functools.cache
def pictures(split: str, size: int, augment: bool = False) -> np.ndarray:
  """The split's pictures squashed to [P, 4S, 4S, 3] (the release squashes to a square too).

  `augment` (train only) adds the 8 rotations and mirrors of each and SCENES made-up pictures
  (`scenes`): a long-trained LVM can remember where things are in 8 pictures, and then answers
  from memory instead of reading the prompt; with pictures it has never seen it has to copy.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  side = 4 * size  # a crop of S sees a sixteenth of the picture: scenes, not texture
  pics = np.stack([np.asarray(Image.fromarray(_picture(n)).resize((side, side), Image.Resampling.LANCZOS))
                   for n in PICTURES[_split(split, augment)]])
  if not augment:
    return pics
  turned = [np.rot90(p, k, axes=(1, 2)) for p in (pics, pics[:, :, ::-1]) for k in range(4)]
  return np.ascontiguousarray(np.concatenate(turned + [scenes(SCENES, side)]))


SCENES = 448  # made-up pictures beside the 64 turned and mirrored real ones: 7 in 8 windows


def scenes(count: int, side: int, seed: int = 0) -> np.ndarray:
  """uint8 [count, side, side, 3]: made-up pictures, each a two-colour gradient under 6-14 ellipses
  and rectangles of random colours, some shaded, then textured with 150-300 specks (`_speckle`),
  softened by a 3x3 box blur (edges as a picture's, not aliased). The specks matter for video
  prompts: on flat shapes a token is mostly its left neighbour (55% of a window's tokens), so a
  model predicts a frame from the frame itself; with specks that share is 29% (real pictures:
  14%), and the rest must come from the frame before. Deterministic for (count, side, seed)."""
  rng = np.random.default_rng([seed, count, side])
  y, x = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side
  out = np.empty((count, side, side, 3), np.uint8)
  for i in range(count):
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5) + 0.5, 0, 1)[..., None]
    a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = a * (1 - t) + b * t
    for _ in range(rng.integers(6, 15)):
      cy, cx = rng.uniform(-0.1, 1.1, 2)
      ry, rx = rng.uniform(0.04, 0.35, 2)
      dy, dx = (y - cy) / ry, (x - cx) / rx
      inside = (dy * dy + dx * dx <= 1) if rng.random() < 0.5 else (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
      colour = rng.uniform(0, 255, 3).astype(np.float32)
      shade = 1 + rng.uniform(-0.4, 0.4) * np.clip(dy, -1, 1)[..., None]  # light from above or below
      img = np.where(inside[..., None], np.clip(colour * shade, 0, 255), img)
    out[i] = np.clip(np.round(_box_blur(_speckle(img, rng), 3)), 0, 255).astype(np.uint8)
  return out


def _speckle(img: np.ndarray, rng: Rng) -> np.ndarray:
  """150-300 small discs and squares (radius 1-4% of the side), each the colour under it moved
  by up to +-60 a channel: texture that keeps the shapes' colours. Drawn in their own boxes."""
  side = img.shape[0]
  for _ in range(rng.integers(150, 301)):
    cy, cx = rng.uniform(0, side, 2)
    r = rng.uniform(0.01, 0.04) * side
    y0, y1, x0, x1 = (int(np.clip(v, 0, side)) for v in (cy - r, cy + r + 1, cx - r, cx + r + 1))
    if y1 <= y0 or x1 <= x0:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if rng.random() < 0.5 else np.ones(yy.shape, bool)
    colour = np.clip(img[int(cy), int(cx)] + rng.uniform(-60, 60, 3), 0, 255)
    img[y0:y1, x0:x1][inside] = colour
  return img


def digit_samples(split: str) -> np.ndarray:
  """Indices into sklearn's load_digits of the split's samples."""
  index = np.arange(1797)
  held_out = index % DIGITS_HELD_OUT_EVERY == DIGITS_HELD_OUT_EVERY - 1
  return index[held_out if _split(split) == "held_out" else ~held_out]


@functools.cache
def _digits(split: str, side: int) -> tuple[np.ndarray, np.ndarray]:
  """The split's digits as grey uint8 [N, side, side] (bilinear upsampling of the 8x8 originals) and labels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  which = digit_samples(split)
  big = [np.asarray(Image.fromarray((d * (255 / 16)).astype(np.float32)).resize(
      (side, side), Image.Resampling.BILINEAR)) for d in digits.images[which]]
  return np.clip(np.round(np.stack(big)), 0, 255).astype(np.uint8), digits.target[which].astype(np.int32)


def digit_images(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The split's digits, white on black: uint8 [N, size, size, 3] and int32 labels [N]."""
  grey, labels = _digits(split, size)
  return np.repeat(grey[..., None], 3, axis=-1), labels


# ---------------------------------------------------------------------------------------------
# Video-like tasks: every frame is a window over a picture, sampled bilinearly.

def _sample(pics: np.ndarray, which: np.ndarray, cy: np.ndarray, cx: np.ndarray, side: np.ndarray,
            angle: np.ndarray, size: int) -> np.ndarray:
  """Windows [N, S, S, 3]: centre (cy, cx), side and rotation (radians) per window, in picture pixels."""
  cy, cx, side, angle = (np.asarray(a, np.float32) for a in (cy, cx, side, angle))  # float32: twice as fast
  g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  v, u = g[:, None], g[None, :]
  cos, sin, side = (a[:, None, None] for a in (np.cos(angle), np.sin(angle), side))
  x = cx[:, None, None] + side * (cos * u - sin * v) - 0.5
  y = cy[:, None, None] + side * (sin * u + cos * v) - 0.5
  x0, y0 = np.floor(x), np.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  last = pics.shape[1] - 1
  x0, y0 = np.clip(x0.astype(int), 0, last), np.clip(y0.astype(int), 0, last)
  x1, y1 = np.minimum(x0 + 1, last), np.minimum(y0 + 1, last)
  p = which[:, None, None]

  def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return pics[p, yy, xx].astype(np.float32)

  out = (at(y0, x0) * (1 - wx) + at(y0, x1) * wx) * (1 - wy) + (at(y1, x0) * (1 - wx) + at(y1, x1) * wx) * wy
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _video(pics: np.ndarray, rng: Rng, count: int, n: int, size: int, cy: np.ndarray, cx: np.ndarray,
           side: np.ndarray, angle: np.ndarray) -> np.ndarray:
  """Frames of per-sentence random pictures; cy, cx, side, angle are [count, n] trajectories."""
  which = np.repeat(rng.integers(0, len(pics), count), n)
  frames = _sample(pics, which, *(a.reshape(-1) for a in (cy, cx, side, angle)), size)
  return frames.reshape(count, n, size, size, 3)


def _moving_crop(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  """A window gliding over a picture: 1 or 2 tokens of the demo tokenizer's 8x8 grid a frame (4 or 8
  pixels at 32), in one of 8 directions, on whole pixels. Whole tokens, so the next frame's codes are
  the last frame's shifted (but on the border it enters by): sub-token shifts would need a tokenizer
  whose codes follow a shift of a pixel, which a 256-code f4 VQGAN's do not."""
  pics = pictures(split, size, augment)
  token = max(1, size // 8)
  compass = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
  velocity = compass[rng.integers(0, 8, count)] * (token * rng.integers(1, 3, count))[:, None]  # [count, 2]
  t = np.arange(n)
  room = pics.shape[1] - size  # the top-left corner's range
  v = np.minimum(np.abs(velocity), room // max(n - 1, 1)) * np.sign(velocity)  # a short picture: slower
  path = v[:, :, None] * t  # [count, 2, n]
  lo = -path.min(2)
  start = lo + (rng.random((count, 2)) * (room - np.ptp(path, 2) + 1)).astype(int)
  corner = start[:, :, None] + path
  ones = np.ones((count, n))
  return _video(pics, rng, count, n, size, corner[:, 0] + size / 2, corner[:, 1] + size / 2, size * ones, 0 * ones)


def _rotating_crop(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  """A window turning a quarter a frame (either way) about a pixel corner: every frame is the last
  one rotated exactly, like the flip task's mirror, a rearrangement a model can learn in context."""
  pics = pictures(split, size, augment)
  reach = int(np.ceil(size / np.sqrt(2))) + 1  # the turning window's corners stay inside the picture
  cy, cx = (rng.integers(reach, pics.shape[1] - reach + 1, (count, 1)) * np.ones(n) for _ in range(2))
  spin = rng.choice([-1, 1], count) * np.pi / 2
  angle = rng.uniform(0, 2 * np.pi, count)[:, None] + spin[:, None] * np.arange(n)
  return _video(pics, rng, count, n, size, cy, cx, size * np.ones((count, n)), angle)


def _zooming_crop(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  pics = pictures(split, size, augment)
  near, far = rng.uniform(1, 1.2, count) * size, rng.uniform(1.8, 2, count) * size  # at most 2x down: little aliasing
  zoom_in = rng.random(count) < 0.5
  first, last = np.where(zoom_in, far, near), np.where(zoom_in, near, far)
  side = first[:, None] * (last / first)[:, None] ** np.linspace(0, 1, n)  # geometric: a steady zoom speed
  cy, cx = (rng.uniform(far / 2, pics.shape[1] - far / 2)[:, None] * np.ones(n) for _ in range(2))
  return _video(pics, rng, count, n, size, cy, cx, side, np.zeros((count, n)))


def _moving_digit(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  """A half-size digit drifting in a straight line; it crosses at least half the canvas horizontally."""
  del augment  # digits on black: nothing to remember a place by
  grey, _ = _digits(split, size // 2)
  d, room = grey.shape[1], size - grey.shape[1]
  x0, x1 = rng.integers(0, room // 4 + 1, count), room - rng.integers(0, room // 4 + 1, count)
  x0, x1 = np.where(rng.random(count) < 0.5, (x0, x1), (x1, x0))
  y0, y1 = rng.integers(0, room + 1, (2, count))
  t = np.linspace(0, 1, n)
  ys, xs = (np.round(a[:, None] + (b - a)[:, None] * t).astype(int) for a, b in ((y0, y1), (x0, x1)))
  digit = grey[rng.integers(0, len(grey), count)]
  canvas = np.zeros((count, n, size, size), np.uint8)
  rows = ys[..., None, None] + np.arange(d)[:, None]
  cols = xs[..., None, None] + np.arange(d)[None, :]
  canvas[np.arange(count)[:, None, None, None], np.arange(n)[:, None, None], rows, cols] = digit[:, None]
  return np.repeat(canvas[..., None], 3, axis=-1)


# ---------------------------------------------------------------------------------------------
# Still-image tasks: exact windows of the pictures (integer positions, no resampling).

def _crops(split: str, count: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  pics = pictures(split, size, augment)
  which = rng.integers(0, len(pics), count)
  y0, x0 = rng.integers(0, pics.shape[1] - size + 1, (2, count))
  i = np.arange(size)
  return pics[which[:, None, None], (y0[:, None] + i)[:, :, None], (x0[:, None] + i)[:, None, :]]


def edges(images: np.ndarray) -> np.ndarray:
  """uint8 [..., S, S, 3] -> Sobel gradient magnitude of the grey image, as grey uint8 [..., S, S, 3]."""
  y = sentences_lib.gray(images)[..., 0].astype(np.float32)
  p = np.pad(y, [(0, 0)] * (y.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
  dx = p[..., :, 2:] - p[..., :, :-2]
  dy = p[..., 2:, :] - p[..., :-2, :]
  gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
  gy = dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]
  mag = np.clip(np.round(np.hypot(gx, gy) * EDGE_GAIN), 0, 255).astype(np.uint8)
  return np.repeat(mag[..., None], 3, axis=-1)


@functools.cache
def colour_centres() -> np.ndarray:
  """len(PALETTE) k-means colour centres of the train pictures, dark to light: the segmentation classes."""
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  pixels = pictures("train", 32).reshape(-1, 3).astype(np.float32)
  pixels = pixels[np.random.default_rng(0).choice(len(pixels), 20000, replace=False)]
  centres = KMeans(len(PALETTE), n_init=4, random_state=0).fit(pixels).cluster_centers_
  return centres[np.argsort(centres @ np.array([0.2989, 0.587, 0.114]))].astype(np.float32)


def _box_blur(images: np.ndarray, k: int) -> np.ndarray:
  """float32 [..., S, S, 3]: the mean of each pixel's k x k neighbourhood (edges repeated)."""
  pad = [(0, 0)] * (images.ndim - 3) + [(k // 2, k // 2), (k // 2, k // 2), (0, 0)]
  p = np.pad(images.astype(np.float32), pad, mode="edge")
  s = images.shape[-2]
  return sum(p[..., dy:dy + s, dx:dx + s, :] for dy in range(k) for dx in range(k)) / (k * k)


def segmentation(images: np.ndarray) -> np.ndarray:
  """uint8 [..., S, S, 3] -> regions: each pixel's nearest colour centre after a box blur of about a
  sixth of the side (5 pixels at 32), drawn in that class's PALETTE colour. The blur makes regions,
  as a segmentation map has, rather than per-pixel colour noise no 8x8-token image can hold."""
  c = colour_centres()
  x = _box_blur(images, max(1, images.shape[-2] // 6) | 1)
  d = (x * x).sum(-1, keepdims=True) - 2 * x @ c.T + (c * c).sum(-1)
  return PALETTE[np.argmin(d, axis=-1)]


_TARGETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "edges": edges,
    "segmentation": segmentation,
    "flip": lambda x: x[..., ::-1, :],
    "invert": lambda x: 255 - x,
}


def _pair_task(target: str) -> Callable[..., np.ndarray]:
  def make(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
    x = _crops(split, count * (n // 2), size, rng, augment).reshape(count, n // 2, size, size, 3)
    pairs = np.stack([x, _TARGETS[target](x)], axis=2)  # [count, k, 2, S, S, 3]
    return np.stack([sentences_lib.kshot_pairs(list(p), rng) for p in pairs])
  return make


def _colorization(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  x = _crops(split, count * (n // 2), size, rng, augment).reshape(count, n // 2, size, size, 3)
  return np.stack([sentences_lib.colorization(list(images)) for images in x])


def _inpainting(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  x = _crops(split, count * (n // 2), size, rng, augment).reshape(count, n // 2, size, size, 3)
  return np.stack([sentences_lib.inpainting(list(images), rng) for images in x])


def _counting(split: str, count: int, n: int, size: int, rng: Rng, augment: bool) -> np.ndarray:
  """Digits d, d+1, ... (mod 10) from a random d; each image a random sample of its digit."""
  del augment
  grey, labels = _digits(split, size)
  per_digit = [np.flatnonzero(labels == k) for k in range(10)]
  table = np.stack([np.resize(s, max(map(len, per_digit))) for s in per_digit])  # [10, most]; rows padded
  digits = (rng.integers(0, 10, count)[:, None] + np.arange(n)) % 10
  pick = (rng.random((count, n)) * np.array([len(s) for s in per_digit])[digits]).astype(int)
  return np.repeat(grey[table[digits, pick]][..., None], 3, axis=-1)


_MAKERS: dict[str, Callable[[str, int, int, int, Rng, bool], np.ndarray]] = {
    "moving_crop": _moving_crop,
    "rotating_crop": _rotating_crop,
    "zooming_crop": _zooming_crop,
    "moving_digit": _moving_digit,
    **{name: _pair_task(name) for name in _TARGETS},
    "colorization": _colorization,
    "inpainting": _inpainting,
    "counting": _counting,
}
TASKS: tuple[str, ...] = tuple(_MAKERS)
_PAIRED = ("edges", "segmentation", "flip", "invert", "colorization", "inpainting")


def _split(split: str, augment: bool = False) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown demo split {split!r}; expected one of {', '.join(SPLITS)}")
  if augment and split != "train":  # held-out stays held out
    raise ValueError(f"demo split {split!r}: augment is for the train split only")
  return split


def sentences(task: str, split: str, count: int, size: int = 32, seed: int = 0, images: int = 8,
              augment: bool = False) -> np.ndarray:
  """`count` sentences of `images` images of one task: uint8 [count, images, size, size, 3].

  Deterministic for (task, split, seed, augment); the other arguments only change how much is
  drawn. `augment` draws the pictures' windows from their rotations and mirrors too (`pictures`).
  """
  if task not in _MAKERS:
    raise ValueError(f"unknown demo task {task!r}; expected one of {', '.join(TASKS)}")
  _split(split, augment)
  if size < 8 or images < 1 or count < 0:
    raise ValueError(f"demo {task}: size={size}, images={images}, count={count}; "
                     "expected size >= 8, images >= 1, count >= 0")
  if task in _PAIRED and images % 2:
    raise ValueError(f"demo {task}: images={images}, a sentence of (x, y) pairs needs an even number")
  if count == 0:
    return np.zeros((0, images, size, size, 3), np.uint8)
  rng = np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split)])
  return _MAKERS[task](split, count, images, size, rng, augment)


# ---------------------------------------------------------------------------------------------
# The tokenizer's training data: a train_vqgan config with data.name = "demo" trains on the frames of
# every task's train sentences, so that the codes fit what the LVM will read (digits on black, edge
# maps, palette maps, masked and grey pictures), not only natural pictures.

@functools.cache
def frames(split: str, size: int, per_task: int, seed: int = 0) -> np.ndarray:
  """Every image of `per_task` 4-image sentences of every task: uint8 [11 * per_task * 4, S, S, 3],
  task by task."""
  return np.concatenate([sentences(t, split, per_task, size, seed, images=4).reshape(-1, size, size, 3)
                         for t in TASKS])


def identity(c: Any) -> dict:
  return {"source": {"kind": "demo", "split": "train", "per_task": c.data.per_task, "tasks": list(TASKS)}}


def make_iterator(c: Any, rows: np.ndarray) -> Iterator[dict]:
  """Random frames (and horizontal flips) of the train sentences; example i depends on (seed, i) only."""
  from lvm_jax.data import rows as rows_lib  # pylint: disable=g-import-not-at-top
  pool = frames("train", c.image_size, c.data.per_task)

  def example(index: int) -> dict:
    rng = np.random.default_rng([c.seed, index])
    image = pool[rng.integers(len(pool))]
    return {"images": image[:, ::-1] if rng.random() < 0.5 else image}
  return rows_lib.iterate(rows, c.global_batch, example)


def evaluation_images(c: Any, per_task: int = 4) -> np.ndarray:
  """The held-out PSNR's images: the first frame of `per_task` held-out sentences of every task, and
  the last frame of the same sentences (answers: edge maps, palette maps, next digits)."""
  x = [sentences(t, "held_out", per_task, c.image_size, seed=1, images=4)[:, [0, -1]] for t in TASKS]
  return np.concatenate(x).reshape(-1, c.image_size, c.image_size, 3)
