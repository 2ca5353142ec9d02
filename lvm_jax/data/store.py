"""Token store: visual sentences as uint16 VQGAN tokens in tensorstore zarr3 arrays, local or gs://.

Layout under a root (a local path or gs://bucket/prefix, the same code for both):

  manifest.json          tokenizer id, tokens per image, vocabulary; written once, checked after
  shards/<name>/tokens   uint16 [tokens]: the shard's sentences back to back
  shards/<name>/offsets  int64 [sentences + 1]: sentence i is tokens[offsets[i]:offsets[i + 1]]
  shards/<name>/meta     int32 [sentences, 3]: dataset id, task id, images in the sentence
  done/<name>.json       written last: counts, the dataset / task names the ids index, and what
                         the writer adds (make_dataset: a digest of the shard's inputs)

Readers see a shard only once its done/ marker exists, so a job killed mid-shard never leaves a
half shard visible, and a rerun rewrites that shard from scratch. The markers sit under their own
prefix so listing them does not list every chunk object on GCS.
"""

import dataclasses
import fnmatch
import json
from typing import Any, Optional

import numpy as np
import tensorstore as ts

MANIFEST = "manifest.json"
FORMAT = "lvm_jax.store/1"
# Reads are random (a global shuffle), so the read chunk is about one LVM sentence (4096 tokens):
# a sentence costs one or two ranged reads of 16 KiB. The chunks of a shard array sit in one
# object (zarr3 sharding), so a store is a few objects per shard, not one per chunk.
READ_CHUNK_TOKENS = 1 << 13
# Shared by every array a process opens: sentences reread in a later epoch may come from memory.
CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 30}})


class StoreError(ValueError):
  """A store that cannot be read or written as asked; the message names the path and mismatch."""


def kvstore(root: str) -> dict:
  root = root.rstrip("/") + "/"
  if root.startswith("gs://"):
    bucket, _, path = root[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": path}
  return {"driver": "file", "path": root}


def _join(spec: dict, key: str) -> dict:
  return {**spec, "path": spec["path"] + key}


def _read_json(kv: ts.KvStore, key: str) -> Optional[dict]:
  result = kv.read(key).result()
  return json.loads(result.value) if result.state == "value" else None


@dataclasses.dataclass(frozen=True)
class Manifest:
  tokens_per_image: int
  vocab: int  # every token is < vocab
  tokenizer: str  # an id of the VQGAN that made the tokens (e.g. a hash of its config and weights)
  format: str = FORMAT


def create(root: str, manifest: Manifest) -> None:
  """Makes `root` a store with this manifest, or checks that it already is one with the same."""
  if manifest.vocab > 1 << 16:
    raise StoreError(f"vocab={manifest.vocab} does not fit uint16 tokens (max 65536)")
  kv = ts.KvStore.open(kvstore(root)).result()
  have = _read_json(kv, MANIFEST)
  if have is None:
    kv.write(MANIFEST, json.dumps(dataclasses.asdict(manifest), indent=1).encode()).result()
  elif have != dataclasses.asdict(manifest):
    diff = sorted(k for k in have.keys() | dataclasses.asdict(manifest).keys()
                  if have.get(k) != dataclasses.asdict(manifest).get(k))
    raise StoreError(f"{root} holds a store made differently ({', '.join(f'{k}={have.get(k)!r}' for k in diff)}); "
                     "use a new path or the same tokenizer")


def done_names(root: str) -> list[str]:
  """Names of the complete shards, sorted."""
  kv = ts.KvStore.open(kvstore(root)).result()
  keys = kv.list(ts.KvStore.KeyRange("done/", "done0")).result()
  return sorted(k.decode()[len("done/"):-len(".json")] for k in keys)


def done_markers(root: str, names: list[str]) -> dict[str, Optional[dict]]:
  """Each shard's done marker, None where it has none; the reads run concurrently (on GCS, one
  wait for all of them instead of one per shard)."""
  kv = ts.KvStore.open(kvstore(root)).result()
  reads = {name: kv.read(f"done/{name}.json") for name in names}
  return {name: json.loads(r.result().value) if r.result().state == "value" else None for name, r in reads.items()}


def unmark_done(root: str, names: list[str]) -> None:
  """Deletes these shards' done markers (missing ones are fine): readers stop seeing the shards
  at once, and their arrays are overwritten when a shard of the same name is written again."""
  kv = ts.KvStore.open(kvstore(root)).result()
  for w in [kv.write(f"done/{name}.json", None) for name in names]:  # writing None deletes
    w.result()


class ShardWriter:
  """Collects one shard's sentences in memory and writes it whole on `close()`.

  Shards are small enough for memory (the job sizes them), and writing once lets the arrays be
  created with their exact shapes and the done marker follow them.
  """

  def __init__(self, root: str, name: str, manifest: Manifest):
    self.root, self.name, self.manifest = root, name, manifest
    self.tokens: list[np.ndarray] = []
    self.meta: list[tuple[int, int, int]] = []
    self.datasets: dict[str, int] = {}
    self.tasks: dict[str, int] = {}

  def add(self, tokens: np.ndarray, dataset: str, task: str) -> None:
    tokens = np.asarray(tokens).reshape(-1)
    tpi = self.manifest.tokens_per_image
    if not tokens.size or tokens.size % tpi:
      raise StoreError(f"sentence of {tokens.size} tokens is not a whole number of {tpi}-token images")
    if tokens.min() < 0 or tokens.max() >= self.manifest.vocab:
      raise StoreError(f"tokens span [{tokens.min()}, {tokens.max()}], outside the vocabulary [0, {self.manifest.vocab})")
    d = self.datasets.setdefault(dataset, len(self.datasets))
    t = self.tasks.setdefault(task, len(self.tasks))
    self.tokens.append(tokens.astype(np.uint16))
    self.meta.append((d, t, tokens.size // tpi))

  def close(self, extra: Optional[dict] = None) -> dict:
    """Writes the arrays, then the done marker (with the fields of `extra` too, e.g. what the
    shard was built from); returns the marker's contents."""
    lengths = np.array([len(t) for t in self.tokens], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.uint16)
    meta = np.array(self.meta, np.int32).reshape(-1, 3)
    base = kvstore(self.root)
    writes = []
    for key, value, chunk in (("tokens", tokens, READ_CHUNK_TOKENS), ("offsets", offsets, None),
                              ("meta", meta, None)):
      spec = {"driver": "zarr3", "kvstore": _join(base, f"shards/{self.name}/{key}")}
      whole = [max(1, len(value))] + list(value.shape[1:])
      read = [min(chunk, whole[0]) if chunk else whole[0]] + whole[1:]
      layout = ts.ChunkLayout(write_chunk_shape=whole, read_chunk_shape=read)
      arr = ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(value.dtype.name),
                    shape=value.shape, chunk_layout=layout).result()
      writes.append(arr.write(value))
    for w in writes:
      w.result()
    marker = {"sentences": len(self.meta), "tokens": int(offsets[-1]),
              "datasets": list(self.datasets), "tasks": list(self.tasks), **(extra or {})}
    kv = ts.KvStore.open(base).result()
    kv.write(f"done/{self.name}.json", json.dumps(marker).encode()).result()
    return marker


class Store:
  """Read side: the complete shards of a store, addressable by a global sentence index.

  Offsets and metadata (a few bytes per sentence) are held in memory; tokens are read on demand
  through tensorstore, whose chunk cache is shared by the process.
  """

  def __init__(self, root: str):
    self.root = root
    kv = ts.KvStore.open(kvstore(root)).result()
    manifest = _read_json(kv, MANIFEST)
    if manifest is None:
      raise StoreError(f"{root}: no {MANIFEST}; not a token store (make one with python -m lvm_jax.make_dataset)")
    self.manifest = Manifest(**manifest)
    names = done_names(root)
    if not names:
      raise StoreError(f"{root}: the store has no complete shard yet")
    self.shards, offsets, metas, self.datasets, self.tasks = [], [], [], [], []
    for name in names:
      marker = _read_json(kv, f"done/{name}.json")
      self.shards.append(self._open(f"shards/{name}/tokens"))
      offsets.append(self._open(f"shards/{name}/offsets").read().result())
      meta = self._open(f"shards/{name}/meta").read().result().copy()
      # Shard-local dataset / task ids -> store-wide ids.
      meta[:, 0] = [_intern(self.datasets, marker["datasets"][i]) for i in meta[:, 0]]
      meta[:, 1] = [_intern(self.tasks, marker["tasks"][i]) for i in meta[:, 1]]
      metas.append(meta)
    self.shard_of = np.concatenate([np.full(len(o) - 1, s, np.int32) for s, o in enumerate(offsets)])
    self.starts = np.concatenate([o[:-1] for o in offsets])
    self.lengths = np.concatenate([np.diff(o) for o in offsets])
    self.meta = np.concatenate(metas)

  def _open(self, key: str) -> Any:
    spec = {"driver": "zarr3", "kvstore": _join(kvstore(self.root), key), "recheck_cached_data": False}
    try:
      return ts.open(spec, read=True, context=CONTEXT).result()
    except ValueError as e:  # tensorstore reports a missing or damaged array as ValueError
      raise StoreError(f"{self.root}: cannot read {key}: {str(e).splitlines()[0]}") from None

  def __len__(self) -> int:
    return len(self.lengths)

  def read(self, index: int) -> ts.Future:
    """Starts reading sentence `index`'s tokens; `.result()` gives uint16 [tokens]."""
    start = int(self.starts[index])
    return self.shards[self.shard_of[index]][start:start + int(self.lengths[index])].read()

  def __getitem__(self, index: int) -> dict:
    d, t, n = self.meta[index]
    return {"tokens": self.read(index).result(), "dataset": self.datasets[d], "task": self.tasks[t],
            "images": int(n)}

  def indices(self, dataset: Optional[str] = None, task: Optional[str] = None) -> np.ndarray:
    """Sentence indices, optionally only those whose dataset and/or task match a shell-style
    pattern ("kitti", "*_train")."""
    keep = np.ones(len(self), bool)
    for column, names, want in ((0, self.datasets, dataset), (1, self.tasks, task)):
      if want is not None:
        ids = [i for i, name in enumerate(names) if fnmatch.fnmatchcase(name, want)]
        if not ids:
          raise StoreError(f"{self.root}: no {'dataset' if column == 0 else 'task'} {want!r} (has {names})")
        keep &= np.isin(self.meta[:, column], ids)
    return np.flatnonzero(keep)


def _intern(names: list[str], name: str) -> int:
  if name not in names:
    names.append(name)
  return names.index(name)
