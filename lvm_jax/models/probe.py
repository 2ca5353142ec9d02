"""AIM's attentive probe: a classifier on frozen token features, and its training loop.

As ml-aim's AttentionPoolingClassifier: BatchNorm without affine over the features (per channel,
over batch x tokens); one learned query used as is (no query projection); key and value linears
without bias; as many heads as the trunk; softmax attention, mean over the query; a linear
classifier without bias. Unlike ml-aim's JAX port, which always normalises with the batch's
statistics (even for one image), evaluation here uses the running statistics.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class AttentiveProbe(nnx.Module):
  def __init__(self, dim: int, heads: int, classes: int, *, rngs: nnx.Rngs, momentum: float = 0.9):
    self.heads = heads
    self.bn = nnx.BatchNorm(dim, use_bias=False, use_scale=False, epsilon=1e-6, momentum=momentum, rngs=rngs)
    self.query = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
    self.k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.linear = nnx.Linear(dim, classes, use_bias=False, rngs=rngs)

  def __call__(self, feats_BND: jax.Array, train: bool) -> jax.Array:
    B, N, D = feats_BND.shape
    H = self.heads
    x = self.bn(feats_BND.astype(jnp.float32), use_running_average=not train)
    q = jnp.broadcast_to(self.query[...], (B, 1, D)).reshape(B, 1, H, D // H)
    k, v = self.k(x).reshape(B, N, H, D // H), self.v(x).reshape(B, N, H, D // H)
    attn = jax.nn.softmax(jnp.einsum("bqhk,bnhk->bhqn", q, k) * (D // H) ** -0.5, axis=-1)
    pooled = jnp.einsum("bhqn,bnhk->bqhk", attn, v).reshape(B, 1, D).mean(axis=1)
    return self.linear(pooled)


@functools.cache
def _adamw(steps: int, lr: float, weight_decay: float) -> optax.GradientTransformation:
  # One object per setting: the optimizer's graph holds it, so probes fitted alike (the checkpoints
  # of a run, lvm_jax/aim_curve.py) share one compiled step.
  return optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)


@nnx.jit
def _step(probe: AttentiveProbe, opt: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  def loss_fn(probe):
    return optax.softmax_cross_entropy_with_integer_labels(probe(x, train=True), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(probe)
  opt.update(probe, grads)
  return loss


@nnx.jit
def _predict(probe: AttentiveProbe, x: jax.Array) -> jax.Array:
  return jnp.argmax(probe(x, train=False), axis=-1)


def fit(feats_BND: np.ndarray, labels_B: np.ndarray, heads: int, classes: int, *, steps: int = 300,
        batch: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0) -> AttentiveProbe:
  """AdamW with cosine decay on frozen features, minibatches drawn with replacement."""
  probe = AttentiveProbe(feats_BND.shape[-1], heads, classes, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(probe, _adamw(steps, lr, weight_decay), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(labels_B), batch)
    _step(probe, opt, jnp.asarray(feats_BND[idx]), jnp.asarray(labels_B[idx]))
  return probe


def accuracy(probe: AttentiveProbe, feats_BND: np.ndarray, labels_B: np.ndarray, batch: int = 256) -> float:
  preds = np.concatenate([np.asarray(_predict(probe, jnp.asarray(feats_BND[i:i + batch])))
                          for i in range(0, len(labels_B), batch)])
  return float(np.mean(preds == labels_B))
