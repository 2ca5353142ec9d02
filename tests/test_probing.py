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


def folder(root) -> dict:
  return {"kind": "image_folder", "root": str(root), "labels_from_dirs": True}


def test_labeled_images_skip_bad_files_and_spread_over_classes(tmp_path):
  stripes(tmp_path, 10, 0)
  (tmp_path / "vertical" / "bad.png").write_bytes(b"\x89PNG broken")
  got = probing.labeled_images(folder(tmp_path), 16, max_images=100)
  assert got.images.shape == (10, 16, 16, 3) and got.skipped == 1 and sorted(np.bincount(got.labels)) == [5, 5]
  assert got.names == ["horizontal", "vertical"]
  got = probing.labeled_images(folder(tmp_path), 16, max_images=4)
  assert set(got.labels) == {0, 1}  # a cap takes images from every class, not the first folder's
  with pytest.raises(ConfigError, match="without a label, e.g. horizontal/"):
    probing.labeled_images({"kind": "image_folder", "root": str(tmp_path)}, 16, max_images=100)
  with pytest.raises(ConfigError, match="no such directory"):
    probing.labeled_images(folder(tmp_path / "nope"), 16, max_images=100)
  (tmp_path / "only_bad" / "x").mkdir(parents=True)
  (tmp_path / "only_bad" / "x" / "a.png").write_bytes(b"")
  with pytest.raises(ConfigError, match="no image could be loaded .first: x/a.png: not an image: empty file"):
    probing.labeled_images(folder(tmp_path / "only_bad"), 16, max_images=100)


def test_test_classes_are_numbered_as_the_train_folders(tmp_path):
  """Each root numbers its own class folders: a test root without one class must not shift ids."""
  for split, classes in (("train", "abc"), ("test", "ac")):
    for k in classes:
      (tmp_path / split / k).mkdir(parents=True)
      Image.new("RGB", (8, 8), (ord(k),) * 3).save(tmp_path / split / k / "0.png")
  tr = probing.labeled_images(folder(tmp_path / "train"), 8, 10)
  te = probing.labeled_images(folder(tmp_path / "test"), 8, 10)
  assert list(te.labels) == [0, 1] and list(probing.align(tr, te)) == [0, 2]
  with pytest.raises(ConfigError, match=r"test classes \['b'\] are not among the train classes"):
    probing.align(te, tr)


@pytest.mark.slow  # ~25 s
def test_probe_on_an_image_folder_learns_the_classes(tmp_path):
  stripes(tmp_path / "train", 128, 1)
  stripes(tmp_path / "test", 64, 2)
  cfg = aim.Config(**load_config("aim_tiny").model)
  trunk = aim.Trunk(cfg, nnx.Rngs(0))
  r = probing.run(trunk, (2, 3), folder(tmp_path / "train"), folder(tmp_path / "test"), steps=300, per_class=4)
  assert r["classes"] == 2 and r["train_images"] == 128 and r["test_images"] == 64 and r["chance"] == 0.5
  # Orientation at any colour and phase is plain in the tokens (0.95 here), not in the pixels (0.42).
  assert r["attentive_probe"] >= 0.85 and r["linear_probe_pixels"] < 0.7, r
  assert set(r["4_per_class"]) == {"attentive_probe", "random_trunk_probe", "linear_probe_pixels"}
  with pytest.raises(ConfigError, match=r"probe layers=\[3, 4\]: need distinct blocks in \[0, 4\)"):
    probing.run(trunk, (3, 4), folder(tmp_path / "train"), folder(tmp_path / "test"))
