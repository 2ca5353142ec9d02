"""models/quantizer.py: the nearest code in fp32, straight-through gradients, the VQ losses."""

import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.models import quantizer


def test_quantizer_picks_the_nearest_code_in_fp32():
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(300, 8)).astype(np.float32)
  z = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  expected = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  ids, q, _ = quantizer.quantize(jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_array_equal(np.asarray(ids), expected)
  # bf16 latents (a bf16 backbone) are compared in fp32 against the fp32 codebook.
  z_bf16 = jnp.asarray(z).astype(jnp.bfloat16)
  z_up = np.asarray(z_bf16.astype(jnp.float32))
  ids_bf16, _, _ = quantizer.quantize(z_bf16, jnp.asarray(codebook))
  np.testing.assert_array_equal(np.asarray(ids_bf16),
                                np.argmin(((z_up[..., None, :] - codebook) ** 2).sum(-1), axis=-1))
  np.testing.assert_allclose(np.asarray(q), codebook[expected], atol=1e-6)  # forward value = the code


def test_l2_codes_pick_the_most_cosine_similar_code():
  rng = np.random.default_rng(1)
  codebook = rng.normal(size=(64, 8)).astype(np.float32) * rng.random((64, 1)).astype(np.float32) * 5
  z = rng.normal(size=(1, 4, 4, 8)).astype(np.float32)
  cos = (z / np.linalg.norm(z, axis=-1, keepdims=True)) @ (codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)).T
  ids, _, _ = quantizer.quantize(jnp.asarray(z), jnp.asarray(codebook), l2_codes=True)
  np.testing.assert_array_equal(np.asarray(ids), cos.argmax(-1))


def test_straight_through_and_loss_gradients_go_where_they_should():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.float32)
  cb = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  # Straight-through: the quantized output passes the gradient to z unchanged.
  g = jax.grad(lambda z: jnp.sum(quantizer.quantize(z, cb)[1] * 3.0))(z)
  np.testing.assert_allclose(np.asarray(g), 3.0)
  # Commitment (beta) moves only the encoder output; the codebook loss moves only the codes.
  commit = lambda z, cb: quantizer.quantize(z, cb, beta=0.25)[2]["commitment_loss"]
  book = lambda z, cb: quantizer.quantize(z, cb, beta=0.25)[2]["codebook_loss"]
  gz, gcb = jax.grad(commit, argnums=(0, 1))(z, cb)
  q = cb[quantizer.quantize(z, cb)[0]]
  np.testing.assert_allclose(np.asarray(gz), 0.25 * 2 * (z - q) / z.size, rtol=1e-5)
  assert not np.any(np.asarray(gcb))
  gz, gcb = jax.grad(book, argnums=(0, 1))(z, cb)
  assert not np.any(np.asarray(gz)) and np.any(np.asarray(gcb))


def test_codebook_stats():
  stats = quantizer.codebook_stats(jnp.array([0, 0, 1, 1, 2, 2, 3, 3]), codes=8)
  np.testing.assert_allclose(float(stats["codebook_usage"]), 0.5)
  np.testing.assert_allclose(float(stats["codebook_perplexity"]), 4.0, rtol=1e-6)
