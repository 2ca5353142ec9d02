"""Attentive probing on labeled sources: loading, skips, errors, and a probe that must learn."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lvm_jax import probing
from lvm_jax.config import ConfigError
from lvm_jax.models import aim
from tests.conftest import load_config


def stripes(folder, n: int, seed: int) -> None:
  """Two classes a random trunk can tell apart only through its tokens' layout: vertical vs
  horizontal stripes, at random phases and colours."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    k = i % 2
    period, phase = rng.integers(4, 9), rng.integers(0, 8)
    wave = ((np.arange(40) + phase) // (period // 2)) % 2
    mask = np.broadcast_to(wave[None, :] if k == 0 else wave[:, None], (40, 40))
    colours = rng.integers(0, 256, (2, 3))
    image = np.where(mask[..., None] == 1, colours[0], colours[1]).astype(np.uint8)
    (folder / ("vertical", "horizontal")[k]).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / ("vertical", "horizontal")[k] / f"{i:03d}.png")


def test_labeled_images_skip_bad_files_and_spread_over_classes(tmp_path):
  stripes(tmp_path, 10, 0)
  (tmp_path / "vertical" / "bad.png").write_bytes(b"\x89PNG broken")
  x, y, skipped = probing.labeled_images({"kind": "image_folder", "root": str(tmp_path), "labels_from_dirs": True},
                                         16, max_images=100)
  assert x.shape == (10, 16, 16, 3) and skipped == 1 and sorted(np.bincount(y)) == [5, 5]
  _, y, _ = probing.labeled_images({"kind": "image_folder", "root": str(tmp_path), "labels_from_dirs": True},
                                   16, max_images=4)
  assert set(y) == {0, 1}  # a cap takes images from every class, not the first folder's
  with pytest.raises(ConfigError, match="without a label"):
    probing.labeled_images({"kind": "image_folder", "root": str(tmp_path)}, 16, max_images=100)
  with pytest.raises(ConfigError, match="no such directory"):
    probing.labeled_images({"kind": "image_folder", "root": str(tmp_path / "nope")}, 16, max_images=100)


def test_probe_on_an_image_folder_learns_the_classes(tmp_path):
  stripes(tmp_path / "train", 128, 1)
  stripes(tmp_path / "test", 64, 2)
  cfg = aim.Config(**load_config("aim_tiny").model)
  model = aim.Model(cfg, rngs=nnx.Rngs(0))
  spec = lambda split: {"kind": "image_folder", "root": str(tmp_path / split), "labels_from_dirs": True}
  r = probing.run(model, (2, 3), spec("train"), spec("test"), steps=300, per_class=4)
  assert r["classes"] == 2 and r["train_images"] == 128 and r["test_images"] == 64 and r["chance"] == 0.5
  # Orientation at any colour and phase is plain in the tokens (0.95 here), not in the pixels (0.42).
  assert r["attentive_probe"] >= 0.85 and r["linear_probe_pixels"] < 0.7, r
  assert set(r["4_per_class"]) == {"attentive_probe", "random_trunk_probe", "linear_probe_pixels"}
