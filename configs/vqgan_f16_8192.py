"""The LVM tokenizer: amused / open-muse VQGAN, f16, 8192 codes of dim 64, 256x256 -> 16x16 tokens.

146.2M parameters; the released weights (diffusers VQModel layout, e.g. amused's `vae/`) load
with lvm_jax.convert.vqgan_torch.load_safetensors(path, vqgan.Config(**config.model)).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model_name = "vqgan"
  c.model = dict(hidden=128, channel_mult=(1, 2, 2, 4, 6), encoder_blocks=2, z_channels=64,
                 codes=8192, groups=32, beta=0.25, l2_codes=False, dtype="bfloat16")
  c.image_size = 256
  return c
