"""The demo's tokenizer: the tiny VQGAN trained on the frames of the demo's own train sentences.

  python -m lvm_jax.train_vqgan --config configs/vqgan_demo.py --workdir /tmp/vqgan_demo

32x32 images, f4 -> 8x8 = 64 tokens, 256 codes, like configs/vqgan_tiny.py, but trained on every
demo task's train frames (crops of pictures, digits, edge and palette maps, grey and masked
pictures) rather than on natural pictures alone: the LVM reads those frames, and a tokenizer that
has never seen a palette map loses it. No GAN and no LPIPS: the demo scores answers by PSNR, MSE
and mIoU, which a critic's texture trades away. `norm="position"` (groups=1: a LayerNorm over each
position's channels) rather than GroupNorm over the image: a code then depends on the pixels near
it, not on statistics of the whole image, so the kept part of a masked picture, a mirrored or a
moved one keeps its codes for an LVM to copy (with GroupNorm's image-wide statistics a kept
inpainting patch had the answer's code 56% of the time, now 79%; 97% away from the holes; a
flip's codes are the mirrored query's 38% -> 62%). After 1200 steps of reconstruction the shift
loss (models/vqgan.py shift_loss: weight 0.2, then 1.0 from step 1700) makes the codes follow a
shift by whole tokens: the tokenizer report's shift consistency is 0.86 (0.76 with GroupNorm), at
20.8 dB PSNR. About 20 minutes on 2 CPU cores. `:test` shortens it.
"""

from lvm_jax.config import vqgan_config


def get_config(arg=None):
  c = vqgan_config(dict(hidden=32, channel_mult=(1, 2, 2), encoder_blocks=2, z_channels=8, codes=256, groups=1,
                        norm="position", mid_attention=False, attn_levels=(), downsample="conv", beta=0.25,
                        l2_codes=True, entropy_weight=0.0, entropy_temperature=0.01, dtype="float32"), 32)
  c.data = dict(name="demo", per_task=512)  # lvm_jax/data/demo.py: the train split's 4-image sentences
  c.global_batch = 16
  c.steps = 2000
  c.shift_weights = ((1200, 0.2), (1700, 1.0))
  c.lr = 1e-3
  c.ema = 0.99
  c.gan.start, c.gan.width, c.gan.layers = c.steps + 1, 16, 2  # never (see the docstring): the smallest critic
  c.perceptual_weight = 0.0
  c.log_every, c.eval_every, c.ckpt_every, c.sample_every = 50, 300, 300, 300
  if arg == "test":
    c.data.per_task, c.steps, c.gan.start, c.shift_weights = 4, 40, 41, ((20, 0.2), (30, 1.0))
    c.log_every, c.eval_every, c.ckpt_every, c.sample_every = 10, 20, 20, 20
  elif arg:
    raise ValueError(f"configs/vqgan_demo.py: unknown arg {arg!r} (expected 'test' or nothing)")
  return c
