"""Visual-sentence builders: layouts, the release's formulas and masks, determinism, build() grouping."""

import numpy as np
import pytest

from lvm_jax.data import sentences

S = 8


def rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


def coded(*values: int) -> np.ndarray:
  """Images [len(values), S, S, 3] filled with the given values, so the output says where each came from."""
  return np.stack([np.full((S, S, 3), v, np.uint8) for v in values])


def codes(sentence: np.ndarray) -> list[int]:
  return [int(im[0, 0, 0]) for im in sentence]


# video_clip ------------------------------------------------------------------------------------

def test_video_clip_takes_n_frames_at_a_chosen_stride():
  video = coded(*range(100))
  seen = set()
  for seed in range(20):
    c = codes(sentences.video_clip(video, 5, (2, 7), rng(seed)))
    stride = c[1] - c[0]
    assert len(c) == 5 and stride in (2, 7) and np.all(np.diff(c) == stride)
    seen.add((stride, c[0]))
  assert {s for s, _ in seen} == {2, 7} and len({start for _, start in seen}) > 5  # strides and starts vary


def test_video_clip_caps_the_stride_and_is_deterministic():
  video = coded(*range(10))
  # stride 8 is capped at (10 - 1) // (4 - 1) = 3, which leaves a single start
  assert codes(sentences.video_clip(video, 4, (8,), rng(3))) == [0, 3, 6, 9]
  a = sentences.video_clip(coded(*range(40)), 4, (3,), rng(7))
  np.testing.assert_array_equal(a, sentences.video_clip(coded(*range(40)), 4, (3,), rng(7)))
  assert sentences.video_clip(video, 11, (1,), rng()) is None
  assert sentences.video_clip(video, 1, (8,), rng()).shape == (1, S, S, 3)


# kshot_pairs ------------------------------------------------------------------------------------

def test_kshot_pairs_keeps_x_before_y_and_shuffles_pairs():
  pairs = [coded(10 + i, 20 + i) for i in range(5)]
  orders = set()
  for seed in range(10):
    c = codes(sentences.kshot_pairs(pairs, rng(seed)))
    xs, ys = c[0::2], c[1::2]
    assert [y - x for x, y in zip(xs, ys)] == [10] * 5 and sorted(xs) == list(range(10, 15))
    orders.add(tuple(xs))
  assert len(orders) > 1


# colorization -----------------------------------------------------------------------------------

def test_colorization_uses_the_release_gray_formula():
  pixels = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30], [0, 0, 0]], np.uint8)
  image = np.zeros((S, S, 3), np.uint8)
  image[0, :6] = pixels
  out = sentences.colorization([image, 255 - image])
  assert out.shape == (4, S, S, 3)
  np.testing.assert_array_equal(out[1], image)  # [gray, color] pairs, colour second
  np.testing.assert_array_equal(out[3], 255 - image)
  # 0.2989R + 0.587G + 0.114B, rounded: 76.2, 149.7, 29.1, 255.0, 18.1, 0
  np.testing.assert_array_equal(out[0][0, :6], np.repeat([[76], [150], [29], [255], [18], [0]], 3, axis=1))
  assert np.all(out[2] == out[2][..., :1])  # the same grey in every channel


# inpainting -------------------------------------------------------------------------------------

def classify(keep: np.ndarray, patch: int) -> str:
  """'hole' if the dropped pixels form one square of side 10-50% of the image, 'patches' if the mask
  is constant over every patch cell, else 'other'."""
  size = keep.shape[0]
  ys, xs = np.nonzero(~keep)
  if len(ys):
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    if h == w and len(ys) == h * w and int(0.1 * size) <= h < int(0.5 * size):
      return "hole"
  cells = keep.reshape(size // patch, patch, size // patch, patch)
  return "patches" if np.all(cells == cells[:, :1, :, :1]) else "other"


def test_inpainting_masks_follow_the_release():
  size, patch = 64, 8
  images = [np.random.default_rng(i).integers(1, 256, (size, size, 3), dtype=np.uint8) for i in range(4)]
  styles, kept = [], []
  for seed in range(25):
    out = sentences.inpainting(images, rng(seed), patch=patch)
    assert out.shape == (8, size, size, 3)
    r = np.random.default_rng(seed)  # the same draws, mask after mask
    masks = [sentences.inpainting_mask(size, r, patch=patch) for _ in images]
    for i, image in enumerate(images):
      np.testing.assert_array_equal(out[2 * i + 1], image)  # the original second
      keep = out[2 * i].any(-1)  # the images have no zero pixel: zero means masked
      np.testing.assert_array_equal(keep, masks[i])
      np.testing.assert_array_equal(out[2 * i][keep], image[keep])
      styles.append(classify(keep, patch))
      kept.append(keep.mean())
  assert set(styles) == {"hole", "patches"}
  assert 0.1 < styles.count("hole") / len(styles) < 0.5  # hole_prob 0.3
  assert min(kept) < 0.3 and max(kept) > 0.7  # the kept-patch ratio is itself random


def test_inpainting_patches_are_kept_with_probability_u():
  """The release multiplies the patches by `rand < u`: a patch is kept (not dropped) with probability u.

  u is uniform, so only the draws themselves tell keeping from dropping: replay them.
  """
  replayed = 0
  for seed in range(10):
    draws = np.random.default_rng(seed)
    if draws.random() < 0.3:
      continue  # a hole this time
    u = draws.random()
    expected = np.kron(draws.random((4, 4)) < u, np.ones((4, 4), bool))
    np.testing.assert_array_equal(sentences.inpainting_mask(16, rng(seed), patch=4), expected)
    replayed += 1
  assert replayed >= 3


def test_inpainting_mask_options():
  assert sentences.default_patch(256) == 32 and sentences.default_patch(32) == 4
  for seed in range(5):
    assert classify(sentences.inpainting_mask(40, rng(seed), hole_prob=1.0, patch=4), 4) == "hole"
    assert classify(sentences.inpainting_mask(40, rng(seed), hole_prob=0.0, patch=4), 4) == "patches"
  assert sentences.inpainting_mask(20, rng(), hole_prob=0.0, patch=6).shape == (20, 20)  # a partial last patch


# multi_annotation -------------------------------------------------------------------------------

def test_multi_annotation_applies_one_permutation_per_sentence():
  items = [coded(*(10 * i + j for j in range(4))) for i in range(3)]
  orders = set()
  for seed in range(10):
    c = np.array(codes(sentences.multi_annotation(items, rng(seed)))).reshape(3, 4)
    np.testing.assert_array_equal(c // 10, np.repeat(np.arange(3)[:, None], 4, 1))  # items stay in order
    assert np.all(c % 10 == c[0] % 10) and sorted(c[0] % 10) == [0, 1, 2, 3]
    orders.add(tuple(c[0] % 10))
  assert len(orders) > 1
  in_order = sentences.multi_annotation(items, rng(), shuffle=False)
  assert codes(in_order) == [10 * i + j for i in range(3) for j in range(4)]


# same_category ----------------------------------------------------------------------------------

def test_same_category_groups_images_of_the_chosen_classes():
  by_label = {label: list(coded(*(10 * label + j for j in range(n)))) for label, n in enumerate([5, 2, 4, 3, 6])}
  chosen = set()
  for seed in range(10):
    c = np.array(codes(sentences.same_category(by_label, 3, 3, rng(seed)))).reshape(3, 3)
    labels = c // 10
    assert np.all(labels == labels[:, :1]) and len(set(labels[:, 0])) == 3  # grouped, distinct classes
    assert all(len(set(row)) == 3 for row in c)  # distinct images
    assert 1 not in labels  # class 1 has only 2 images
    chosen.add(tuple(labels[:, 0]))
  assert len(chosen) > 1
  assert sentences.same_category(by_label, 5, 3, rng()) is None  # only 4 classes have 3 images


# build ------------------------------------------------------------------------------------------

def test_build_groups_pairs_and_reports_the_rest():
  items = [coded(10 + i, 20 + i) for i in range(7)] + [coded(1, 2, 3)]
  out, skipped = sentences.build("kshot_pairs", items, [], rng(), shots=3)
  assert [sorted(codes(s)[0::2]) for s in out] == [[10, 11, 12], [13, 14, 15]]
  assert len(skipped) == 2 and "item 7" in skipped[0] and "T=3" in skipped[0] and "[6]" in skipped[1]
  again, _ = sentences.build("kshot_pairs", items, [], rng(), shots=3)
  np.testing.assert_array_equal(np.stack(out), np.stack(again))


def test_build_video_clips_and_short_videos():
  items = [coded(*range(20)), coded(*range(3)), coded(*range(100, 130))]
  out, skipped = sentences.build("video_clip", items, [], rng(), n=4, strides=5, clips_per_video=2)
  assert len(out) == 4 and all(len(s) == 4 for s in out)
  assert [codes(s)[0] >= 100 for s in out] == [False, False, True, True]
  assert skipped == ["item 1: 3 frames, a clip needs 4"]
  (clip,), skipped = sentences.build("video_clip", [coded(*range(20))], [], rng())  # release: 16 frames, stride 8
  assert not skipped and np.all(np.diff(codes(clip)) == 1) and len(clip) == 16  # stride capped at 19 // 15


def test_build_still_image_kinds():
  stills = [coded(30 + i) for i in range(5)] + [coded(1, 2)]
  out, skipped = sentences.build("colorization", stills, [], rng(), shots=2)
  assert [codes(s)[1::2] for s in out] == [[30, 31], [32, 33]]
  assert any("item 5" in r for r in skipped) and any("[4]" in r for r in skipped)
  out, _ = sentences.build("inpainting", stills[:4], [], rng(), shots=4, hole_prob=1.0)
  assert len(out) == 1 and codes(out[0])[1::2] == [30, 31, 32, 33]
  big = np.zeros((1, 2 * S, 2 * S, 3), np.uint8)
  _, skipped = sentences.build("colorization", stills[:2] + [big], [], rng(), shots=1)
  assert len(skipped) == 1 and "item 2" in skipped[0] and "differs" in skipped[0]


def test_build_multi_annotation_and_same_category():
  items = [coded(*(10 * i + j for j in range(3))) for i in range(4)] + [coded(7, 8)]
  out, skipped = sentences.build("multi_annotation", items, [], rng(), shots=2)
  assert [len(s) for s in out] == [6, 6] and skipped == ["item 4: 2 modalities, the others have 3"]
  stills = [coded(10 * label + j) for label in range(3) for j in range(4)]
  labels = [label for label in range(3) for _ in range(4)]
  out, skipped = sentences.build("same_category", stills, labels, rng(), categories=2, per_category=3)
  assert len(out) == 2 and not skipped  # 12 items, 6 per sentence
  for s in out:
    groups = np.array(codes(s)).reshape(2, 3) // 10
    assert np.all(groups == groups[:, :1]) and groups[0, 0] != groups[1, 0]
  _, skipped = sentences.build("same_category", stills, labels, rng(), categories=4, per_category=3, sentences=1)
  assert len(skipped) == 1 and "3 classes" in skipped[0]
  with pytest.raises(ValueError, match="one label per item"):
    sentences.build("same_category", stills, [], rng())


@pytest.mark.parametrize("kind, params, message", [
    ("pairs", {}, "unknown sentence kind 'pairs'; expected one of video_clip, kshot_pairs"),
    ("kshot_pairs", {"n": 3}, r"unknown params \['n'\]; allowed: shots"),
    ("kshot_pairs", {"shots": 0}, "shots=0, expected an integer >= 1"),
    ("video_clip", {"strides": ()}, r"strides=\(\), expected a non-empty tuple"),
    ("inpainting", {"hole_prob": 1.5}, "hole_prob=1.5"),
])
def test_build_rejects_unknown_kinds_and_bad_params(kind, params, message):
  with pytest.raises(ValueError, match=message):
    sentences.build(kind, [coded(1, 2)], [], rng(), **params)
