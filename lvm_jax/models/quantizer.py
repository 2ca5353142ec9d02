"""Vector quantization of the VQGAN's latents: nearest code, straight-through, the VQ losses.

Distances and the argmin run in fp32 whatever the backbone's dtype: with 8192 codes, bf16
distances flip a visible share of the tokens.
"""

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def quantize(z_BhwD: jax.Array, codebook_KD: jax.Array, l2_codes: bool = False,
             beta: float = 0.25, entropy_temperature: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
  """Nearest code by squared L2 in fp32; straight-through quantized latents and the VQ losses.

  codebook loss = |sg(z) - q|^2 (moves codes), commitment = beta |z - sg(q)|^2 (moves encoder).
  With entropy_temperature > 0 also MaskGIT's entropy loss on softmax(-distance / T): the mean
  per-latent entropy (each latent should pick one code) minus the entropy of the mean
  distribution (the batch should use many codes).
  """
  z = z_BhwD.astype(jnp.float32)
  cb = codebook_KD.astype(jnp.float32)
  if l2_codes:
    z, cb = l2_normalize(z), l2_normalize(cb)
  # |z|^2 is the same for every code, so the argmin needs only |e|^2 - 2 z.e.
  scores = jnp.einsum("bhwd,kd->bhwk", z, cb, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(cb * cb, axis=-1)[None, None, None] - 2.0 * scores
  ids = jnp.argmin(dist, axis=-1).astype(jnp.int32)
  q = jnp.take(cb, ids, axis=0)
  aux = {"codebook_loss": jnp.mean(jnp.square(jax.lax.stop_gradient(z) - q)),
         "commitment_loss": beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))}
  if entropy_temperature:
    aux["entropy_loss"] = codebook_entropy_loss(-dist.reshape(-1, cb.shape[0]), entropy_temperature)
  return ids, z + jax.lax.stop_gradient(q - z), aux


def codebook_entropy_loss(logits_NK: jax.Array, temperature: float) -> jax.Array:
  log_probs = jax.nn.log_softmax(logits_NK / temperature, axis=-1)
  probs = jnp.exp(log_probs)
  mean_probs = jnp.mean(probs, axis=0)
  # Per-latent entropy (each latent should pick one code) minus the mean distribution's (use many).
  return -jnp.mean(jnp.sum(probs * log_probs, axis=-1)) + jnp.sum(mean_probs * jnp.log(mean_probs + 1e-12))


def lookup(ids_Bhw: jax.Array, codebook_KD: jax.Array, l2_codes: bool = False) -> jax.Array:
  cb = codebook_KD.astype(jnp.float32)
  return jnp.take(l2_normalize(cb) if l2_codes else cb, ids_Bhw, axis=0)


def codebook_stats(ids: jax.Array, codes: int) -> dict:
  """Share of codes used in `ids` and the perplexity of their histogram."""
  counts = jnp.bincount(ids.reshape(-1), length=codes)
  p = counts / jnp.maximum(counts.sum(), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0))
  return {"codebook_usage": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}
