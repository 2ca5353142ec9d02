"""A tiny VQGAN for CPUs, tests and the demo: 32x32 images, f4 -> 8x8 = 64 tokens, 256 codes.

  python -m lvm_jax.train_vqgan --config configs/vqgan_tiny.py --workdir /tmp/vqgan_tiny

Trains on random crops of scikit-image's built-in pictures, about 2.5 minutes on 2 CPU cores. The
held-out PSNR of the EMA model (metrics.jsonl, "psnr") rises to ~15 dB by step 400: above the
12.5 dB of painting each crop its mean colour, still below the 18.9 dB of an 8x8 box filter (the
same 8x8 grid as the tokens): a longer run is needed for a useful tokenizer. `:test` shortens it.
"""

from lvm_jax.config import vqgan_config


def get_config(arg=None):
  # 8-dim l2-normalised codes (LlamaGen) use more of the codebook than 16-dim raw ones here.
  c = vqgan_config(dict(hidden=32, channel_mult=(1, 2, 2), encoder_blocks=2, z_channels=8,
                        codes=256, groups=8, mid_attention=False, attn_levels=(), downsample="conv", beta=0.25, l2_codes=True, entropy_weight=0.0,
                        entropy_temperature=0.01, dtype="float32"), 32)
  c.global_batch = 16
  c.steps = 400
  c.lr, c.gan.lr = 1e-3, 1e-4
  c.ema = 0.99  # a short run: the EMA must follow within ~100 steps
  c.gan.start, c.gan.width, c.gan.layers = 300, 16, 2
  c.data.shrink = 4
  c.log_every, c.eval_every, c.ckpt_every = 20, 100, 200
  c.sample_every = 100  # labeled original | reconstruction grids in TensorBoard
  if arg == "test":
    c.steps, c.gan.start = 160, 120
    c.log_every, c.eval_every, c.ckpt_every = 20, 80, 80
    c.sample_every = 80
  elif arg:
    raise ValueError(f"configs/vqgan_tiny.py: unknown arg {arg!r} (expected 'test' or nothing)")
  return c
