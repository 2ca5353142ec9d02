"""AIM-600M (v1): width 1536, 24 blocks, 12 heads of 128, patch 14 at 224; 0.68B trunk parameters.

  python -m lvm_jax.compile --config configs/aim_600m.py --topology v5p-128    # memory check, no TPU
  bash launch/tpu_pod.sh NAME v5p-128 configs/aim_600m.py gs://BUCKET/aim_600m \\
      --config.data.source.root=gs://BUCKET/imagenet/train    # or a local folder on every host

The recipe is config.aim_config's (ml-l3m's AIM v1). Expect the normalized-pixel loss of the
next patch to fall fastest in the first few thousand steps.
"""

from lvm_jax.config import aim_config


def get_config(arg=None):
  del arg
  return aim_config(width=1536, depth=24, heads=12)
