"""Tokenization job: sources -> visual sentences -> VQGAN tokens -> token store.

  python -m lvm_jax.make_dataset --config configs/dataset_demo.py --config.store=/tmp/demo/store

Every dataset of the config is cut into units of `items_per_shard` source items (or demo
sentences); a unit becomes one store shard named <dataset>-<unit>. Units are dealt round-robin to
JAX processes, each encoding on its own devices and writing its own shards, so processes never
wait for each other. A unit whose shard is complete is skipped, so a killed job reruns where it
stopped; a unit's sentences depend only on (seed, dataset, unit), so reruns and any process count
give the same store. Inputs that cannot be used (corrupt files, videos too short, ...) are
skipped, listed with their reasons in reports/<shard>.json and summed in the final report.

A shard's done marker records a digest of what it was built from: the dataset's entry of the
config, image_size, resize, seed and the unit's source keys. Files added to, removed from or
renamed in a source shift the units, and a changed dataset entry or seed changes every unit: on a
rerun each unit whose digest differs loses its marker first (readers stop seeing it) and is built
again, and the shards of this config's datasets past the new plan (a shrunk source) lose theirs;
the job logs one line naming both ("corpus changed: rebuilding ..."). A file overwritten under the
same name is not noticed: give it a new name, or use a new store.
"""

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from absl import logging

from lvm_jax import cli, progress
from lvm_jax.config import ConfigError, plain
from lvm_jax.data import demo, sentences, sources, store
from lvm_jax.models import tokenize, vqgan


@dataclasses.dataclass(frozen=True)
class Unit:
  dataset: int  # index into config.datasets
  number: int
  keys: tuple  # source keys, or (first, count) of demo sentences
  name: str
  digest: str = ""  # of everything its shard's content depends on (unit_digest)


def unit_digest(c: Any, spec: Any, keys: tuple) -> str:
  """sha256 of what a unit's shard is built from, recorded in its done marker: a rerun whose
  sources or config differ rebuilds the shard instead of keeping one made from other inputs."""
  what = {"dataset": spec, "image_size": c.image_size, "resize": c.resize, "seed": c.seed, "keys": keys}
  # No default= for other objects: their str may hold an address, and the digest would differ every run.
  return hashlib.sha256(json.dumps(plain(what), sort_keys=True).encode()).hexdigest()


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
    units += [Unit(d, k, tuple(ks), f"{spec['name']}-{k:05d}", unit_digest(c, spec, tuple(ks)))
              for k, ks in enumerate(keys)]
  return units


def sort_out(root: str, mine: list[Unit]) -> tuple[list[Unit], list[str]]:
  """(units to build, names of those among them whose existing shard was built from other
  inputs): a unit is done only when its marker holds its digest. Markers of jobs before digests
  were recorded hold none, so such shards are rebuilt once."""
  markers = store.done_markers(root, [u.name for u in mine])
  todo = [u for u in mine if (markers[u.name] or {}).get("digest") != u.digest]
  return todo, [u.name for u in todo if markers[u.name] is not None]


def stale_shards(c: Any, units: list[Unit]) -> list[str]:
  """Complete shards of this config's datasets whose unit is not in the plan: the source shrank.
  Shards of datasets not in the config are other data in the same store, never touched."""
  planned = {u.name for u in units}
  prefixes = [f"{spec['name']}-" for spec in c.datasets]
  # <dataset>-<digits> only: dataset "a" must not claim the shards of a dataset "a-2".
  return [name for name in store.done_names(c.store) if name not in planned
          and any(name.startswith(p) and name[len(p):].isdigit() for p in prefixes)]


def change_message(rebuilt: list[str], removed: list[str]) -> str:
  def some(names: list[str], what: str) -> str:
    shown = ", ".join(names[:10]) + (f", ... {len(names) - 10} more" if len(names) > 10 else "")
    return f"{len(names)} {what}{'s' if len(names) != 1 else ''} ({shown})"
  parts = ([f"rebuilding {some(rebuilt, 'shard')}"] if rebuilt else []) + (
      [f"removing {some(removed, 'stale shard')}"] if removed else [])
  return "corpus changed: " + "; ".join(parts)


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
                           src.get("images", 8), bool(src.get("augment", False)))
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


def tokenize_unit(c: Any, unit: Unit, source: Any, tok: tokenize.Tokenizer, manifest: store.Manifest) -> dict:
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
  marker = writer.close({"digest": unit.digest})
  return {**report, "tokens": marker["tokens"]}


def tokenizer_id(cfg: vqgan.Config, model: vqgan.Model) -> str:
  """Config and a digest of the weights: stores made by different tokenizers never mix."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def load_tokenizer(c: Any) -> tuple[tokenize.Tokenizer, store.Manifest]:
  from lvm_jax import load  # pylint: disable=g-import-not-at-top
  # The job's vqgan spec is the user's own config: its config file may run (vqgan_record).
  model, image_size = load.load_vqgan(load.vqgan_record(c.vqgan))
  if image_size != c.image_size:
    named = c.vqgan.get("config") or c.vqgan.get("workdir") or c.vqgan.get("weights")
    raise ConfigError(f"image_size={c.image_size} but the VQGAN of {named} takes {image_size}")
  tok = tokenize.Tokenizer(model, c.image_size, c.batch_size)  # this process's devices
  manifest = store.Manifest(tokens_per_image=tok.grid ** 2, vocab=model.cfg.codes,
                            tokenizer=tokenizer_id(model.cfg, model))
  return tok, manifest


def make_dataset(c: Any, show_progress: bool = True) -> dict:
  """Runs the job for this process's units; returns the report of the planned shards so far, with
  the names of those this process found changed and rebuilt ("rebuilt") or removed ("removed").
  With show_progress, a log line per shard written: x/N, rate, ETA."""
  if not c.store:
    raise ConfigError("store is empty: set --config.store to a local path or gs://bucket/path")
  with progress.phase(f"listing the sources of {len(c.datasets)} datasets"):  # a bucket listing can take minutes
    opened = open_sources(c)
    units = plan(c, opened)
  with progress.phase("loading the tokenizer"):
    tok, manifest = load_tokenizer(c)
  store.create(c.store, manifest)  # every process: the same bytes, and each checks an existing one
  mine = units[jax.process_index()::jax.process_count()]
  todo, rebuilt = sort_out(c.store, mine)
  removed = stale_shards(c, units) if jax.process_index() == 0 else []  # one process lists and deletes
  # This process's changed markers go before any of its shards is rebuilt: a job killed midway
  # leaves no old shard visible next to new ones holding its images. Only its own: another
  # process's marker may already be the fresh one when this one gets to delete it.
  store.unmark_done(c.store, rebuilt + removed)
  if rebuilt or removed:
    logging.warning("%s", change_message(rebuilt, removed))
  done = len(mine) - len(todo)
  logging.info("%d units in all, %d for this process, %d already done", len(units), len(mine), done)
  # Counted over this process's units, with the rate and ETA of this run's (a rerun's) own.
  shards = progress.Progress("tokenizing", len(mine), unit="shard", start=done)
  with cli.stop_requests():  # SIGTERM: finish the shard being written, then stop (a rerun goes on)
    for i, unit in enumerate(todo, start=1):
      r = tokenize_unit(c, unit, opened[unit.dataset], tok, manifest)
      if show_progress:
        shards.log(done + i, f"{unit.name}: {r['sentences']} sentences, {r['tokens']} tokens, "
                             f"{len(r['skipped'])} skipped")
      if cli.terminated() and i < len(todo):
        logging.warning("SIGTERM: stopped after %d/%d shards of this process; rerun the same command to finish",
                        done + i, len(mine))
        break
  return {**summary(c.store, units), "rebuilt": rebuilt, "removed": removed}


def summary(root: str, units: list[Unit]) -> dict:
  """Totals over the planned units' complete shards (other processes' shards not yet rebuilt do
  not count): sentences, images, tokens, skipped inputs with reasons."""
  kv = ts.KvStore.open(store.kvstore(root)).result()
  markers = store.done_markers(root, [u.name for u in units])
  reports = {u.name: kv.read(f"reports/{u.name}.json") for u in units}
  out = {"shards": 0, "sentences": 0, "images": 0, "tokens": 0, "skipped": []}
  for u in units:
    marker, report = markers[u.name], reports[u.name].result()
    if marker is None or marker.get("digest") != u.digest or report.state != "value":
      continue
    r = json.loads(report.value)
    out["shards"] += 1
    out["tokens"] += marker["tokens"]
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
