"""Training batches from token stores: mixture, global shuffle, per-process shard, packing.

  config.data = dict(name="pipeline", seed=0, threads=8, bos=-1,
                     mixture=dict(video=dict(path="gs://b/video", weight=3.0, dataset="", task=""),
                                  pairs=dict(path="gs://b/pairs", weight=1.0, dataset="", task="")))

Each mixture component is a store, optionally only the datasets and/or tasks matching a pattern
("kitti", "*_train"; "" = all);
components are named so a command line can set them (--config.data.mixture.video.path=...). Its sentence
indices are shuffled over the whole component with a new permutation every epoch, repeated
forever, and sliced by JAX process, so processes read disjoint sentences. Components are mixed by
weight; sentences are read through tensorstore on `threads` threads (GCS latency overlaps),
cut to whole images that fit seq_len, and packed first-fit into rows of seq_len tokens: the
layout FIELDS (tokens, segment ids with 0 = padding, positions that restart per sentence, a loss
mask), which data/synthetic.py fills through pack_row. Packed sentences
neither attend to each other nor predict across their boundary (the trainer masks by segment),
unlike the LVM release, which streams one concatenation through fixed windows.

The iterator is a grain DatasetIterator; the trainer checkpoints its state with the train state.
"""

from typing import Any, Iterable, Iterator, Optional

import grain
import jax
import numpy as np

from lvm_jax import config as config_lib
from lvm_jax.data import rows as rows_lib, store as store_lib

# The packed-row layout of every token batch (synthetic.py's too): int32 [rows, seq_len] each.
# segment_ids number a row's sentences from 1 (0 = padding), positions restart at every
# sentence, loss_mask marks the tokens that may be targets.
FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")

_STORES: dict[str, store_lib.Store] = {}


def open_store(path: str) -> store_lib.Store:
  """One Store per path and process (its offsets and the tensorstore handles are reused)."""
  if path not in _STORES:
    _STORES[path] = store_lib.Store(path)
  return _STORES[path]


def _paths(mixture: dict) -> dict[str, str]:
  """{component name: store path}, sorted; one line for an empty mixture or path."""
  if not mixture:
    raise config_lib.ConfigError("data.mixture is empty: name at least one token store")
  for name in mixture:
    if not mixture[name].get("path"):
      raise config_lib.ConfigError(f"data.mixture.{name}.path is empty: set it to a token store "
                                   f"(--config.data.mixture.{name}.path=gs://... or a local path)")
  return {name: mixture[name]["path"] for name in sorted(mixture)}


def identity(c: Any) -> dict:
  """The stores' tokenizer, tokens per image and vocabulary, after checking them against the
  model: ids the stores can hold fit model.vocab_size, images have config.tokens_per_image
  tokens, and every component comes from the same tokenizer. One line for each mismatch."""
  manifests = {name: open_store(path).manifest for name, path in _paths(dict(c.data.mixture)).items()}
  vocab_size, bos = c.model.vocab_size, c.data.get("bos", -1)
  for name, m in manifests.items():
    path = c.data.mixture[name]["path"]
    if m.tokens_per_image != c.tokens_per_image:
      raise config_lib.ConfigError(f"{path} has {m.tokens_per_image} tokens per image, the config "
                                   f"tokens_per_image={c.tokens_per_image}")
    if m.vocab > vocab_size:
      raise config_lib.ConfigError(f"{path} holds token ids up to {m.vocab - 1}, outside model.vocab_size="
                                   f"{vocab_size}: raise model.vocab_size to at least {m.vocab}")
    if 0 <= bos < m.vocab or bos >= vocab_size:
      raise config_lib.ConfigError(f"data.bos={bos} must be an id after the store's {m.vocab} image codes and "
                                   f"below model.vocab_size={vocab_size}")
  tokenizers = {m.tokenizer for m in manifests.values()}
  if len(tokenizers) > 1:
    raise config_lib.ConfigError("the mixture's stores come from different tokenizers: " + ", ".join(
        f"{n}={m.tokenizer}" for n, m in manifests.items()))
  return {"tokenizer": tokenizers.pop(), "tokens_per_image": c.tokens_per_image,
          "vocab": max(m.vocab for m in manifests.values())}


def _component(spec: Any, seed: int, max_tokens: int, tokens_per_image: int) -> grain.MapDataset:
  store = open_store(spec["path"])
  if store.manifest.tokens_per_image != tokens_per_image:
    raise config_lib.ConfigError(f"{spec['path']} has {store.manifest.tokens_per_image} tokens per image, "
                                 f"the config tokens_per_image={tokens_per_image}")
  indices = store.indices(spec.get("dataset") or None, spec.get("task") or None)
  if not len(indices):
    raise config_lib.ConfigError(f"mixture component {dict(spec)} selects no sentence")
  # Whole images only: a cut image would teach the model that images can end early.
  keep = (max_tokens // tokens_per_image) * tokens_per_image

  def read(i: int) -> np.ndarray:
    return store.read(int(indices[i])).result()[:keep]

  ds = grain.MapDataset.range(len(indices)).shuffle(seed=seed).repeat(None)
  return ds[jax.process_index()::jax.process_count()].map(read)


def sentences(mixture: dict, seed: int, max_tokens: int, tokens_per_image: int) -> grain.MapDataset:
  """Token arrays of the mixture's sentences, in this process's shuffled order."""
  names = list(_paths(mixture))
  parts = [_component(mixture[n], rows_lib.shuffle_seed(seed, k), max_tokens, tokens_per_image)
           for k, n in enumerate(names)]
  weights = [float(mixture[n].get("weight", 1.0)) for n in names]
  if min(weights) <= 0:
    raise config_lib.ConfigError(f"data.mixture weights must be > 0, got {weights}")
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def layout(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
           first_target: int = 0) -> dict[str, np.ndarray]:
  """Packed tokens with their segment ids and positions -> a row (or rows) of FIELDS. A sentence's
  tokens from position `first_target` on may be targets (the trainer drops those across a
  boundary), padding none."""
  targets = (segment_ids > 0) & (positions >= first_target)
  return dict(zip(FIELDS, (np.asarray(a, np.int32) for a in (tokens, segment_ids, positions, targets)), strict=True))


def pack_row(sentences: Iterable[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One row: sentences laid end to end up to the first that is empty or does not fit, the rest
  padding. `sentences` may be endless (nothing after that one is read); the first must fit."""
  tokens, segment_ids, positions = (np.zeros(seq_len, np.int32) for _ in range(3))
  start = 0
  for segment, sentence in enumerate(sentences, 1):
    end = start + len(sentence)
    if end > seq_len or end == start:  # an endless stream of empty sentences would never end the row
      break
    tokens[start:end], segment_ids[start:end], positions[start:end] = sentence, segment, np.arange(len(sentence))
    start = end
  if start == 0:
    raise ValueError(f"pack_row: the first sentence is empty or longer than seq_len={seq_len}")
  return layout(tokens, segment_ids, positions)


def pack(ds: grain.IterDataset, seq_len: int, rows: int, seed: int, bos: int = -1,
         max_sentences: int = 0, first_target: int = 0) -> grain.IterDataset:
  """Sentences -> batches of `rows` rows of FIELDS [rows, L], packed first-fit over the batch,
  at most `max_sentences` in a row (0: no limit), targets from each sentence's position
  `first_target` on (a BOS is position 0)."""

  def features(tokens: np.ndarray) -> dict:
    tokens = tokens.astype(np.int32)
    if bos >= 0:
      tokens = np.concatenate([[bos], tokens[:seq_len - 1]]).astype(np.int32)
    return {"tokens": tokens}

  packed = grain.experimental.FirstFitPackIterDataset(
      ds.map(features), length_struct={"tokens": seq_len}, num_packing_bins=rows, seed=seed,
      max_sequences_per_bin=max_sentences or None)
  # grain names a feature's segment ids and positions after it.
  return packed.map(lambda row: layout(row["tokens"], row["tokens_segment_ids"], row["tokens_positions"],
                                       first_target)).batch(rows, drop_remainder=True)


def make_iterator(c: Any, rows: np.ndarray, threads: Optional[int] = None) -> Iterator[dict]:
  """This process's part of every global batch: dicts of int32 [len(rows), seq_len]."""
  d = c.data
  max_tokens = c.seq_len - (1 if d.bos >= 0 else 0)
  ds = sentences(dict(d.mixture), d.seed, max_tokens, c.tokens_per_image)
  threads = d.threads if threads is None else threads
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * threads, 16)))
  skip = d.get("loss_from_image", 0)  # images; a BOS comes before the first
  first_target = skip * c.tokens_per_image + (1 if d.bos >= 0 else 0) if skip else 0
  return iter(pack(it_ds, c.seq_len, len(rows), d.seed, d.bos, (c.get("model") or {}).get("max_sentences", 0),
                   first_target))
