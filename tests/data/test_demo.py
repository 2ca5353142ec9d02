"""Built-in demo data: shapes, determinism, held-out material, and that each task does what it says."""

import numpy as np
import pytest

from lvm_jax.data import demo, images, sentences

SIZE = 16  # small windows keep the tests fast; the default is 32


def make(task: str, split: str = "train", count: int = 6, seed: int = 0, n: int = 6) -> np.ndarray:
  return demo.sentences(task, split, count, size=SIZE, seed=seed, images=n)


@pytest.mark.parametrize("task", demo.TASKS)
def test_every_task_is_deterministic_and_seeded(task):
  a = make(task)
  assert a.shape == (6, 6, SIZE, SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, make(task))
  assert not np.array_equal(a, make(task, seed=1))
  assert not np.array_equal(a, make(task, split="held_out"))
  assert a.std() > 10  # not blank
  assert demo.sentences(task, "train", 2).shape == (2, 8, 32, 32, 3)  # defaults: 8 images of 32x32


def test_held_out_material_is_disjoint():
  assert not set(demo.PICTURES["train"]) & set(demo.PICTURES["held_out"])
  assert not set(demo.PICTURES["held_out"]) & set(images.TRAIN)  # the demo tokenizer never saw them
  train, held_out = demo.digit_samples("train"), demo.digit_samples("held_out")
  assert not set(train) & set(held_out) and len(train) + len(held_out) == 1797
  for split in demo.SPLITS:
    _, labels = demo.digit_images(split, SIZE)
    assert set(labels) == set(range(10))


def _pictures_holding(pics: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Indices of the pictures that hold window w exactly: corners whose pixel is w's top-left one
  first (comparing every window in full took most of this file's time)."""
  last = pics.shape[1] - w.shape[0] + 1
  p, y, x = np.nonzero(np.all(pics[:, :last, :last] == w[0, 0], axis=-1))
  return np.unique([i for i, r, c in zip(p, y, x) if np.array_equal(pics[i, r:r + w.shape[0], c:c + w.shape[1]], w)])


def test_still_images_are_windows_of_the_split_pictures():
  found = lambda window, split: len(_pictures_holding(demo.pictures(split, SIZE), window)) > 0

  for split, other in (("held_out", "train"), ("train", "held_out")):
    x = make("flip", split, count=2, n=4)[:, 0::2].reshape(-1, SIZE, SIZE, 3)
    assert all(found(w, split) and not found(w, other) for w in x)


def test_augment_draws_from_the_pictures_turned_and_mirrored_and_made_up():
  """`augment` (the shipped LVM's store) adds the 8 symmetries of each train picture and made-up
  scenes, keeps every window a window of one of them, and changes nothing without it."""
  pics, more = demo.pictures("train", SIZE), demo.pictures("train", SIZE, augment=True)
  assert more.shape == (8 * len(pics) + demo.SCENES,) + pics.shape[1:]
  np.testing.assert_array_equal(more[:len(pics)], pics)
  np.testing.assert_array_equal(more[len(pics)], np.rot90(pics[0]))
  np.testing.assert_array_equal(more[4 * len(pics)], pics[0][:, ::-1])
  x = demo.sentences("flip", "train", 8, SIZE, images=4, augment=True)[:, 0::2].reshape(-1, SIZE, SIZE, 3)
  hits = [_pictures_holding(more, w) for w in x]
  assert all(len(h) for h in hits)  # every window comes from some turned or mirrored picture
  assert any(h.min() >= len(pics) for h in hits)  # and not all from the originals
  for task in ("moving_crop", "flip", "counting"):
    np.testing.assert_array_equal(make(task), demo.sentences(task, "train", 6, SIZE, 0, 6, augment=False))
    assert demo.sentences(task, "train", 4, SIZE, augment=True).shape == (4, 8, SIZE, SIZE, 3)
  with pytest.raises(ValueError, match="augment is for the train split only"):
    demo.sentences("flip", "held_out", 2, SIZE, augment=True)


def test_made_up_scenes_are_varied_and_deterministic():
  a = demo.scenes(6, 64)
  assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, demo.scenes(6, 64))
  assert not np.array_equal(a, demo.scenes(6, 64, seed=1))
  assert min(np.abs(a[i].astype(int) - a[j]).mean() for i in range(6) for j in range(i)) > 20  # no two alike
  assert all(len(np.unique(im.reshape(-1, 3), axis=0)) > 50 for im in a)  # shapes and gradients, not flat


def test_counting_counts_up_with_samples_of_the_split():
  for split in demo.SPLITS:
    pool, labels = demo.digit_images(split, SIZE)
    index = {im.tobytes(): i for i, im in enumerate(pool)}
    s = make("counting", split, count=8, n=12)
    found = np.array([[index[im.tobytes()] for im in sentence] for sentence in s])  # KeyError: not a split sample
    digits = labels[found]
    assert np.all((digits[:, 1:] - digits[:, :-1]) % 10 == 1)
    assert len(set(digits[:, 0])) > 1 and len(set(found[:, 0])) == 8  # random starts and samples


def test_pair_tasks():
  flip, invert = make("flip"), make("invert")
  np.testing.assert_array_equal(flip[:, 1::2], flip[:, 0::2, :, ::-1])
  assert np.all(invert[:, 0::2].astype(int) + invert[:, 1::2] == 255)
  seg = make("segmentation")
  np.testing.assert_array_equal(seg[:, 1::2], demo.segmentation(seg[:, 0::2]))
  assert {tuple(c) for c in seg[:, 1::2].reshape(-1, 3)} <= {tuple(c) for c in demo.PALETTE}
  assert len({tuple(c) for c in seg[:, 1::2].reshape(-1, 3)}) >= 3
  edge = make("edges")
  np.testing.assert_array_equal(edge[:, 1::2], demo.edges(edge[:, 0::2]))


def test_edges_are_a_sobel_magnitude():
  step = np.zeros((1, SIZE, SIZE, 3), np.uint8)
  step[:, :, SIZE // 2:] = 100
  e = demo.edges(step)[0, ..., 0]
  assert np.all(e[:, [0, SIZE // 2 - 2, SIZE // 2 + 1, SIZE - 1]] == 0)
  # Sobel across a 100-level step: 4 * 100 in both columns beside it, times the gain
  assert np.all(e[:, [SIZE // 2 - 1, SIZE // 2]] == round(400 * demo.EDGE_GAIN))


def test_colorization_and_inpainting_through_the_builders():
  c = make("colorization")
  np.testing.assert_array_equal(c[:, 0::2], sentences.gray(c[:, 1::2]))
  p = make("inpainting", count=20)
  masked, orig = p[:, 0::2], p[:, 1::2]
  kept = masked.any(-1)
  np.testing.assert_array_equal(masked[kept], orig[kept])
  assert np.all(masked[~kept] == 0) and 0.2 < kept.mean() < 0.95


def test_moving_digits_move_steadily():
  s = make("moving_digit", count=10, n=8)[..., 0].astype(float)
  ys, xs = np.mgrid[:SIZE, :SIZE]
  mass = s.sum((2, 3))
  cy, cx = (s * ys).sum((2, 3)) / mass, (s * xs).sum((2, 3)) / mass
  for path in (cx, cy):
    step = np.diff(path, axis=1)
    assert np.all((step >= -1e-9) | np.all(step <= 1e-9, axis=1, keepdims=True))  # monotonic per sentence
  assert np.all(np.abs(cx[:, -1] - cx[:, 0]) >= SIZE / 4 - 1)  # at least half the free width


def test_video_crops_change_smoothly():
  for task in ("moving_crop", "rotating_crop", "zooming_crop"):
    s = make(task, count=4, n=6).astype(float)
    step = np.abs(np.diff(s, axis=1)).mean((2, 3, 4))
    assert np.all(step > 0.5), task  # every frame changes


def test_moving_crops_glide_by_whole_tokens():
  """Each frame is the last one shifted by the sentence's one velocity: 1 or 2 tokens (SIZE / 8
  pixels) along one of 8 directions; the overlap is exact."""
  token = SIZE // 8
  s = make("moving_crop", count=16, n=4).astype(int)
  seen = set()
  for frames in s:
    found = []
    for a, b in zip(frames[:-1], frames[1:]):
      shifts = [(dy, dx) for dy in range(-2 * token, 2 * token + 1) for dx in range(-2 * token, 2 * token + 1)
                if np.array_equal(a[max(dy, 0):SIZE + min(dy, 0), max(dx, 0):SIZE + min(dx, 0)],
                                  b[max(-dy, 0):SIZE + min(-dy, 0), max(-dx, 0):SIZE + min(-dx, 0)])]
      assert len(shifts) >= 1 and (0, 0) not in shifts
      found.append(shifts[0])
    assert len(set(found)) == 1  # a steady velocity
    assert found[0][0] % token == 0 and found[0][1] % token == 0
    seen.add(found[0])
  assert len(seen) >= 4  # directions and speeds vary


def test_rotating_crops_turn_a_quarter_each_frame():
  s = make("rotating_crop", count=8, n=4).astype(int)
  for frames in s:
    turns = [min((k for k in (1, 3) if np.abs(np.rot90(a, k) - b).max() <= 1), default=None)
             for a, b in zip(frames[:-1], frames[1:])]
    assert turns[0] is not None and len(set(turns)) == 1  # a quarter turn, always the same way


@pytest.mark.parametrize("args, message", [
    (("jigsaw", "train", 2), "unknown demo task 'jigsaw'; expected one of moving_crop"),
    (("flip", "test", 2), "unknown demo split 'test'; expected one of train, held_out"),
    (("flip", "train", 2, 32, 0, 5), "images=5, a sentence of .* needs an even number"),
    (("counting", "train", 2, 4), "expected size >= 8"),
])
def test_bad_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    demo.sentences(*args)
