"""aim_curve: the quick run end to end, the correlations, and the digits-in-clutter task."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from lvm_jax import aim_curve, train
from lvm_jax.config import ConfigError
from lvm_jax.data import clutter, demo, sources
from tests.conftest import load_config


@pytest.mark.slow  # ~2 min on 2 CPU cores, most of it compiling: trains 4 steps, probes 3 trunks and the pixels
def test_quick_run_writes_the_curve_of_every_checkpoint(tmp_path):
  workdir = tmp_path / "w"
  report = aim_curve.run(load_config("aim_tiny"), str(workdir), every=25, quick=True, name="aim_tiny")
  steps = [r["step"] for r in report["rows"]]
  assert steps == [0, 2, 4]  # the random trunk, then every checkpoint (--quick: 4 steps, every 2)
  # The validation loss is the trainer's own eval/loss at the same steps, and training lowered it.
  logged = {r["step"]: r["eval/loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "eval/loss" in r}
  assert [r["val_loss"] for r in report["rows"][1:]] == pytest.approx([logged[2], logged[4]], rel=1e-5)
  assert report["rows"][-1]["val_loss"] < report["rows"][0]["val_loss"]
  keys = {"all_labels", "2_per_class"}
  for scores in [*report["rows"], *report["references"].values()]:
    assert keys <= set(scores) and all(0.0 <= scores[k] <= 1.0 for k in keys)
  assert set(report["references"]) == {"linear_pixels", "attentive_patch_pixels"}
  assert report["correlation"]["all_labels"]["n"] == 2 and report["probe"]["labels_2_per_class"] == 20
  saved = json.loads((workdir / "aim_curve.json").read_text())
  assert saved["rows"] == report["rows"] and saved["probe"]["train"] == {"kind": "digits", "split": "train"}
  table = (workdir / "aim_curve.md").read_text()
  assert "| 0 (random trunk) |" in table and "| 4 |" in table and "| linear pixels |" in table
  with Image.open(workdir / "aim_curve.png") as png:
    assert png.format == "PNG" and png.size[0] > 1000
  # The same workdir with other data would be measured as if it were that data's run.
  with pytest.raises(ConfigError, match="trained with another data section"):
    aim_curve.run(load_config("aim_tiny", "clutter"), str(workdir), every=25, quick=True)


def test_correlations_of_known_numbers():
  x = [1, 2, 3, 4, 5]
  same = aim_curve.correlation(x, [2, 4, 6, 8, 10])
  assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0) and same["n"] == 5
  cubes = aim_curve.correlation(x, [-v**3 for v in x])  # monotone: Spearman sees it all, Pearson not
  assert cubes["spearman"] == pytest.approx(-1.0) and cubes["pearson"] == pytest.approx(-0.94311, abs=1e-5)
  assert aim_curve.correlation([1, 2, 3, 4], [1, 3, 2, 4])["pearson"] == pytest.approx(0.8)
  # Tied values share their mean rank: ranks [0, 1.5, 1.5, 3] against [0, 1, 2, 3].
  assert aim_curve.correlation([1, 2, 2, 3], [1, 2, 3, 4])["spearman"] == pytest.approx(4.5 / np.sqrt(22.5))
  assert np.isnan(aim_curve.correlation([1, 2, 3], [0.5, 0.5, 0.5])["pearson"])


def test_table_and_plot_of_a_report(tmp_path):
  rows = [{"step": s, "val_loss": v, "all_labels": a, "10_per_class": f}
          for s, v, a, f in ((0, 1.05, 0.5, 0.3), (25, 0.4, 0.8, 0.6), (50, 0.3, 0.9, 0.7))]
  report = {"config": "aim_tiny", "rows": rows, "chance": 0.1,
            "references": {"linear_pixels": {"all_labels": 0.95, "10_per_class": 0.7},
                           "attentive_patch_pixels": {"all_labels": 0.6, "10_per_class": 0.4}},
            "correlation": {"all_labels": aim_curve.correlation([0.4, 0.3], [0.8, 0.9]),
                            "10_per_class": {"pearson": float("nan"), "spearman": float("nan"), "n": 2}},
            "probe": {"train": {"kind": "digits"}, "test": {"kind": "digits"}, "steps_all_labels": 1000,
                      "steps_10_per_class": 500, "labels_10_per_class": 100, "train_images": 1438,
                      "test_images": 400}}
  table = aim_curve.table(report).splitlines()
  assert "| 0 (random trunk) | 1.0500 | 0.5000 | 0.3000 |" in table and "| 50 | 0.3000 | 0.9000 | 0.7000 |" in table
  assert "| linear pixels | | 0.9500 | 0.7000 |" in table and "| chance | | 0.1000 | 0.1000 |" in table
  assert "- all labels: Pearson r = -1.000, Spearman rho = -1.000 over the 2 trained checkpoints" in " ".join(table)
  # 400 test images and a median accuracy of 0.8: 1.96 * sqrt(0.8 * 0.2 / 400) = 0.0392.
  assert "an accuracy near 0.80 is known to +-0.039 (95%, binomial)" in " ".join(table)
  aim_curve.plot(report, str(tmp_path / "curve.png"))  # NaN correlations too (constant accuracies)
  with Image.open(tmp_path / "curve.png") as png:
    assert png.format == "PNG" and png.size[0] > 1000


def test_curve_config_keeps_every_checkpoint_and_refuses_bad_intervals():
  c = aim_curve.curve_config(load_config("aim_tiny"), 25, quick=False)
  assert (c.ckpt_every, c.eval_every, c.steps) == (25, 25, 300) and c.ckpt_keep >= 300 // 25
  with pytest.raises(ConfigError, match=r"--every=0: need a checkpoint interval in \[1, steps=300\]"):
    aim_curve.curve_config(load_config("aim_tiny"), 0, quick=False)
  with pytest.raises(ConfigError, match="needs an AIM config"):
    aim_curve.curve_config(load_config("lvm_tiny"), 25, quick=False)


def test_cluttered_digits_are_labeled_and_held_out_apart():
  train, held_out = clutter.cluttered_digits("train", 32), clutter.cluttered_digits("held_out", 32)
  assert train.images.shape == (1438, 32, 32, 3) and held_out.images.shape == (359, 32, 32, 3)
  # The class is the digit pasted: the demo's labels of the same samples.
  assert list(held_out.labels) == list(demo.digit_images("held_out", 8)[1])
  assert not set(train.pictures) & set(held_out.pictures) and set(held_out.pictures) == set(demo.PICTURES["held_out"])
  assert not set(train.digits) & set(held_out.digits)
  # Scenes, not a black canvas: 40% of the plain digits' pixels are black, next to none of these.
  assert np.mean(held_out.images.max(-1) < 16) < 0.1 < np.mean(demo.digit_images("held_out", 32)[0].max(-1) < 16)
  src = sources.open_source({"kind": "digits", "split": "held_out", "clutter": True, "size": 32, "mode": "center_crop"})
  assert src.name == "cluttered_digits/held_out" and src.label("5") == held_out.labels[5]
  np.testing.assert_array_equal(src.load("5")[0], held_out.images[5])


def test_step_0_is_the_weights_the_run_started_from(tmp_path):
  """The curve's first row probes what the trainer started from: the draw of config.seed, or the
  weights config.init_from names (here a 3-step run's), never a draw of its own."""
  c = load_config("aim_tiny", "test")
  c.steps, c.ckpt_every, c.eval_every = 3, 3, 0  # past the warmup's first update, of learning rate 0
  train.train(c, str(tmp_path / "first"))
  _, drawn = aim_curve._weights(c, "", 0)
  _, trained = aim_curve._weights(c, str(tmp_path / "first"), 3)
  c.init_from, c.seed = str(tmp_path / "first"), c.seed + 1
  _, started = aim_curve._weights(c, "", 0)
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  assert all(np.array_equal(a, b) for a, b in zip(leaves(started), leaves(trained)))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(drawn), leaves(trained)))  # the steps changed them
