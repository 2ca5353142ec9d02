"""Vector-matrix products for decoding one token on a GPU, in Pallas (Triton), with what sits
around them in a decoder layer fused in: the RMSNorm before, the SwiGLU gate before, the residual
add after.

  y_F = gemv(x_D, w_FD, norm_D=attn_norm)              # rms_norm(x) @ W
  y_D = gemv(x_D, w_DF, residual_D=res)                # res + x @ W
  y_D = gemv(g_F, w_DF, up_F=u, residual_D=res)        # res + (silu(g) * u) @ W

Why: at batch 1 XLA:GPU turns each product into a multiply and a reduction over the weight's
major axis, which ran at about a third of the copy bandwidth on an H200, and every norm, gate and
residual add is one more short kernel (bench/accelerator.py profiled 1.04 ms a token for the
LVM-300M, 20% of the weight-read bound). Here the weight is stored output-major ([F, D]) so each
program streams `block_f` whole rows, contiguous, and reduces along them.

`reference` is the same computation in plain XLA, with the same roundings (bf16 activations
between ops, fp32 sums): the CPU path and the kernels' numerical reference. interpret=True runs
the kernel op by op on a CPU (Pallas interpret mode).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# (block_f, block_d, warps, stages, programs) for bf16 weights: block_d halves until it divides D
# (the LVM-300M's FFN of 2688 takes 128); D splits until there are `programs` programs.
# bench/accelerator.py's sampler rows try others.
TUNING = (8, 512, 4, 3, 528)


def _rms(x_D: jax.Array, norm_D: jax.Array, eps: float) -> jax.Array:
  x = x_D.astype(jnp.float32)
  return (x * jax.lax.rsqrt(jnp.mean(x * x) + eps) * norm_D.astype(jnp.float32)).astype(x_D.dtype)


def _swiglu(g: jax.Array, u: jax.Array, dtype) -> jax.Array:
  g = g.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * u.astype(jnp.float32)).astype(dtype)


def reference(x_D: jax.Array, w_FD: jax.Array, *, norm_D: Optional[jax.Array] = None, eps: float = 1e-6,
              up_D: Optional[jax.Array] = None, residual_F: Optional[jax.Array] = None,
              out_dtype=None) -> jax.Array:
  """gemv in plain XLA: [F] in out_dtype (default x's dtype)."""
  if norm_D is not None:
    x_D = _rms(x_D, norm_D, eps)
  if up_D is not None:
    x_D = _swiglu(x_D, up_D, x_D.dtype)
  y_F = jnp.einsum("fd,d->f", w_FD, x_D.astype(w_FD.dtype), preferred_element_type=jnp.float32)
  return _finish(y_F, x_D.dtype, residual_F, out_dtype)


def _finish(y_F: jax.Array, dtype, residual_F: Optional[jax.Array], out_dtype) -> jax.Array:
  """The fp32 product rounded as a matmul in `dtype` rounds it, the residual added."""
  if residual_F is not None:
    y_F = y_F.astype(dtype).astype(jnp.float32) + residual_F.astype(jnp.float32)
  return y_F.astype(out_dtype or dtype)


def _kernel(*refs, chunks: int, bd: int, eps: float, norm: bool, swiglu: bool):
  """Program (i, s): rows i*bf.. of W times columns s*chunks*bd.. of x, an fp32 partial sum."""
  x_ref, w_ref, o_ref = refs[0], refs[1], refs[-1]
  rest = list(refs[2:-1])
  norm_ref = rest.pop(0) if norm else None
  up_ref = rest.pop(0) if swiglu else None
  dtype, start = w_ref.dtype, pl.program_id(1) * chunks * bd
  inv = 1.0
  if norm:  # the whole vector's mean square first: every program reads all of x (a few KB)
    D = x_ref.shape[0]
    bn = _block(D, 1024)
    ss = jax.lax.fori_loop(0, D // bn, lambda j, s: s + jnp.sum(jnp.square(
        x_ref[pl.ds(j * bn, bn)].astype(jnp.float32))), jnp.zeros((), jnp.float32))
    inv = jax.lax.rsqrt(ss / D + eps)

  def body(j, acc):
    cols = pl.ds(start + j * bd, bd)
    x = x_ref[cols].astype(jnp.float32)
    if norm:
      x = x * inv * norm_ref[cols].astype(jnp.float32)
    x = _swiglu(x, up_ref[cols], dtype) if swiglu else x.astype(dtype)
    return acc + w_ref[:, pl.ds(j * bd, bd)].astype(jnp.float32) * x.astype(jnp.float32)[None, :]

  acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros((w_ref.shape[0], bd), jnp.float32))
  o_ref[...] = jnp.sum(acc, axis=1)


def _block(D: int, bd: int) -> int:
  """The largest power of two <= bd (and >= 16) dividing D."""
  while D % bd and bd > 16:
    bd //= 2
  return bd


def _splits(F: int, D: int, tuning: tuple) -> int:
  """Into how many slabs of D the products split: the fewest giving `programs` programs."""
  bf, bd, _, _, programs = tuning
  chunks = D // _block(D, bd)
  return next((s for s in range(1, chunks + 1) if chunks % s == 0 and F // bf * s >= programs), chunks)


def fits(F: int, D: int, tuning: tuple = TUNING) -> bool:
  """Whether the kernel takes an [F, D] weight with these blocks (Triton: power-of-two loads)."""
  return F % tuning[0] == 0 and D % _block(D, tuning[1]) == 0


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "tuning", "interpret"))
def gemv(x_D: jax.Array, w_FD: jax.Array, *, norm_D: Optional[jax.Array] = None, eps: float = 1e-6,
         up_D: Optional[jax.Array] = None, residual_F: Optional[jax.Array] = None, out_dtype=None,
         tuning: tuple = TUNING, interpret: bool = False) -> jax.Array:
  """reference's result. Programs tile F by block_f and, where that leaves too few of them to
  fill the GPU, D into slabs (split-K); XLA adds the slabs' fp32 partials and the residual."""
  F, D = w_FD.shape
  bf, bd, warps, stages, _ = tuning
  bd = _block(D, bd)
  if not fits(F, D, tuning):
    raise ValueError(f"gemv: weight [{F}, {D}] is not a multiple of blocks ({bf}, {bd})")
  S = _splits(F, D, tuning)
  whole = pl.BlockSpec((D,), lambda i, s: (0,))
  extra = [a for a in (norm_D, up_D) if a is not None]
  kernel = functools.partial(_kernel, chunks=D // bd // S, bd=bd, eps=eps, norm=norm_D is not None,
                             swiglu=up_D is not None)
  partial_SF = pl.pallas_call(
      kernel, grid=(F // bf, S), interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
      in_specs=[whole, pl.BlockSpec((bf, D // S), lambda i, s: (i, s))] + [whole] * len(extra),
      out_specs=pl.BlockSpec((None, bf), lambda i, s: (s, i)),
      out_shape=jax.ShapeDtypeStruct((S, F), jnp.float32),
  )(x_D, w_FD, *extra)
  return _finish(jnp.sum(partial_SF, axis=0), x_D.dtype, residual_F, out_dtype)


def product(x_D: jax.Array, w_FD: jax.Array, **kw) -> jax.Array:
  """gemv on a GPU where the blocks fit the weight, reference elsewhere."""
  if jax.default_backend() == "gpu" and fits(*w_FD.shape, TUNING):
    return gemv(x_D, w_FD, tuning=TUNING, **kw)
  return reference(x_D, w_FD, **kw)
