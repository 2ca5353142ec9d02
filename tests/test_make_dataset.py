"""The tokenization job end to end: demo data -> VQGAN -> store; deterministic, resumable, reported;
and the trainer reading the store through the pipeline."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from lvm_jax import make_dataset, train
from lvm_jax.convert import vqgan_torch
from lvm_jax.data import demo, pipeline, store
from lvm_jax.models import vqgan
from tests.conftest import load_config


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
  """A random tiny VQGAN as safetensors: the job's tokenizer without a training run."""
  cfg = vqgan.Config(**load_config("vqgan_tiny").model)
  params = nnx.to_pure_dict(nnx.state(vqgan.Model(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  path = str(tmp_path_factory.mktemp("vqgan") / "tiny.safetensors")
  vqgan_torch.save_safetensors(params, path, cfg)
  return path


def demo_config(root: str, weights: str):
  c = load_config("dataset_demo", "test")
  c.store, c.vqgan.weights, c.batch_size = root, weights, 16
  return c


def test_demo_store_is_complete_deterministic_and_resumable(tmp_path, weights):
  c = demo_config(str(tmp_path / "store"), weights)
  report = make_dataset.make_dataset(c, show_progress=False)
  n_tasks = len(demo.TASKS)
  assert report["shards"] == n_tasks * 3  # train: 6 sentences in shards of 4 -> 2; held_out: 1
  assert report["sentences"] == n_tasks * 8 and report["images"] == n_tasks * 32
  assert report["tokens"] == n_tasks * 32 * 64 and report["skipped"] == []
  s = store.Store(c.store)
  assert len(s) == n_tasks * 8 and s.manifest.tokens_per_image == 64 and s.manifest.vocab == 256
  # A shard holds exactly the tokens of its unit's sentences, as the tokenizer gives them.
  tok, _ = make_dataset.load_tokenizer(c)
  unit = make_dataset.plan(c, make_dataset.open_sources(c))[1]
  built, task, _ = make_dataset.unit_sentences(c, unit, None)
  expected = tok.encode(np.concatenate(built)).reshape(len(built), -1)
  got = [s[i] for i in range(len(s)) if s[i]["dataset"] == c.datasets[unit.dataset]["name"]]
  got = got[4:]  # the unit is the second shard of its dataset, after a first of 4 sentences
  assert len(got) == len(built) and all(g["task"] == task for g in got)
  np.testing.assert_array_equal(np.stack([g["tokens"] for g in got]), expected)
  # A rerun does nothing; a shard whose marker is missing (a killed job) is made again, the same.
  marker = tmp_path / "store" / "done" / f"{unit.name}.json"
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "done").iterdir()}
  os.remove(marker)
  again = make_dataset.make_dataset(c, show_progress=False)
  assert again == report
  after = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "done").iterdir()}
  assert [p.name for p in before if before[p] != after[p]] == [marker.name]
  s = store.Store(c.store)
  remade = [s[i] for i in range(len(s)) if s[i]["dataset"] == c.datasets[unit.dataset]["name"]][4:]
  np.testing.assert_array_equal(np.stack([g["tokens"] for g in remade]), expected)


def test_bad_job_configs_are_one_line(tmp_path, weights):
  from lvm_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  c = demo_config(str(tmp_path / "s"), str(tmp_path / "missing.safetensors"))
  with pytest.raises(ConfigError, match="vqgan.weights=.*missing.safetensors"):
    make_dataset.make_dataset(c, show_progress=False)
  c = demo_config(str(tmp_path / "s"), weights)
  c.image_size = 64
  with pytest.raises(ConfigError, match="image_size=64 but the VQGAN of .*vqgan_tiny.py takes 32"):
    make_dataset.make_dataset(c, show_progress=False)


def test_trainer_learns_from_the_store(tmp_path, weights):
  c = demo_config(str(tmp_path / "store"), weights)
  c.datasets = [d for d in c.datasets if d["source"]["split"] == "train"][:3]
  make_dataset.make_dataset(c, show_progress=False)
  t = load_config("lvm_tiny", "test")
  t.model.vocab_size, t.tokens_per_image, t.seq_len = 256, 64, 128
  t.data = dict(name="pipeline", seed=0, threads=2, bos=-1, mixture={"demo": dict(path=c.store)})
  t.steps = 4
  train.train(t, str(tmp_path / "lvm"))
  rows = [json.loads(line) for line in open(tmp_path / "lvm" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and np.isfinite(rows[-1]["loss"])
  # The data iterator's state went into the checkpoint with the train state.
  assert (tmp_path / "lvm" / "checkpoints" / "4" / "data").exists()
  it = pipeline.make_iterator(t, np.arange(t.global_batch // jax.process_count()))
  assert next(it)["tokens"].max() < 256


def test_folder_source_with_bad_files_is_reported_not_fatal(tmp_path, weights):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "pictures"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
  (folder / "broken.jpg").write_bytes(b"not an image at all")
  Image.new("RGB", (1, 1)).save(folder / "dot.png")
  c = demo_config(str(tmp_path / "store"), weights)
  c.datasets = [dict(name="pics", source=dict(kind="image_folder", root=str(folder)),
                     sentence=dict(kind="colorization", shots=2))]
  c.items_per_shard = 100
  report = make_dataset.make_dataset(c, show_progress=False)
  # 5 good pictures -> 2 sentences of 2 (gray, colour) pairs; one left over; 2 bad files.
  assert (report["sentences"], report["images"]) == (2, 8)
  reasons = " | ".join(report["skipped"])
  assert "broken.jpg: not an image" in reasons and "dot.png" in reasons and "left over" in reasons, reasons
  s = store.Store(c.store)
  assert [s[i]["task"] for i in range(len(s))] == ["colorization"] * 2 and s[0]["images"] == 4


def test_a_shard_of_unreadable_files_stops_the_job_unwritten(tmp_path, weights):
  folder = tmp_path / "links"
  folder.mkdir()
  for i in range(3):  # a dataset of links into a mount that is not there
    os.symlink(tmp_path / "unmounted" / f"{i}.png", folder / f"{i}.png")
  c = demo_config(str(tmp_path / "store"), weights)
  c.datasets = [dict(name="pics", source=dict(kind="image_folder", root=str(folder)),
                     sentence=dict(kind="colorization", shots=1))]
  with pytest.raises(make_dataset.ConfigError, match=r"none of its 3 files could be read \(first: \d.png: unreadable file: not found"):
    make_dataset.make_dataset(c, show_progress=False)
  assert not os.path.exists(tmp_path / "store" / "done")  # no shard marked done: a rerun redoes it


def test_tokenizing_needs_square_images():
  c = load_config("dataset_demo", "test")
  c.resize = "short_side"  # AIM's crops read whole pictures; the tokenizer reads squares
  with pytest.raises(make_dataset.ConfigError, match="resize='short_side'"):
    make_dataset.open_sources(c)
