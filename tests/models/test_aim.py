"""AIM model contracts: sizes of the paper, ml-aim's position layout, patch order, prefix
attention, the normalized-pixel loss over non-prefix targets, probe features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvm_jax import models
from lvm_jax.models import aim

TINY = aim.Config(width=64, depth=3, heads=4, patch=4, image_size=16, head_width=32, head_depth=2, head_mlp=64)


@pytest.mark.parametrize("width,depth,heads,billions", [(1536, 24, 12, 0.6), (2048, 24, 16, 1.2),
                                                         (3072, 24, 24, 2.7), (4096, 32, 32, 6.5)])
def test_trunk_and_head_sizes_match_the_paper(width, depth, heads, billions):
  cfg = aim.Config(width=width, depth=depth, heads=heads)
  model = models.abstract(aim, cfg)
  trunk = models.count_params(model.trunk)
  # 12 D^2 per block (qkv, proj, 4x MLP, no biases) + patch conv and norms; the paper rounds.
  assert abs(trunk - 12 * width**2 * depth) < 0.002 * trunk and abs(trunk / 1e9 - billions) < 0.1
  assert abs(models.count_params(model.head) / 1e9 - 0.40) < 0.02  # ml-l3m's 12 x 2048/8192 head


def test_positions_put_the_column_first():
  pos = aim.sincos_2d(4, 16)  # raster order: index = row * 4 + col
  half = 8
  np.testing.assert_array_equal(pos[1, half:], pos[0, half:])  # (0, 1) vs (0, 0): same row half
  assert not np.allclose(pos[1, :half], pos[0, :half])
  np.testing.assert_array_equal(pos[4, :half], pos[0, :half])  # (1, 0) vs (0, 0): same column half
  np.testing.assert_allclose(pos[2, :4], np.sin(2 * 10000.0 ** -(np.arange(4) / 4)), rtol=1e-6)  # column 2


def test_patch_conv_is_a_linear_map_of_patchified_pixels():
  """The conv reads each patch as patchify lays it out (row, col, channel): conversion of ml-aim's
  conv weights and the loss targets agree on the pixel order."""
  model = aim.Model(TINY, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  conv = model.trunk.proj(x).reshape(2, 16, -1)
  flat = aim.patchify(x, 4) @ model.trunk.proj.kernel[...].reshape(48, -1) + model.trunk.proj.bias[...][None, None]
  np.testing.assert_allclose(np.asarray(conv), np.asarray(flat), atol=1e-5)


def test_prefix_attention_is_bidirectional_in_the_prefix_causal_after():
  model = aim.Model(TINY, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(2), (1, 16, 16, 3))
  prefix = jnp.array([5])
  out = lambda img: np.asarray(model.trunk(img, prefix)[0][0])
  base = out(x)
  later = out(x.at[:, 12:, 12:].set(0.0))  # patch 15 only: nothing before it changes
  np.testing.assert_allclose(later[:15], base[:15], atol=1e-6)
  assert not np.allclose(later[15], base[15])
  early = out(x.at[:, :4, 12:].set(0.0))  # patch 3, inside the prefix: patches 0-2 see it
  assert not np.allclose(early[0], base[0])
  outside = out(x.at[:, 4:8, 4:8].set(0.0))  # patch 5, the first non-prefix one
  np.testing.assert_allclose(outside[:5], base[:5], atol=1e-6)
  # Without a prefix the trunk is bidirectional: patch 15 reaches patch 0.
  bidir = lambda img: np.asarray(model.trunk(img)[0][0])
  assert not np.allclose(bidir(x.at[:, 12:, 12:].set(0.0))[0], bidir(x)[0])


def test_loss_is_mse_on_normalized_next_patches_after_the_prefix():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)
  t = np.asarray(aim.normalized_targets(images, 4))
  np.testing.assert_allclose(t.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(t.var(-1, ddof=1), 1, atol=1e-4)
  pred = jnp.asarray(rng.normal(size=(2, 16, 48)), jnp.float32)
  prefix = jnp.array([1, 9])
  want = []
  for b, s in enumerate((1, 9)):
    want += [np.mean((np.asarray(pred)[b, j - 1] - t[b, j]) ** 2) for j in range(s, 16)]
  total, count = aim.loss_terms(pred, images, prefix, 4)
  assert float(count) == len(want)
  np.testing.assert_allclose(float(total / count), np.mean(want), rtol=1e-5)
  draws = np.asarray(aim.sample_prefix(jax.random.key(0), 4000, 16))
  assert draws.min() == 1 and draws.max() == 15


def test_probe_features_average_raw_block_outputs():
  model = aim.Model(TINY, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  normed, both = model.trunk(x, layers=(1, 2))
  _, one = model.trunk(x, layers=(1,))
  _, two = model.trunk(x, layers=(2,))
  np.testing.assert_allclose(np.asarray(both), (np.asarray(one) + np.asarray(two)) / 2, atol=1e-5)
  # Raw outputs, before the post-trunk norm: the last block's features are not the normed tokens.
  assert not np.allclose(np.asarray(two), np.asarray(normed), atol=1e-2)
  np.testing.assert_allclose(np.asarray(model.trunk.post_trunk_norm(two)), np.asarray(normed), atol=1e-4)
