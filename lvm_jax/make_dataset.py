"""Tokenization job: sources -> visual sentences -> VQGAN tokens -> token store.

  python -m lvm_jax.make_dataset --config configs/dataset_demo.py --config.store=/tmp/demo/store

Every dataset of the config is cut into units of `items_per_shard` source items (or demo
sentences); a unit becomes one store shard named <dataset>-<unit>. Units are dealt round-robin to
JAX processes, each encoding on its own devices and writing its own shards, so processes never
wait for each other. A unit whose shard is complete is skipped, so a killed job reruns where it
stopped; a unit's sentences depend only on (seed, dataset, unit), so reruns and any process count
give the same store. Inputs that cannot be used (corrupt files, videos too short, ...) are
skipped, listed with their reasons in reports/<shard>.json and summed in the final report.
"""

import dataclasses
import hashlib
import json
import time
from typing import Any, Optional

import jax
import numpy as np
import tensorstore as ts
from absl import logging

from lvm_jax import cli
from lvm_jax.config import ConfigError
from lvm_jax.data import demo, sentences, sources, store
from lvm_jax.models import vqgan


@dataclasses.dataclass(frozen=True)
class Unit:
  dataset: int  # index into config.datasets
  number: int
  keys: tuple  # source keys, or (first, count) of demo sentences
  name: str


def plan(c: Any, opened: list) -> list[Unit]:
  """All units of all datasets, in a fixed order."""
  units = []
  for d, (spec, source) in enumerate(zip(c.datasets, opened)):
    if source is None:  # demo sentences are generated, numbered 0..count-1
      count = spec["source"]["count"]
      keys = [(i, min(c.items_per_shard, count - i)) for i in range(0, count, c.items_per_shard)]
    else:
      all_keys = source.keys()
      keys = [tuple(all_keys[i:i + c.items_per_shard]) for i in range(0, len(all_keys), c.items_per_shard)]
    units += [Unit(d, k, tuple(ks), f"{spec['name']}-{k:05d}") for k, ks in enumerate(keys)]
  return units


def open_sources(c: Any) -> list:
  if c.resize not in ("squash", "center_crop"):  # the tokenizer reads squares
    raise ConfigError(f"resize={c.resize!r}: expected squash|center_crop")
  opened = []
  for spec in c.datasets:
    src = dict(spec["source"])
    if src.get("kind") == "demo":
      opened.append(None)
    else:
      opened.append(sources.open_source({**src, "size": c.image_size, "mode": c.resize}))
  return opened


def unit_sentences(c: Any, unit: Unit, source: Any) -> tuple[list[np.ndarray], str, list[str]]:
  """(sentences, task, skip reasons) of one unit."""
  spec = c.datasets[unit.dataset]
  seed = int.from_bytes(hashlib.sha256(f"{c.seed}/{spec['name']}/{unit.number}".encode()).digest()[:4], "little")
  if source is None:
    src = spec["source"]
    built = demo.sentences(src["task"], src.get("split", "train"), unit.keys[1], c.image_size, seed,
                           src.get("images", 8))
    return list(built), src["task"], []
  items, labels, skipped, unreadable = [], [], [], 0
  rng = np.random.default_rng(seed)
  # Builders group items in order; a shuffled unit gives random groups (pairs from across folders).
  for key in rng.permutation(np.array(unit.keys, dtype=object)):
    try:
      items.append(source.load(key))
      labels.append(source.label(key))
    except sources.BadInput as e:
      skipped.append(f"{key}: {e}")
      unreadable += isinstance(e, sources.Unreadable)
  if len(unit.keys) > 1 and unreadable == len(unit.keys):
    # Not bad files but a missing mount, permissions or dangling links: writing the shard empty
    # would mark it done, and a rerun after the fix would skip it.
    raise ConfigError(f"shard {unit.name}: none of its {len(unit.keys)} files could be read (first: {skipped[0]}); "
                      "nothing written for it")
  params = {k: v for k, v in spec["sentence"].items() if k != "kind"}
  built, reasons = sentences.build(spec["sentence"]["kind"], items, labels, rng, **params)
  return built, spec.get("task", spec["sentence"]["kind"]), skipped + list(reasons)


def tokenize_unit(c: Any, unit: Unit, source: Any, tok: vqgan.Tokenizer, manifest: store.Manifest) -> dict:
  built, task, skipped = unit_sentences(c, unit, source)
  counts = [len(s) for s in built]
  ids = tok.encode(np.concatenate(built)) if built else np.zeros((0, manifest.tokens_per_image), np.int32)
  writer = store.ShardWriter(c.store, unit.name, manifest)
  for sentence_ids in np.split(ids, np.cumsum(counts)[:-1]) if built else []:
    writer.add(sentence_ids.reshape(-1), c.datasets[unit.dataset]["name"], task)
  report = {"shard": unit.name, "sentences": len(built), "images": int(sum(counts)), "skipped": skipped}
  # The report goes first: a unit counts as done only once its shard marker follows.
  kv = ts.KvStore.open(store.kvstore(c.store)).result()
  kv.write(f"reports/{unit.name}.json", json.dumps(report).encode()).result()
  marker = writer.close()
  return {**report, "tokens": marker["tokens"]}


def tokenizer_id(cfg: vqgan.Config, model: vqgan.Model) -> str:
  """Config and a digest of the weights: stores made by different tokenizers never mix."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def load_tokenizer(c: Any) -> tuple[vqgan.Tokenizer, store.Manifest]:
  from lvm_jax import train_vqgan  # pylint: disable=g-import-not-at-top
  model, image_size = train_vqgan.load_vqgan(c.vqgan)
  if image_size != c.image_size:
    raise ConfigError(f"image_size={c.image_size} but the VQGAN of {c.vqgan.config} takes {image_size}")
  tok = vqgan.Tokenizer(model, c.image_size, c.batch_size)  # this process's devices
  manifest = store.Manifest(tokens_per_image=tok.grid ** 2, vocab=model.cfg.codes,
                            tokenizer=tokenizer_id(model.cfg, model))
  return tok, manifest


def make_dataset(c: Any, show_progress: bool = True) -> dict:
  """Runs the job for this process's units; returns the report of the whole store so far."""
  if not c.store:
    raise ConfigError("store is empty: set --config.store to a local path or gs://bucket/path")
  opened = open_sources(c)
  units = plan(c, opened)
  tok, manifest = load_tokenizer(c)
  store.create(c.store, manifest)  # every process: the same bytes, and each checks an existing one
  mine = units[jax.process_index()::jax.process_count()]
  todo = [u for u in mine if not store.shard_done(c.store, u.name)]
  logging.info("%d units in all, %d for this process, %d already done", len(units), len(mine), len(mine) - len(todo))
  t0 = time.time()
  for i, unit in enumerate(todo):
    r = tokenize_unit(c, unit, opened[unit.dataset], tok, manifest)
    if show_progress:
      rate = (i + 1) / (time.time() - t0)
      print(f"[{i + 1}/{len(todo)}] {unit.name}: {r['sentences']} sentences, {r['tokens']} tokens, "
            f"{len(r['skipped'])} skipped ({rate:.2f} units/s, ~{(len(todo) - i - 1) / rate:.0f} s left)", flush=True)
  return summary(c.store, [u.name for u in units])


def summary(root: str, names: Optional[list[str]] = None) -> dict:
  """Totals over the complete shards' reports: sentences, images, tokens, skipped inputs with reasons."""
  kv = ts.KvStore.open(store.kvstore(root)).result()
  out = {"shards": 0, "sentences": 0, "images": 0, "tokens": 0, "skipped": []}
  for name in names if names is not None else []:
    marker, report = (kv.read(f"{d}/{name}.json").result() for d in ("done", "reports"))
    if marker.state != "value" or report.state != "value":
      continue
    r = json.loads(report.value)
    out["shards"] += 1
    out["tokens"] += json.loads(marker.value)["tokens"]
    for k in ("sentences", "images"):
      out[k] += r[k]
    out["skipped"] += r["skipped"]
  return out


def cli_main() -> None:
  config = cli.define_config()

  def main(_):
    report = make_dataset(config.value)
    print(f"store {config.value.store}: {report['shards']} shards, {report['sentences']} sentences, "
          f"{report['images']} images, {report['tokens']} tokens, {len(report['skipped'])} inputs skipped")
    for reason in report["skipped"][:50]:
      print(f"  skipped {reason}")
    if len(report["skipped"]) > 50:
      print(f"  ... and {len(report['skipped']) - 50} more (reports/*.json in the store)")

  cli.run(main, required=["config"])


if __name__ == "__main__":
  cli_main()
