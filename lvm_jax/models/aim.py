"""AIM v1 (El-Nouby et al. 2024): a ViT trained to predict the next patch's normalized pixels.

Dimension letters: B batch, N patches, D width, P patch pixels (p * p * 3), N_L layers.

Trunk as the released AIM v1: patch 14 at 224 (a conv with bias), LayerNorm on the patch
tokens, fixed 2D sin-cos positions (the first D/2 channels encode the column, as ml-aim's
meshgrid "xy" quirk does, so its weights load), pre-norm blocks with exact GELU and no biases
in the attention and MLP linears, LayerNorm after the last block (eps 1e-6), no cls token.
Pretraining attends prefix-causally: query i sees key j if j <= i or j < prefix[b]; evaluation
attends bidirectionally. Blocks are stacked on a leading axis under `lax.scan`, like the LVM's.

The MLP head (12 residual MLP blocks at 2048 / 8192 by default) maps the normed trunk output,
plus its own sin-cos positions, to the pixels of the next patch. Its blocks are plain
x + MLP(LN(x)): ml-l3m's decoder blocks also add LN(x) through an identity "attention", a quirk
of reusing its transformer block that the paper does not describe; it is not copied here.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvm_jax.config import check
from lvm_jax.kernels import attention as attention_lib


@dataclasses.dataclass(frozen=True)
class Config:
  width: int = 1536
  depth: int = 24
  heads: int = 12
  patch: int = 14
  image_size: int = 224
  mlp_ratio: int = 4
  head_width: int = 2048
  head_depth: int = 12
  head_mlp: int = 8192
  norm_eps: float = 1e-6
  dtype: str = "float32"
  attention: str = "xla"

  @property
  def patches(self) -> int:
    return (self.image_size // self.patch) ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch * self.patch * 3


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """[grid * grid, dim] fixed positions in raster order: the first dim/2 channels encode the
  column, the rest the row, each half sin then cos over dim/4 frequencies (MAE / ml-aim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  embed = lambda pos: np.concatenate([np.sin(pos.reshape(-1, 1) * omega), np.cos(pos.reshape(-1, 1) * omega)], 1)
  return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def patchify(images_BHWC: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, 3] -> [B, N, p * p * 3] in raster order, pixels (row, col, channel) within a patch."""
  B, H, W, C = images_BHWC.shape
  x = images_BHWC.reshape(B, H // patch, patch, W // patch, patch, C)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def _dense(din: int, dout: int, rngs: nnx.Rngs, bias: bool, dtype: str, axes: tuple = ("embed", "mlp")) -> nnx.Linear:
  """Logical `axes` as the LVM's params carry them (sharding.param_specs reads them)."""
  return nnx.Linear(din, dout, use_bias=bias, kernel_init=nnx.initializers.xavier_uniform(),
                    dtype=jnp.dtype(dtype), rngs=rngs, kernel_metadata={"axes": axes},
                    bias_metadata={"axes": axes[1:]})


def _norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs, scale_metadata={"axes": ("norm",)},
                       bias_metadata={"axes": ("norm",)})


class Block(nnx.Module):
  """Pre-norm ViT block: x + proj(attn(LN(x))), then x + fc2(gelu(fc1(LN(x)))), no biases."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    D = cfg.width
    self.norm_1 = _norm(D, cfg.norm_eps, rngs)
    self.qkv = _dense(D, 3 * D, rngs, False, cfg.dtype, ("embed", None))
    self.proj = _dense(D, D, rngs, False, cfg.dtype, (None, "embed"))
    self.norm_2 = _norm(D, cfg.norm_eps, rngs)
    self.fc1 = _dense(D, cfg.mlp_ratio * D, rngs, False, cfg.dtype, ("embed", "mlp"))
    self.fc2 = _dense(cfg.mlp_ratio * D, D, rngs, False, cfg.dtype, ("mlp", "embed"))

  def __call__(self, x_BND: jax.Array, heads: int, causal: bool, prefix_B: Optional[jax.Array], impl: str) -> jax.Array:
    B, N, D = x_BND.shape
    qkv = self.qkv(_ln(self.norm_1, x_BND)).reshape(B, N, 3, heads, D // heads)
    out = attention_lib.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=causal,
                                  prefix_len_B=prefix_B if causal else None, impl=impl)
    x_BND = x_BND + self.proj(out.reshape(B, N, D))
    return x_BND + self.fc2(jax.nn.gelu(self.fc1(_ln(self.norm_2, x_BND)), approximate=False))


def _ln(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
  """LayerNorm statistics in fp32 (as l3m's LayerNormFP32), output in the activation dtype."""
  return norm(x.astype(jnp.float32)).astype(x.dtype)


class Trunk(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.proj = nnx.Conv(3, cfg.width, (cfg.patch, cfg.patch), strides=(cfg.patch, cfg.patch), padding="VALID",
                         kernel_init=nnx.initializers.xavier_uniform(), dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                         kernel_metadata={"axes": (None, None, None, "embed")}, bias_metadata={"axes": ("embed",)})
    self.patch_norm = _norm(cfg.width, cfg.norm_eps, rngs)
    make = nnx.vmap(lambda r: Block(cfg, r), in_axes=0, out_axes=0)  # blocks stacked on a leading axis
    self.blocks = make(nnx.Rngs(params=jax.random.split(rngs.params(), cfg.depth)))
    self.post_trunk_norm = _norm(cfg.width, cfg.norm_eps, rngs)

  def __call__(self, images_BHWC: jax.Array, prefix_B: Optional[jax.Array] = None,
               layers: Optional[tuple[int, ...]] = None) -> tuple[jax.Array, Optional[jax.Array]]:
    """Normed trunk output [B, N, D] and, if `layers` is given, the mean of those blocks' raw
    outputs (the probe's features). prefix_B given: prefix-causal attention, else bidirectional."""
    cfg = self.cfg
    x = self.proj(images_BHWC.astype(jnp.dtype(cfg.dtype)))
    B, h, w, D = x.shape
    x = _ln(self.patch_norm, x.reshape(B, h * w, D)) + jnp.asarray(sincos_2d(h, D), x.dtype)[None]
    graphdef, stacked = nnx.split(self.blocks)
    keep = jnp.zeros((cfg.depth,), bool).at[jnp.asarray(layers or (), jnp.int32)].set(True)

    def body(carry, xs):
      x, feats = carry
      state, take = xs
      x = nnx.merge(graphdef, state)(x, cfg.heads, prefix_B is not None, prefix_B, cfg.attention)
      return (x, feats + jnp.where(take, x.astype(jnp.float32), 0.0)), None

    (x, feats), _ = jax.lax.scan(body, (x, jnp.zeros(x.shape, jnp.float32)), (stacked, keep))
    return _ln(self.post_trunk_norm, x), (feats / len(layers) if layers else None)


class HeadBlock(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.norm = _norm(cfg.head_width, cfg.norm_eps, rngs)
    self.fc1 = _dense(cfg.head_width, cfg.head_mlp, rngs, False, cfg.dtype, ("embed", "mlp"))
    self.fc2 = _dense(cfg.head_mlp, cfg.head_width, rngs, False, cfg.dtype, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.fc2(jax.nn.gelu(self.fc1(_ln(self.norm, x)), approximate=False))


class Head(nnx.Module):
  """Normed trunk tokens [B, N, D] -> predicted next-patch pixels [B, N, P]."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.proj_in = _dense(cfg.width, cfg.head_width, rngs, True, cfg.dtype, ("embed", None))
    self.blocks = nnx.List([HeadBlock(cfg, rngs) for _ in range(cfg.head_depth)])
    self.norm = _norm(cfg.head_width, cfg.norm_eps, rngs)
    # Scaled down as l3m's last layer (fan-in normal / (1 + depth)): the head starts near zero.
    self.proj_out = nnx.Linear(cfg.head_width, cfg.patch_dim, rngs=rngs, dtype=jnp.dtype(cfg.dtype),
                               kernel_init=nnx.initializers.variance_scaling(1.0 / (1 + cfg.head_depth) ** 2,
                                                                             "fan_in", "truncated_normal"),
                               kernel_metadata={"axes": ("embed", None)}, bias_metadata={"axes": (None,)})

  def __call__(self, x_BND: jax.Array) -> jax.Array:
    x = self.proj_in(x_BND)
    x = x + jnp.asarray(sincos_2d(int(round(x.shape[1] ** 0.5)), x.shape[-1]), x.dtype)[None]
    for block in self.blocks:
      x = block(x)
    return self.proj_out(_ln(self.norm, x)).astype(jnp.float32)


class Model(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Trunk(cfg, rngs)
    self.head = Head(cfg, rngs)

  def __call__(self, images_BHWC: jax.Array, prefix_B: jax.Array) -> jax.Array:
    """Pretraining forward: predictions [B, N, P] of each next patch, prefix-causal attention."""
    return self.head(self.trunk(images_BHWC, prefix_B)[0])


def normalized_targets(images_BHWC: jax.Array, patch: int, eps: float = 1e-6) -> jax.Array:
  """Each patch's pixels (row, col, channel) normalised by its own mean and unbiased variance."""
  t = patchify(images_BHWC.astype(jnp.float32), patch)
  mean = jnp.mean(t, axis=-1, keepdims=True)
  var = jnp.var(t, axis=-1, keepdims=True, ddof=1)
  return (t - mean) / jnp.sqrt(var + eps)


def loss_terms(pred_BNP: jax.Array, images_BHWC: jax.Array, prefix_B: jax.Array, patch: int) -> tuple:
  """(summed error, number of targets): the prediction at position i against patch i + 1,
  squared error averaged over pixels, for every non-prefix target (patch j >= prefix[b])."""
  target = normalized_targets(images_BHWC, patch)[:, 1:]
  err_BN = jnp.mean(jnp.square(pred_BNP[:, :-1] - target), axis=-1)
  is_target = (jnp.arange(1, target.shape[1] + 1)[None] >= prefix_B[:, None]).astype(jnp.float32)
  return jnp.sum(err_BN * is_target), jnp.sum(is_target)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images_BHWC: jax.Array) -> jax.Array:
  """uint8 images -> ImageNet-normalised floats, the trunk's input and the targets' source."""
  x = images_BHWC.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)[None, None, None]) / jnp.asarray(IMAGENET_STD)[None, None, None]


def sample_prefix(key: jax.Array, batch: int, patches: int) -> jax.Array:
  """Prefix lengths drawn uniformly from [1, N - 1] per image."""
  return jax.random.randint(key, (batch,), 1, patches)


# ---------------------------------------------------------------------------- the family's contract
# The names models/transformer.py exports too (train.py, compile.py, load.py, config.py use them).

WEIGHTS = "params"  # the checkpoint item holding the weights to run (load.py)
EVALUATION = "probe"  # evaluate.py's report: attentive probing of the frozen trunk


def inference(cfg: Config) -> Config:
  return dataclasses.replace(cfg, attention="auto")


def batch_spec(c: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch: uint8 RGB images and each image's prefix length (data/aim_images.py)."""
  size = c.model.image_size
  return {"images": jax.ShapeDtypeStruct((c.global_batch, size, size, 3), jnp.uint8),
          "prefix": jax.ShapeDtypeStruct((c.global_batch,), jnp.int32)}


def loss(model: Model, batch: dict) -> tuple[jax.Array, dict]:
  """(summed next-patch error over the non-prefix targets, sums to report): sums, so
  micro-batches accumulate and the trainer divides once by all targets (l3m's token-level mean)."""
  images = normalize(batch["images"])
  total, count = loss_terms(model(images, batch["prefix"]), images, batch["prefix"], model.cfg.patch)
  return total, {"loss": total, "targets": count}


def summary(loss_value: float) -> dict:
  """Host metrics derived from a logged step's mean loss: none, the error is reported as it is."""
  del loss_value
  return {}


def train_flops_per_image(cfg: Config) -> float:
  """6 x matmul params per patch (trunk and head) plus attention over the patches."""
  n = cfg.patches
  trunk = cfg.depth * 12 * cfg.width**2 + cfg.patch_dim * cfg.width
  head = cfg.head_depth * 2 * cfg.head_width * cfg.head_mlp + cfg.width * cfg.head_width + cfg.head_width * cfg.patch_dim
  return n * (6.0 * (trunk + head) + 12 * cfg.depth * n * cfg.width)


def flops_per_step(c: Any) -> float:
  """Model FLOPs of one optimizer update (metrics.py's MFU)."""
  return train_flops_per_image(Config(**c.model)) * c.global_batch


def validate(c: Any) -> None:
  m = c.model
  check(m.width % m.heads == 0, f"model.width={m.width} is not divisible by model.heads={m.heads}")
  check(m.image_size % m.patch == 0, f"model.image_size={m.image_size} is not a multiple of model.patch={m.patch}")
  check(c.seq_len == (m.image_size // m.patch) ** 2, f"seq_len={c.seq_len}: must be the patches per image")
  check(m.attention in attention_lib.IMPLEMENTATIONS,
        f"model.attention={m.attention!r}: expected one of {attention_lib.IMPLEMENTATIONS}")
