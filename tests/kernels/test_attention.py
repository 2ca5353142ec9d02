"""The XLA reference attention against a float64 numpy reference, with every mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.kernels import attention


def _reference(q, k, v, causal, seg, prefix):
  """Float64 attention with the mask spelled out element by element."""
  B, L, H, K = q.shape
  out = np.zeros((B, L, H, K))
  for b in range(B):
    allowed = np.zeros((L, L), bool)
    for i in range(L):
      for j in range(L):
        ok = (j <= i or (prefix is not None and j < prefix[b])) if causal else True
        allowed[i, j] = ok and (seg is None or seg[b, i] == seg[b, j])
    for h in range(H):
      s = q[b, :, h] @ k[b, :, h].T / np.sqrt(K)
      s = np.where(allowed, s, -np.inf)
      with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
      out[b, :, h] = p @ v[b, :, h]
  return out


@pytest.mark.parametrize("chunk", [256, 4])  # 4: the causal path splits 13 queries into 4 blocks
@pytest.mark.parametrize("causal,use_seg,use_prefix", [
    (True, False, False), (True, True, False), (True, False, True), (True, True, True),
    (False, True, False)])
def test_matches_float64_reference(causal, use_seg, use_prefix, chunk):
  rng = np.random.default_rng(0)
  B, L, H, K = 2, 13, 3, 8
  q, k, v = (rng.normal(size=(B, L, H, K)) for _ in range(3))
  seg = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 13]) if use_seg else None
  prefix = np.array([4, 9]) if use_prefix else None
  with jax.default_matmul_precision("highest"):
    out = attention.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), causal=causal,
                              segment_ids_BL=None if seg is None else jnp.asarray(seg),
                              prefix_len_B=None if prefix is None else jnp.asarray(prefix),
                              chunk=chunk)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, causal, seg, prefix),
                             atol=2e-5, rtol=2e-5)


def test_gradients_match_float64_reference_through_chunks():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 11, 2, 4)) for _ in range(3))
  seg = np.array([[1] * 6 + [2] * 5, [1] * 11])
  cot = rng.normal(size=q.shape)

  def loss(q, k, v):
    out = attention.attention(q, k, v, segment_ids_BL=jnp.asarray(seg), chunk=3)
    return jnp.sum(out * cot)

  with jax.default_matmul_precision("highest"):
    grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  eps = 1e-6  # central differences of the float64 reference
  ref = lambda q, k, v: np.sum(_reference(q, k, v, True, seg, None) * cot)
  # Both rows, both sentences of row 0, and both sides of its boundary (positions 5 and 6).
  for idx in ((0, 2, 0, 1), (0, 5, 1, 3), (0, 6, 0, 0), (0, 10, 1, 2), (1, 7, 1, 2), (1, 0, 0, 3)):
    for which, g in enumerate(grads):
      up, down = [a.copy() for a in (q, k, v)], [a.copy() for a in (q, k, v)]
      up[which][idx] += eps
      down[which][idx] -= eps
      np.testing.assert_allclose(float(g[idx]), (ref(*up) - ref(*down)) / (2 * eps), rtol=1e-3, atol=1e-5)


def test_bad_inputs_name_the_problem():
  x = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="shapes differ"):
    attention.attention(x, jnp.ones((1, 5, 2, 8)), x)
  with pytest.raises(ValueError, match="impl='pallas'"):
    attention.attention(x, x, x, impl="pallas")


def test_resolve_follows_the_platform():
  assert [attention.resolve("auto", p) for p in ("cpu", "tpu", "cuda")] == ["xla", "flash:tpu", "cudnn"]
  assert attention.resolve("flash", "cpu") == "flash:cpu" and attention.resolve("xla", "tpu") == "xla"
  assert attention.resolve("flash", "gpu") == "flash:gpu" and attention.resolve("cudnn", "cuda") == "cudnn"
  with pytest.raises(ValueError, match="cudnn.*GPUs only"):
    attention.resolve("cudnn", "tpu")


def test_run_table_follows_max_sentences():
  """cuDNN's table: max_sentences (capped by what fits) plus the padding run; 0 = all that fit."""
  assert [attention.max_runs(4096, n) for n in (0, 1, 8, 16, 40)] == [17, 2, 9, 17, 17]
  assert attention.max_runs(8192) == 33 and attention.max_runs(100) == 2
  seg = np.zeros((3, 4096), np.int32)
  for row, n in enumerate((1, 8, 9)):  # n sentences of 256 tokens, then padding
    seg[row, :256 * n] = np.repeat(np.arange(1, n + 1), 256)
  np.testing.assert_array_equal(attention.runs_per_row(jnp.asarray(seg)), [2, 9, 10])
  assert int(attention.run_overflow(jnp.asarray(seg), 8)) == 1 and int(attention.run_overflow(jnp.asarray(seg))) == 0


def test_segment_runs_describe_every_run_of_a_packed_row():
  """cuDNN's packed form: per-row run lengths and start offsets, -1 past the last run; rows with
  more runs than the table are what run_overflow counts."""
  rng = np.random.default_rng(0)
  L, runs = 64, attention.max_runs(64)
  rows = []
  for n in (1, 2, runs - 1, runs, runs + 3):
    cuts = np.sort(rng.choice(np.arange(1, L), n - 1, replace=False))
    ids = np.repeat(np.arange(n), np.diff(np.r_[0, cuts, L]))
    rows.append(np.where(ids == n - 1, 0, ids + 1) if n > 1 else ids + 1)  # the last run as padding (0)
  seg = jnp.asarray(np.stack(rows), jnp.int32)
  lengths, offsets = (np.asarray(x) for x in attention.segment_runs(seg, runs))
  assert lengths.shape == (5, runs) and offsets.shape == (5, runs + 1) and np.all(offsets[:, -1] == -1)
  for row, length, offset in zip(np.asarray(seg), lengths, offsets):
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    n = min(len(starts), runs)
    np.testing.assert_array_equal(offset[:n], starts[:n])
    np.testing.assert_array_equal(length[:n], np.diff(np.r_[starts, L])[:n])
    assert np.all(offset[n:] == -1) and np.all(length[n:] == -1)
  assert int(attention.run_overflow(seg)) == 1  # only the row of runs + 3
