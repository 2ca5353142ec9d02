"""One new token's attention over the KV cache on a GPU, split over the cache (flash decoding).

At batch 1 the cache products are short: XLA:GPU ran each as its own fusion on a few dozen
blocks. Here one Pallas Triton program per (example, head, chunk of `block` slots) computes the
chunk's scores, its softmax statistics and its value product in one pass over the chunk's keys
and values; a small XLA combine weighs the chunks by their maxima. Keys are [B, H, S, K], values
[B, H, K, S] (transformer.Model.empty_cache), the mask [B, S] (the slots this token may see).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASK = -1e30


def _chunk_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref, *, scale):
  q_K = q_ref[...].astype(jnp.float32)
  s_S = jnp.sum(k_ref[...].astype(jnp.float32) * q_K[None, :], axis=1) * scale
  seen_S = mask_ref[...] != 0
  s_S = jnp.where(seen_S, s_S, MASK)
  m = jnp.max(s_S)
  p_S = jnp.where(seen_S, jnp.exp(s_S - m), 0.0)
  o_ref[...] = jnp.sum(v_ref[...].astype(jnp.float32) * p_S[None, :], axis=1)
  m_ref[...] = jnp.full(m_ref.shape, m, jnp.float32)
  l_ref[...] = jnp.full(l_ref.shape, jnp.sum(p_S), jnp.float32)


@functools.partial(jax.jit, static_argnames=("block", "warps", "stages", "interpret"))
def decode_attention(q_BHK: jax.Array, k_BHSK: jax.Array, v_BHKS: jax.Array, mask_BS: jax.Array, *,
                     block: int = 128, warps: int = 4, stages: int = 2, interpret: bool = False) -> jax.Array:
  """[B, H, K] attention outputs (q's dtype) of one query per (example, head) over the cache."""
  B, H, S, K = k_BHSK.shape
  if S % block:
    raise ValueError(f"decode_attention: cache length {S} is not a multiple of block {block}")
  C = S // block
  lanes = 16  # per-chunk statistics travel as small rows: Triton blocks are power-of-two arrays
  o_BHCK, m_BHCL, l_BHCL = pl.pallas_call(
      functools.partial(_chunk_kernel, scale=K ** -0.5),
      grid=(B, H, C),
      in_specs=[pl.BlockSpec((None, None, K), lambda b, h, c: (b, h, 0)),
                pl.BlockSpec((None, None, block, K), lambda b, h, c: (b, h, c, 0)),
                pl.BlockSpec((None, None, K, block), lambda b, h, c: (b, h, 0, c)),
                pl.BlockSpec((None, block), lambda b, h, c: (b, c))],
      out_specs=[pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, h, c, 0)),
                 pl.BlockSpec((None, None, None, lanes), lambda b, h, c: (b, h, c, 0)),
                 pl.BlockSpec((None, None, None, lanes), lambda b, h, c: (b, h, c, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, H, C, K), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, C, lanes), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, C, lanes), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret,
  )(q_BHK, k_BHSK, v_BHKS, mask_BS.astype(jnp.int32))
  m_BHC, l_BHC = m_BHCL[..., 0], l_BHCL[..., 0]
  w_BHC = jnp.exp(m_BHC - jnp.max(m_BHC, axis=-1, keepdims=True))
  out_BHK = jnp.einsum("bhc,bhck->bhk", w_BHC, o_BHCK) / jnp.maximum(jnp.sum(w_BHC * l_BHC, axis=-1), 1e-30)[..., None]
  return out_BHK.astype(q_BHK.dtype)
