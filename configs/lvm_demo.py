"""Tiny LVM on the built-in demo store: 4-image sentences of 64-token (32x32) images.

  python -m lvm_jax.make_dataset --config configs/dataset_demo.py     # the shipped demo tokenizer
  python -m lvm_jax.train --config configs/lvm_demo.py --workdir /tmp/lvm_demo/lvm

Reads /tmp/lvm_demo/store (configs/dataset_demo.py) through the grain pipeline, one sentence of
256 tokens per row; the train split of every demo task, weighted equally by sentence count.
d_model 128, 4 layers (copying from an earlier image takes two attention steps: find where, then
copy). Expect the loss to fall from ln(256) = 5.5 to about 2.4 in the 1000 steps (2M tokens),
5.3 minutes on 2 CPU cores, with the held-out answer perplexity still falling at the end (median
~26 at step 500, ~23 at 1000).

`:long` is the first half of the recipe of the LVM the demo ships (lvm_jax/assets/lvm_demo/):
the same model on twelve times the tokens, 3000 steps of 32 sentences (~65 minutes on 2 cores), on
the large store of configs/dataset_demo.py:large, whose train windows come from made-up textured
scenes and the pictures' rotations and mirrors too: on 8 pictures a long run learns the pictures
by heart instead of copying from the prompt. Batch 32 rather than 8 because copying a moving
picture appears only after a plateau that small batches do not leave (bench/copy_probe.py).

`:continued` is the second stage of the shipped LVM's training: `:long`'s model (its workdir,
/tmp/lvm_demo/long) trained 1500 more steps from a peak learning rate of 1e-3, on the same store
in another order (~30 minutes). With the position-norm tokenizer it raised 9 of the 11 demo
tasks' scores (moving crop 12.3 -> 12.6 dB, moving digit 18.0 -> 18.7; inpainting 14.1 -> 14.0)
and the median held-out perplexity went 4.4 -> 4.3.

`:focused` is the last stage, run three times (each later run from the one before's workdir,
with --config.data.seed=3, then 4): `:continued`'s model trained 1500 more steps with no loss on each
sentence's first image (data.loss_from_image=1). Nothing before a sentence's first image
predicts it, and prompting always gives it, so the small model's capacity goes to the images that
follow from context. Its first 1500 steps passed flip (11.0 -> 11.5 dB against 11.0 for copying)
and raised zooming crop 13.9 -> 14.3 and colorization 0.063 -> 0.050 MSE; the third raised
inpainting 14.27 -> 14.56 dB (against 14.26 for the mean-colour fill) and zooming 14.7 -> 15.1.
A fourth (seed 5) gave some back (inpainting 14.36), so the demo ships the third.
"""

from lvm_jax import config as config_lib
from lvm_jax.config import lvm_config

LONG_STEPS = 3_000


def get_config(arg=None):
  if arg not in (None, "", "long", "continued", "focused"):
    raise ValueError(f"configs/lvm_demo.py: unknown arg {arg!r} (expected 'long', 'continued', 'focused' or nothing)")
  c = lvm_config(d_model=128, ffn=384, layers=4, heads=4)
  c.model.update(dtype="float32", remat="none", vocab_size=256)  # the tiny VQGAN's 256 codes
  c.seq_len, c.tokens_per_image = 256, 64
  c.global_batch, c.steps = 8, 1000
  c.optim.update(lr=3e-3, end_lr=3e-4, warmup=20)
  c.data.mixture.main.update(path="/tmp/lvm_demo/store", dataset="*_train")  # held_out is for evaluation
  c.data.threads = 2
  c.log_every, c.ckpt_every = 50, 500
  # Held-out answer perplexity of every task and labeled sample grids, three times a run.
  c.eval_every, c.sample_every = 500, 500
  c.eval_data.update(per_task=16, samples=4)
  if arg in ("long", "continued", "focused"):
    c.global_batch, c.steps = 32, LONG_STEPS
    c.optim.update(end_lr=1e-4, warmup=100)
    c.data.mixture.main.path = "/tmp/lvm_demo/store_large"
    c.vqgan = dict(config_lib.load_file("dataset_demo").vqgan)  # the shipped tokenizer: samples decode with it
    c.ckpt_every, c.eval_every, c.sample_every = 500, 500, LONG_STEPS
  if arg in ("continued", "focused"):
    c.init_from = "/tmp/lvm_demo/long"  # :long's workdir, at its last step
    c.optim.lr, c.data.seed, c.steps = 1e-3, 1, LONG_STEPS // 2
  if arg == "focused":
    c.init_from, c.data.seed = "/tmp/lvm_demo/continued", 2
    c.data.loss_from_image = 1
  return c
