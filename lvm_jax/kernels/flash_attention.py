"""Flash attention in Pallas: the TPU (Mosaic) kernels, and the entry point for both backends.

Dimension letters: B batch, H heads, L sequence, K head dim; kernels see [B, H, L, K].

Memory stays linear in L: the forward keeps a running max, normaliser and output per query
block (online softmax in fp32) and saves only the log-sum-exp per query; the backward recomputes
the probabilities block by block (dK/dV in one kernel, dQ in another, as FlashAttention-2).
The mask (causal or AIM prefix-causal, segment ids, padding) is flash_common.allowed. A block of
queries x keys that the mask empties entirely is skipped: its condition is computed from block
positions, prefix lengths and each block's segment-id range, held in SMEM (scalar prefetch).

Shapes the hardware cannot take are padded, not refused (flash_common.padded_call): the sequence
to a multiple of the blocks and the head dim to a multiple of 128 (TPU lanes).

`flash_attention_gpu.py` holds the Triton kernels; what the two share is in `flash_common.py`.
Both run in Pallas interpret mode on a CPU, which is how the tests check them against float64.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lvm_jax.kernels import flash_attention_gpu
from lvm_jax.kernels.flash_common import (MASK, FlashError, Static, allowed, blocks, check_inputs, first_query_block,
                                          last_key_block, padded_call, round_up, with_vjp)

LANES = 128


# ------------------------------------------------------------------------------ block skipping


def _visible(b, i, j, prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, *, bq, bk, nq, nk, causal, kv_len):
  """Whether block (queries i, keys j) of example b has any unmasked entry (scalars only)."""
  k_lo = j * bk
  vis = k_lo < kv_len
  if causal:
    vis = jnp.logical_and(vis, jnp.logical_or(k_lo <= (i + 1) * bq - 1, k_lo < prefix_ref[b]))
  overlap = jnp.logical_and(kmin_ref[b * nk + j] <= qmax_ref[b * nq + i], qmin_ref[b * nq + i] <= kmax_ref[b * nk + j])
  return jnp.logical_and(vis, overlap)


# ------------------------------------------------------------------------------ TPU kernels


def _fwd_kernel(prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, bq, bk, nq, nk, causal, kv_len):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  args = (prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref)
  kw = dict(bq=bq, bk=bk, nq=nq, nk=nk, causal=causal, kv_len=kv_len)

  @pl.when(_visible(b, i, j, *args, **kw))
  def _body():
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
    q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = allowed(q_pos, k_pos, qseg_ref[:, :1], kseg_ref[:1, :], prefix_ref[b], causal=causal, kv_len=kv_len)
    s = jnp.where(mask, s, MASK)
    m_prev = m_sc[:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # masked entries are 0 even in all-masked rows
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = jnp.broadcast_to(alpha * l_sc[:, :1] + jnp.sum(p, axis=1, keepdims=True), l_sc.shape)
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * alpha + pv

  @pl.when(j == nk - 1)
  def _finish():
    l = jnp.maximum(l_sc[:, :1], 1e-30)  # a query that sees no key: acc is 0, output 0
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    # Saved as a row [1, bq]: a column would need a 128-lane padded [L, 128] array per head.
    lse_col = jnp.broadcast_to(m_sc[:, :1] + jnp.log(l), (bq, LANES))
    lse_ref[...] = jnp.transpose(lse_col)[:1, :]


def _dkv_kernel(prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref,
                qseg_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, bq, bk, nq, nk, causal, kv_len):
  """Grid (b, h, key block j, query block i): accumulates dK, dV of key block j over i.

  Works in the transposed orientation s^T [bk, bq], so the per-query lse and D rows broadcast
  over sublanes without a transpose.
  """
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  args = (prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref)

  @pl.when(_visible(b, i, j, *args, bq=bq, bk=bk, nq=nq, nk=nk, causal=causal, kv_len=kv_len))
  def _body():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    nt = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b^T
    s_t = jax.lax.dot_general(k, q, nt, preferred_element_type=jnp.float32) * scale  # [bk, bq]
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (1, bq), 1)
    mask = allowed(q_pos, k_pos, qseg_ref[:1, :], kseg_ref[:, :1], prefix_ref[b], causal=causal, kv_len=kv_len)
    p_t = jnp.where(mask, jnp.exp(s_t - lse_ref[...]), 0.0)
    nn = (((1,), (0,)), ((), ()))
    dv_sc[...] += jax.lax.dot_general(p_t.astype(do.dtype), do, nn, preferred_element_type=jnp.float32)
    dp_t = jax.lax.dot_general(v, do, nt, preferred_element_type=jnp.float32)  # [bk, bq]
    ds_t = p_t * (dp_t - d_ref[...])
    dk_sc[...] += jax.lax.dot_general(ds_t.astype(q.dtype), q, nn, preferred_element_type=jnp.float32) * scale

  @pl.when(i == nq - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref,
               qseg_ref, kseg_ref, dq_ref, dq_sc, *, scale, bq, bk, nq, nk, causal, kv_len):
  """Grid (b, h, query block i, key block j): accumulates dQ of query block i over j."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  args = (prefix_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref)

  @pl.when(_visible(b, i, j, *args, bq=bq, bk=bk, nq=nq, nk=nk, causal=causal, kv_len=kv_len))
  def _body():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    nt = (((1,), (1,)), ((), ()))
    s = jax.lax.dot_general(q, k, nt, preferred_element_type=jnp.float32) * scale  # [bq, bk]
    q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = allowed(q_pos, k_pos, qseg_ref[:, :1], kseg_ref[:1, :], prefix_ref[b], causal=causal, kv_len=kv_len)
    lse = jnp.transpose(jnp.broadcast_to(lse_ref[...], (LANES, bq)))[:, :1]  # row -> column
    d = jnp.transpose(jnp.broadcast_to(d_ref[...], (LANES, bq)))[:, :1]
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = jax.lax.dot_general(do, v, nt, preferred_element_type=jnp.float32)
    ds = p * (dp - d)
    dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32) * scale

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


# ------------------------------------------------------------------------------ pallas_call wrappers


def _scalars(seg_BL: jax.Array, prefix_B: jax.Array, bq: int, bk: int) -> tuple:
  """Prefix lengths and each block's segment-id range, flattened for SMEM."""
  B, L = seg_BL.shape
  q_blocks, k_blocks = seg_BL.reshape(B, L // bq, bq), seg_BL.reshape(B, L // bk, bk)
  return (prefix_B.astype(jnp.int32), q_blocks.min(-1).reshape(-1), q_blocks.max(-1).reshape(-1),
          k_blocks.min(-1).reshape(-1), k_blocks.max(-1).reshape(-1))


def _seg_layouts(seg_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Segment ids as columns [B, L, 128] and rows [B, 8, L]: TPU blocks are (8, 128)-tiled."""
  return (jnp.broadcast_to(seg_BL[:, :, None], (*seg_BL.shape, LANES)),
          jnp.broadcast_to(seg_BL[:, None, :], (seg_BL.shape[0], 8, seg_BL.shape[1])))


def _call(kernel, st: Static, grid, in_specs, out_specs, out_shape, scratch, scalars, *arrays):
  return pl.pallas_call(
      kernel, out_shape=out_shape, interpret=st.interpret,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
  )(*scalars, *arrays)


def _kv_index(st: Static, segments: bool = False):
  """Index map of key/value blocks (or, with `segments`, of the [B, 8, L] key segment rows) for
  grids (b, h, i, j): key blocks past the last one query block i sees map to that one, so the
  pipeline fetches nothing for blocks whose compute is skipped."""
  def index(b, h, i, j, prefix_ref, *_):
    j = jnp.minimum(j, last_key_block(i, prefix_ref[b], bq=st.bq, bk=st.bk, causal=st.causal, kv_len=st.kv_len))
    return (b, 0, j) if segments else (b, h, j, 0)
  return index


def _forward(q, k, v, seg_BL, prefix_B, st: Static):
  B, H, L, K = q.shape
  bq, bk = st.bq, st.bk
  nq, nk = L // bq, L // bk
  seg_col, seg_row = _seg_layouts(seg_BL)
  blk = lambda rows, index: pl.BlockSpec((None, None, rows, K), index)
  kv = _kv_index(st)
  in_specs = [blk(bq, lambda b, h, i, j, *_: (b, h, i, 0)), blk(bk, kv), blk(bk, kv),
              pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
              pl.BlockSpec((None, 8, bk), _kv_index(st, segments=True))]
  out_specs = [blk(bq, lambda b, h, i, j, *_: (b, h, i, 0)),
               pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, 1, L), jnp.float32)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, K), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, **st.kernel_kw(nq=nq, nk=nk))
  return _call(kernel, st, (B, H, nq, nk), in_specs, out_specs, out_shape, scratch,
               _scalars(seg_BL, prefix_B, bq, bk), q, k, v, seg_col, seg_row)


def _backward(q, k, v, o, lse, do, seg_BL, prefix_B, st: Static):
  B, H, L, K = q.shape
  bq, bk = st.bq, st.bk
  nq, nk = L // bq, L // bk
  seg_col, seg_row = _seg_layouts(seg_BL)
  d = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, H, 1, L]
  scalars = _scalars(seg_BL, prefix_B, bq, bk)
  blk = lambda rows, index: pl.BlockSpec((None, None, rows, K), index)
  row = lambda index: pl.BlockSpec((None, None, 1, bq), index)

  # dK, dV: grid (b, h, key block j, query block i).
  # Query blocks before the first that sees key block j map to it: the pipeline fetches nothing new.
  first = lambda b, j, prefix: first_query_block(j, prefix[b], bq=bq, bk=bk, causal=st.causal)
  qi = lambda b, h, j, i, prefix, *_: (b, h, jnp.maximum(i, first(b, j, prefix)), 0)
  kj = lambda b, h, j, i, *_: (b, h, j, 0)
  q_row = lambda b, h, j, i, prefix, *_: (b, h, 0, jnp.maximum(i, first(b, j, prefix)))
  in_specs = [blk(bq, qi), blk(bk, kj), blk(bk, kj), blk(bq, qi), row(q_row), row(q_row),
              pl.BlockSpec((None, 8, bq), lambda b, h, j, i, prefix, *_: (b, 0, jnp.maximum(i, first(b, j, prefix)))),
              pl.BlockSpec((None, bk, LANES), lambda b, h, j, i, *_: (b, j, 0))]
  dk, dv = _call(functools.partial(_dkv_kernel, **st.kernel_kw(nq=nq, nk=nk)), st, (B, H, nk, nq), in_specs,
                 [blk(bk, kj), blk(bk, kj)], [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
                 [pltpu.VMEM((bk, K), jnp.float32)] * 2, scalars, q, k, v, do, lse, d, seg_row, seg_col)

  # dQ: grid (b, h, query block i, key block j).
  qi, kj = (lambda b, h, i, j, *_: (b, h, i, 0)), _kv_index(st)
  q_row = lambda b, h, i, j, *_: (b, h, 0, i)
  in_specs = [blk(bq, qi), blk(bk, kj), blk(bk, kj), blk(bq, qi), row(q_row), row(q_row),
              pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
              pl.BlockSpec((None, 8, bk), _kv_index(st, segments=True))]
  (dq,) = _call(functools.partial(_dq_kernel, **st.kernel_kw(nq=nq, nk=nk)), st, (B, H, nq, nk), in_specs,
                [blk(bq, qi)], [jax.ShapeDtypeStruct(q.shape, q.dtype)], [pltpu.VMEM((bq, K), jnp.float32)],
                scalars, q, k, v, do, lse, d, seg_col, seg_row)
  return dq, dk, dv


_flash = with_vjp(_forward, _backward)


# ------------------------------------------------------------------------------ entry point


def flash_attention(
    q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, *, causal: bool = True,
    segment_ids_BL: Optional[jax.Array] = None, prefix_len_B: Optional[jax.Array] = None,
    block_q: Optional[int] = None, block_k: Optional[int] = None, interpret: bool = False,
    backend: str = "tpu",
) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v over [B, L, H, K] inputs with the masks of kernels/attention.py.

  backend: "tpu" (Mosaic) or "gpu" (Triton). On a CPU pass interpret=True (Pallas interpret
  mode): the same kernels, run op by op.
  """
  if backend == "gpu":
    return flash_attention_gpu.flash_attention(q_BLHK, k_BLHK, v_BLHK, causal=causal, segment_ids_BL=segment_ids_BL,
                                               prefix_len_B=prefix_len_B, block_q=block_q, block_k=block_k,
                                               interpret=interpret)
  if backend != "tpu":
    raise FlashError(f"backend={backend!r}: expected tpu or gpu")
  _, L, _, K = check_inputs(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B)
  # Short sequences: no block longer than the sequence rounded to the lane width.
  bq, bk = blocks(block_q, block_k, "tpu", valid=lambda blk: blk % LANES == 0, rule=f"multiples of {LANES}",
                  cap=round_up(L, LANES))
  return padded_call(_flash, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B, causal=causal, bq=bq, bk=bk,
                     head_dim=round_up(K, LANES), interpret=interpret)
