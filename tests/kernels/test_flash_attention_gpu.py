"""The Triton flash kernels, run in Pallas interpret mode on the CPU, against the XLA reference
(kernels/attention.xla_attention) in float32: forward and gradients, every mask, padded lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.kernels import attention, flash_attention_gpu

B, H, K = 2, 2, 12  # K=12 pads to 16 inside the kernel
SEG = np.array([[1] * 15 + [2] * 17 + [0] * 8,  # two sentences, then padding (segment 0)
                [1] * 7 + [2] * 7 + [3] * 26])
PREFIX = np.array([5, 23])  # AIM: per-example prefix lengths, inside and past the first block of 16

CASES = [  # L, causal, segment ids, prefix lengths
    (40, True, False, False),  # 40 is no multiple of the 16-blocks: the padding path
    (40, True, True, False),
    (40, True, False, True),
    (40, True, True, True),
    (40, False, False, False),
    (32, False, True, False),
]


def _inputs(L: int, use_seg: bool, use_prefix: bool):
  rng = np.random.default_rng(L)
  q, k, v, do = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(4))
  seg = jnp.asarray(SEG[:, :L]) if use_seg else None
  prefix = jnp.asarray(PREFIX) if use_prefix else None
  return (q, k, v), do, seg, prefix


def _assert_close(got, want, what: str):
  """float32: relative 1e-5, with an absolute floor of 1e-5 of the largest entry (entries near 0
  come from sums that cancel, where a relative bound on each one is meaningless)."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("L,causal,use_seg,use_prefix", CASES)
def test_interpret_matches_xla_forward_and_gradients(L, causal, use_seg, use_prefix):
  qkv, do, seg, prefix = _inputs(L, use_seg, use_prefix)
  flash = lambda q, k, v: flash_attention_gpu.flash_attention(
      q, k, v, causal=causal, segment_ids_BL=seg, prefix_len_B=prefix, block_q=16, block_k=16, interpret=True)
  mask = attention.make_mask(L, causal=causal, segment_ids_BL=seg, prefix_len_B=prefix)
  xla = lambda q, k, v: attention.xla_attention(q, k, v, mask)
  out, vjp = jax.vjp(flash, *qkv)
  want, want_vjp = jax.vjp(xla, *qkv)
  _assert_close(out, want, "out")
  for name, g, w in zip("qkv", vjp(do), want_vjp(do)):
    _assert_close(g, w, f"d{name}")


def test_unequal_blocks_and_default_blocks_capped_to_the_sequence():
  """block_q 32 with block_k 16, and the default blocks (64) on a 40-long sequence, give the same
  attention as the XLA reference."""
  qkv, do, seg, prefix = _inputs(40, True, True)
  mask = attention.make_mask(40, causal=True, segment_ids_BL=seg, prefix_len_B=prefix)
  want = attention.xla_attention(*qkv, mask)
  for blocks in (dict(block_q=32, block_k=16), {}):
    out = flash_attention_gpu.flash_attention(*qkv, segment_ids_BL=seg, prefix_len_B=prefix, interpret=True, **blocks)
    _assert_close(out, want, str(blocks))
