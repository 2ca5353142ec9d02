"""The PatchGAN discriminator: patch-map size and parameter count as taming's, batch-statistics
normalisation, and the hinge losses' values and signs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax.models import discriminator


def n_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def by_hand(width: int, layers: int) -> int:
  """4x4 convs: conv_in 3 -> width with bias, then bias-free convs each with a (scale, bias)
  norm, widths doubling up to 8x, and conv_out to one channel with bias."""
  widths = [width * min(2**i, 8) for i in range(layers + 1)]
  hidden = sum(16 * cin * cout + 2 * cout for cin, cout in zip(widths, widths[1:]))
  return (16 * 3 * width + width) + hidden + (16 * widths[-1] + 1)


@pytest.mark.parametrize("width, layers, size, patches", [(8, 2, 32, 6), (4, 1, 32, 14), (64, 3, 256, 30)])
def test_patch_map_size(width, layers, size, patches):
  """Stride-2 4x4 convs with padding 1 halve the side; the two stride-1 ones take 1 each
  (taming: 256 -> 30 with 3 layers). Traced, not run: eager convs take seconds on CPU."""

  def logits() -> jax.Array:
    model = discriminator.Model(nnx.Rngs(0), width=width, layers=layers)
    return model(jnp.zeros((2, size, size, 3)))

  out = jax.eval_shape(logits)
  assert out.shape == (2, patches, patches) and out.dtype == jnp.float32


def test_parameter_count():
  small = nnx.eval_shape(lambda: discriminator.Model(nnx.Rngs(0), width=8, layers=2))
  assert n_params(small) == by_hand(8, 2) == 392 + 2048 + 8192 + 96 + 513
  default = nnx.eval_shape(lambda: discriminator.Model(nnx.Rngs(0)))
  assert n_params(default) == by_hand(64, 3) == 2_765_633  # taming's NLayerDiscriminator with BatchNorm


def test_batch_stat_norm_standardises_each_channel_over_the_batch():
  norm = discriminator.BatchStatNorm(3)
  x = np.random.default_rng(1).normal([3.0, -2.0, 0.0], [1.0, 10.0, 0.1], (4, 5, 5, 3)).astype(np.float32)
  y = np.asarray(norm(jnp.asarray(x)))
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std((0, 1, 2)), 1.0, atol=1e-3)  # var + 1e-5: the 0.1 channel is 0.05% short
  norm.scale[...], norm.bias[...] = jnp.array([2.0, 2.0, 2.0]), jnp.array([1.0, 1.0, 1.0])
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), 2.0 * y + 1.0, rtol=1e-5, atol=1e-5)


def test_hinge_losses_known_values():
  d = discriminator.hinge_d_loss
  # relu(1 - real) = (0, 0.5), relu(1 + fake) = (0, 1): 0.5 * (0.25 + 0.5)
  assert float(d(jnp.array([2.0, 0.5]), jnp.array([-3.0, 0.0]))) == pytest.approx(0.375)
  assert float(d(jnp.array([1.0, 5.0]), jnp.array([-1.0, -4.0]))) == 0.0  # beyond the margins: no loss
  assert float(d(jnp.zeros(3), jnp.zeros(3))) == pytest.approx(1.0)  # an undecided discriminator
  assert float(d(jnp.array([-1.0]), jnp.array([1.0]))) == pytest.approx(2.0)  # both wrong by the margin


def test_generator_loss_falls_as_fakes_look_real():
  g = discriminator.generator_loss
  assert float(g(jnp.array([[1.0, 3.0]]))) == pytest.approx(-2.0)
  assert float(g(jnp.array([-0.5]))) == pytest.approx(0.5)
  grad = jax.grad(g)(jnp.zeros((2, 2)))
  np.testing.assert_allclose(np.asarray(grad), -0.25)  # descent raises every fake logit
