"""A tiny AIM for CPUs and tests: 32x32 crops of scikit-image's pictures, 4x4 patches (64 per image).

  python -m lvm_jax.train --config configs/aim_tiny.py --workdir /tmp/aim_tiny

Width 128, 4 blocks, a 2-block head; prefix-causal pretraining on random resized crops and
flips. Expect the normalized-pixel loss to fall from about 1 (predicting the mean) to ~0.5
within the 300 steps, a minute or two on 2 CPU cores. `:test` is a few steps.
"""

from lvm_jax.config import aim_config


def get_config(arg=None):
  c = aim_config(width=128, depth=4, heads=4, image_size=32, patch=4)
  c.model.update(head_width=128, head_depth=2, head_mlp=512, dtype="float32")
  c.data.source = dict(kind="digits", split="train")
  c.global_batch, c.steps = 16, 300
  c.optim.update(warmup=15)
  c.log_every, c.ckpt_every = 10, 100
  if arg == "test":
    c.steps, c.optim.warmup, c.log_every, c.ckpt_every = 6, 2, 1, 3
    c.peak_tflops = 1.0
  elif arg:
    raise ValueError(f"configs/aim_tiny.py: unknown arg {arg!r} (expected 'test' or nothing)")
  return c
