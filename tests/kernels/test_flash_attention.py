"""The Pallas flash-attention kernels (TPU and GPU) in interpret mode against float64 attention
and its exact gradients; sharded on 8 fake devices; lowered for TPU (Mosaic) and GPU (Triton)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lvm_jax import sharding
from lvm_jax.config import DEFAULT_RULES
from lvm_jax.kernels import attention, flash_attention as fa


def reference(q, k, v, do, causal, seg, prefix):
  """Float64 attention and its gradients (softmax backward spelled out) for [B, L, H, K] inputs."""
  B, L, H, K = q.shape
  i, j = np.arange(L)[:, None], np.arange(L)[None, :]
  allowed = np.ones((B, L, L), bool)
  if causal:
    allowed = (j <= i)[None] | ((j[None] < prefix[:, None, None]) if prefix is not None else False)
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  t = lambda x: x.transpose(0, 2, 1, 3).astype(np.float64)  # [B, H, L, K]
  q, k, v, do = t(q), t(k), t(v), t(do)
  s = np.where(allowed[:, None], q @ k.transpose(0, 1, 3, 2) / np.sqrt(K), -np.inf)
  with np.errstate(invalid="ignore"):
    p = np.nan_to_num(np.exp(s - s.max(-1, keepdims=True)))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  out = p @ v
  dp = do @ v.transpose(0, 1, 3, 2)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  dq, dk, dv = ds @ k / np.sqrt(K), ds.transpose(0, 1, 3, 2) @ q / np.sqrt(K), p.transpose(0, 1, 3, 2) @ do
  back = lambda x: x.transpose(0, 2, 1, 3)
  return back(out), (back(dq), back(dk), back(dv))


def segments(rng, B, L):
  """Sorted ids of 1-4 packed sentences per row, the last one padding (0) in some rows."""
  cuts = np.sort(rng.integers(1, L, (B, 3)), axis=1)
  return (np.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


CASES = [  # B, L, H, K, causal, segments, prefix, blocks (q, k), dtype
    (2, 200, 2, 100, True, True, True, (128, 128), "float32"),  # odd L, K=100, every mask
    (1, 128, 3, 64, True, False, False, (128, 128), "float32"),
    (2, 300, 1, 96, False, True, False, (128, 256), "float32"),  # unequal blocks, bidirectional
    (2, 130, 2, 128, True, False, True, (128, 128), "float32"),  # AIM prefix, no segments
    (1, 77, 2, 128, True, True, False, (128, 128), "bfloat16"),
]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("B,L,H,K,causal,use_seg,use_prefix,blocks,dtype", CASES)
def test_interpret_matches_float64_forward_and_gradients(B, L, H, K, causal, use_seg, use_prefix, blocks, dtype,
                                                         backend):
  rng = np.random.default_rng(L + K)
  q, k, v, do = (rng.normal(size=(B, L, H, K)).astype(np.float32) for _ in range(4))
  seg = segments(rng, B, L) if use_seg else None
  prefix = rng.integers(1, L, B).astype(np.int32) if use_prefix else None
  want, want_grads = reference(q, k, v, do, causal, seg, prefix)

  def run(q, k, v):
    return fa.flash_attention(q, k, v, causal=causal, segment_ids_BL=None if seg is None else jnp.asarray(seg),
                              prefix_len_B=None if prefix is None else jnp.asarray(prefix),
                              block_q=blocks[0] // (4 if backend == "gpu" else 1),  # GPU: 32 / 64
                              block_k=blocks[1] // (4 if backend == "gpu" else 1), interpret=True, backend=backend)

  args = [jnp.asarray(x, dtype) for x in (q, k, v)]
  out, vjp = jax.vjp(run, *args)
  grads = vjp(jnp.asarray(do, dtype))
  tol = 2e-5 if dtype == "float32" else 4e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
  for name, g, w in zip("qkv", grads, want_grads):
    scale = max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, w / scale, atol=tol * 5, err_msg=f"d{name}")


def test_masked_blocks_are_skipped():
  """Block visibility from scalars: above the causal diagonal, past the keys, or with disjoint
  segment ranges, a block does no work; a prefix reopens blocks above the diagonal."""
  L, bq, bk = 512, 128, 128
  seg = np.repeat([1, 1, 2, 3], 128)[None]
  scalars = fa._scalars(jnp.asarray(seg), jnp.array([0]), bq, bk)
  vis = lambda i, j, causal, prefix=0, kv_len=L: bool(fa._visible(
      0, i, j, jnp.array([prefix]), *scalars[1:], bq=bq, bk=bk, nq=4, nk=4, causal=causal, kv_len=kv_len))
  assert vis(1, 1, True) and vis(1, 0, True) and not vis(0, 1, True)
  assert not vis(2, 0, False) and not vis(3, 2, False) and vis(1, 0, False)  # segments 2|1, 3|2
  assert vis(0, 1, True, prefix=200) and not vis(0, 2, True, prefix=200)
  assert not vis(1, 1, True, kv_len=100)


def test_sharded_over_the_mesh_equals_the_reference():
  """Batch over data x fsdp, heads over tensor: each device runs the kernel on its block."""
  mesh = sharding.make_mesh(dict(ici=dict(data=2, fsdp=2, tensor=2), dcn=dict(data=1, fsdp=1, tensor=1)))
  rng = np.random.default_rng(3)
  B, L, H, K = 4, 160, 4, 64
  q, k, v = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(segments(rng, B, L))

  def loss(impl, q, k, v):
    out = attention.attention(q, k, v, segment_ids_BL=seg, impl=impl, block=128)
    return jnp.sum(jnp.sin(out)), out

  with jax.set_mesh(mesh), sharding.axis_rules(DEFAULT_RULES):
    spec = sharding.current_spec(("batch", None, "heads", None))
    q, k, v = (jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss("flash:cpu", *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert spec == P(("data", "fsdp"), None, "tensor", None) and out.sharding.spec == spec
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


@pytest.mark.parametrize("backend,platform,target", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_the_accelerator(backend, platform, target):
  """Mosaic and Triton lowering run here without the hardware (compiling them needs it)."""
  spec = jax.ShapeDtypeStruct((2, 1000, 4, 100), jnp.bfloat16)

  def loss(q, k, v, seg, prefix):
    out = fa.flash_attention(q, k, v, segment_ids_BL=seg, prefix_len_B=prefix, backend=backend)
    return jnp.sum(out.astype(jnp.float32))

  # Triton calls carry no serialization guarantee; lowering is what is checked here.
  checks = [jax.export.DisabledSafetyCheck.custom_call(target)] if backend == "gpu" else []
  export = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform], disabled_checks=checks)
  try:
    exported = export(spec, spec, spec, jax.ShapeDtypeStruct((2, 1000), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
  except RuntimeError as e:  # jax >= 0.12 reads the GPU's compute capability while lowering Triton
    if "No supported GPU devices" not in str(e):
      raise
    pytest.skip(f"this jax lowers Triton only with a GPU present ({jax.__version__})")
  assert exported.mlir_module().count(target) == 3  # forward, dK/dV and dQ kernels


def test_bad_inputs_are_one_line():
  x = jnp.ones((1, 8, 2, 16))
  with pytest.raises(fa.FlashError, match="must share one"):
    fa.flash_attention(x, jnp.ones((1, 9, 2, 16)), x)
  with pytest.raises(fa.FlashError, match="dtypes int32"):
    fa.flash_attention(*(jnp.ones((1, 8, 2, 16), jnp.int32),) * 3)
  with pytest.raises(fa.FlashError, match="block_q=100: TPU blocks must be multiples of 128"):
    fa.flash_attention(x, x, x, block_q=100)
  with pytest.raises(fa.FlashError, match=r"segment_ids shape \(1, 7\)"):
    fa.flash_attention(x, x, x, segment_ids_BL=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(fa.FlashError, match="block_k=48: GPU blocks must be powers of two >= 16"):
    fa.flash_attention(x, x, x, block_k=48, backend="gpu")
  with pytest.raises(fa.FlashError, match="backend='npu'"):
    fa.flash_attention(x, x, x, backend="npu")
