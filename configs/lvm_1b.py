"""LVM 1B (1.15B parameters): d_model 2048, ffn 5504, 22 layers, 16 heads.

The vqlm_1b size of the LVM release, trained on visual sentences of 16 images x 256 tokens.

  python -m lvm_jax.compile --config configs/lvm_1b.py --topology v5p-64   # memory check, no TPU
  bash launch/tpu_pod.sh NAME v5p-64 configs/lvm_1b.py gs://BUCKET/lvm_1b

Expect the loss to fall fastest in the first few thousand steps (warmup 2000) and the learning
rate to follow warmup + cosine from 1.5e-4 to 3e-5 over `steps` optimizer updates.
"""

from lvm_jax.config import lvm_config


def get_config(arg=None):
  del arg
  c = lvm_config(d_model=2048, ffn=5504, layers=22, heads=16)
  c.global_batch = 128
  return c
