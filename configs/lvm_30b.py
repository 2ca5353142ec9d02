"""LVM 30B (32.2B parameters): d_model 6656, ffn 17920, 60 layers, 52 heads.

The vqlm_30b size of the LVM release, trained on visual sentences of 16 images x 256 tokens.

  python -m lvm_jax.compile --config configs/lvm_30b.py --topology v5p-256   # memory check, no TPU
  bash launch/tpu_pod.sh NAME v5p-256 configs/lvm_30b.py gs://BUCKET/lvm_30b

Expect the loss to fall fastest in the first few thousand steps (warmup 2000) and the learning
rate to follow warmup + cosine from 1.5e-4 to 3e-5 over `steps` optimizer updates.
"""

from lvm_jax.config import lvm_config


def get_config(arg=None):
  del arg
  c = lvm_config(d_model=6656, ffn=17920, layers=60, heads=52)
  c.global_batch = 128
  return c
