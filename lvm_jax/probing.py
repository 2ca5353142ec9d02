"""Attentive probing of a frozen AIM trunk on labeled images: what `python -m lvm_jax.evaluate`
reports for an AIM workdir.

Train and test images come from any labeled source of data/sources.py (default: the demo's
digits, whose train split the tiny AIM pretrains on without labels): an image folder with
`labels_from_dirs`, a TFDS dataset, numpy arrays with labels. Images are centre-cropped to the
model's size; up to `max_images` per split, spread evenly over the source, are decoded in
threads, and their token features are kept in memory (float16), so this is a probe for datasets
of thousands of images, not an ImageNet-scale training job. The attentive probe (models/probe.py)
is trained to convergence with all training labels and with `per_class` of them, next to the same
probe on a randomly initialised trunk and a logistic regression on raw pixels (box-filtered to at
most 32 x 32, which keeps the regression tractable for large images).
"""

import concurrent.futures
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvm_jax import progress
from lvm_jax.config import ConfigError
from lvm_jax.data import sources
from lvm_jax.models import aim, probe

DIGITS = ({"kind": "digits", "split": "train"}, {"kind": "digits", "split": "held_out"})


class Labeled(NamedTuple):
  images: np.ndarray  # uint8 [N, size, size, 3] centre crops
  labels: np.ndarray  # int32 [N]
  names: Optional[list[str]]  # class names by id, when the source has them (image folders)
  skipped: int


def labeled_images(spec: dict, size: int, max_images: int, threads: int = 16) -> Labeled:
  """Up to max_images of a labeled source, spread evenly over it; unusable inputs skipped."""
  if max_images < 1:
    raise ConfigError(f"probe max_images={max_images}: need at least 1")
  try:
    src = sources.open_source({**spec, "size": size, "mode": "center_crop"})
    keys = src.keys()
  except ValueError as e:  # unknown kind or key, missing folder, empty prefix
    raise ConfigError(f"probe source {spec}: {e}") from None
  if len(keys) > max_images:  # evenly spread: folders are sorted by class
    keys = [keys[i] for i in np.linspace(0, len(keys) - 1, max_images).round().astype(int)]

  def load(key: str) -> tuple[np.ndarray, int] | str:
    try:
      return src.load(key)[0], src.label(key)
    except sources.BadInput as e:
      return f"{key}: {e}"

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    try:
      results = list(pool.map(load, keys))
    except ValueError as e:  # storage failures (data/files.py), not one bad file
      pool.shutdown(cancel_futures=True)
      raise ConfigError(f"probe source {spec}: {e}") from None
  loaded = [r for r in results if not isinstance(r, str)]
  if not loaded:
    raise ConfigError(f"probe source {spec}: no image could be loaded (first: {results[0] if results else 'none'})")
  unlabeled = [k for k, r in zip(keys, results) if not isinstance(r, str) and r[1] < 0]
  if unlabeled:
    raise ConfigError(f"probe source {spec}: {len(unlabeled)} images without a label, e.g. {unlabeled[0]} "
                      "(image folders: labels_from_dirs=True and images inside class folders)")
  return Labeled(np.stack([image for image, _ in loaded]), np.array([label for _, label in loaded], np.int32),
                 src.class_names(), len(keys) - len(loaded))


def align(train: Labeled, test: Labeled) -> np.ndarray:
  """Test labels in the train split's ids: folder roots number their own class folders."""
  if train.names is None or test.names is None:
    return test.labels
  ids = {name: i for i, name in enumerate(train.names)}
  if missing := sorted(set(test.names) - set(ids)):
    raise ConfigError(f"probe test classes {missing[:3]} are not among the train classes")
  return np.array([ids[test.names[k]] for k in test.labels], np.int32)


def default_layers(depth: int) -> tuple[int, ...]:
  """The blocks whose outputs the probe averages unless told: the last min(6, depth)."""
  return tuple(range(max(0, depth - 6), depth))


def few_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of `per_class` examples of every class (all of a smaller class), drawn with `seed`."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.choice(idx, min(per_class, len(idx)), replace=False)
                         for k in range(int(labels.max()) + 1) if len(idx := np.flatnonzero(labels == k))])


@functools.cache
def _feature_fn(graphdef: nnx.GraphDef, layers: tuple[int, ...]) -> Any:
  # One compilation per architecture: probing many checkpoints of a run (aim_curve.py) reuses it.
  return jax.jit(lambda s, im: nnx.merge(graphdef, s)(aim.normalize(im), layers=layers)[1].astype(jnp.float16))


def features(trunk: aim.Trunk, images: np.ndarray, layers: tuple[int, ...], batch: int = 64) -> np.ndarray:
  """float16 [N, patches, D]: the mean of `layers`' outputs of the bidirectional trunk."""
  graphdef, state = nnx.split(trunk)
  run = _feature_fn(graphdef, tuple(layers))
  out = None
  for i in range(0, len(images), batch):  # filled in place: a split's features can be gigabytes
    f = np.asarray(run(state, jnp.asarray(images[i:i + batch])))
    out = np.empty((len(images), *f.shape[1:]), f.dtype) if out is None else out
    out[i:i + len(f)] = f
  return out


def linear_pixels(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
  """Held-out accuracy of a logistic regression on the pixels, box-filtered to at most 32 x 32."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top  (scikit-learn's)

  def flat(im: np.ndarray) -> np.ndarray:
    f = max(1, -(-im.shape[1] // 32))  # box filter down to at most 32 x 32
    n, s = len(im), im.shape[1] // f * f
    return im[:, :s, :s].reshape(n, s // f, f, s // f, f, 3).mean((2, 4)).reshape(n, -1) / 255.0

  # One BLAS thread: the matrices are small, and OpenBLAS's spinning threads made the fit 15x
  # slower on 2 busy CPU cores (107 s against 7 s for the 1438 digits).
  with threadpool_limits(1):
    return float(LogisticRegression(max_iter=3000).fit(flat(x), y).score(flat(x_test), y_test))


def run(trunk: aim.Trunk, layers: tuple[int, ...], train: dict = DIGITS[0], test: dict = DIGITS[1],
        steps: int = 2000, per_class: int = 10, max_images: int = 10_000, seed: int = 0) -> dict:
  """Probe accuracies on `test` after training on `train`, with all labels and `per_class` per class."""
  cfg = trunk.cfg
  if steps < 2:
    raise ConfigError(f"probe steps={steps}: need at least 2")
  if not layers or len(set(layers)) != len(layers) or not all(0 <= i < cfg.depth for i in layers):
    raise ConfigError(f"probe layers={list(layers)}: need distinct blocks in [0, {cfg.depth})")
  with progress.phase(f"loading up to {max_images} labeled images per split"):
    tr = labeled_images(dict(train), cfg.image_size, max_images)
    te = labeled_images(dict(test), cfg.image_size, max_images)
  xtr, ytr, xte, yte = tr.images, tr.labels, te.images, align(tr, te)
  if len(np.unique(ytr)) < 2:
    raise ConfigError(f"probe source {train}: one class only; a classifier needs two")
  classes = int(max(ytr.max(), yte.max())) + 1
  few = few_per_class(ytr, per_class, seed)

  # Four probes in all: all labels and `per_class`, on each trunk. Updated after each, the rate
  # (and ETA) includes the features of the trunk, computed before its probes.
  fits = progress.Progress("probing", 2 * (steps + steps // 2))

  def accuracies(t: aim.Trunk, name: str, done: int) -> tuple[float, float]:
    with progress.phase(f"features of {len(ytr) + len(yte)} images from the {name} trunk"):
      ftr, fte = features(t, xtr, layers), features(t, xte, layers)
    # Trained to convergence: a short budget would favour whichever features converge fastest.
    full = probe.fit(ftr, ytr, cfg.heads, classes, steps=steps, seed=seed)
    fits.log(done + steps, f"{name} trunk, all {len(ytr)} labels")
    some = probe.fit(ftr[few], ytr[few], cfg.heads, classes, steps=steps // 2, seed=seed)
    fits.log(done + steps + steps // 2, f"{name} trunk, {len(few)} labels ({per_class} per class)")
    return probe.accuracy(full, fte, yte), probe.accuracy(some, fte, yte)

  trained, trained_few = accuracies(trunk, "trained", 0)
  rand, rand_few = accuracies(aim.Trunk(cfg, nnx.Rngs(seed + 1)), "random", steps + steps // 2)
  with progress.phase("logistic regressions on pixels"):
    pixels, pixels_few = linear_pixels(xtr, ytr, xte, yte), linear_pixels(xtr[few], ytr[few], xte, yte)
  return {"attentive_probe": trained, "random_trunk_probe": rand, "linear_probe_pixels": pixels,
          "chance": float(np.max(np.bincount(yte)) / len(yte)),  # always answering the commonest class
          f"{per_class}_per_class": {"attentive_probe": trained_few, "random_trunk_probe": rand_few,
                                     "linear_probe_pixels": pixels_few},
          "layers": list(layers), "classes": classes, "train_images": len(ytr), "test_images": len(yte),
          "skipped_inputs": tr.skipped + te.skipped}
