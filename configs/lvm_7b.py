"""LVM 7B (6.54B parameters): d_model 4096, ffn 11008, 32 layers, 32 heads.

The vqlm_7b size of the LVM release, trained on visual sentences of 16 images x 256 tokens.

  python -m lvm_jax.compile --config configs/lvm_7b.py --topology v5p-128   # memory check, no TPU
  bash launch/tpu_pod.sh NAME v5p-128 configs/lvm_7b.py gs://BUCKET/lvm_7b

Expect the loss to fall fastest in the first few thousand steps (warmup 2000) and the learning
rate to follow warmup + cosine from 1.5e-4 to 3e-5 over `steps` optimizer updates.
"""

from lvm_jax.config import lvm_config


def get_config(arg=None):
  del arg
  c = lvm_config(d_model=4096, ffn=11008, layers=32, heads=32)
  c.global_batch = 128
  return c
