"""Tokens/s delivered by the training pipeline (shuffle + read + pack + batch), local and gs://.

  python bench/pipeline.py [--sentences 2000 --seq_len 4096 --batch 8 --threads 8]

Writes one token store of LVM-shaped sentences (16 images x 256 tokens = 4096 tokens) to a local
directory and to a fake-gcs-server bucket on 127.0.0.1 (tests/gcs.py), then times batches of
packed rows from each. Prints tokens/s (non-padding) and the ratio to the issue's targets
(>= 1M tokens/s local, >= 200k tokens/s from the emulator). Reads are random (a global
shuffle) and the chunk cache is off, so every sentence is really read, as in a run over a
corpus far larger than memory.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402

from lvm_jax.data import pipeline, store  # noqa: E402
from tests import gcs  # noqa: E402

TARGETS = {"local": 1_000_000, "emulator": 200_000}


def write(root: str, sentences: int, tokens: int, seed: int = 0) -> None:
  manifest = store.Manifest(tokens_per_image=256, vocab=8192, tokenizer="bench")
  store.create(root, manifest)
  rng = np.random.default_rng(seed)
  per_shard = 500
  for s in range(0, sentences, per_shard):
    writer = store.ShardWriter(root, f"{s // per_shard:05d}", manifest)
    for _ in range(min(per_shard, sentences - s)):
      writer.add(rng.integers(0, 8192, tokens), "bench", "video")
    writer.close()


def tokens_per_second(root: str, args: argparse.Namespace) -> float:
  c = ml_collections.ConfigDict()
  c.seq_len, c.tokens_per_image = args.seq_len, 256
  c.data = dict(name="pipeline", seed=0, threads=args.threads, bos=-1, mixture={"bench": dict(path=root)})
  it = pipeline.make_iterator(c, np.arange(args.batch))
  for _ in range(3):  # thread pool and first reads
    next(it)
  t0, delivered = time.perf_counter(), 0
  for _ in range(args.batches):
    delivered += int(np.sum(next(it)["segment_ids"] > 0))
  return delivered / (time.perf_counter() - t0)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--sentences", type=int, default=2000)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--threads", type=int, default=8)
  args = p.parse_args()
  store.CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
  print(f"{args.sentences} sentences of {args.seq_len} tokens, batch {args.batch} x {args.seq_len}, "
        f"{args.threads} read threads, {os.cpu_count()} CPU cores")
  with tempfile.TemporaryDirectory() as tmp, gcs.local_and_emulated(Path(tmp), "store") as roots:
    for where, root in roots.items():
      write(root, args.sentences, args.seq_len)
      rate = tokens_per_second(root, args)
      print(f"{where:9s}: {rate / 1e6:6.2f}M tokens/s, {rate / TARGETS[where]:5.2f}x the target "
            f"({TARGETS[where] / 1e6:g}M)")

if __name__ == "__main__":
  main()
