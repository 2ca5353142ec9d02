"""PatchGAN discriminator (pix2pix / taming NLayerDiscriminator) for VQGAN training, in Flax NNX.

Dimension letters: B batch, H W size, C channels.

4x4 convs, LeakyReLU 0.2, n_layers stride-2 stages doubling the width up to 8x, a stride-1 stage
and a 1-channel patch logit map. taming normalises with BatchNorm; here the same normalisation
is computed from the current batch only (no running statistics: the discriminator is never run
in inference mode), which keeps the train step a pure function.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class BatchStatNorm(nnx.Module):
  """BatchNorm with batch statistics and a learned affine, stateless."""

  def __init__(self, ch: int):
    self.scale = nnx.Param(jnp.ones((ch,)))
    self.bias = nnx.Param(jnp.zeros((ch,)))

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    mean = jnp.mean(x_BHWC, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(x_BHWC, axis=(0, 1, 2), keepdims=True)
    x = (x_BHWC - mean) * jax.lax.rsqrt(var + 1e-5)
    return x * self.scale[...].reshape(1, 1, 1, -1) + self.bias[...].reshape(1, 1, 1, -1)


class Model(nnx.Module):
  """images in [0, 1] [B, H, W, 3] -> patch logits [B, H', W']."""

  def __init__(self, rngs: nnx.Rngs, width: int = 64, layers: int = 3):
    init = nnx.initializers.normal(0.02)  # taming / pix2pix init
    conv = lambda cin, cout, stride, bias: nnx.Conv(cin, cout, (4, 4), strides=(stride, stride),
                                                    padding=((1, 1), (1, 1)), use_bias=bias,
                                                    kernel_init=init, rngs=rngs)
    widths = [width * min(2**i, 8) for i in range(layers + 1)]
    self.conv_in = conv(3, width, 2, True)
    self.convs = nnx.List([conv(widths[i - 1], widths[i], 2 if i < layers else 1, False)
                           for i in range(1, layers + 1)])
    self.norms = nnx.List([BatchStatNorm(widths[i]) for i in range(1, layers + 1)])
    self.conv_out = conv(widths[-1], 1, 1, True)

  def __call__(self, images_BHWC: jax.Array) -> jax.Array:
    x = jax.nn.leaky_relu(self.conv_in(images_BHWC * 2.0 - 1.0), 0.2)
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
    return self.conv_out(x)[..., 0]


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def generator_loss(fake_logits: jax.Array) -> jax.Array:
  return -jnp.mean(fake_logits)
