"""Token store of the built-in demo data (lvm_jax/data/demo.py), tokenized by the tiny VQGAN.

  python -m lvm_jax.train_vqgan --config configs/vqgan_tiny.py --workdir /tmp/lvm_demo/vqgan
  python -m lvm_jax.make_dataset --config configs/dataset_demo.py

Every demo task becomes a dataset of 4-image sentences (32x32 images, 64 tokens each, so 256
tokens a sentence) with a train and a held_out part; about a minute on 2 CPU cores. The report
lists shards, sentences and tokens (demo data has nothing to skip). `:test` makes a few
sentences per task.
"""

import os

import ml_collections

from lvm_jax.data import demo

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.store = "/tmp/lvm_demo/store"  # local path or gs://bucket/path
  c.image_size = 32
  c.resize = "squash"  # or center_crop; demo images already have the size
  c.batch_size = 64  # images per tokenizer call, over this process's devices
  c.seed = 0
  c.items_per_shard = 256  # source items (here: demo sentences) per shard
  # The tokenizer: a train_vqgan workdir, or safetensors weights (e.g. the released amused VQGAN).
  c.vqgan = dict(config=os.path.join(HERE, "vqgan_tiny.py"), workdir="/tmp/lvm_demo/vqgan", weights="",
                 layout="diffusers")
  count = {"train": 512, "held_out": 64}
  if arg == "test":
    count = {"train": 6, "held_out": 2}
    c.items_per_shard = 4
  elif arg:
    raise ValueError(f"configs/dataset_demo.py: unknown arg {arg!r} (expected 'test' or nothing)")
  c.datasets = [dict(name=f"{task}_{split}", source=dict(kind="demo", task=task, split=split, count=n, images=4))
                for split, n in count.items() for task in demo.TASKS]
  return c
