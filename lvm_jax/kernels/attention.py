"""The one attention entry point every model calls.

Dimension letters: B batch, L query length, S key length, H heads, K head dim.

`impl='xla'` is the reference path: plain einsums with fp32 logits and softmax, correct on every
backend and the numerical reference for the Pallas kernel (kernels/flash_attention.py, its own
issue). The mask is the AND of: causal (or prefix-causal, for AIM) and equal segment ids (packed
visual sentences never attend across sentence boundaries).
"""

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def make_mask(
    length: int,
    *,
    causal: bool = True,
    segment_ids_BL: Optional[jax.Array] = None,
    prefix_len_B: Optional[jax.Array] = None,
) -> jax.Array:
  """Boolean [B|1, 1, L, L] mask, True where query i may attend to key j."""
  i_L1 = jnp.arange(length)[:, None]
  j_1L = jnp.arange(length)[None, :]
  if causal:
    mask_BLL = (j_1L <= i_L1)[None]
    if prefix_len_B is not None:
      # Prefix attention (AIM): the first prefix_len positions see each other bidirectionally.
      mask_BLL = mask_BLL | (j_1L[None] < prefix_len_B[:, None, None])
  else:
    mask_BLL = jnp.ones((1, length, length), bool)
  if segment_ids_BL is not None:
    mask_BLL = mask_BLL & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
  return mask_BLL[:, None]


def xla_attention(
    q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, mask_BHLS: jax.Array
) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v with fp32 logits; masked rows that see nothing give zeros."""
  scale = q_BLHK.shape[-1] ** -0.5
  logits_BHLS = jnp.einsum("blhk,bshk->bhls", q_BLHK * scale, k_BSHK,
                           preferred_element_type=jnp.float32)
  logits_BHLS = jnp.where(mask_BHLS, logits_BHLS, jnp.finfo(jnp.float32).min)
  probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1)
  # A query whose every key is masked (padding) would otherwise average all values.
  probs_BHLS = jnp.where(mask_BHLS.any(-1, keepdims=True), probs_BHLS, 0.0)
  return jnp.einsum("bhls,bshk->blhk", probs_BHLS.astype(v_BSHK.dtype), v_BSHK,
                    preferred_element_type=jnp.float32).astype(q_BLHK.dtype)


def attention(
    q_BLHK: jax.Array,
    k_BLHK: jax.Array,
    v_BLHK: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BL: Optional[jax.Array] = None,
    prefix_len_B: Optional[jax.Array] = None,
    impl: str = "xla",
) -> jax.Array:
  """Multi-head self-attention over [B, L, H, K] inputs; returns [B, L, H, K]."""
  if q_BLHK.shape != k_BLHK.shape or k_BLHK.shape != v_BLHK.shape:
    raise ValueError(f"attention: q/k/v shapes differ: {q_BLHK.shape}, {k_BLHK.shape}, {v_BLHK.shape}")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}: expected one of {IMPLEMENTATIONS}")
  mask_BHLS = make_mask(q_BLHK.shape[1], causal=causal, segment_ids_BL=segment_ids_BL,
                        prefix_len_B=prefix_len_B)
  return xla_attention(q_BLHK, k_BLHK, v_BLHK, mask_BHLS)
