"""Scaling ladder on the demo store: 5 LVM sizes (53k to 3.4M non-embedding parameters, 64x), one
token budget, held-out loss against parameters and training FLOPs with fitted power laws.

  python -m lvm_jax.demo          # once, for its token store: the first two stages write workdir/demo/store
  python -m lvm_jax.scaling --config scaling_demo --workdir workdir/scaling [--store workdir/demo/store]

Every rung trains on the train split of the 11 demo tasks for the same 1000 steps of 8 sentences
(2.0M tokens, 1.4 epochs), then is scored on all tokens of the first 64 held-out sentences of
each task. Expect 25-30 minutes on 2 CPU cores (the largest rung takes half of it; step times
measured on the demo store), the held-out loss to fall from rung to rung, and
workdir/scaling/scaling.png, scaling.md and scaling.json. Rerunning the command skips finished
rungs; SIGTERM saves the running one, which the next run resumes. `:test` is a 4-rung ladder of
tiny models on 64-token sentences (tests/test_scaling.py).
"""

import ml_collections

from lvm_jax.config import lvm_config

# The demo LVM (configs/lvm_demo.py) trains stably at lr 3e-3 with d_model 128: the anchor.
BASE_LR, BASE_WIDTH = 3e-3, 128


def rung(name: str, d_model: int, ffn: int, layers: int, heads: int) -> dict:
  """One size. Adam moves every weight by about lr per step whatever its fan-in, so a matrix's
  output moves by about lr x d_model: lr ~ 1/d_model keeps that step the same across widths
  (muP's rule for hidden matrices under Adam), so no rung is favoured by a learning rate tuned
  for another. The schedule ends at a tenth of the peak, as the demo LVM's does."""
  lr = BASE_LR * BASE_WIDTH / d_model
  return dict(name=name, model=dict(d_model=d_model, ffn=ffn, layers=layers, heads=heads),
              optim=dict(lr=lr, end_lr=lr / 10))


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  # Every rung's recipe, that of the demo LVM; a rung changes only the model's size and its lr.
  t = lvm_config(d_model=BASE_WIDTH, ffn=384, layers=2, heads=4)
  t.model.update(dtype="float32", remat="none", vocab_size=256)  # CPUs: fp32; the tiny VQGAN's 256 codes
  t.seq_len, t.tokens_per_image = 256, 64
  t.global_batch, t.steps = 8, 1000  # the token budget: steps x global_batch x seq_len, the same for every rung
  t.optim.update(lr=BASE_LR, end_lr=BASE_LR / 10, warmup=20)
  t.data.mixture.main.update(path="workdir/demo/store", dataset="*_train")  # python -m lvm_jax.demo's store
  t.data.threads = 2
  # Scored once at the end by lvm_jax.scaling (held-out loss over all tokens), not while training;
  # no sample grids (they need the VQGAN). eval_data says which held-out sentences.
  t.eval_every, t.sample_every = 0, 0
  t.eval_data.update(dataset="*_held_out", per_task=64)
  t.log_every, t.ckpt_every = 25, 500
  c.train = t
  c.rungs = (
      rung("xs", 64, 192, 1, 2),
      rung("s", 96, 288, 2, 3),
      rung("m", 128, 384, 2, 4),  # the demo LVM's size
      rung("l", 192, 576, 3, 6),
      rung("xl", 256, 768, 4, 8),
  )
  if arg == "test":
    t.seq_len, t.tokens_per_image = 64, 16
    t.steps, t.optim.warmup, t.log_every = 8, 2, 2
    t.data.mixture.main.path = ""  # the test's own store
    t.eval_data.per_task = 4
    t.peak_tflops = 1.0  # skip measuring the CPU's matmul peak
    c.rungs = (rung("a", 16, 32, 1, 2), rung("b", 24, 48, 1, 2), rung("c", 32, 64, 2, 2), rung("d", 48, 96, 2, 2))
  elif arg:
    raise ValueError(f"configs/scaling_demo.py: unknown arg {arg!r} (expected 'test' or nothing)")
  return c
