"""LLaMA-style decoder-only transformer of the LVM release, in Flax NNX.

Dimension letters: B batch, L length, D d_model, H heads, K head dim, F ffn hidden, V vocab,
N layers.

As in the release: pre-RMSNorm computed in fp32 (eps 1e-6), RoPE (theta 1e4), SwiGLU, no biases,
untied embeddings, multi-head attention, every weight drawn from normal(0.02). Parameters are
fp32; activations run in `dtype` (bf16 on TPU). Layers are stacked along a leading N axis and run
under `lax.scan`, so compile time does not grow with depth; `remat` picks what the backward pass
recomputes.

Parameter names map one-to-one onto Hugging Face `LlamaForCausalLM`:
  embed [V, D]          -> model.embed_tokens.weight
  layers.attn_norm[i]   -> model.layers.i.input_layernorm.weight
  layers.wq/wk/wv[i]    -> model.layers.i.self_attn.{q,k,v}_proj.weight  (reshape [D, H*K], transpose)
  layers.wo[i]          -> model.layers.i.self_attn.o_proj.weight        (reshape [H*K, D], transpose)
  layers.mlp_norm[i]    -> model.layers.i.post_attention_layernorm.weight
  layers.w_gate/w_up/w_down[i] -> model.layers.i.mlp.{gate,up,down}_proj.weight  (transpose)
  final_norm            -> model.norm.weight
  lm_head [D, V]        -> lm_head.weight (transpose)
RoPE uses the rotate-half layout of HF, so q/k need no permutation.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvm_jax import sharding
from lvm_jax.config import check
from lvm_jax.kernels import attention as attention_lib


@dataclasses.dataclass(frozen=True)
class Config:
  d_model: int
  ffn: int
  layers: int
  heads: int
  vocab_size: int = 8292
  rope_theta: float = 1e4
  norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: str = "full"
  attention: str = "xla"  # kernels/attention.py: xla | auto | flash, or resolved (flash:tpu)
  attention_block: int = 0  # flash kernels: query and key block; 0 = the backend default
  # The most sentences the data packs in a row (0: as many as fit). It sizes cuDNN's run table,
  # whose empty slots cost time: on an H200, 9 slots ran at plain causal speed and 17 15% slower.
  max_sentences: int = 0
  # False: one copy of the layer per layer instead of a lax.scan. Compiles take longer, but the
  # backward reads each layer's saved activations where they were made: under the scan XLA:GPU
  # copies them into stacked buffers (~14% of an LVM-300M step on an H200, bench/accelerator.py).
  scan_layers: bool = True

  @property
  def head_dim(self) -> int:
    return self.d_model // self.heads


def _param(init: nnx.Initializer, key: jax.Array, shape: tuple, axes: tuple) -> nnx.Param:
  return nnx.Param(init(key, shape, jnp.float32), axes=axes)


class Layers(nnx.Module):
  """All N decoder layers, each weight stacked along a leading N axis."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    N, D, H, K, F = cfg.layers, cfg.d_model, cfg.heads, cfg.head_dim, cfg.ffn
    normal, ones = nnx.initializers.normal(0.02), nnx.initializers.ones
    self.attn_norm = _param(ones, rngs.params(), (N, D), ("layers", "norm"))
    self.wq = _param(normal, rngs.params(), (N, D, H, K), ("layers", "embed", "heads", "head_dim"))
    self.wk = _param(normal, rngs.params(), (N, D, H, K), ("layers", "embed", "heads", "head_dim"))
    self.wv = _param(normal, rngs.params(), (N, D, H, K), ("layers", "embed", "heads", "head_dim"))
    self.wo = _param(normal, rngs.params(), (N, H, K, D), ("layers", "heads", "head_dim", "embed"))
    self.mlp_norm = _param(ones, rngs.params(), (N, D), ("layers", "norm"))
    self.w_gate = _param(normal, rngs.params(), (N, D, F), ("layers", "embed", "mlp"))
    self.w_up = _param(normal, rngs.params(), (N, D, F), ("layers", "embed", "mlp"))
    self.w_down = _param(normal, rngs.params(), (N, F, D), ("layers", "mlp", "embed"))


class Model(nnx.Module):
  """tokens [B, L] (+ segment ids and positions for packed sentences) -> logits [B, L, V]."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    normal = nnx.initializers.normal(0.02)
    self.embed = _param(normal, rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.layers = Layers(cfg, rngs)
    self.final_norm = _param(nnx.initializers.ones, rngs.params(), (cfg.d_model,), ("norm",))
    self.lm_head = _param(normal, rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def __call__(
      self,
      tokens_BL: jax.Array,
      segment_ids_BL: Optional[jax.Array] = None,
      positions_BL: Optional[jax.Array] = None,
  ) -> jax.Array:
    cfg = self.cfg
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    sin_BLK, cos_BLK = rope_tables(positions_BL, cfg.head_dim, cfg.rope_theta)

    def attend(q, k, v):
      return attention_lib.attention(q, k, v, causal=True, segment_ids_BL=segment_ids_BL, impl=cfg.attention,
                                     block=cfg.attention_block, max_sentences=cfg.max_sentences), None

    def layer(x_BLD: jax.Array, p: dict) -> tuple[jax.Array, None]:
      return decoder_layer(x_BLD, p, sin_BLK, cos_BLK, attend, cfg)

    x_BLD, stacked = self._embed(tokens_BL), self._stacked()
    if cfg.scan_layers:
      x_BLD, _ = jax.lax.scan(remat(layer, cfg.remat), x_BLD, stacked)
    else:
      for n in range(cfg.layers):
        x_BLD, _ = remat(layer, cfg.remat)(x_BLD, {k: w[n] for k, w in stacked.items()})
    return self._logits(x_BLD)

  def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: dict,
             layer_params: Optional[list] = None, head_GD: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """T new tokens at absolute positions, attending to themselves and to the KV cache.

    cache (see `empty_cache`): per layer the keys and values (_write_cache); pos [B, S], the
    absolute position each slot holds (-1: empty); next, the slot the next token goes to. Slots
    are written in turn, wrapping after S, so a full cache slides: a query sees the last S
    positions up to itself. RoPE makes attention depend on position differences only, so
    positions past the training length are fine as long as the window is not longer than it.
    A call with T > 1 must not run past the last slot (generation prefills an empty cache, then
    adds one token at a time). `layer_params` (from `split_layers`) lets a decoding loop slice
    the stacked weights once instead of at every token; with fuse_for_decoding(vector=True)'s
    layers, one token also takes the output head as fuse_head_for_decoding makes it (`head_GD`).
    Returns logits [B, T, V] and the updated cache.
    """
    cfg = self.cfg
    T = tokens_BT.shape[1]
    S = cache["pos"].shape[1]
    start = cache["next"] % S
    pos_BS = jax.lax.dynamic_update_slice(cache["pos"], positions_BT.astype(jnp.int32), (0, start))
    mask_B1TS = ((pos_BS[:, None, :] >= 0) & (pos_BS[:, None, :] <= positions_BT[:, :, None])
                 & (pos_BS[:, None, :] > positions_BT[:, :, None] - S))[:, None]
    sin_BTK, cos_BTK = rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta)
    # Layers unrolled over per-layer caches: each new k/v is a dynamic_update_slice that XLA does
    # in place. A scan over a stacked cache made XLA:CPU copy the whole cache for every token.
    x_BTD, kvs = self._embed(tokens_BT), list(cache["kv"])
    for n, p in enumerate(layer_params or self.split_layers()):

      def attend(q, k, v, q_scale_BT=None, n=n):
        kvs[n], k_BHSK, v_BHSK = _write_cache(kvs[n], k, v, start)
        return attention_lib.cache_attention(q, k_BHSK.astype(q.dtype), v_BHSK.astype(q.dtype), mask_B1TS,
                                             q_scale_BT), None

      x_BTD, _ = decoder_layer(x_BTD, p, sin_BTK, cos_BTK, attend, cfg)
    new_cache = {"kv": tuple(kvs), "pos": pos_BS, "next": cache["next"] + T}
    return self._logits(x_BTD, head_GD), new_cache

  def split_layers(self) -> list[dict]:
    """Per-layer weight dicts, sliced from the stacked arrays."""
    return [{k: w[n] for k, w in self._stacked().items()} for n in range(self.cfg.layers)]

  def empty_cache(self, batch: int, length: int, dtype: Optional[str] = None, joint: bool = False) -> dict:
    """A KV cache of `length` slots for each layer (the context window when decoding): per layer
    a pair of arrays k, v [B, H, S, K], or with `joint` one array [B, H, 2, S, K] (_write_cache)."""
    cfg = self.cfg
    zeros = lambda *shape: jnp.zeros((batch, cfg.heads, *shape, length, cfg.head_dim), jnp.dtype(dtype or cfg.dtype))
    return {"kv": tuple(zeros(2) if joint else (zeros(), zeros()) for _ in range(cfg.layers)),
            "pos": jnp.full((batch, length), -1, jnp.int32), "next": jnp.zeros((), jnp.int32)}

  def _embed(self, tokens_BL: jax.Array) -> jax.Array:
    # Gather the table whole before the lookup, as FSDP does for every weight: a gather from a
    # vocab/embed-sharded table into a batch-sharded output has no efficient SPMD lowering.
    table_VD = sharding.constrain(self.embed[...], (None, None))
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return sharding.constrain(x_BLD, ("batch", "length", "embed"))

  def _stacked(self) -> dict:
    return {k: v[...] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}

  def _logits(self, x_BLD: jax.Array, head_GD: Optional[jax.Array] = None) -> jax.Array:
    """The output head on the final norm; head_GD: one token's head (fuse_head_for_decoding), the
    norm folded into its product (_normed_rows), 1/rms applied to the logits."""
    # fp32 logits even from bf16 activations: the cross-entropy must not see rounded logits.
    if head_GD is not None:
      logits_1V, inv_rms_11 = _normed_rows(x_BLD.reshape(1, -1), head_GD, self.cfg.norm_eps)
      return (logits_1V * inv_rms_11)[None]
    x_BLD = rms_norm(x_BLD, self.final_norm[...], self.cfg.norm_eps)
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, self.lm_head[...].astype(jnp.dtype(self.cfg.dtype)),
                            preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BLV, ("batch", "length", "vocab"))


def _write_cache(kv: Any, k_BTHK: jax.Array, v_BTHK: jax.Array, start: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
  """One layer's cache with the T new keys and values written at slot `start` (in place: a
  dynamic_update_slice), and its keys and values [B, H, S, K] to attend over.

  A joint cache (one [B, H, 2, S, K] array) takes both in one write: one kernel a token where
  XLA:GPU runs two (bench/sampler_launches.py: LVM-300M 214 -> 192 at batch 1). The barrier
  keeps XLA from rewriting the attention's read of the slices as the old cache plus the new
  row (three more kernels). XLA:CPU copies each slice before its product, so the CPU keeps the
  pair of arrays (the sampler picks, sample.py)."""
  new_BHTK = (jnp.swapaxes(x, 1, 2) for x in (k_BTHK, v_BTHK))
  if isinstance(kv, tuple):
    kv = tuple(sharding.constrain(jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, 0, start, 0)),
                                  ("batch", "heads", None, None)) for c, x in zip(kv, new_BHTK))
    return kv, *kv
  new_BH2TK = jnp.stack(tuple(new_BHTK), axis=2).astype(kv.dtype)
  kv = sharding.constrain(jax.lax.dynamic_update_slice(kv, new_BH2TK, (0, 0, 0, start, 0)),
                          ("batch", "heads", None, None, None))
  read = jax.lax.optimization_barrier(kv)
  return kv, read[:, :, 0], read[:, :, 1]


def decoder_layer(
    x_BLD: jax.Array,
    p: dict,
    sin_BLK: jax.Array,
    cos_BLK: jax.Array,
    attend: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]],
    cfg: Config,
) -> tuple[jax.Array, Any]:
  """One pre-norm block: x + attn(norm(x)), then x + swiglu(norm(x)).

  `attend(q, k, v)` (RoPE applied, [B, L, H, K]) returns the attention output and anything the
  caller carries across steps (the KV cache when decoding, None in training); the one-token
  layer (_vector_layer) also passes a factor for each query's logits.
  Projections run on tokens flattened to T = B*L rows: plain 2D matmuls are what every backend's
  fastest path takes (XLA:CPU runs 3D einsums fused with elementwise ops ~2x slower), and the
  flattened rows keep the batch's sharding because B is the major dimension.
  """
  if "wqkv_GD" in p:
    return _vector_layer(x_BLD, p, sin_BLK, cos_BLK, attend, cfg)
  B, L, D = x_BLD.shape
  H, K = cfg.heads, cfg.head_dim
  w = {k: v.astype(x_BLD.dtype) for k, v in p.items()}
  x_TD = x_BLD.reshape(B * L, D)
  h_TD = rms_norm(x_TD, p["attn_norm"], cfg.norm_eps)
  if "wqkv" in w:  # decoding's fused weights (fuse_for_decoding): one matmul where three would launch
    qkv_T3F = jnp.einsum("td,dnf->tnf", h_TD, w["wqkv"])
    q_BLHK, k_BLHK, v_BLHK = (qkv_T3F[:, i].reshape(B, L, H, K) for i in range(3))
  else:
    q_BLHK, k_BLHK, v_BLHK = ((h_TD @ w[n].reshape(D, H * K)).reshape(B, L, H, K) for n in ("wq", "wk", "wv"))
  q_BLHK = sharding.constrain(apply_rope(q_BLHK, sin_BLK, cos_BLK), ("batch", "length", "heads", "head_dim"))
  k_BLHK = apply_rope(k_BLHK, sin_BLK, cos_BLK)
  out_BLHK, carry = attend(q_BLHK, k_BLHK, v_BLHK)
  x_TD = x_TD + out_BLHK.reshape(B * L, H * K) @ w["wo"].reshape(H * K, D)
  x_TD = sharding.constrain(x_TD, ("batch", "embed"))

  h_TD = rms_norm(x_TD, p["mlp_norm"], cfg.norm_eps)
  if "w_gate_up" in w:
    gate_up_T2F = jnp.einsum("td,dnf->tnf", h_TD, w["w_gate_up"])
    gate_TF, up_TF = gate_up_T2F[:, 0], gate_up_T2F[:, 1]
  else:
    gate_TF, up_TF = h_TD @ w["w_gate"], h_TD @ w["w_up"]
  h_TF = sharding.constrain(jax.nn.silu(gate_TF) * up_TF, ("batch", "mlp"))
  x_TD = x_TD + h_TF @ w["w_down"]
  return sharding.constrain(x_TD, ("batch", "embed")).reshape(B, L, D), carry


def _vector_layer(x_11D, p, sin_11K, cos_11K, attend, cfg: Config) -> tuple[jax.Array, Any]:
  """decoder_layer for one token (B = L = 1) on fuse_for_decoding(vector=True)'s weights.

  XLA:GPU runs each one-row product as one reduction kernel, and at batch 1 a token pays more for
  its kernels' fixed costs (~1-2 us each on an H200) than for its bytes, so this layer is built
  to launch few. Products run on [out, in] weights (the reductions then run along contiguous
  rows: 1.5x faster than down the columns of [in, out]). Each norm folds into the product after
  it (_normed_rows), its 1/rms then scaling k and v before the cache, q's attention logits (RoPE
  is linear) and gate/up before SwiGLU; each residual add happens inside its product
  (_plus_rows). LVM-300M: 214 kernels a token where the plain layers took 297; 190 with a
  joint cache (_write_cache) and the final norm inside the head (fuse_head_for_decoding)
  (bench/sampler_launches.py).
  """
  if x_11D.shape[:2] != (1, 1):
    raise ValueError(f"vector decoding weights take one token of one sequence, not {x_11D.shape[:2]}")
  D, H, K, F = x_11D.shape[-1], cfg.heads, cfg.head_dim, p["w_down_DJ"].shape[1] - SPARE
  x_1D = x_11D.reshape(1, D)
  qkv_1F, inv_rms_11 = _normed_rows(x_1D, p["wqkv_GD"], cfg.norm_eps)
  q_1F, k_1F, v_1F = (qkv_1F[:, i * H * K:(i + 1) * H * K] for i in range(3))
  q_11HK, k_11HK, v_11HK = ((a * s).astype(x_1D.dtype).reshape(1, 1, H, K)
                            for a, s in ((q_1F, 1.0), (k_1F, inv_rms_11), (v_1F, inv_rms_11)))
  out_11HK, carry = attend(apply_rope(q_11HK, sin_11K, cos_11K), apply_rope(k_11HK, sin_11K, cos_11K), v_11HK,
                           inv_rms_11)
  x_1D = _plus_rows(x_1D, out_11HK.reshape(1, H * K), p["wo_DJ"])
  gate_up_1F, inv_rms_11 = _normed_rows(x_1D, p["w_gate_up_GD"], cfg.norm_eps)
  h_1F = jax.nn.silu(gate_up_1F[:, :F] * inv_rms_11) * (gate_up_1F[:, F:] * inv_rms_11)
  x_1D = _plus_rows(x_1D, h_1F.astype(x_1D.dtype), p["w_down_DJ"])
  return x_1D.reshape(1, 1, D), carry


SPARE = 8  # zero columns after the weights of a product that adds the residual (rows stay 16-byte aligned)


def _plus_rows(x_1D: jax.Array, h_1I: jax.Array, w_DJ: jax.Array) -> jax.Array:
  """x + h @ w[:, :I].T in one reduction kernel, summed in fp32: h gets a 1 in the first spare
  column, whose weights are swapped for x inside the product."""
  I, J = h_1I.shape[1], w_DJ.shape[1]
  h_1J = jnp.concatenate([h_1I, jnp.ones((1, 1), h_1I.dtype), jnp.zeros((1, J - I - 1), h_1I.dtype)], axis=1)
  w_DJ = jnp.where(jax.lax.broadcasted_iota(jnp.int32, w_DJ.shape, 1) == I, x_1D.reshape(-1, 1).astype(w_DJ.dtype),
                   w_DJ)
  return jnp.einsum("tj,dj->td", h_1J, w_DJ, preferred_element_type=jnp.float32).astype(x_1D.dtype)


def _normed_rows(x_1D: jax.Array, w_GD: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """(x @ w[:-1].T, 1/rms(x)) in fp32, in one reduction kernel: rms_norm(x) @ W.T is
  (x @ (W * scale).T) / rms(x), and the spare last row of w (fuse_for_decoding) is swapped for x
  inside the product, so the norm's sum of squares comes out beside the rows."""
  G, D = w_GD.shape
  w_GD = jnp.where(jax.lax.broadcasted_iota(jnp.int32, w_GD.shape, 0) == G - 1, x_1D.astype(w_GD.dtype), w_GD)
  out_1G = jnp.einsum("td,gd->tg", x_1D, w_GD, preferred_element_type=jnp.float32)
  return out_1G[:, :-1], jax.lax.rsqrt(out_1G[:, -1:] / D + eps)


def fuse_for_decoding(p: dict, dtype: Any, vector: bool = False) -> dict:
  """One layer's weights for decode steps: in `dtype` (a token reads every weight once, so bf16
  halves its bytes), with q/k/v and gate/up each one product (at batch 1 every product is a short
  kernel far below the memory bandwidth: fewer, larger ones decoded 1.2x faster on an H200).
  They stack on a new axis, not along the output one, so a tensor-sharded output axis keeps its
  sharding. Norm scales stay as they are. vector=True (one token on one device, _vector_layer):
  each weight transposed to [out, in], q/k/v and gate/up concatenated, each norm's scale
  multiplied into the product after it, which gets a spare last row (_normed_rows); wo and
  w_down get SPARE zero columns (_plus_rows)."""
  D = p["wq"].shape[0]
  if vector:
    def normed(norm, *names):
      w_FD = jnp.concatenate([p[n].reshape(D, -1).T for n in names], axis=0) * p[norm].astype(jnp.float32)[None]
      return jnp.concatenate([w_FD, jnp.zeros((1, D), w_FD.dtype)]).astype(dtype)
    spare = lambda w_DI: jnp.concatenate([w_DI, jnp.zeros((D, SPARE), w_DI.dtype)], axis=1).astype(dtype)
    return {"wqkv_GD": normed("attn_norm", "wq", "wk", "wv"), "wo_DJ": spare(p["wo"].reshape(-1, D).T),
            "w_gate_up_GD": normed("mlp_norm", "w_gate", "w_up"), "w_down_DJ": spare(p["w_down"].T)}
  cast = lambda n: p[n].reshape(D, -1).astype(dtype)
  fused = {"wqkv": jnp.stack([cast(n) for n in ("wq", "wk", "wv")], axis=1),
           "w_gate_up": jnp.stack([cast("w_gate"), cast("w_up")], axis=1)}
  rest = {k: w if "norm" in k else w.astype(dtype) for k, w in p.items() if k not in ("wq", "wk", "wv", "w_gate", "w_up")}
  return {**rest, **fused}


def fuse_head_for_decoding(head_DV: jax.Array, norm_D: jax.Array, dtype: Any) -> jax.Array:
  """The output head for one token (_vector_layer's model): [out, in], the final norm's scale
  multiplied in (in fp32, rounded to `dtype` once) and a spare last row (_normed_rows), so the
  final norm runs inside the head's product."""
  w_VD = head_DV.astype(jnp.float32).T * norm_D.astype(jnp.float32)[None]
  return jnp.concatenate([w_VD, jnp.zeros((1, w_VD.shape[1]), w_VD.dtype)]).astype(dtype)


REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat(fn, policy: str):
  """none: keep every activation; full: keep only layer inputs (least memory, ~1/3 more compute);
  dots: keep the outputs of matmuls without batch dimensions (the projections), recompute the
  attention scores and the elementwise ops."""
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT[policy], prevent_cse=False)


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in fp32 whatever the activation dtype (bf16 squares lose too much), cast back."""
  x = x_BLD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  scale = scale_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (x * scale).astype(x_BLD.dtype)


def rope_tables(positions_BL: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """sin and cos [B, L, K] for rotate-half RoPE, in fp32."""
  inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_BLK2 = positions_BL.astype(jnp.float32)[..., None] * inv_freq_K2[None, None]
  angles_BLK = jnp.concatenate([angles_BLK2, angles_BLK2], axis=-1)
  return jnp.sin(angles_BLK), jnp.cos(angles_BLK)


def apply_rope(x_BLHK: jax.Array, sin_BLK: jax.Array, cos_BLK: jax.Array) -> jax.Array:
  half = x_BLHK.shape[-1] // 2
  x = x_BLHK.astype(jnp.float32)
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BLK[:, :, None] + rotated * sin_BLK[:, :, None]
  return out.astype(x_BLHK.dtype)


# ---------------------------------------------------------------------------- the family's contract
# What train.py, compile.py, load.py and config.py need of a model family (models/aim.py has the
# same names): the config, the batch, the loss, the FLOPs, validation, and which weights to load.

WEIGHTS = "params"  # the checkpoint item holding the weights to run (load.py)
EVALUATION = "perplexity"  # evaluate.py's report: answer perplexity per dataset and task


def inference(cfg: Config) -> Config:
  """The config to run trained weights with: no recompute, the backend's fastest attention."""
  return dataclasses.replace(cfg, remat="none", attention="auto")


def batch_spec(c: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the loss takes: packed rows of visual sentences (data/pipeline.py).

  tokens: ids; segment_ids: the sentence of each token, 0 = padding; positions: from 0 in each
  sentence; loss_mask: 1 where the token may be a target."""
  row = jax.ShapeDtypeStruct((c.global_batch, c.seq_len), jnp.int32)
  return {"tokens": row, "segment_ids": row, "positions": row, "loss_mask": row}


def loss(model: Model, batch: dict, *, z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """(summed objective, sums to report: next-token cross-entropy, targets, input errors): sums, so
  micro-batches accumulate and the trainer divides once by all targets of the update.

  Token t is a target if its loss_mask is 1 and token t-1 is in the same sentence: packed
  sentences never predict across a boundary, and padding (segment 0) is never a target.
  `z_loss` weighs PaLM's log(Z)^2 penalty, which keeps the softmax normaliser near 1.
  """
  tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
  logits_BLV = model(tokens_BL, seg_BL, batch["positions"])[:, :-1].astype(jnp.float32)
  targets_BL = tokens_BL[:, 1:]
  weights_BL = (batch["loss_mask"][:, 1:] * (seg_BL[:, 1:] == seg_BL[:, :-1]) * (seg_BL[:, 1:] > 0))
  weights_BL = weights_BL.astype(jnp.float32)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll = jnp.sum((log_z_BL - target_logit_BL) * weights_BL)
  z_penalty = z_loss * jnp.sum(jnp.square(log_z_BL) * weights_BL)
  # The embedding clamps ids it has no row for: count them, the loop stops on any (loop.py). So
  # are rows with more sentences than cuDNN's packed attention describes (kernels/attention.py).
  input_errors = jnp.sum((tokens_BL < 0) | (tokens_BL >= model.cfg.vocab_size))
  if model.cfg.attention == "cudnn":
    input_errors = input_errors + attention_lib.run_overflow(seg_BL, model.cfg.max_sentences)
  return nll + z_penalty, {"loss": nll, "targets": jnp.sum(weights_BL), "input_errors": input_errors}


def summary(loss_value: float) -> dict:
  """Host metrics derived from a logged step's mean loss."""
  return {"perplexity": float(np.exp(min(loss_value, 50.0)))}


def train_flops_per_token(cfg: Config, seq_len: int) -> float:
  """6 x matmul params (fwd + bwd) plus causal attention, per trained token."""
  d, f, n, v = cfg.d_model, cfg.ffn, cfg.layers, cfg.vocab_size
  matmul_params = n * (4 * d * d + 3 * d * f) + d * v  # the embedding gather is no matmul
  attention = 6 * n * seq_len * d  # 12 L D per layer, halved by the causal mask
  return 6.0 * matmul_params + attention


def flops_per_step(c: Any) -> float:
  """Model FLOPs of one optimizer update (metrics.py's MFU)."""
  return train_flops_per_token(Config(**c.model), c.seq_len) * c.seq_len * c.global_batch


def validate(c: Any) -> None:
  """One-line errors for model settings that would fail later or silently do the wrong thing."""
  m = c.model
  check(m.d_model % m.heads == 0, f"model.d_model={m.d_model} is not divisible by model.heads={m.heads}")
  check((m.d_model // m.heads) % 2 == 0, f"head dim {m.d_model // m.heads} must be even for RoPE")
  check(m.remat in REMAT, f"model.remat={m.remat!r}: expected one of {tuple(REMAT)}")
  check(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: expected float32|bfloat16")
  check(isinstance(m.get("scan_layers", True), bool), f"model.scan_layers={m.get('scan_layers')!r}: expected True|False")
  check(m.attention in attention_lib.IMPLEMENTATIONS,
        f"model.attention={m.attention!r}: expected one of {attention_lib.IMPLEMENTATIONS}")
  block = m.get("attention_block", 0)
  check(block == 0 or (block >= 16 and block & (block - 1) == 0),
        f"model.attention_block={block}: expected 0 (the backend's default) or a power of two >= 16 "
        "(>= 128 on TPU)")
  check(c.seq_len > 1, f"seq_len={c.seq_len} must be > 1")
  check(c.tokens_per_image >= 0, f"tokens_per_image={c.tokens_per_image} must be >= 0 (0: no image grid)")
  if c.tokens_per_image:
    check(c.seq_len % c.tokens_per_image == 0,
          f"seq_len={c.seq_len} is not a multiple of tokens_per_image={c.tokens_per_image}")
  first = c.data.get("loss_from_image", 0)
  if first != 0:
    check(c.tokens_per_image > 0, f"data.loss_from_image={first!r} needs tokens_per_image > 0")
  check(isinstance(first, int) and 0 <= first < (c.seq_len // c.tokens_per_image if first else 1),
        f"data.loss_from_image={first!r}: expected an image index from 0 (every token a target) to the images "
        "a row holds - 1")
