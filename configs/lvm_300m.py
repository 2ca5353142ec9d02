"""LVM 300M (291M parameters): d_model 1024, ffn 2688, 22 layers, 8 heads.

The vqlm_300m size of the LVM release, trained on visual sentences of 16 images x 256 tokens.

  python -m lvm_jax.compile --config configs/lvm_300m.py --topology v5p-32   # memory check, no TPU
  bash launch/tpu_pod.sh NAME v5p-32 configs/lvm_300m.py gs://BUCKET/lvm_300m

Expect the loss to fall fastest in the first few thousand steps (warmup 2000) and the learning
rate to follow warmup + cosine from 1.5e-4 to 3e-5 over `steps` optimizer updates.
"""

from lvm_jax.config import lvm_config


def get_config(arg=None):
  del arg
  c = lvm_config(d_model=1024, ffn=2688, layers=22, heads=8)
  c.global_batch = 64
  return c
