"""Attentive probe: the paper's parameter count, running statistics at evaluation, and it learns
to find the one informative token among distractors."""

import jax
import numpy as np
from flax import nnx

from lvm_jax.models import probe


def test_parameter_count_is_2d2_plus_d_plus_classifier():
  p = probe.AttentiveProbe(32, 4, 10, rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(p, nnx.Param)))
  assert n == 2 * 32 * 32 + 32 + 32 * 10  # BatchNorm has no affine parameters


def test_evaluation_uses_running_statistics():
  p = probe.AttentiveProbe(8, 2, 3, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(3.0, 2.0, (16, 5, 8)).astype(np.float32)
  for _ in range(30):
    p(x, train=True)  # running statistics move towards the data's
  alone = np.asarray(p(x[:1], train=False))
  together = np.asarray(p(x, train=False))[:1]
  np.testing.assert_allclose(alone, together, atol=1e-5)  # one image is not normalised by itself
  assert not np.allclose(np.asarray(p(x[:1], train=True)), alone, atol=1e-3)


def test_probe_learns_which_token_carries_the_class():
  rng = np.random.default_rng(0)
  n, tokens, dim, classes = 1200, 12, 16, 4
  labels = rng.integers(0, classes, n)
  feats = rng.normal(size=(n, tokens, dim)).astype(np.float32)
  where = rng.integers(0, tokens, n)
  feats[np.arange(n), where, :classes] += 4.0 * np.eye(classes)[labels]  # one token, somewhere
  feats[np.arange(n), where, -1] = 6.0  # and a marker the attention can key on
  p = probe.fit(feats[:1000], labels[:1000], heads=2, classes=classes, steps=300, lr=3e-3)
  assert probe.accuracy(p, feats[1000:], labels[1000:]) > 0.9
