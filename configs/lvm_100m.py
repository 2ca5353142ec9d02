"""LVM 100M (117M parameters): d_model 640, ffn 1664, 22 layers, 10 heads.

The vqlm_100m size of the LVM release, trained on visual sentences of 16 images x 256 tokens.

  python -m lvm_jax.compile --config configs/lvm_100m.py --topology v5p-16   # memory check, no TPU
  bash launch/tpu_pod.sh NAME v5p-16 configs/lvm_100m.py gs://BUCKET/lvm_100m

Expect the loss to fall fastest in the first few thousand steps (warmup 2000) and the learning
rate to follow warmup + cosine from 1.5e-4 to 3e-5 over `steps` optimizer updates.
"""

from lvm_jax.config import lvm_config


def get_config(arg=None):
  del arg
  c = lvm_config(d_model=640, ffn=1664, layers=22, heads=10)
  c.global_batch = 32
  return c
