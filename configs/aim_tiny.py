"""A tiny AIM for CPUs and tests: 32x32 crops of scikit-learn's digits (train split, no labels), 4x4 patches.

  python -m lvm_jax.train --config configs/aim_tiny.py --workdir /tmp/aim_tiny
  python -m lvm_jax.evaluate --workdir /tmp/aim_tiny

Width 128, 4 blocks, a 2-block head; prefix-causal pretraining on random resized crops and
flips of the 1438 train digits (64 patches per image). Expect the normalized-pixel loss to fall
from ~0.5 at step 10 to ~0.15 at step 300, under a minute on 2 CPU cores; the probe of the
held-out digits with 10 labels per class ~80-88% (a random trunk ~63-65%). `:test` is a few steps.

`:clutter` pretrains and evaluates on the same digits pasted at random places, scales and colours
on crops of pictures (data/clutter.py: held-out digits on held-out pictures), a task where raw
pixels are a poor basis; `python -m lvm_jax.aim_curve` plots its loss against its probe.
"""

from lvm_jax.config import aim_config


def get_config(arg=None):
  c = aim_config(width=128, depth=4, heads=4, image_size=32, patch=4)
  c.model.update(head_width=128, head_depth=2, head_mlp=512, dtype="float32")
  c.data.source = dict(kind="digits", split="train")
  c.global_batch, c.steps = 16, 300
  c.optim.update(warmup=15)
  c.log_every, c.ckpt_every = 10, 100
  c.eval_every = 50  # validation loss on the 359 held-out digits
  c.eval_data = dict(source=dict(kind="digits", split="held_out"), images=359)
  if arg == "clutter":
    c.data.source.clutter = True
    c.eval_data.source.clutter = True
  elif arg == "test":
    c.steps, c.optim.warmup, c.log_every, c.ckpt_every = 6, 2, 1, 3
    c.peak_tflops = 1.0
  elif arg:
    raise ValueError(f"configs/aim_tiny.py: unknown arg {arg!r} (expected 'test', 'clutter' or nothing)")
  return c
