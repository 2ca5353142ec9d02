"""A tiny VQGAN for CPUs, tests and the demo: 32x32 images, f4 -> 8x8 = 64 tokens, 256 codes.

Same network family as configs/vqgan_f16_8192.py with three levels of 32/64/64 channels.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model_name = "vqgan"
  c.model = dict(hidden=32, channel_mult=(1, 2, 2), encoder_blocks=2, z_channels=16,
                 codes=256, groups=8, beta=0.25, l2_codes=False, dtype="float32")
  c.image_size = 32
  return c
