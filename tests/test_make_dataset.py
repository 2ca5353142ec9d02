"""The tokenization job end to end: demo data -> VQGAN -> store; deterministic, resumable, reported;
rebuilt where sources or config changed; and the trainer reading the store through the pipeline."""

import glob
import json
import logging
import os
import zlib

import jax
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from lvm_jax import make_dataset, train
from lvm_jax.convert import vqgan_torch
from lvm_jax.data import demo, pipeline, store
from lvm_jax.models import vqgan
from tests.conftest import REPO, events, load_config


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


def test_demo_store_is_complete_deterministic_and_resumable(tmp_path, weights, caplog):
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
  with caplog.at_level(logging.INFO):
    again = make_dataset.make_dataset(c)
  assert again == report
  # The rerun's progress counts the shards found done: x/N of the whole job, and no ETA at the end.
  lines, n = [m for m in caplog.messages if m.startswith("tokenizing: ")], report["shards"]
  assert len(lines) == 1 and lines[0].startswith(f"tokenizing: shard {n}/{n} (100%), ") and "ETA" not in lines[0]
  assert lines[0].endswith(f"; {unit.name}: 2 sentences, 512 tokens, 0 skipped"), lines
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
  with pytest.raises(ConfigError, match="image_size=64 but the VQGAN of .*tiny.safetensors takes 32"):
    make_dataset.make_dataset(c, show_progress=False)


def test_trainer_learns_from_the_store(tmp_path, weights):
  c = demo_config(str(tmp_path / "store"), weights)
  c.datasets = [d for d in c.datasets if d["source"]["split"] == "train"][:3]
  make_dataset.make_dataset(c, show_progress=False)
  t = load_config("lvm_tiny", "test")
  t.model.vocab_size, t.tokens_per_image, t.seq_len = 256, 64, 128
  t.data = dict(name="pipeline", seed=0, threads=2, bos=-1, mixture={"demo": dict(path=c.store)})
  t.steps, t.optim.warmup, t.optim.lr = 8, 2, 3e-3
  # Evaluation and samples at the end (monitor.py), on the store's own sentences here.
  t.eval_every, t.sample_every = 8, 8
  t.eval_data = dict(dataset="*", per_task=2, samples=2)
  t.vqgan = dict(weights=weights, config=os.path.join(REPO, "configs", "vqgan_tiny.py"))
  train.train(t, str(tmp_path / "lvm"))
  rows = [json.loads(line) for line in open(tmp_path / "lvm" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 9))
  s = store.Store(c.store)
  groups = {f"eval/{s[i]['dataset']}/{s[i]['task']}/perplexity" for i in range(len(s))}
  assert sorted(k for k in rows[-1] if k.startswith("eval/")) == sorted(groups), rows[-1]
  assert all(1 < rows[-1][k] < 256 for k in groups)  # below the uniform guess over the 256 codes
  [tb] = glob.glob(str(tmp_path / "lvm" / "tensorboard" / "events.out.tfevents.*"))
  images = [(step, tag, v) for step, tag, v in events(open(tb, "rb").read()) if tag.startswith("samples/")]
  assert len(images) == 2 and {step for step, _, _ in images} == {8}
  # Labeled cells of >= 128 px: the prompt, the answer, the consensus of the samples and greedy.
  assert all(v.width >= 4 * 128 and v.height >= 128 for _, _, v in images)
  # A fresh model predicts the 256 codes about uniformly; a few updates on the store's codes
  # (a handful used far more than others) bring the loss well below that.
  assert abs(rows[0]["loss"] - np.log(256)) < 0.1, rows[0]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
  # The data iterator's state went into the checkpoint with the train state.
  assert (tmp_path / "lvm" / "checkpoints" / "8" / "data").exists()
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


def pictures(folder, names: list[str]) -> None:
  """Random pictures, each's pixels fixed by its name: the same file whether made first or later."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder.mkdir(exist_ok=True)
  for name in names:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")


def folder_config(root: str, weights: str, folder, names=("pics",)):
  """One sentence a picture (its gray and colour images), two pictures a shard."""
  c = demo_config(root, weights)
  c.datasets = [dict(name=n, source=dict(kind="image_folder", root=str(folder)),
                     sentence=dict(kind="colorization", shots=1)) for n in names]
  c.items_per_shard = 2
  return c


def sentences_of(root: str, dataset: str = "*") -> list[tuple]:
  # A cache of its own: the process-wide one never rechecks, so it would still hold the chunks
  # of a shard read before it was rebuilt.
  with pytest.MonkeyPatch.context() as m:
    m.setattr(store, "CONTEXT", ts.Context({"cache_pool": {"total_bytes_limit": 1 << 24}}))
    s = store.Store(root)
    return [(s[i]["dataset"], s[i]["task"], s[i]["images"], s[i]["tokens"].tobytes()) for i in s.indices(dataset)]


def assert_as_if_built_fresh(c, fresh_root: str, report: dict, dataset: str = "*") -> None:
  """The store after a rerun holds exactly what a new store of the same config and sources would,
  and its report says so: no image twice, none missing, nothing of the old sources."""
  root, c.store = c.store, fresh_root
  expected = make_dataset.make_dataset(c, show_progress=False)
  c.store = root
  assert {**report, "rebuilt": [], "removed": []} == expected
  assert sentences_of(root, dataset) == sentences_of(fresh_root, dataset)


@pytest.mark.slow  # ~25 s: three tokenizing runs
def test_files_added_or_removed_rebuild_the_shards_they_shift(tmp_path, weights, caplog):
  folder, done = tmp_path / "pictures", tmp_path / "store" / "done"
  pictures(folder, ["p0", "p1", "p2", "p3", "p4", "p5"])
  c = folder_config(str(tmp_path / "store"), weights, folder)
  make_dataset.make_dataset(c, show_progress=False)  # units [p0 p1] [p2 p3] [p4 p5]
  untouched = (done / "pics-00000.json").stat().st_mtime_ns
  pictures(folder, ["p2a"])  # sorts after p2: [p0 p1] [p2 p2a] [p3 p4] [p5]
  with caplog.at_level(logging.WARNING):
    report = make_dataset.make_dataset(c, show_progress=False)
  assert (report["rebuilt"], report["removed"]) == (["pics-00001", "pics-00002"], [])
  assert "corpus changed: rebuilding 2 shards (pics-00001, pics-00002)" in caplog.messages
  assert (done / "pics-00000.json").stat().st_mtime_ns == untouched
  assert_as_if_built_fresh(c, str(tmp_path / "fresh1"), report)
  # Each picture once: the colour images (a sentence's second half) are 7 different ones.
  assert len({tokens[len(tokens) // 2:] for *_, tokens in sentences_of(c.store)}) == report["sentences"] == 7
  os.remove(folder / "p1.png")  # [p0 p2] [p2a p3] [p4 p5]: every unit shifts, pics-00003 is past the plan
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    report = make_dataset.make_dataset(c, show_progress=False)
  assert report["rebuilt"] == ["pics-00000", "pics-00001", "pics-00002"] and report["removed"] == ["pics-00003"]
  assert caplog.messages == [("corpus changed: rebuilding 3 shards (pics-00000, pics-00001, pics-00002); "
                              "removing 1 stale shard (pics-00003)")]
  assert_as_if_built_fresh(c, str(tmp_path / "fresh2"), report)


@pytest.mark.slow  # ~20 s: three tokenizing runs
def test_a_changed_sentence_config_or_seed_rebuilds_the_same_rewrites_nothing(tmp_path, weights):
  folder, done = tmp_path / "pictures", tmp_path / "store" / "done"
  pictures(folder, ["p0", "p1", "p2", "p3"])
  c = folder_config(str(tmp_path / "store"), weights, folder)
  make_dataset.make_dataset(c, show_progress=False)
  c.datasets = [dict(c.datasets[0], sentence=dict(kind="colorization", shots=2))]
  report = make_dataset.make_dataset(c, show_progress=False)
  assert report["rebuilt"] == ["pics-00000", "pics-00001"]
  assert [images for _, _, images, _ in sentences_of(c.store)] == [4, 4]  # no 2-image sentence left
  c.seed = 1  # the pictures of a sentence in another order
  report = make_dataset.make_dataset(c, show_progress=False)
  assert report["rebuilt"] == ["pics-00000", "pics-00001"]
  assert_as_if_built_fresh(c, str(tmp_path / "fresh"), report)
  before = {p: p.stat().st_mtime_ns for p in done.iterdir()}
  again = make_dataset.make_dataset(c, show_progress=False)
  assert again == {**report, "rebuilt": []}
  assert {p: p.stat().st_mtime_ns for p in done.iterdir()} == before


@pytest.fixture(params=["local", "gcs"])
def store_root(request, tmp_path, monkeypatch) -> str:
  if request.param == "local":
    return str(tmp_path / "store")
  for k, v in request.getfixturevalue("gcs_emulator").items():
    monkeypatch.setenv(k, v)
  return f"gs://lvm-test/make_dataset/{tmp_path.name}"


def test_a_shrunk_source_leaves_no_stale_shard_visible(tmp_path, weights, store_root):
  folder = tmp_path / "pictures"
  pictures(folder, ["p0", "p1", "p2", "p3", "p4", "p5"])
  # "pics-2" is another dataset in the same store; its shard names start with "pics-" too.
  c = folder_config(store_root, weights, folder, names=("pics", "pics-2"))
  make_dataset.make_dataset(c, show_progress=False)
  os.remove(folder / "p4.png")
  os.remove(folder / "p5.png")
  c.datasets = c.datasets[:1]  # pics-2 is no longer this config's: its shards are left alone
  report = make_dataset.make_dataset(c, show_progress=False)
  assert (report["rebuilt"], report["removed"], report["shards"]) == ([], ["pics-00002"], 2)
  assert len(sentences_of(store_root, "pics")) == 4 and len(sentences_of(store_root, "pics-2")) == 6
  assert_as_if_built_fresh(c, str(tmp_path / "fresh"), report, dataset="pics")


@pytest.mark.slow  # ~17 s: two CLI runs
def test_sigterm_mid_job_finishes_the_shard_exits_0_and_a_rerun_completes(tmp_path, weights):
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import sigterm_on  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "store")
  cmd = [sys.executable, "-m", "lvm_jax.make_dataset", "--config", "configs/dataset_demo.py:test",
         f"--config.store={root}", f"--config.vqgan.weights={weights}", "--config.batch_size=16",
         "--noshowprefixforinfo"]  # absl's INFO lines then start with the message, as sigterm_on reads them
  returncode, out = sigterm_on(cmd, "tokenizing: shard 1/", dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert returncode == 0 and "SIGTERM: stopped after" in out, out[-3000:]
  done = len(os.listdir(os.path.join(root, "done")))
  assert 1 <= done < len(demo.TASKS) * 3  # stopped early, every written shard complete
  c = demo_config(root, weights)
  report = make_dataset.make_dataset(c, show_progress=False)
  assert report["shards"] == len(demo.TASKS) * 3 and report["rebuilt"] == []
  assert_as_if_built_fresh(c, str(tmp_path / "fresh"), report)
