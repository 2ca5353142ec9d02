"""VQGAN image tokenizer in Flax NNX, by default the f16 / 8192-code amused (open-muse) network.

Dimension letters: B batch, H W image size, h w token grid, C channels, D code dim, K codes.

The default `Config` is the tokenizer the released LVM checkpoints were trained on (open-muse
`VQGANModel`, = diffusers `VQModel` of amused): hidden 128, channel_mult (1, 2, 2, 4, 6), 2 res
blocks per encoder level and 3 per decoder level, no attention, z/code dim 64, 8192 codes,
GroupNorm(32, eps 1e-6) + SiLU, pad (0,1,0,1) + 3x3 stride-2 VALID downsampling, nearest x2 +
3x3 upsampling, inputs in [0, 1], outputs clamped to [0, 1]. Names follow diffusers' `VQModel`
(encoder.down_blocks.0.resnets.1.conv1, ...): convert/vqgan_torch.py is a rename and transpose
table. Taming's shape (attention inside chosen levels and the mid blocks) and MaskGIT's
parameter-free average-pool downsampling are options of the same `Config`.

The codes are looked up by models/quantizer.py (nearest code in fp32, straight-through).
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvm_jax.config import ConfigError, check
from lvm_jax.models import quantizer


@dataclasses.dataclass(frozen=True)
class Config:
  hidden: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
  encoder_blocks: int = 2  # res blocks per encoder level; the decoder has one more
  z_channels: int = 64  # = code dim (amused has no separate quantized_embed_dim)
  codes: int = 8192
  groups: int = 32  # GroupNorm groups
  # "group": a group's statistics over the whole image (diffusers); "position": over the group's
  # channels at each position alone, so a code depends on nothing outside its receptive field.
  norm: str = "group"
  mid_attention: bool = False  # a self-attention block inside each mid block (taming; amused has none)
  # Levels (0 = full resolution) whose res blocks are each followed by self-attention; taming's
  # f16 ImageNet model has attn_resolutions=[16] at 256px, i.e. attn_levels=(4,).
  attn_levels: tuple[int, ...] = ()
  downsample: str = "conv"  # "conv": pad (0,1,0,1) + 3x3 stride 2 (taming); "avgpool": 2x2 (MaskGIT)
  beta: float = 0.25  # commitment weight, on the encoder term (taming's "legacy" placement is a bug)
  l2_codes: bool = False  # l2-normalise latents and codes before the lookup (ViT-VQGAN)
  entropy_weight: float = 0.0  # MaskGIT's codebook entropy loss (0.1 there), 0 = off
  entropy_temperature: float = 0.01
  dtype: str = "float32"  # backbone compute dtype; params and the quantizer stay fp32

  def __post_init__(self):
    levels = len(self.channel_mult)
    if not set(self.attn_levels) <= set(range(levels)):
      raise ConfigError(f"model.attn_levels={self.attn_levels}: levels are 0..{levels - 1}")
    for name, allowed in (("downsample", ("conv", "avgpool")), ("norm", ("group", "position"))):
      check(getattr(self, name) in allowed, f"model.{name}={getattr(self, name)!r}: expected {'|'.join(allowed)}")
    if self.hidden % self.groups or self.z_channels < 1 or self.codes < 2:
      raise ConfigError(f"model: hidden={self.hidden} must be a multiple of groups={self.groups}, "
                        f"z_channels >= 1 (got {self.z_channels}), codes >= 2 (got {self.codes})")

  @property
  def channels(self) -> tuple[int, ...]:
    return tuple(self.hidden * m for m in self.channel_mult)

  @property
  def factor(self) -> int:
    """Downsampling factor: one halving between consecutive levels."""
    return 2 ** (len(self.channel_mult) - 1)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype: str, stride: int = 1,
          padding: str | tuple = "SAME") -> nnx.Conv:
  pad = ((k // 2, k // 2),) * 2 if padding == "SAME" else padding
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, dtype=jnp.dtype(dtype),
                  rngs=rngs)


class GroupNorm(nnx.GroupNorm):
  """nnx.GroupNorm (same parameters: scale, bias) with accurate fp32 statistics.

  nnx.GroupNorm's default variance E[x^2] - E[x]^2 cancels where an activation's mean is large
  against its spread, and at batch >= 4 XLA:CPU sums a group's H*W*C/G elements in one fp32 run
  whose error grows with their count (2e-5 on a mean of 3 over 256x256x4, 100x its batch-1
  error); the fast variance magnifies that: the amused network's latents of six real pictures in
  one batch were 3e-4 from diffusers' in float64 (1.2e-4 with flax's exact variance, 6e-6 here).
  Here (`_image_moments`) the sums run over x less a shift near the group's mean, which takes the
  cancellation away, each row first and then the rows, which keeps every partial sum short; both
  sums come from one read of x. Config.norm "position" takes the statistics at each position
  alone (with groups=1, a LayerNorm over channels, as in ConvNeXt).
  """

  def __init__(self, ch: int, cfg: Config, rngs: nnx.Rngs):
    super().__init__(ch, num_groups=cfg.groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs)
    self.per_position = cfg.norm == "position"

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    x_BHWGc = x_BHWC.astype(jnp.float32).reshape(B, H, W, self.num_groups, C // self.num_groups)
    if self.per_position:
      mean = jnp.mean(x_BHWGc, axis=4, keepdims=True)
      var = jnp.mean(jnp.square(x_BHWGc - mean), axis=4, keepdims=True)
    else:
      mean, var = _image_moments(x_BHWGc)
    y_BHWC = ((x_BHWGc - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(B, H, W, C)
    return y_BHWC * self.scale[...].reshape(1, 1, 1, C) + self.bias[...].reshape(1, 1, 1, C)


def _image_moments(x_BHWGc: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each image's group mean and variance [B, 1, 1, G, 1] from one pass over x, where the mean
  and then the squared deviations from it take two (on a GPU, one reduction kernel for both sums).

  The shift s is the group's mean over a grid of about 8x8 positions (a read too small to count),
  so |E[x] - s| is a small share of the spread and E[(x-s)^2] - E[x-s]^2 cancels nothing of note
  (a constant group gives exactly 0). Sums run per row, then over the rows: short fp32 runs.
  """
  B, H, W, G, c = x_BHWGc.shape
  # The grid is sliced from x as [B, H, W, C]: a slice of the 5-d view costs a TPU a relayout of x.
  grid_BhwC = x_BHWGc.reshape(B, H, W, G * c)[:, ::max(H // 8, 1), ::max(W // 8, 1)]
  # The moments do not depend on s (its derivatives cancel): no gradient, so no scatter into x's.
  shift_B11G1 = jax.lax.stop_gradient(jnp.mean(grid_BhwC.reshape(B, *grid_BhwC.shape[1:3], G, c), axis=(1, 2, 4),
                                               keepdims=True))
  d_BHWGc = x_BHWGc - shift_B11G1
  # A mean of row means: XLA merges a sum of row sums into one long fp32 run (10x the error).
  mean_of = lambda v: jnp.mean(jnp.mean(v, axis=(2, 4), keepdims=True), axis=1, keepdims=True)
  dmean_B11G1, dsquare_B11G1 = mean_of(d_BHWGc), mean_of(jnp.square(d_BHWGc))
  return shift_B11G1 + dmean_B11G1, jnp.maximum(dsquare_B11G1 - jnp.square(dmean_B11G1), 0.0)


class ResnetBlock(nnx.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus x (1x1 conv when channels change)."""

  def __init__(self, cin: int, cout: int, cfg: Config, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(cin, cfg, rngs)
    self.conv1 = _conv(cin, cout, 3, rngs, cfg.dtype)
    self.norm2 = GroupNorm(cout, cfg, rngs)
    self.conv2 = _conv(cout, cout, 3, rngs, cfg.dtype)
    self.conv_shortcut = _conv(cin, cout, 1, rngs, cfg.dtype) if cin != cout else None

  def __call__(self, x_BHWC: jax.Array, x_bias_C: Optional[jax.Array] = None) -> jax.Array:
    """x_bias_C: a bias per channel that x still lacks (an upsampler's, see Level), added where it
    costs no pass over x: inside norm1's fusions, and to the bias of the conv that carries the
    residual. (On a GPU, cuDNN's transposed conv takes no bias, and x + bias was a kernel of its
    own: 1.5 GB of the 25.6 that XLA's H200 compile moves for a decode of 8 images.)"""
    x_in = x_BHWC if x_bias_C is None else x_BHWC + x_bias_C.astype(x_BHWC.dtype).reshape(1, 1, 1, -1)
    h = jax.nn.silu(_norm(self.norm2, self.conv1(jax.nn.silu(_norm(self.norm1, x_in)))))
    if x_bias_C is None:
      skip = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
      return skip + self.conv2(h)
    if self.conv_shortcut is None:  # (x + b) + conv2(h): b joins conv2's bias
      return x_BHWC + _conv_with(self.conv2, h, bias=self.conv2.bias[...] + x_bias_C)
    # A 1x1 conv of x + b is the conv of x plus b @ W: b joins the shortcut's bias.
    w_CO = self.conv_shortcut.kernel[...].reshape(x_BHWC.shape[-1], -1).astype(jnp.float32)
    b_O = jnp.dot(x_bias_C.astype(jnp.float32), w_CO, precision=jax.lax.Precision.HIGHEST)
    skip = _conv_with(self.conv_shortcut, x_BHWC, bias=self.conv_shortcut.bias[...] + b_O)
    return skip + self.conv2(h)


def _norm(norm: GroupNorm, x: jax.Array) -> jax.Array:
  """GroupNorm statistics in fp32 (bf16 variances lose too much), output in the input dtype."""
  return norm(x.astype(jnp.float32)).astype(x.dtype)


class Resample(nnx.Module):
  """Downsample: pad right/bottom by one, 3x3 stride 2 VALID (or a parameter-free 2x2 average).
  Upsample: nearest x2, 3x3, computed without the x2 image (`_upsample_conv`)."""

  def __init__(self, ch: int, down: bool, cfg: Config, rngs: nnx.Rngs):
    self.down = down
    self.conv = None if down and cfg.downsample == "avgpool" else _conv(
        ch, ch, 3, rngs, cfg.dtype, stride=2 if down else 1, padding="VALID" if down else "SAME")

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    if self.down and self.conv is None:
      B, H, W, C = x_BHWC.shape
      return x_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    if self.down:
      return self.conv(jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0))))
    return _upsample_conv(self.conv, x_BHWC)


def _upsample_conv(conv: nnx.Conv, x_BhwC: jax.Array, with_bias: bool = True) -> jax.Array:
  """conv(nearest x2 of x) as a stride-2 transposed conv of x: the x2 image is never written.
  Without `with_bias`, the caller adds conv's bias (Level leaves it to the next ResnetBlock).

  Output row 2i+a sees x's rows i-1, i, i (a=0) or i, i, i+1 (a=1) through the 3x3 kernel's rows
  k0, k1, k2, so x's row i spreads to output rows 2i-1 .. 2i+2 with weights k2, k1+k2, k0+k1, k0;
  the same for columns. The merged 4x4 kernel is summed in fp32 before any rounding. A transposed
  conv costs 16 taps a small pixel where the conv of the x2 image costs 36: cuDNN runs it as a
  backward-data conv, a TPU's conv emitter with input dilation (XLA's counts: amused decoder
  3.77 -> 3.21 TFLOP for 8 images). A 2x2 conv with four outputs a channel and an interleave
  computes the same, 2x faster on a CPU, but XLA:TPU relayouts the interleave: 7.2 GB moved for
  the largest upsampler, against 1.8 here and 2.7 for the conv of the x2 image.
  """
  k_33CO = conv.kernel[...].astype(jnp.float32)
  spread = lambda k, ax: jnp.stack([k.take(2, ax), k.take(1, ax) + k.take(2, ax), k.take(0, ax) + k.take(1, ax),
                                    k.take(0, ax)], ax)
  dtype = conv.dtype or x_BhwC.dtype
  # conv_transpose's kernel is the strided conv's whose transpose this is: [4, 4, O, C].
  k_44OC = spread(spread(k_33CO, 0), 1).swapaxes(2, 3).astype(dtype)
  y_BHWO = jax.lax.conv_transpose(x_BhwC.astype(dtype), k_44OC, (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True,
                                  precision=conv.precision)
  return y_BHWO + conv.bias[...].astype(dtype).reshape(1, 1, 1, -1) if with_bias else y_BHWO


class Level(nnx.Module):
  """One resolution: res blocks (each followed by self-attention if `attend`), then a resampler."""

  def __init__(self, cin: int, cout: int, blocks: int, resample: Optional[str], attend: bool, cfg: Config,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs) for i in range(blocks)])
    if attend:  # diffusers' Attn{Down,Up}*Block2D
      self.attentions = nnx.List([AttnBlock(cout, cfg, rngs) for _ in range(blocks)])
    # Named as in diffusers: {down,up}samplers.0.conv; the last level has none.
    if resample == "down":
      self.downsamplers = nnx.List([Resample(cout, True, cfg, rngs)])
    elif resample == "up":
      self.upsamplers = nnx.List([Resample(cout, False, cfg, rngs)])

  def __call__(self, x: jax.Array, x_bias_C: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array]]:
    """x_bias_C: a bias that x still lacks, for the first block. Returns the output and the bias
    that it still lacks: an upsampler's, left to the next level's first block (ResnetBlock)."""
    for i, block in enumerate(self.resnets):
      x = block(x, x_bias_C if i == 0 else None)
      if hasattr(self, "attentions"):
        x = self.attentions[i](x)
    if hasattr(self, "upsamplers"):
      conv = self.upsamplers[0].conv
      return _upsample_conv(conv, x, with_bias=False), conv.bias[...]
    for sampler in getattr(self, "downsamplers", []):
      x = sampler(x)
    return x, None


def _through(levels: nnx.List, x: jax.Array) -> jax.Array:
  bias_C = None
  for level in levels:
    x, bias_C = level(x, bias_C)
  return x if bias_C is None else x + bias_C.astype(x.dtype).reshape(1, 1, 1, -1)


class AttnBlock(nnx.Module):
  """Single-head self-attention over the h*w positions, pre-GroupNorm, residual (diffusers names)."""

  def __init__(self, ch: int, cfg: Config, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(ch, cfg, rngs)
    dense = lambda: nnx.Linear(ch, ch, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
    self.to_q, self.to_k, self.to_v = dense(), dense(), dense()
    self.to_out = nnx.List([dense()])

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    h_BLC = _norm(self.group_norm, x_BHWC).reshape(B, H * W, C)
    q, k, v = self.to_q(h_BLC), self.to_k(h_BLC), self.to_v(h_BLC)
    logits_BLL = jnp.einsum("blc,bmc->blm", q, k, preferred_element_type=jnp.float32) * C**-0.5
    out_BLC = jnp.einsum("blm,bmc->blc", jax.nn.softmax(logits_BLL, axis=-1).astype(v.dtype), v)
    return x_BHWC + self.to_out[0](out_BLC).reshape(B, H, W, C)


class MidBlock(nnx.Module):
  """resnet -> (attention) -> resnet."""

  def __init__(self, ch: int, cfg: Config, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(ch, ch, cfg, rngs) for _ in range(2)])
    if cfg.mid_attention:
      self.attentions = nnx.List([AttnBlock(ch, cfg, rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if hasattr(self, "attentions"):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    ch = cfg.channels
    self.conv_in = _conv(3, ch[0], 3, rngs, cfg.dtype)
    self.down_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], ch[i], cfg.encoder_blocks, "down" if i < len(ch) - 1 else None,
              i in cfg.attn_levels, cfg, rngs)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], cfg, rngs)
    self.conv_norm_out = GroupNorm(ch[-1], cfg, rngs)
    self.conv_out = _conv(ch[-1], cfg.z_channels, 3, rngs, cfg.dtype)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    x = self.mid_block(_through(self.down_blocks, self.conv_in(x_BHWC)))
    return self.conv_out(jax.nn.silu(_norm(self.conv_norm_out, x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    ch = cfg.channels[::-1]  # deepest level first, as diffusers orders up_blocks
    self.conv_in = _conv(cfg.z_channels, ch[0], 3, rngs, cfg.dtype)
    self.mid_block = MidBlock(ch[0], cfg, rngs)
    self.up_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], ch[i], cfg.encoder_blocks + 1, "up" if i < len(ch) - 1 else None,
              len(ch) - 1 - i in cfg.attn_levels, cfg, rngs)
        for i in range(len(ch))])
    self.conv_norm_out = GroupNorm(ch[-1], cfg, rngs)
    self.conv_out = _conv(ch[-1], 3, 3, rngs, cfg.dtype)

  def __call__(self, z_BhwD: jax.Array) -> jax.Array:
    return self.conv_out(self.trunk(z_BhwD))

  def trunk(self, z_BhwD: jax.Array) -> jax.Array:
    """Everything before conv_out: the GAN's adaptive weight differentiates through conv_out only."""
    x = _through(self.up_blocks, self.mid_block(self.conv_in(z_BhwD)))
    return jax.nn.silu(_norm(self.conv_norm_out, x))


class Model(nnx.Module):
  """images [B, H, W, 3] in [0, 1] -> codes [B, h, w] -> images; see `__call__` for training."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.quant_conv = _conv(cfg.z_channels, cfg.z_channels, 1, rngs, cfg.dtype)
    limit = 1.0 / cfg.codes  # taming's codebook init: U(-1/K, 1/K)
    self.codebook = nnx.Param(jax.random.uniform(rngs.params(), (cfg.codes, cfg.z_channels),
                                                 jnp.float32, -limit, limit))
    self.post_quant_conv = _conv(cfg.z_channels, cfg.z_channels, 1, rngs, cfg.dtype)
    self.decoder = Decoder(cfg, rngs)

  def latents(self, images_BHWC: jax.Array) -> jax.Array:
    """Pre-quantization latents [B, h, w, D] in fp32."""
    x = images_BHWC.astype(jnp.dtype(self.cfg.dtype))
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def encode(self, images_BHWC: jax.Array) -> jax.Array:
    """Images in [0, 1] -> code ids [B, h, w] (int32)."""
    return quantizer.quantize(self.latents(images_BHWC), self.codebook[...], self.cfg.l2_codes)[0]

  def decode(self, ids_Bhw: jax.Array) -> jax.Array:
    """Code ids [B, h, w] -> images in [0, 1] (fp32)."""
    return self._decode_latents(quantizer.lookup(ids_Bhw, self.codebook[...], self.cfg.l2_codes))

  def _decode_latents(self, z_BhwD: jax.Array) -> jax.Array:
    x = self.post_quant_conv(z_BhwD.astype(jnp.dtype(self.cfg.dtype)))
    return jnp.clip(self.decoder(x).astype(jnp.float32), 0.0, 1.0)

  def __call__(self, images_BHWC: jax.Array) -> tuple[jax.Array, dict]:
    """Training pass: the decoder's features before conv_out (see Decoder.trunk), and the
    quantizer's losses, ids and input latents. Reconstruction = self.decoder.conv_out(features)."""
    z = self.latents(images_BHWC)
    ids, zq, aux = quantizer.quantize(z, self.codebook[...], self.cfg.l2_codes, self.cfg.beta,
                                      self.cfg.entropy_temperature if self.cfg.entropy_weight else 0.0)
    if self.cfg.entropy_weight:
      aux["entropy_loss"] = self.cfg.entropy_weight * aux["entropy_loss"]
    x = self.post_quant_conv(zq.astype(jnp.dtype(self.cfg.dtype)))
    return self.decoder.trunk(x), {**aux, "ids": ids, "latents": z}


def _conv_with(conv: nnx.Conv, x: jax.Array, kernel: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None) -> jax.Array:
  """`conv` applied with another kernel (the adaptive weight differentiates w.r.t. it) or bias
  (ResnetBlock's x_bias_C); one conv and one bias add, which cuDNN runs as one kernel."""
  dtype = conv.dtype or x.dtype
  kernel, bias = conv.kernel[...] if kernel is None else kernel, conv.bias[...] if bias is None else bias
  y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), conv.strides, conv.padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=conv.precision)
  return y + bias.astype(dtype).reshape(1, 1, 1, -1)


# ------------------------ the family's contract: models/transformer.py's names; its own trainer (train_vqgan.py)

WEIGHTS = "ema"  # the checkpoint item holding the weights to run: the generator's EMA (load.py)
EVALUATION = "reconstruction"  # evaluate.py's report: tokenizer_report.py's, on held-out pictures


def inference(cfg: Config) -> Config:
  """Trained weights run with the config they were trained with."""
  return cfg


def batch_spec(c: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch: uint8 RGB crops (data/images.py)."""
  return {"images": jax.ShapeDtypeStruct((c.global_batch, c.image_size, c.image_size, 3), jnp.uint8)}


def loss(model: Model, batch: dict, *, gan_loss: Callable[[jax.Array], jax.Array], gan_weight: jax.Array,
         perceptual: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
         perceptual_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """Generator objective: L1 + perceptual + codebook + commitment (+ entropy) + an adaptively
  weighted GAN term, and its parts (with the reconstruction and ids, for the caller).

  taming's adaptive weight |grad nll| / |grad gan| at the decoder's last layer keeps the GAN term
  from swamping reconstruction whatever the two losses' scales; `gan_weight` (0 before the
  discriminator starts) scales it. `gan_loss(recon)` is the critic's generator loss.
  """
  images = batch["images"].astype(jnp.float32) / 255.0
  feats, aux = model(images)
  conv_out = model.decoder.conv_out

  def nll_and_gan(kernel: jax.Array, feats: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    recon = _conv_with(conv_out, feats, kernel).astype(jnp.float32)
    nll = jnp.mean(jnp.abs(images - recon))
    if perceptual is not None:
      nll = nll + perceptual_weight * jnp.mean(perceptual(recon, images))
    return nll, gan_loss(recon), recon

  kernel = conv_out.kernel[...]
  nll, gan, recon = nll_and_gan(kernel, feats)
  fixed = jax.lax.stop_gradient(feats)  # the weight is a constant of the step
  g_nll = jax.grad(lambda k: nll_and_gan(k, fixed)[0])(kernel)
  g_gan = jax.grad(lambda k: nll_and_gan(k, fixed)[1])(kernel)
  weight = jnp.clip(optax.tree.norm(g_nll) / (optax.tree.norm(g_gan) + 1e-4), 0.0, 1e4)
  weight = jax.lax.stop_gradient(weight * gan_weight)
  total = nll + weight * gan + aux["codebook_loss"] + aux["commitment_loss"] + aux.get("entropy_loss", 0.0)
  return total, {"nll": nll, "gan_g": gan, "gan_weight": weight, "recon": recon, **aux}


def shift_loss(model: Model, images_BHWC: jax.Array, shift_yx: jax.Array,
               z_BhwD: Optional[jax.Array] = None) -> jax.Array:
  """Mean squared distance of the latents of images rolled by shift_yx tokens from their latents
  (z_BhwD, if the caller has them) rolled alike, over tokens that did not wrap (unit sphere with
  l2_codes). Codes that follow a shift give a moving scene tokens an LVM can copy from its prompt."""
  z_BhwD = model.latents(images_BHWC) if z_BhwD is None else z_BhwD
  z2_BhwD = model.latents(jnp.roll(images_BHWC, shift_yx * model.cfg.factor, axis=(1, 2)))
  if model.cfg.l2_codes:
    z_BhwD, z2_BhwD = quantizer.l2_normalize(z_BhwD), quantizer.l2_normalize(z2_BhwD)
  h, w = z_BhwD.shape[1:3]
  rows, cols = jnp.arange(h) - shift_yx[0], jnp.arange(w) - shift_yx[1]  # where each token came from
  kept_hw = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
  d_Bhw = jnp.sum(jnp.square(jnp.roll(z_BhwD, shift_yx, axis=(1, 2)) - z2_BhwD), axis=-1)
  return jnp.sum(d_Bhw * kept_hw[None]) / (jnp.sum(kept_hw) * d_Bhw.shape[0])


def flops_per_step(c: Any) -> float:
  """Model FLOPs of one update, from XLA's count of the generator's forward (x3 for the backward):
  a convnet has no scan, so the compiler's count is exact; the critic and LPIPS are not counted."""
  cfg = Config(**c.model)
  model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((c.global_batch, c.image_size, c.image_size, 3), jnp.float32)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images)
  return 3.0 * float(forward.cost_analysis()["flops"])


def validate(c: Any) -> None:
  cfg = Config(**c.model)  # its own checks (levels, groups, codes) raise ConfigError
  check(c.image_size % cfg.factor == 0,
        f"image_size={c.image_size} is not a multiple of the downsampling factor {cfg.factor}")
  check(0.0 <= c.ema < 1.0, f"ema={c.ema}: expected a decay in [0, 1)")
  check(c.gan.start >= 0 and c.gan.weight >= 0, f"gan.start={c.gan.start} and gan.weight={c.gan.weight} must be >= 0")
  shifts = [tuple(p) for p in c.get("shift_weights", ())]
  check(all(len(p) == 2 and min(p) >= 0 for p in shifts) and shifts == sorted(shifts),
        f"shift_weights={shifts}: expected (from_step, weight) pairs, both >= 0, in step order")
