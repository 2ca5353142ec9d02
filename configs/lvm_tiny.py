"""Tiny LVM for CPUs, tests and the demo: 2 layers, d_model 128, 16-token images, seq 128.

  python -m lvm_jax.train --config configs/lvm_tiny.py --workdir /tmp/lvm_tiny

On the synthetic visual sentences (each image is the previous one with every code shifted by one)
the loss falls from ln(8292) = 9.0 to under 2 within the 300 steps, a couple of minutes on 2 CPU
cores; the ideal loss is the entropy of the first image of each sentence, spread over the sentence.

`configs/lvm_tiny.py:test` shrinks it further (d_model 64, vocab 256, seq 64, 12 steps) so that
a training run in the test suite takes seconds.
"""

from lvm_jax.config import lvm_config, synthetic_data


def get_config(arg=None):
  c = lvm_config(d_model=128, ffn=384, layers=2, heads=4)
  c.model.dtype = "float32"  # CPUs have no fast bf16 matmuls
  c.model.remat = "none"
  c.data = synthetic_data()
  c.seq_len = 128
  c.tokens_per_image = 16
  c.global_batch = 8
  c.steps = 300
  c.optim.lr = 3e-3
  c.optim.end_lr = 3e-4
  c.optim.warmup = 20
  c.log_every = 10
  c.eval_every = c.sample_every = 0  # synthetic sentences have no held-out split
  c.ckpt_every = 100
  if arg == "test":
    c.model.update(d_model=64, ffn=128, vocab_size=256)
    c.data.codes = 32
    c.seq_len, c.tokens_per_image = 64, 8
    c.steps, c.optim.warmup = 12, 2
    c.log_every, c.ckpt_every = 1, 4
    c.peak_tflops = 1.0  # skip measuring the CPU's matmul peak
  elif arg:
    raise ValueError(f"configs/lvm_tiny.py: unknown arg {arg!r} (expected 'test' or nothing)")
  return c
