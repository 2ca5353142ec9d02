"""The synthetic source: packed rows with the right masks, deterministic, resumable."""

import numpy as np

from lvm_jax.data import synthetic


def test_rows_are_packed_sentences_with_the_shift_structure(tiny_config):
  c = tiny_config
  row = synthetic.make_row(7, c.seq_len, c.tokens_per_image, c.data.codes, (2, 4), seed=0)
  seg, tokens, pos = row["segment_ids"], row["tokens"], row["positions"]
  assert seg[0] == 1 and np.all(np.diff(seg[seg > 0]) >= 0)
  assert np.all(row["loss_mask"] == (seg > 0))
  for s in np.unique(seg[seg > 0]):
    t = tokens[seg == s].reshape(-1, c.tokens_per_image)
    assert 2 <= len(t) <= 4
    np.testing.assert_array_equal(pos[seg == s], np.arange(t.size))
    np.testing.assert_array_equal(t[1:], (t[:-1] + 1) % c.data.codes)


def test_rows_depend_only_on_their_global_index(tiny_config):
  c = tiny_config
  whole, half = synthetic.make_iterator(c, np.arange(8)), synthetic.make_iterator(c, np.arange(4, 8))
  for step in range(3):  # the second process's rows, step after step
    w, h = next(whole), next(half)
    np.testing.assert_array_equal(w["tokens"][4:], h["tokens"])
    expected = synthetic.make_row(step * c.global_batch + 5, c.seq_len, c.tokens_per_image, c.data.codes,
                                  tuple(c.data.images_per_sentence), c.seed)
    np.testing.assert_array_equal(h["tokens"][1], expected["tokens"])


def test_iterator_state_restores_exactly(tiny_config):
  it = synthetic.make_iterator(tiny_config, np.arange(8))
  next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(2)]
  it2 = synthetic.make_iterator(tiny_config, np.arange(8))
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["tokens"], e)
