"""The pieces both flash kernels share: the block ranges agree with the elementwise mask, the
custom_vjp wiring hands the backend's backward its residuals, and padding round-trips."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.kernels import flash_common as fc


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bq,bk", [(4, 4), (4, 8), (8, 4)])
def test_block_ranges_are_exactly_the_blocks_the_mask_opens(causal, bq, bk):
  """With one segment, last_key_block / first_query_block are tight: the block they name has an
  allowed entry and no block past (before) it has one; keys from kv_len on are padding."""
  Lp, kv_len = 24, 21
  pos = np.arange(Lp)
  for prefix in (0, 3, 9, 21):
    m = np.broadcast_to(fc.allowed(pos[:, None], pos[None, :], 0, 0, prefix, causal=causal, kv_len=kv_len), (Lp, Lp))
    blocks_seen = m.reshape(Lp // bq, bq, Lp // bk, bk).any(axis=(1, 3))  # [query block, key block]
    for i in range(Lp // bq):
      last = int(fc.last_key_block(i, prefix, bq=bq, bk=bk, causal=causal, kv_len=kv_len))
      assert blocks_seen[i, last] and not blocks_seen[i, last + 1:].any(), (prefix, i)
    for j in range((kv_len - 1) // bk + 1):
      first = int(fc.first_query_block(j, prefix, bq=bq, bk=bk, causal=causal))
      assert blocks_seen[first, j] and not blocks_seen[:first, j].any(), (prefix, j)


def test_allowed_is_causal_or_prefix_and_same_segment_and_not_padding():
  q, k = np.arange(6)[:, None], np.arange(6)[None, :]
  seg = np.array([1, 1, 1, 2, 2, 0])
  got = np.asarray(fc.allowed(q, k, seg[:, None], seg[None, :], 2, causal=True, kv_len=5))
  for i, j in itertools.product(range(6), range(6)):
    want = (j <= i or j < 2) and seg[i] == seg[j] and j < 5
    assert got[i, j] == want, (i, j)


def test_with_vjp_gives_the_backends_gradients_and_none_for_the_ids():
  """The backward gets (q, k, v, o, lse, do, seg, prefix, st) as the forward saw and made them."""
  seen = {}

  def forward(q, k, v, seg, prefix, st):
    return q * k + v, jnp.full(q.shape[:-1], st.scale)

  def backward(q, k, v, o, lse, do, seg, prefix, st):
    seen.update(o=o, lse=lse, seg=seg, prefix=prefix, st=st)
    return do * k, do * q, do

  flash = fc.with_vjp(forward, backward)
  st = fc.Static(0.5, 8, 8, True, 3, True)
  q, k, v = (jnp.full((1, 1, 3, 2), x, jnp.float32) for x in (2.0, 3.0, 4.0))
  seg, prefix = jnp.ones((1, 3), jnp.int32), jnp.array([1], jnp.int32)
  grads = jax.grad(lambda q, k, v: jnp.sum(flash(q, k, v, seg, prefix, st)), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(np.stack(grads), np.stack([k, q, jnp.ones_like(v)]))
  assert seen["st"] == st and float(seen["o"][0, 0, 0, 0]) == 10.0 and float(seen["lse"][0, 0, 0]) == 0.5
  np.testing.assert_array_equal(seen["seg"], seg)
  np.testing.assert_array_equal(seen["prefix"], prefix)


def test_padded_call_pads_to_both_blocks_and_crops_back():
  """L=10 with blocks 4 and 6 pads to 12 (their lcm); K=3 to head_dim 8; segment ids repeat
  their last id (block id ranges unchanged); the output comes back [B, L, H, K] unchanged."""
  B, L, H, K = 2, 10, 3, 3
  q = jnp.asarray(np.random.default_rng(0).normal(size=(B, L, H, K)), jnp.float32)
  seg = jnp.asarray(np.tile(np.repeat([1, 2], 5), (B, 1)))

  def flash(q, k, v, seg_BL, prefix_B, st):
    assert q.shape == (B, H, 12, 8) and seg_BL.shape == (B, 12) and prefix_B.dtype == jnp.int32
    assert st == fc.Static(K ** -0.5, 4, 6, True, L, False)
    np.testing.assert_array_equal(seg_BL[:, L:], seg_BL[:, L - 1:L].repeat(2, axis=1))
    assert not q[:, :, L:].any() and not q[..., K:].any()
    return q

  out = fc.padded_call(flash, q, q, q, seg, None, causal=True, bq=4, bk=6, head_dim=8, interpret=False)
  np.testing.assert_array_equal(out, q)


def test_blocks_default_per_backend_are_checked_and_capped():
  pow2 = dict(valid=lambda b: not b & (b - 1), rule="powers of two")
  assert fc.blocks(None, None, "gpu", cap=1024, **pow2) == (fc.BLOCKS["gpu"],) * 2
  assert fc.blocks(None, 16, "tpu", cap=256, **pow2) == (256, 16)
  with pytest.raises(fc.FlashError, match="block_k=48: GPU blocks must be powers of two"):
    fc.blocks(16, 48, "gpu", cap=64, **pow2)
