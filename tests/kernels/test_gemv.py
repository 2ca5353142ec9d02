"""kernels/gemv.py: the Triton vector-matrix kernel, run in Pallas interpret mode on the CPU,
against its XLA reference and against the unfused ops it replaces in a decoder layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.kernels import gemv
from lvm_jax.models import transformer

F, D = 48, 384  # D spans three blocks of 128: the loop over D runs more than once
TUNE = (8, 128, 4, 1, 0)  # no split of D
SPLIT = (8, 64, 4, 2, 12)  # 6 programs along F, so D splits in 2 (3 blocks each)


def _inputs(dtype):
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (D,), dtype)
  w = (jax.random.normal(k[1], (F, D)) * 0.05).astype(dtype)
  norm = (1 + 0.1 * jax.random.normal(k[2], (D,))).astype(dtype)
  return x, w, norm, jax.random.normal(k[3], (D,), dtype), jax.random.normal(k[4], (F,), dtype)


@pytest.mark.parametrize("tuning", [TUNE, SPLIT], ids=["whole_D", "split_D"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fused", ["plain", "norm", "swiglu", "residual", "norm+residual"])
def test_kernel_matches_reference(dtype, fused, tuning):
  x, w, norm, up, res = _inputs(dtype)
  kw = {"norm": dict(norm_D=norm), "swiglu": dict(up_D=up), "residual": dict(residual_F=res),
        "norm+residual": dict(norm_D=norm, residual_F=res), "plain": {}}[fused]
  got = gemv.gemv(x, w, tuning=tuning, interpret=True, **kw)
  want = gemv.reference(x, w, **kw)
  assert got.dtype == dtype and got.shape == (F,)
  # fp32: summation order only; bf16: the same roundings, so at most one bf16 step apart.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_reference_is_the_layer_ops_it_fuses():
  """rms_norm -> matmul, silu(gate) * up -> matmul, residual + matmul, as decoder_layer has them."""
  x, w, norm, up, res = _inputs(jnp.float32)
  mm = lambda h: h @ w.T
  np.testing.assert_allclose(gemv.reference(x, w, norm_D=norm), mm(transformer.rms_norm(x[None], norm, 1e-6)[0]),
                             atol=1e-5)
  np.testing.assert_allclose(gemv.reference(x, w, up_D=up), mm(jax.nn.silu(x) * up), atol=1e-5)
  np.testing.assert_allclose(gemv.reference(x, w, residual_F=res), res + mm(x), atol=1e-5)


def test_splits_fill_the_programs():
  assert gemv._splits(48, 384, SPLIT) == 2 and gemv._splits(48, 384, TUNE) == 1
  assert gemv._splits(1024, 2688, (8, 256, 4, 3, 264)) == 3  # 21 blocks of 128: 128 x 3 programs
  assert gemv._splits(8, 256, (8, 64, 4, 2, 1000)) == 4  # at most one block a program


def test_blocks_that_do_not_fit_are_refused():
  x, w, *_ = _inputs(jnp.float32)
  assert gemv.fits(F, 48, TUNE) and not gemv.fits(F, 200, TUNE) and not gemv.fits(20, D, TUNE)
  with pytest.raises(ValueError, match="multiple of blocks"):
    gemv.gemv(x[:200], w[:, :200], tuning=TUNE, interpret=True)
  # block_d 128 halves to 16 for D = 48: still the reference's numbers
  np.testing.assert_allclose(gemv.gemv(x[:48], w[:, :48], tuning=TUNE, interpret=True),
                             gemv.reference(x[:48], w[:, :48]), atol=1e-5)
