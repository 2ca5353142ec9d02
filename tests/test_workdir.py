"""The workdir record: data checked against the model and the first start before anything compiles,
every start's config kept, local paths stored absolute."""

import json
import logging
import os

import numpy as np
import pytest

from lvm_jax import config as config_lib, train, workdir as workdir_lib
from lvm_jax.data import store


def _store(root: str, tokenizer: str, vocab: int = 256, tpi: int = 8) -> str:
  """A small real token store: 24 sentences of 4 images, codes below `vocab`."""
  manifest = store.Manifest(tokens_per_image=tpi, vocab=vocab, tokenizer=tokenizer)
  store.create(root, manifest)
  writer = store.ShardWriter(root, "demo-00000", manifest)
  rng = np.random.default_rng(0)
  for _ in range(24):
    writer.add(rng.integers(0, vocab, 4 * tpi), "demo", "video")
  writer.close()
  return root


def _on_store(c, root: str):
  c.data = dict(name="pipeline", mixture=dict(main=dict(path=root, weight=1.0, dataset="", task="")), seed=0,
                threads=2, bos=-1, allow_new_tokenizer=False)
  c.steps, c.optim.warmup = 2, 1
  return c


def test_store_ids_beyond_the_vocabulary_are_refused_before_compiling(tiny_config, tmp_path):
  root = _store(str(tmp_path / "store"), "tok-a", vocab=256)
  c = _on_store(tiny_config, root)
  c.model.vocab_size = 100
  with pytest.raises(config_lib.ConfigError, match=r"holds token ids up to 255, outside model.vocab_size=100"):
    train.train(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  c.model.vocab_size, c.tokens_per_image = 256, 16
  with pytest.raises(config_lib.ConfigError, match=r"has 8 tokens per image, the config tokens_per_image=16"):
    train.train(c, str(tmp_path / "run"))
  c.tokens_per_image, c.data.bos = 8, 3
  with pytest.raises(config_lib.ConfigError, match=r"data.bos=3 must be an id after the store's 256 image codes"):
    train.train(c, str(tmp_path / "run"))


def test_mixing_stores_of_two_tokenizers_is_refused(tiny_config, tmp_path):
  c = _on_store(tiny_config, _store(str(tmp_path / "a"), "tok-a"))
  c.data.mixture["other"] = dict(path=_store(str(tmp_path / "b"), "tok-b"), weight=1.0, dataset="", task="")
  with pytest.raises(config_lib.ConfigError, match=r"different tokenizers: main=tok-a, other=tok-b"):
    train.train(c, str(tmp_path / "run"))


@pytest.mark.slow  # ~19 s: three runs
def test_resume_on_another_tokenizer_is_refused_unless_allowed_and_history_is_kept(tiny_config, tmp_path, caplog):
  run = tmp_path / "run"
  c = _on_store(tiny_config, _store(str(tmp_path / "a"), "tok-a"))
  train.train(c, str(run))
  first = json.loads((run / "config.json").read_text())
  assert json.loads((run / "data.json").read_text()) == {"tokenizer": "tok-a", "tokens_per_image": 8, "vocab": 256}
  c.data.mixture.main.path, c.steps = _store(str(tmp_path / "b"), "tok-b"), 4
  with pytest.raises(config_lib.ConfigError, match=r"trained on tokens of tokenizer tok-a, the data now comes from "
                                                   r"tokenizer tok-b: .*allow_new_tokenizer=True") as e:
    train.train(c, str(run))
  assert "\n" not in str(e.value)
  assert json.loads((run / "config.json").read_text()) == first  # a refused start leaves no trace
  assert [p.name for p in sorted((run / "configs").iterdir())] == ["0000-step0.json"]
  c.data.allow_new_tokenizer = True
  with caplog.at_level(logging.INFO):
    train.train(c, str(run))
  out = caplog.text
  assert "config changed since the last start" in out and f"data.mixture.main.path: {tmp_path / 'a'} -> " in out
  assert "steps: 2 -> 4" in out
  assert [p.name for p in sorted((run / "configs").iterdir())] == ["0000-step0.json", "0001-step2.json"]
  assert json.loads((run / "configs" / "0000-step0.json").read_text()) == first  # history never overwritten
  assert json.loads((run / "data.json").read_text())["tokenizer"] == "tok-b"


def test_relative_paths_are_stored_absolute(tiny_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _store("store", "tok-a")
  c = _on_store(tiny_config, "store")
  train.train(c, "run")
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["data"]["mixture"]["main"]["path"] == str(tmp_path / "store")


def test_changes_lists_dotted_keys():
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
  new = {"a": 1, "b": {"c": (1, 3), "e": 2}}
  assert workdir_lib.changes(old, new) == ["b.c: [1, 2] -> [1, 3]", "b.d: x -> (none)", "b.e: (none) -> 2"]
