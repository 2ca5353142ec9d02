"""The synthetic source: packed rows with the right masks, deterministic, resumable."""

import json

import numpy as np
import pytest

from lvm_jax import workdir
from lvm_jax.config import ConfigError
from lvm_jax.data import pipeline, synthetic


def test_rows_are_packed_sentences_with_the_shift_structure(tiny_config):
  c = tiny_config
  row = synthetic.make_row(7, c.seq_len, c.tokens_per_image, c.data.codes, (2, 4), seed=0)
  seg, tokens, pos = row["segment_ids"], row["tokens"], row["positions"]
  assert set(row) == set(pipeline.FIELDS) and all(v.shape == (c.seq_len,) and v.dtype == np.int32
                                                    for v in row.values())
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


def test_sentences_longer_than_a_row_are_cut_to_whole_images():
  row = synthetic.make_row(3, 20, 8, 32, (3, 3), seed=0)  # 24-token sentences, 20-token rows
  np.testing.assert_array_equal(row["segment_ids"], [1] * 16 + [0] * 4)
  np.testing.assert_array_equal(row["tokens"][8:16], (row["tokens"][:8] + 1) % 32)


def test_config_errors(tiny_config):
  tiny_config.tokens_per_image = tiny_config.seq_len + 1
  with pytest.raises(ConfigError, match="synthetic images need between 1 and seq_len=64 tokens"):
    synthetic.make_iterator(tiny_config, np.arange(8))


def test_identity_keeps_a_synthetic_workdir_off_store_tokens(tiny_config, tmp_path):
  data = synthetic.identity(tiny_config)
  assert data == {"tokenizer": "synthetic", "tokens_per_image": 8, "vocab": 32}
  (tmp_path / "data.json").write_text(json.dumps(data))
  workdir.check_data(tiny_config, str(tmp_path), data)  # the same data resumes
  with pytest.raises(ConfigError, match="trained on tokens of tokenizer synthetic, the data now comes from "
                                        "tokenizer test-vqgan"):
    workdir.check_data(tiny_config, str(tmp_path), {**data, "tokenizer": "test-vqgan"})
