"""Scaling ladder of the LVM release's sizes on a TPU slice: 100M, 300M, 600M and 1B on one
token store, each trained on the same 10.5B tokens (20k steps of 128 x 4096), held-out loss
against parameters and training FLOPs with fitted power laws.

  python -m lvm_jax.compile --config lvm_1b --topology v5p-64   # memory check: the largest rung fits
  # then on every worker of the v5p-64 slice (they join through jax.distributed by themselves):
  python -m lvm_jax.scaling --config scaling_lvm --workdir gs://BUCKET/scaling --store gs://BUCKET/lvm_store

launch/tpu_pod.sh installs lvm_jax on every worker but starts lvm_jax.train; start the ladder
the same way, e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd lvm_jax &&
.venv/bin/python -m lvm_jax.scaling ...'`. The store needs a train and a held-out part of each
dataset, named <name>_train and <name>_held_out as in configs/dataset_demo.py, or point
--config.train.data.mixture.main.dataset and --config.train.eval_data.dataset elsewhere. The mesh
is lvm_config's (FSDP over every chip), so the file runs on any slice whose chips divide the
batch. Expect the held-out loss to fall with size, and scaling.png / .md / .json in the workdir
at the end; every rung checkpoints, so a preempted ladder resumes with the same command.
"""

import ml_collections

from lvm_jax.config import lvm_config

# The release trains every size at 1.5e-4; across a ladder, lr ~ 1/d_model (Adam moves each
# weight by about lr, so a matrix's output by about lr x d_model) anchored at the release's 1B:
# 3e-4 at d_model 1024, as GPT-3 used, and a little below its 2.5e-4 and 2e-4 at 1536 and 2048.
BASE_LR, BASE_WIDTH = 1.5e-4, 2048


def rung(name: str, d_model: int, ffn: int, layers: int, heads: int) -> dict:
  lr = BASE_LR * BASE_WIDTH / d_model
  return dict(name=name, model=dict(d_model=d_model, ffn=ffn, layers=layers, heads=heads),
              optim=dict(lr=lr, end_lr=lr / 5))  # the release's 1.5e-4 -> 3e-5


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  t = lvm_config(d_model=BASE_WIDTH, ffn=5504, layers=22, heads=16)  # the recipe of configs/lvm_*.py
  t.global_batch, t.steps = 128, 20_000  # 0.52M tokens a step; the budget every rung shares
  t.data.mixture.main.update(path="", dataset="*_train")  # --store gs://BUCKET/lvm_store
  t.eval_every, t.sample_every = 0, 0  # scored once, at the end, by lvm_jax.scaling
  t.eval_data.update(dataset="*_held_out", per_task=256)
  t.ckpt_every = 1000
  c.train = t
  c.rungs = (
      rung("100m", 640, 1664, 22, 10),  # configs/lvm_100m.py
      rung("300m", 1024, 2688, 22, 8),  # configs/lvm_300m.py
      rung("600m", 1536, 4096, 22, 16),  # configs/lvm_600m.py
      rung("1b", 2048, 5504, 22, 16),  # configs/lvm_1b.py
  )
  return c
