"""What the TPU (flash_attention.py) and GPU (flash_attention_gpu.py) flash kernels share.

Dimension letters: B batch, H heads, L sequence, K head dim; kernels see [B, H, L, K].

The mask is the AND of an optional causal mask, widened to prefix-causal per example (AIM: query
i sees key j if j <= i or j < prefix[b]), equal segment ids (packed sentences), and keys before
`kv_len` (the rest is padding). It is written once here, elementwise (`allowed`) and as the block
ranges it leaves non-empty (`last_key_block`, `first_query_block`), so both backends skip the
same work and compute the same numbers. Each backend brings its own forward and backward
(Mosaic and Triton differ in layouts and loops); `with_vjp` ties them into one custom_vjp and
`padded_call` pads inputs to the backend's block and head-dim multiples and crops the output.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

MASK = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(MASK - MASK) must not be nan
BLOCKS = {"tpu": 512, "gpu": 64}  # default query/key block per backend


class FlashError(ValueError):
  """Inputs or block sizes the kernel cannot take; the message names the value and what is allowed."""


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialise on (hashable: a custom_vjp static argument)."""
  scale: float
  bq: int
  bk: int
  causal: bool
  kv_len: int  # keys at or past this position are padding
  interpret: bool
  warps: int = 4  # GPU (Triton) only: warps per program and software-pipelining stages
  stages: int = 2

  def kernel_kw(self, **counts: int) -> dict:
    """Keyword arguments of a kernel: the static parameters plus its block counts (nq, nk)."""
    return dict(scale=self.scale, bq=self.bq, bk=self.bk, causal=self.causal, kv_len=self.kv_len, **counts)


# ------------------------------------------------------------------------------ masks


def allowed(q_pos, k_pos, q_seg, k_seg, prefix, *, causal: bool, kv_len: int) -> jax.Array:
  """Elementwise mask from broadcastable positions and segment ids (True: query sees key)."""
  m = k_pos < kv_len
  if causal:
    m = jnp.logical_and(m, jnp.logical_or(k_pos <= q_pos, k_pos < prefix))
  return jnp.logical_and(m, q_seg == k_seg)


def last_key_block(i, prefix, *, bq: int, bk: int, causal: bool, kv_len: int):
  """The last key block query block i can see: later ones are all masked (or padding)."""
  last = (kv_len - 1) // bk
  if not causal:
    return last
  reach = jnp.maximum((i + 1) * bq - 1, prefix - 1)
  # lax.div, not //: floor division of signed ints lowers through `sign`, which Mosaic rejects
  # in index maps; both operands are >= 0 here, where the two agree.
  return jnp.minimum(jax.lax.div(reach, bk), last)


def first_query_block(j, prefix, *, bq: int, bk: int, causal: bool):
  """The first query block that sees key block j (0 if j lies in the example's prefix)."""
  if not causal:
    return 0
  return jnp.where(j * bk < prefix, 0, jax.lax.div(j * bk, bq))


# ------------------------------------------------------------------------------ checks


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, seg: Optional[jax.Array],
                 prefix: Optional[jax.Array]) -> tuple[int, int, int, int]:
  """The [B, L, H, K] shape of q, k, v; FlashError on shapes or dtypes the kernels cannot take."""
  if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
    raise FlashError(f"flash attention: q, k, v must share one [B, L, H, K] shape, got {q.shape}, {k.shape}, {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
    raise FlashError(f"flash attention: dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected all float32 or all bfloat16")
  B, L = q.shape[:2]
  if seg is not None and seg.shape != (B, L):
    raise FlashError(f"flash attention: segment_ids shape {seg.shape}, expected {(B, L)}")
  if prefix is not None and prefix.shape != (B,):
    raise FlashError(f"flash attention: prefix_len shape {prefix.shape}, expected {(B,)}")
  return q.shape


def blocks(block_q: Optional[int], block_k: Optional[int], backend: str, *, valid: Callable[[int], bool],
           rule: str, cap: int) -> tuple[int, int]:
  """Query and key blocks: the backend's default where not given, checked against the backend's
  `rule`, then capped at `cap` so a short sequence is not padded to a whole default block."""
  bq, bk = block_q or BLOCKS[backend], block_k or BLOCKS[backend]
  for name, blk in (("block_q", bq), ("block_k", bk)):
    if not valid(blk):
      raise FlashError(f"{name}={blk}: {backend.upper()} blocks must be {rule}")
  return min(bq, cap), min(bk, cap)


# ------------------------------------------------------------------------------ custom_vjp and padding

# forward(q, k, v, seg_BL, prefix_B, st) -> (o, lse); backward(q, k, v, o, lse, do, seg_BL, prefix_B, st)
# -> (dq, dk, dv); all arrays [B, H, L, K] (lse in the backend's own layout), padded as padded_call does.
Forward = Callable[..., tuple[jax.Array, jax.Array]]
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
Flash = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Static], jax.Array]


def with_vjp(forward: Forward, backward: Backward) -> Flash:
  """flash(q, k, v, seg_BL, prefix_B, st) -> o, differentiable in q, k, v: the forward saves only
  o and the log-sum-exp, from which the backward recomputes the probabilities block by block."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def flash(q, k, v, seg_BL, prefix_B, st: Static):
    return forward(q, k, v, seg_BL, prefix_B, st)[0]

  def flash_fwd(q, k, v, seg_BL, prefix_B, st: Static):
    o, lse = forward(q, k, v, seg_BL, prefix_B, st)
    return o, (q, k, v, o, lse, seg_BL, prefix_B)

  def flash_bwd(st: Static, res, do):
    q, k, v, o, lse, seg_BL, prefix_B = res
    return (*backward(q, k, v, o, lse, do, seg_BL, prefix_B, st), None, None)  # no grads for ids

  flash.defvjp(flash_fwd, flash_bwd)
  return flash


def padded_call(flash: Flash, q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                segment_ids_BL: Optional[jax.Array], prefix_len_B: Optional[jax.Array], *, causal: bool,
                bq: int, bk: int, head_dim: int, interpret: bool, warps: int = 4, stages: int = 2) -> jax.Array:
  """Runs `flash` on [B, H, L', head_dim] copies of the inputs, L' a multiple of both blocks,
  and crops its output back to [B, L, H, K]. Padded keys are masked (Static.kv_len), padded
  queries dropped, and zero head-dim columns change no dot product."""
  B, L, _, K = q_BLHK.shape
  Lp = round_up(L, int(np.lcm(bq, bk)))
  seg = jnp.zeros((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
  seg = jnp.pad(seg, ((0, 0), (0, Lp - L)), mode="edge")  # padding keeps block id ranges unchanged
  prefix = jnp.zeros((B,), jnp.int32) if prefix_len_B is None else prefix_len_B.astype(jnp.int32)
  pad = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, Lp - L), (0, head_dim - K)))
  st = Static(float(K) ** -0.5, int(bq), int(bk), bool(causal), int(L), bool(interpret), int(warps), int(stages))
  out = flash(pad(q_BLHK), pad(k_BLHK), pad(v_BLHK), seg, prefix, st)
  return jnp.swapaxes(out[:, :, :L, :K], 1, 2)
