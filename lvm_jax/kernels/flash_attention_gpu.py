"""Flash attention for GPUs in Pallas (Triton): the kernels of flash_attention.py, GPU-shaped.

One program per (example, head, query block) loops over key blocks inside the kernel (Triton
style) instead of over a grid axis; the loop stops at the last key block the causal or prefix
mask can reach (flash_common.last_key_block), so the work above the diagonal is never done.
Segment ids mask elementwise (flash_common.allowed). The backward is FlashAttention-2's: one
kernel per key block accumulates dK and dV over query blocks, another per query block
accumulates dQ. Triton needs power-of-two block shapes, so the head dim is padded to one
(96 and 100 -> 128) and the sequence to a multiple of the blocks (flash_common.padded_call).
Pass interpret=True to run the same kernels op by op on a CPU (Pallas interpret mode).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lvm_jax.kernels.flash_common import (MASK, Static, allowed, blocks, check_inputs, first_query_block,
                                          last_key_block, padded_call, with_vjp)

PREFIX_LANES = 16  # the prefix length travels as a small row: Triton blocks are power-of-two arrays
# (block_q, block_k, warps, stages) by padded head dim, from bench/accelerator.py's sweep on an H200.
TUNING = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)}


def _triton(st) -> pltriton.CompilerParams:
  # Selects the Triton lowering (pallas_call on GPU otherwise picks Mosaic GPU, whose whole-row
  # key/value blocks would not fit shared memory).
  return pltriton.CompilerParams(num_warps=st.warps, num_stages=st.stages)


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _key_blocks(i, prefix, *, bq, bk, causal, kv_len):
  """How many key blocks query block i loops over: up to the last one it can see."""
  return last_key_block(i, prefix, bq=bq, bk=bk, causal=causal, kv_len=kv_len) + 1


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, prefix_ref, o_ref, lse_ref, *, scale, bq, bk, causal, kv_len):
  i = pl.program_id(2)
  prefix = jnp.max(prefix_ref[...])
  q = q_ref[...]
  q_pos = i * bq + jnp.arange(bq)[:, None]
  q_seg = seg_ref[pl.ds(i * bq, bq)][:, None]

  def body(j, carry):
    m, l, acc = carry
    ks = pl.ds(j * bk, bk)
    s = jnp.dot(q, k_ref[ks, :].T, preferred_element_type=jnp.float32) * scale
    mask = allowed(q_pos, j * bk + jnp.arange(bk)[None, :], q_seg, seg_ref[ks][None, :], prefix, causal=causal,
                   kv_len=kv_len)
    s = jnp.where(mask, s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v_ref.dtype), v_ref[ks, :], preferred_element_type=jnp.float32)
    return m_new, alpha * l + jnp.sum(p, axis=1), acc

  K = q.shape[-1]
  init = (jnp.full((bq,), MASK, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, K), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _key_blocks(i, prefix, bq=bq, bk=bk, causal=causal, kv_len=kv_len), body, init)
  l = jnp.maximum(l, 1e-30)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, seg_ref, prefix_ref, dk_ref, dv_ref, *,
                scale, bq, bk, nq, causal, kv_len):
  j = pl.program_id(2)
  prefix = jnp.max(prefix_ref[...])
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + jnp.arange(bk)[None, :]
  k_seg = seg_ref[pl.ds(j * bk, bk)][None, :]

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(i * bq, bq)
    q, do = q_ref[qs, :], do_ref[qs, :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [bq, bk]
    mask = allowed(i * bq + jnp.arange(bq)[:, None], k_pos, seg_ref[qs][:, None], k_seg, prefix, causal=causal,
                   kv_len=kv_len)
    p = jnp.where(mask, jnp.exp(s - lse_ref[qs][:, None]), 0.0)
    dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - d_ref[qs][:, None])
    return dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  # Causal: query blocks before the first that reaches this key block see none of it.
  first = first_query_block(j, prefix, bq=bq, bk=bk, causal=causal)
  dk, dv = jax.lax.fori_loop(first, nq, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, seg_ref, prefix_ref, dq_ref, *,
               scale, bq, bk, causal, kv_len):
  i = pl.program_id(2)
  prefix = jnp.max(prefix_ref[...])
  q, do = q_ref[...], do_ref[...]
  lse, d = lse_ref[...][:, None], d_ref[...][:, None]
  q_pos = i * bq + jnp.arange(bq)[:, None]
  q_seg = seg_ref[pl.ds(i * bq, bq)][:, None]

  def body(j, dq):
    ks = pl.ds(j * bk, bk)
    k = k_ref[ks, :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    mask = allowed(q_pos, j * bk + jnp.arange(bk)[None, :], q_seg, seg_ref[ks][None, :], prefix, causal=causal,
                   kv_len=kv_len)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    ds = p * (jnp.dot(do, v_ref[ks, :].T, preferred_element_type=jnp.float32) - d)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

  dq = jax.lax.fori_loop(0, _key_blocks(i, prefix, bq=bq, bk=bk, causal=causal, kv_len=kv_len), body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(L: int, K: int) -> tuple:
  """BlockSpecs over [B, H, L, K] arrays, rows of [B, H, L] and [B, L], grid (b, h, block)."""
  whole = pl.BlockSpec((None, None, L, K), lambda b, h, x: (b, h, 0, 0))
  block = lambda n: pl.BlockSpec((None, None, n, K), lambda b, h, x: (b, h, x, 0))
  vec = lambda n: pl.BlockSpec((None, None, n), lambda b, h, x: (b, h, x))
  seg = pl.BlockSpec((None, L), lambda b, h, x: (b, 0))
  prefix = pl.BlockSpec((None, PREFIX_LANES), lambda b, h, x: (b, 0))
  return whole, block, vec, seg, prefix


def _prefix_rows(prefix_B: jax.Array) -> jax.Array:
  """[B] prefix lengths as [B, PREFIX_LANES] rows, a shape a Triton block can hold."""
  return jnp.broadcast_to(prefix_B[:, None], (prefix_B.shape[0], PREFIX_LANES))


def _forward(q, k, v, seg, prefix, st: Static):
  B, H, L, K = q.shape
  whole, block, vec, seg_spec, prefix_spec = _specs(L, K)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, **st.kernel_kw()), grid=(B, H, L // st.bq), interpret=st.interpret,
      compiler_params=_triton(st),
      in_specs=[block(st.bq), whole, whole, seg_spec, prefix_spec], out_specs=[block(st.bq), vec(st.bq)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, L), jnp.float32)],
  )(q, k, v, seg, _prefix_rows(prefix))


def _backward(q, k, v, o, lse, do, seg, prefix, st: Static):
  B, H, L, K = q.shape
  whole, block, vec, seg_spec, prefix_spec = _specs(L, K)
  d = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  prefix = _prefix_rows(prefix)
  full_vec = pl.BlockSpec((None, None, L), lambda b, h, x: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **st.kernel_kw(nq=L // st.bq)), grid=(B, H, L // st.bk),
      interpret=st.interpret, compiler_params=_triton(st),
      in_specs=[whole, block(st.bk), block(st.bk), whole, full_vec, full_vec, seg_spec, prefix_spec],
      out_specs=[block(st.bk), block(st.bk)], out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
  )(q, k, v, do, lse, d, seg, prefix)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **st.kernel_kw()), grid=(B, H, L // st.bq), interpret=st.interpret,
      compiler_params=_triton(st),
      in_specs=[block(st.bq), whole, whole, block(st.bq), vec(st.bq), vec(st.bq), seg_spec, prefix_spec],
      out_specs=block(st.bq), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
  )(q, k, v, do, lse, d, seg, prefix)
  return dq, dk, dv


_flash = with_vjp(_forward, _backward)


def flash_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, *, causal: bool = True,
                    segment_ids_BL: Optional[jax.Array] = None, prefix_len_B: Optional[jax.Array] = None,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    interpret: bool = False, warps: Optional[int] = None, stages: Optional[int] = None) -> jax.Array:
  """As flash_attention.flash_attention, with the Triton kernels (blocks: powers of two >= 16).
  Blocks, warps and stages not given come from TUNING for the padded head dim."""
  _, L, _, K = check_inputs(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B)
  head_dim = _next_pow2(K)
  tuned_q, tuned_k, tuned_warps, tuned_stages = TUNING.get(head_dim, TUNING[128])
  bq, bk = blocks(block_q or tuned_q, block_k or tuned_k, "gpu", valid=lambda blk: blk >= 16 and not blk & (blk - 1),
                  rule="powers of two >= 16", cap=_next_pow2(L))
  return padded_call(_flash, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B, causal=causal, bq=bq, bk=bk,
                     head_dim=head_dim, interpret=interpret, warps=warps or tuned_warps,
                     stages=stages or tuned_stages)
