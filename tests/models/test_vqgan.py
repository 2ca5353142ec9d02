"""VQGAN contracts: shapes and ranges, the layers against their plain forms, the losses in the model."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import models
from lvm_jax.models import quantizer, vqgan
from tests.conftest import load_config

TINY = vqgan.Config(**load_config("vqgan_tiny").model)


def test_tiny_config_round_trips_shapes_and_range():
  model = vqgan.Model(TINY, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  ids = model.encode(images)
  assert ids.shape == (2, 8, 8) and ids.dtype == jnp.int32 and TINY.factor == 4
  assert int(ids.min()) >= 0 and int(ids.max()) < TINY.codes
  out = model.decode(ids)
  assert out.shape == (2, 32, 32, 3) and float(out.min()) >= 0 and float(out.max()) <= 1
  feats, aux = model(images)
  recon = model.decoder.conv_out(feats)
  assert recon.shape == images.shape and aux["ids"].shape == (2, 8, 8)
  # Same codes as decode(ids); z + sg(q - z) differs from q by float rounding only.
  np.testing.assert_allclose(np.clip(np.asarray(recon), 0, 1), np.asarray(model.decode(aux["ids"])), atol=1e-4)


def test_shift_loss_compares_each_token_with_where_its_content_went():
  """shift_loss = mean over the tokens that did not wrap of |z(roll(x))[i] - z(x)[i - shift]|^2,
  on the unit sphere with l2_codes; 0 for no shift; the same with z(x) given by the training pass."""
  for cfg in (TINY, dataclasses.replace(TINY, l2_codes=True)):
    model = vqgan.Model(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    z, f = np.asarray(model.latents(x)), cfg.factor
    for dy, dx in ((1, -2), (0, 1), (-1, 0)):
      z2 = np.asarray(model.latents(jnp.roll(x, (dy * f, dx * f), axis=(1, 2))))
      if cfg.l2_codes:
        z, z2 = (a / np.linalg.norm(a, axis=-1, keepdims=True) for a in (np.asarray(model.latents(x)), z2))
      d = [np.sum((z2[b, i, j] - z[b, i - dy, j - dx]) ** 2) for b in range(2) for i in range(8) for j in range(8)
           if 0 <= i - dy < 8 and 0 <= j - dx < 8]
      got = vqgan.shift_loss(model, x, jnp.array([dy, dx]))
      np.testing.assert_allclose(got, np.mean(d), rtol=1e-4)
      # The training pass's own latents of x (Model.__call__'s aux) stand in for a second encoding.
      given = vqgan.shift_loss(model, x, jnp.array([dy, dx]), model(x)[1]["latents"])
      np.testing.assert_allclose(given, got, rtol=1e-6)
    assert float(vqgan.shift_loss(model, x, jnp.array([0, 0]))) == 0.0


def test_entropy_loss_rewards_confident_latents_spread_over_codes():
  confident_spread = jnp.eye(8) * 50.0  # each latent sure of its own code
  confident_collapsed = jnp.zeros((8, 8)).at[:, 0].set(50.0)  # all sure of code 0
  unsure = jnp.zeros((8, 8))  # every latent spread over all codes
  loss = lambda logits: float(quantizer.codebook_entropy_loss(logits, temperature=1.0))
  np.testing.assert_allclose(loss(confident_spread), -np.log(8), atol=1e-4)  # the minimum
  np.testing.assert_allclose(loss(unsure), 0.0, atol=1e-6)
  np.testing.assert_allclose(loss(confident_collapsed), 0.0, atol=1e-4)
  # In the model: the weight times the loss of the latents' negative squared distances to the codes.
  cfg = dataclasses.replace(TINY, entropy_weight=0.1, entropy_temperature=0.5)
  model = vqgan.Model(cfg, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  _, aux = model(x)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # the tiny config's l2 codes
  z = unit(np.asarray(model.latents(x), np.float64).reshape(-1, cfg.z_channels))
  cb = unit(np.asarray(model.codebook[...], np.float64))
  dist = (z**2).sum(-1, keepdims=True) + (cb**2).sum(-1)[None] - 2 * z @ cb.T
  want = 0.1 * float(quantizer.codebook_entropy_loss(jnp.asarray(-dist, jnp.float32), 0.5))
  np.testing.assert_allclose(float(aux["entropy_loss"]), want, rtol=1e-4, atol=1e-6)


def test_taming_imagenet_f16_parameter_count():
  """taming's vqgan_imagenet_f16_16384: ch 128, mult (1,1,2,2,4), attention at 16x16 and in the mid
  blocks, z = embed = 256; 76.07M parameters (its 304 MB fp32 checkpoint)."""
  cfg = vqgan.Config(hidden=128, channel_mult=(1, 1, 2, 2, 4), z_channels=256, codes=16384,
                     mid_attention=True, attn_levels=(4,))
  assert models.count_params(models.abstract(vqgan, cfg)) == 76_073_859


def test_avgpool_downsampling_is_a_parameter_free_mean():
  cfg = dataclasses.replace(TINY, downsample="avgpool")
  model = vqgan.Model(cfg, rngs=nnx.Rngs(0))
  sampler = model.encoder.down_blocks[0].downsamplers[0]
  assert sampler.conv is None and models.count_params(sampler) < models.count_params(models.abstract(vqgan, TINY))
  x = jax.random.normal(jax.random.key(1), (1, 4, 6, 2))
  np.testing.assert_allclose(np.asarray(sampler(x)), np.asarray(x).reshape(1, 2, 2, 3, 2, 2).mean((2, 4)), rtol=1e-6)
  assert model.encode(jnp.zeros((1, 32, 32, 3))).shape == (1, 8, 8)


def test_upsampling_is_the_conv_of_the_nearest_x2_image():
  """The upsampler's stride-2 transposed conv (merged 4x4 kernel) computes the 3x3 conv of the
  repeated image: values, and gradients for the kernel, bias and input; odd sizes."""
  sampler = vqgan.Resample(6, False, TINY, nnx.Rngs(3))
  plain = lambda s, x: nnx.merge(*s).conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
  ours = lambda s, x: nnx.merge(*s)(x)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3, 6))
  split = nnx.split(sampler)
  with jax.default_matmul_precision("highest"):
    got, want = ours(split, x), plain(split, x)
    assert got.shape == (2, 10, 6, 6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.key(2), want.shape)  # a loss that weighs every output differently
    grads = [jax.grad(lambda state, x: jnp.sum(f((split[0], state), x) * weights), argnums=(0, 1))(split[1], x)
             for f in (ours, plain)]
  for g, h in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu])")
def test_upsampling_compiles_for_a_tpu_without_the_x2_image():
  """XLA:TPU's own counts for the largest amused upsampler at batch 2: the transposed conv skips
  the zeros of its input dilation (16 taps a small pixel, 36 for the conv of the x2 image) and
  moves fewer bytes than writing and reading the x2 image (1.8 GB against 2.7 at batch 8)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vqgan.Resample(256, False, vqgan.Config(), nnx.Rngs(0))))
  x = spec(jax.ShapeDtypeStruct((2, 128, 128, 256), jnp.float32))
  costs = {}
  for name, up in (("ours", lambda r, x: r(x)), ("plain", lambda r, x: r.conv(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)))):
    compiled = jax.jit(lambda s, x: up(nnx.merge(graphdef, s), x)).lower(jax.tree.map(spec, state), x).compile()
    costs[name] = compiled.cost_analysis()
  assert costs["ours"]["flops"] < 0.5 * costs["plain"]["flops"], costs
  assert costs["ours"]["bytes accessed"] < 0.8 * costs["plain"]["bytes accessed"], costs


def test_an_upsamplers_bias_left_to_the_next_block_changes_nothing():
  """Level leaves its upsampler's bias to the next level's first block, which adds it inside its
  norm and folds it into the bias of the conv that carries the residual: the values and the
  gradients (parameters, input, bias) of the block of x + bias, with either shortcut."""
  rng = np.random.default_rng(0)
  for cin, cout in ((16, 16), (16, 32)):
    graphdef, state = nnx.split(vqgan.ResnetBlock(cin, cout, TINY, nnx.Rngs(cin + cout)))
    state = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape), a.dtype), state)
    x, bias = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 8, 8, cin), (cin,)))

    def run(state, x, bias, deferred):
      block = nnx.merge(graphdef, state)
      return block(x, bias) if deferred else block(x + bias.reshape(1, 1, 1, -1))
    want, got = run(state, x, bias, False), run(state, x, bias, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    assert float(jnp.abs(want - run(state, x, bias * 0, False)).max()) > 0.1  # the bias matters
    loss = lambda *a: jnp.sum(jnp.sin(run(*a)))
    grads = [jax.grad(loss, argnums=(0, 1, 2))(state, x, bias, deferred) for deferred in (False, True)]
    for g_want, g_got in zip(*(jax.tree.leaves(g) for g in grads)):
      np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-4, atol=1e-4)


def test_bad_architecture_is_one_line():
  import pytest  # pylint: disable=g-import-not-at-top
  from lvm_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"attn_levels=\(3,\): levels are 0..2"):
    dataclasses.replace(TINY, attn_levels=(3,))
  with pytest.raises(ConfigError, match=r"downsample='pool': expected conv\|avgpool$"):
    dataclasses.replace(TINY, downsample="pool")
  with pytest.raises(ConfigError, match=r"norm='batch': expected group\|position$"):
    dataclasses.replace(TINY, norm="batch")


def test_position_norm_keeps_a_code_to_its_receptive_field():
  """norm="position" normalises each position's channels alone (groups=1: a LayerNorm over channels),
  so a change in one corner leaves the latents beyond the encoder's receptive field as they were;
  GroupNorm's image-wide statistics carry it to every token."""
  small = dataclasses.replace(TINY, channel_mult=(1, 2), encoder_blocks=1, groups=1)  # receptive field 37 px
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  cornered = images.at[:, :4, :4].set(1.0)
  for norm, far_changes in (("position", False), ("group", True)):
    model = vqgan.Model(dataclasses.replace(small, norm=norm), rngs=nnx.Rngs(0))
    diff_hw = np.abs(np.asarray(model.latents(images) - model.latents(cornered))).max(axis=(0, 3))
    assert diff_hw[0, 0] > 1e-3 and (diff_hw[24:, 24:].max() > 1e-4) == far_changes, norm
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 16)).astype(np.float32) * 3 + 1
  norm = vqgan.GroupNorm(16, dataclasses.replace(small, norm="position"), nnx.Rngs(0))
  want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, atol=1e-5)


def test_group_norm_statistics_are_exact_at_batch_6():
  """Flax's fast variance E[x^2] - E[x]^2 cancels where the mean is large against the spread, and
  at batch >= 4 XLA:CPU's long fp32 sums make that worse (tests/convert/test_vqgan_torch.py has
  what it did to the latents): 1.6e-4 here (2.3e-3 with one CPU device). Ours (one read of x: sums
  less a shift, row means then their mean) stays at fp32 rounding against a float64 GroupNorm, also
  where rare large values carry the variance (4.7e-6; 6e-5 when the sums run as one)."""
  cfg = dataclasses.replace(TINY, groups=8)
  rng = np.random.default_rng(0)
  shifted = 10.0 + rng.standard_normal((6, 128, 128, 32))
  spikes = np.where(rng.random(shifted.shape) < 0.001, 500.0, 3.0 + 0.1 * rng.standard_normal(shifted.shape))

  def error(norm: nnx.Module, x: np.ndarray) -> float:
    g = x.astype(np.float64).reshape(6, 128, 128, 8, 4)
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    return float(np.abs(np.asarray(jax.jit(lambda n, v: n(v))(norm, jnp.asarray(x, jnp.float32))) - want).max())

  ours = vqgan.GroupNorm(32, cfg, nnx.Rngs(0))
  assert error(ours, shifted) < 3e-6 and error(ours, spikes) < 1.5e-5
  # The same parameters through flax's fast variance: this case tells the two apart.
  fast = nnx.GroupNorm(32, num_groups=8, epsilon=1e-6, use_fast_variance=True, rngs=nnx.Rngs(0))
  if jax.default_backend() == "cpu":  # where the suite runs; other backends sum in trees
    assert error(fast, shifted) > 3e-5


def test_group_norm_gradient_matches_the_two_pass_form():
  """The shift of the one-read statistics carries no gradient (the moments do not depend on it):
  the input gradient is the mean-then-deviations GroupNorm's."""
  norm = vqgan.GroupNorm(32, dataclasses.replace(TINY, groups=8), nnx.Rngs(0))
  x = 3.0 + jax.random.normal(jax.random.key(0), (2, 16, 12, 32))
  weights = jax.random.normal(jax.random.key(1), x.shape)

  def two_pass(x_BHWC: jax.Array) -> jax.Array:
    x_BHWGc = x_BHWC.reshape(2, 16, 12, 8, 4)
    centred = x_BHWGc - x_BHWGc.mean(axis=(1, 2, 4), keepdims=True)
    return (centred * jax.lax.rsqrt(jnp.square(centred).mean(axis=(1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)

  got, want = (jax.grad(lambda x: jnp.sum(f(x) * weights))(x) for f in (norm, two_pass))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
