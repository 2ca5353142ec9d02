"""Token store of the built-in demo data (lvm_jax/data/demo.py), tokenized by the tiny VQGAN.

  python -m lvm_jax.make_dataset --config configs/dataset_demo.py

Every demo task becomes a dataset of 4-image sentences (32x32 images, 64 tokens each, so 256
tokens a sentence) with a train and a held_out part, tokenized by the demo's VQGAN (shipped with
the package; --config.vqgan.weights=F tokenizes with your own export of configs/vqgan_demo.py,
`lvm-convert-vqgan --workdir W --out F`); about a minute on 2 CPU cores. The report lists
shards, sentences and tokens (demo data has nothing to skip). `:test` makes a few sentences per
task. `:large` is the store the shipped demo LVM trained on (configs/lvm_demo.py:long): 2048 train
sentences a task whose windows come from made-up textured scenes and the pictures' rotations and
mirrors too (data/demo.py `augment`), so that a long run cannot memorise 8 pictures; about 6
minutes on 2 cores.
"""

import ml_collections

from lvm_jax import config as config_lib
from lvm_jax.data import demo

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.store = "/tmp/lvm_demo/store"  # local path or gs://bucket/path
  c.image_size = 32
  c.resize = "squash"  # or center_crop; demo images already have the size
  c.batch_size = 64  # images per tokenizer call, over this process's devices
  c.seed = 0
  c.items_per_shard = 256  # source items (here: demo sentences) per shard
  # The tokenizer: a train_vqgan workdir (dict(workdir=...)), or safetensors weights with their
  # architecture (e.g. the released amused VQGAN). Here the demo's, shipped with the package.
  vq = config_lib.load_file("vqgan_demo")
  c.vqgan = dict(model=vq.model.to_dict(), image_size=vq.image_size, weights=demo.TOKENIZER, layout="diffusers")
  count, augment = {"train": 512, "held_out": 64}, False
  if arg == "test":
    count = {"train": 6, "held_out": 2}
    c.items_per_shard = 4
  elif arg == "large":
    c.store, count, augment = "/tmp/lvm_demo/store_large", {"train": 2048, "held_out": 64}, True
  elif arg:
    raise ValueError(f"configs/dataset_demo.py: unknown arg {arg!r} (expected 'test', 'large' or nothing)")
  c.datasets = [dict(name=f"{task}_{split}", source=dict(kind="demo", task=task, split=split, count=n, images=4,
                                                         **({"augment": True} if augment and split == "train" else {})))
                for split, n in count.items() for task in demo.TASKS]
  return c
