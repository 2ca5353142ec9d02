"""Visual-sentence builders: every sentence type of the official LVM tokenize scripts.

Images are uint8 [S, S, 3]; a sentence is uint8 [n, S, S, 3], its images in reading order. Data
sources hand over items of uint8 [T, S, S, 3]: T=1 for a still image, T frames for a video, T
aligned modalities for annotations. Every random choice comes from the `rng` passed in, so a
(seed, items) pair always gives the same sentences.

Defaults follow the release scripts (ytongbai/LVM tokenize_examples, shared/reference/lvm.md §3):
16-frame clips at stride 8, 8 (x, y) pairs, 8 colorization and 8 inpainting pairs, 3 shots of
multi-annotation, 4 categories x 4 images.

`build(kind, ...)` is what the tokenization job calls: it groups a unit of items into sentences
of one type and reports the items it could not use instead of failing on them.
"""

from typing import Any, Callable

import numpy as np

Rng = np.random.Generator


def video_clip(frames: np.ndarray, n: int, strides: tuple[int, ...], rng: Rng) -> np.ndarray | None:
  """n frames at a stride drawn from `strides`, from a random start; None if the video is shorter than n.

  As the release's read_frames_from_video, the stride is capped at (T-1)//(n-1) so that a short
  video still gives a clip (at a smaller stride) instead of being dropped.
  """
  t = len(frames)
  if t < n:
    return None
  stride = int(rng.choice(np.asarray(strides)))
  if n > 1:
    stride = min(stride, (t - 1) // (n - 1))
  start = int(rng.integers(0, t - (n - 1) * stride))
  return frames[start + stride * np.arange(n)]


def kshot_pairs(pairs: list[np.ndarray], rng: Rng) -> np.ndarray:
  """(x, y) pairs, each [2, S, S, 3] -> [x1, y1, ..., xk, yk] with the pairs in random order."""
  order = rng.permutation(len(pairs))
  return np.concatenate([pairs[i] for i in order])


def gray(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> uint8 [..., 3]: the release's 0.2989R + 0.587G + 0.114B, copied to 3 channels."""
  y = images.astype(np.float32) @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  y = np.clip(np.round(y), 0, 255).astype(np.uint8)
  return np.repeat(y[..., None], 3, axis=-1)


def colorization(images: list[np.ndarray]) -> np.ndarray:
  """[gray1, color1, ..., grayk, colork] from k colour images [S, S, 3]."""
  color = np.stack(images)
  return np.stack([gray(color), color], axis=1).reshape(-1, *color.shape[1:])


def default_patch(size: int) -> int:
  """The release masks 32-pixel patches of 256-pixel images: the same fraction at any size."""
  return max(1, round(size * 32 / 256))


def inpainting_mask(size: int, rng: Rng, hole_prob: float = 0.3, patch: int | None = None) -> np.ndarray:
  """bool [S, S], True where a pixel is kept: one square hole, or a random set of kept patches.

  With probability hole_prob a square hole of side 10-50% of the image at a random place (the
  release's randint, upper bound excluded); otherwise a ratio u~U(0,1) is drawn and every patch is
  *kept* with probability u (the release multiplies the patches by `rand < u`).
  """
  patch = patch or default_patch(size)
  if rng.random() < hole_prob:
    low = max(1, int(0.1 * size))
    side = int(rng.integers(low, max(low + 1, int(0.5 * size))))
    y, x = rng.integers(0, size - side + 1, size=2)
    keep = np.ones((size, size), bool)
    keep[y:y + side, x:x + side] = False
    return keep
  ratio = rng.random()
  grid = -(-size // patch)  # a partial last patch when patch does not divide the size
  kept = rng.random((grid, grid)) < ratio
  return np.repeat(np.repeat(kept, patch, 0), patch, 1)[:size, :size]


def inpainting(images: list[np.ndarray], rng: Rng, hole_prob: float = 0.3, patch: int | None = None) -> np.ndarray:
  """[masked1, orig1, ..., maskedk, origk]; masked pixels are 0, as in the release."""
  orig = np.stack(images)
  keep = np.stack([inpainting_mask(orig.shape[1], rng, hole_prob, patch) for _ in images])
  masked = orig * keep[..., None].astype(np.uint8)
  return np.stack([masked, orig], axis=1).reshape(-1, *orig.shape[1:])


def multi_annotation(items: list[np.ndarray], rng: Rng, shuffle: bool = True) -> np.ndarray:
  """Items [m, S, S, 3] of aligned modalities -> [item1 mod_a, item1 mod_b, ..., item2 mod_a, ...].

  One modality order per sentence, shared by all its items (the release's shuffle_tasks), so the
  in-context examples show which modality follows which.
  """
  m = items[0].shape[0]
  order = rng.permutation(m) if shuffle else np.arange(m)
  return np.concatenate([item[order] for item in items])


def same_category(by_label: dict[int, list[np.ndarray]], categories: int, per_category: int,
                  rng: Rng) -> np.ndarray | None:
  """`categories` random classes x `per_category` distinct images of each, grouped by class.

  None when fewer than `categories` classes have `per_category` images.
  """
  eligible = sorted(label for label, images in by_label.items() if len(images) >= per_category)
  if len(eligible) < categories:
    return None
  chosen = rng.choice(eligible, categories, replace=False)
  out = []
  for label in chosen:
    images = by_label[int(label)]
    out += [images[i] for i in rng.choice(len(images), per_category, replace=False)]
  return np.stack(out)


# ---------------------------------------------------------------------------------------------
# build(): a unit of loaded items -> sentences of one type, plus one line per item it skipped.

Built = tuple[list[np.ndarray], list[str]]
Items = list[np.ndarray]


def _check_items(items: list[np.ndarray], frames: int | None) -> tuple[list[int], list[str]]:
  """Indices of the items a sentence can use (same image size as the first good one) and why not the others.

  frames: the T every item must have, or None for any T >= 1.
  """
  good, reasons, shape = [], [], None
  for i, x in enumerate(items):
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2] or not len(x):
      reasons.append(f"item {i}: expected uint8 [T, S, S, 3], got {x.dtype} {list(x.shape)}")
    elif frames is not None and x.shape[0] != frames:
      reasons.append(f"item {i}: has T={x.shape[0]}, this sentence type needs T={frames}")
    elif shape is not None and x.shape[1:] != shape:
      reasons.append(f"item {i}: image size {list(x.shape[1:])} differs from {list(shape)} of the others")
    else:
      shape = x.shape[1:]
      good.append(i)
  return good, reasons


def _chunks(good: list[int], k: int, kind: str) -> tuple[list[list[int]], list[str]]:
  """Consecutive groups of k usable items; a shorter remainder is reported, as the release drops it."""
  usable = len(good) - len(good) % k
  groups = [good[j:j + k] for j in range(0, usable, k)]
  if usable == len(good):
    return groups, []
  return groups, [f"items {good[usable:]}: {len(good) - usable} left over, a {kind} sentence takes {k}"]


def _video(items: Items, labels: list[int], rng: Rng, n: int, strides: tuple[int, ...], clips_per_video: int) -> Built:
  good, reasons = _check_items(items, None)
  out = []
  for i in good:
    for _ in range(clips_per_video):
      clip = video_clip(items[i], n, strides, rng)
      if clip is None:
        reasons.append(f"item {i}: {len(items[i])} frames, a clip needs {n}")
        break
      out.append(clip)
  return out, reasons


def _pairs(items: Items, labels: list[int], rng: Rng, shots: int) -> Built:
  good, reasons = _check_items(items, 2)
  groups, more = _chunks(good, shots, "kshot_pairs")
  return [kshot_pairs([items[i] for i in g], rng) for g in groups], reasons + more


def _colorization(items: Items, labels: list[int], rng: Rng, shots: int) -> Built:
  good, reasons = _check_items(items, 1)
  groups, more = _chunks(good, shots, "colorization")
  return [colorization([items[i][0] for i in g]) for g in groups], reasons + more


def _inpainting(items: Items, labels: list[int], rng: Rng, shots: int, hole_prob: float, patch: int | None) -> Built:
  good, reasons = _check_items(items, 1)
  groups, more = _chunks(good, shots, "inpainting")
  return [inpainting([items[i][0] for i in g], rng, hole_prob, patch) for g in groups], reasons + more


def _multi_annotation(items: Items, labels: list[int], rng: Rng, shots: int, shuffle: bool) -> Built:
  good, reasons = _check_items(items, None)
  if good:  # all items of a sentence need the same modalities: the first good item sets how many
    m = items[good[0]].shape[0]
    reasons += [f"item {i}: {len(items[i])} modalities, the others have {m}" for i in good if len(items[i]) != m]
    good = [i for i in good if len(items[i]) == m]
  groups, more = _chunks(good, shots, "multi_annotation")
  return [multi_annotation([items[i] for i in g], rng, shuffle) for g in groups], reasons + more


def _same_category(items: Items, labels: list[int], rng: Rng, categories: int, per_category: int,
                   sentences: int | None) -> Built:
  if len(labels) != len(items):
    raise ValueError(f"same_category needs one label per item: got {len(labels)} labels for {len(items)} items")
  good, reasons = _check_items(items, 1)
  by_label: dict[int, list[np.ndarray]] = {}
  for i in good:
    by_label.setdefault(int(labels[i]), []).append(items[i][0])
  count = len(good) // (categories * per_category) if sentences is None else sentences
  out = []
  for _ in range(count):
    sentence = same_category(by_label, categories, per_category, rng)
    if sentence is None:
      full = sum(len(v) >= per_category for v in by_label.values())
      reasons.append(f"items {good}: {full} classes have {per_category} images, a sentence needs {categories}")
      break
    out.append(sentence)
  return out, reasons


# kind -> (builder, default params). Defaults are the release's (module docstring).
_KINDS: dict[str, tuple[Callable[..., Built], dict[str, Any]]] = {
    "video_clip": (_video, dict(n=16, strides=(8,), clips_per_video=1)),
    "kshot_pairs": (_pairs, dict(shots=8)),
    "colorization": (_colorization, dict(shots=8)),
    "inpainting": (_inpainting, dict(shots=8, hole_prob=0.3, patch=None)),
    "multi_annotation": (_multi_annotation, dict(shots=3, shuffle=True)),
    "same_category": (_same_category, dict(categories=4, per_category=4, sentences=None)),
}
KINDS = tuple(_KINDS)
_POSITIVE = ("n", "clips_per_video", "shots", "categories", "per_category", "patch")


def _check_params(kind: str, params: dict[str, Any]) -> None:
  for name, value in params.items():
    if name in _POSITIVE and value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{kind}: {name}={value!r}, expected an integer >= 1")
  strides = params.get("strides", (1,))
  if not len(strides) or any(not isinstance(s, (int, np.integer)) or s < 1 for s in strides):
    raise ValueError(f"{kind}: strides={strides!r}, expected a non-empty tuple of integers >= 1")
  hole_prob = params.get("hole_prob", 0)
  if not isinstance(hole_prob, (int, float)) or not 0 <= hole_prob <= 1:
    raise ValueError(f"{kind}: hole_prob={params['hole_prob']!r}, expected a probability in [0, 1]")
  if params.get("sentences") is not None and params["sentences"] < 0:
    raise ValueError(f"{kind}: sentences={params['sentences']!r}, expected >= 0 or None")


def build(kind: str, items: list[np.ndarray], labels: list[int], rng: Rng, **params: Any) -> Built:
  """A unit's items [T, S, S, 3] -> (sentences of type `kind`, one reason per item that could not be used).

  Items are grouped in the order given (shuffle the unit first for random groups). `labels` is read
  only by same_category. Params and their release defaults:
    video_clip: n=16, strides=(8,), clips_per_video=1 (one clip per video item)
    kshot_pairs: shots=8 (items are [2, S, S, 3] (x, y) pairs)
    colorization: shots=8; inpainting: shots=8, hole_prob=0.3, patch=None (S/8) (items are T=1)
    multi_annotation: shots=3, shuffle=True (items are [m, S, S, 3])
    same_category: categories=4, per_category=4, sentences=None (as many as the items cover)
  """
  if kind not in _KINDS:
    raise ValueError(f"unknown sentence kind {kind!r}; expected one of {', '.join(KINDS)}")
  builder, defaults = _KINDS[kind]
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise ValueError(f"{kind}: unknown params {unknown}; allowed: {', '.join(defaults)}")
  params = {**defaults, **params}
  if kind == "video_clip":
    params["strides"] = tuple(np.atleast_1d(params["strides"]).tolist())
  _check_params(kind, params)
  return builder(items, labels, rng, **params)
