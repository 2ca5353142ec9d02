"""The LVM tokenizer: amused / open-muse VQGAN, f16, 8192 codes of dim 64, 256x256 -> 16x16 tokens.

146.2M parameters. The released weights (diffusers VQModel or open-muse layout) load with
lvm_jax.convert.vqgan_torch.load_safetensors(path, vqgan.Config(**config.model)). Training a new
one (needs an LPIPS weights file, see lvm_jax/convert/lpips_weights.py):

  python -m lvm_jax.train_vqgan --config configs/vqgan_f16_8192.py --workdir gs://BUCKET/vqgan \\
      --config.lpips_weights=/path/lpips_vgg16.safetensors
"""

from lvm_jax.config import vqgan_config


def get_config(arg=None):
  del arg
  return vqgan_config(dict(hidden=128, channel_mult=(1, 2, 2, 4, 6), encoder_blocks=2, z_channels=64,
                           codes=8192, groups=32, mid_attention=False, attn_levels=(), downsample="conv", beta=0.25, l2_codes=False, entropy_weight=0.0,
                           entropy_temperature=0.01, dtype="bfloat16"), 256)
