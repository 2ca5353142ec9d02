"""The one attention entry point every model calls.

Dimension letters: B batch, L query length, S key length, H heads, K head dim.

The mask is the AND of: causal (or prefix-causal, for AIM) and equal segment ids (packed
visual sentences never attend across sentence boundaries). Implementations:

  xla    plain einsums with fp32 logits and softmax: every backend, and the numerical reference.
  flash  the Pallas kernels (kernels/flash_attention.py; Mosaic on TPU, Triton on GPU), under
         jax.shard_map over the context mesh (batch on its data/fsdp axes, heads on tensor),
         since a Pallas call sees one device's block. On a CPU they run in interpret mode
         (tests only: slow).
  cudnn  GPU only: cuDNN's fused attention (jax.nn.dot_product_attention's cuDNN path) for the
         causal mask, and with segment ids through its packed-sequence form (each contiguous run
         of one segment id is one sequence; cuDNN takes per-row run lengths and offsets). cuDNN
         has no per-example prefix mask, so AIM's prefix attention runs the Triton kernel.
  auto   flash on TPU, cudnn on GPU, xla on CPU.

`resolve(impl, platform)` turns a config's name into what runs, "xla", "cudnn" or
"flash:<platform>", from the mesh's devices: the trainer may compile for a TPU topology on a CPU
host (compile.py).

cuDNN's packed form takes a static table of runs a row and gives every slot of it a sequence
of full length L, so its size costs time: on an H200 (B4 H16 K128, L 4096, fwd+bwd) tables of
2 to 9 runs ran at cuDNN's plain causal speed and one of 17 runs 15% slower. The table holds
max_runs(L, max_sentences) runs: the model config's `max_sentences` (the most sentences the
data packer puts in a row) plus the padding run, or with 0 every sentence of at least MIN_RUN
tokens that fits. (Picking the table per batch under lax.switch measured slower than either:
the conditional cost more than the empty slots.) A row with more runs would lose attention for
the ones past the table, so the LVM's loss counts such rows as input errors (`run_overflow`)
and the trainer stops on the first.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "flash", "cudnn")
GPU_AUTO = "cudnn"  # what auto runs on GPUs (bench/accelerator.py measured the choice)
MIN_RUN = 256  # the shortest sentence the cuDNN packed path expects: one image of 256 tokens


def make_mask(
    length: int,
    *,
    causal: bool = True,
    segment_ids_BL: Optional[jax.Array] = None,
    prefix_len_B: Optional[jax.Array] = None,
) -> jax.Array:
  """Boolean [B|1, 1, L, L] mask, True where query i may attend to key j."""
  i_L1 = jnp.arange(length)[:, None]
  j_1L = jnp.arange(length)[None, :]
  if causal:
    mask_BLL = (j_1L <= i_L1)[None]
    if prefix_len_B is not None:
      # Prefix attention (AIM): the first prefix_len positions see each other bidirectionally.
      mask_BLL = mask_BLL | (j_1L[None] < prefix_len_B[:, None, None])
  else:
    mask_BLL = jnp.ones((1, length, length), bool)
  if segment_ids_BL is not None:
    mask_BLL = mask_BLL & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
  return mask_BLL[:, None]


def xla_attention(
    q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, mask_BHLS: jax.Array
) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v with fp32 logits; queries that see no key give zeros."""
  scale = q_BLHK.shape[-1] ** -0.5
  logits_BHLS = jnp.einsum("blhk,bshk->bhls", q_BLHK * scale, k_BSHK,
                           preferred_element_type=jnp.float32)
  logits_BHLS = jnp.where(mask_BHLS, logits_BHLS, jnp.finfo(jnp.float32).min)
  max_BHL1 = jnp.max(logits_BHLS, axis=-1, keepdims=True)
  # The second where zeroes rows whose every key is masked (padding), where exp(0) = 1 would
  # otherwise average all values.
  probs_BHLS = jnp.where(mask_BHLS, jnp.exp(logits_BHLS - jax.lax.stop_gradient(max_BHL1)), 0.0)
  denom_BLH1 = jnp.swapaxes(jnp.sum(probs_BHLS, axis=-1), 1, 2)[..., None]
  out_BLHK = jnp.einsum("bhls,bshk->blhk", probs_BHLS.astype(v_BSHK.dtype), v_BSHK,
                        preferred_element_type=jnp.float32)
  # Normalising the [L, K] output instead of the [L, S] probabilities saves a pass over L x S.
  return (out_BLHK / jnp.maximum(denom_BLH1, 1e-30)).astype(q_BLHK.dtype)


def cache_attention(q_BTHK: jax.Array, k_BHSK: jax.Array, v_BHSK: jax.Array, mask_B1TS: jax.Array,
                    q_scale_BT: Optional[jax.Array] = None) -> jax.Array:
  """Attention of T new queries over a KV cache kept head-major ([B, H, S, K]): the products
  then batch over (B, H) with S and K contiguous, so no step transposes the whole cache.
  q_scale_BT: a factor per query, applied to its logits (the same as to q, but it can come from
  a later kernel than q: see transformer._vector_layer)."""
  scale = q_BTHK.shape[-1] ** -0.5
  logits_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK * scale, k_BHSK, preferred_element_type=jnp.float32)
  if q_scale_BT is not None:
    logits_BHTS = logits_BHTS * q_scale_BT[:, None, :, None]
  logits_BHTS = jnp.where(mask_B1TS, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jnp.where(mask_B1TS, jax.nn.softmax(logits_BHTS, axis=-1), 0.0)
  out_BTHK = jnp.einsum("bhts,bhsk->bthk", probs_BHTS.astype(v_BHSK.dtype), v_BHSK, preferred_element_type=jnp.float32)
  return out_BTHK.astype(q_BTHK.dtype)


def _causal_chunks(length: int, chunk: int) -> list[tuple[int, int]]:
  return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def attention(
    q_BLHK: jax.Array,
    k_BLHK: jax.Array,
    v_BLHK: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BL: Optional[jax.Array] = None,
    prefix_len_B: Optional[jax.Array] = None,
    impl: str = "xla",
    chunk: int = 256,
    block: int = 0,
    max_sentences: int = 0,
) -> jax.Array:
  """Multi-head self-attention over [B, L, H, K] inputs; returns [B, L, H, K].

  `chunk` is the query block of the causal XLA path (blocks above the diagonal are skipped);
  `block` the flash kernels' query and key block (0: the backend's default); `max_sentences`
  sizes cuDNN's run table (max_runs).
  """
  if q_BLHK.shape != k_BLHK.shape or k_BLHK.shape != v_BLHK.shape:
    raise ValueError(f"attention: q/k/v shapes differ: {q_BLHK.shape}, {k_BLHK.shape}, {v_BLHK.shape}")
  impl = resolve(impl, jax.default_backend()) if impl in IMPLEMENTATIONS else impl
  if impl == "cudnn" and (prefix_len_B is not None or not causal):
    impl = "flash:gpu"  # cuDNN has no per-example prefix mask; the Triton kernel has every mask
  if impl == "cudnn":
    kernel = lambda q, k, v, s, p: cudnn_attention(q, k, v, None if segment_ids_BL is None else s, max_sentences)
    return _sharded(kernel, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B)
  if impl.startswith("flash:"):
    platform = impl.split(":")[1]
    kernel = lambda q, k, v, s, p: _flash(q, k, v, s, p if prefix_len_B is not None else None, causal, block,
                                          platform)
    return _sharded(kernel, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B)
  if impl != "xla":
    raise ValueError(f"attention impl={impl!r}: expected one of {IMPLEMENTATIONS}")
  length = q_BLHK.shape[1]
  mask_BHLS = make_mask(length, causal=causal, segment_ids_BL=segment_ids_BL,
                        prefix_len_B=prefix_len_B)
  if not causal or prefix_len_B is not None or length <= chunk:
    return xla_attention(q_BLHK, k_BLHK, v_BLHK, mask_BHLS)
  # Causal: query chunk [a, b) needs only keys [0, b), so the blocks above the diagonal are
  # never computed: about half the FLOPs and memory traffic of the full L x L product.
  outs = [xla_attention(q_BLHK[:, a:b], k_BLHK[:, :b], v_BLHK[:, :b], mask_BHLS[:, :, a:b, :b])
          for a, b in _causal_chunks(length, chunk)]
  return jnp.concatenate(outs, axis=1)


def resolve(impl: str, platform: str) -> str:
  """A config's implementation for a platform: 'xla', 'cudnn', 'flash:tpu', 'flash:gpu' or
  'flash:cpu' (the TPU kernels in interpret mode). 'auto' is flash on TPU, GPU_AUTO on GPU, xla
  on CPU; 'cudnn' is for GPUs only."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}: expected one of {IMPLEMENTATIONS}")
  platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
  if impl == "auto":
    impl = {"cpu": "xla", "gpu": GPU_AUTO}.get(platform, "flash")
  if impl == "cudnn" and platform != "gpu":
    raise ValueError(f"attention impl='cudnn' runs on NVIDIA GPUs only, not on {platform}: use auto, flash or xla")
  return f"flash:{platform}" if impl == "flash" else impl


def for_platform(cfg: Any, platform: Optional[str]) -> Any:
  """A model config (a dataclass with an `attention` field) with it resolved for `platform`;
  unchanged without one (the backend's default at trace time)."""
  return dataclasses.replace(cfg, attention=resolve(cfg.attention, platform)) if platform else cfg


# ------------------------------------------------------------------------------ cuDNN (GPU)


def max_runs(length: int, max_sentences: int = 0) -> int:
  """The size of cuDNN's per-row table of runs: max_sentences (0: as many sentences of >= MIN_RUN
  tokens as fit), plus the padding run."""
  fit = max(1, length // MIN_RUN)
  return min(max_sentences, fit) + 1 if max_sentences > 0 else fit + 1


def runs_per_row(segment_ids_BL: jax.Array) -> jax.Array:
  """[B] int32: the contiguous runs of equal segment ids in each row (padding is one run)."""
  return 1 + jnp.sum(segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1], axis=1, dtype=jnp.int32)


def segment_runs(segment_ids_BL: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """Contiguous runs of equal segment ids -> cuDNN's packed description: lengths [B, runs] and
  start offsets [B, runs + 1], -1 past a row's last run. Runs past `runs` are not described."""
  B, L = segment_ids_BL.shape
  starts_BL = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
  offsets_BR = jax.vmap(lambda row: jnp.nonzero(row, size=runs + 1, fill_value=-1)[0])(starts_BL).astype(jnp.int32)
  ends_BR = jnp.where(offsets_BR[:, 1:] >= 0, offsets_BR[:, 1:], L)
  lengths_BR = jnp.where(offsets_BR[:, :-1] >= 0, ends_BR - offsets_BR[:, :-1], -1)
  return lengths_BR, offsets_BR.at[:, -1].set(-1)


def run_overflow(segment_ids_BL: jax.Array, max_sentences: int = 0) -> jax.Array:
  """How many rows hold more runs than cuDNN's table (max_runs): their attention would be wrong."""
  return jnp.sum(runs_per_row(segment_ids_BL) > max_runs(segment_ids_BL.shape[1], max_sentences))


def cudnn_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                    segment_ids_BL: Optional[jax.Array] = None, max_sentences: int = 0) -> jax.Array:
  """Causal attention by cuDNN, within each run of equal segment ids when they are given."""
  if segment_ids_BL is None:
    return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, is_causal=True, implementation="cudnn")
  # The packed form is not in jax.nn's signature: jax's cuDNN module takes it (jax 0.10 - 0.12).
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  lengths_BR, offsets_BR = segment_runs(segment_ids_BL, max_runs(q_BLHK.shape[1], max_sentences))
  return cudnn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, None, None, lengths_BR, lengths_BR, offsets_BR,
                                     offsets_BR, scale=q_BLHK.shape[-1] ** -0.5,
                                     mask_type=cudnn.MaskType.PADDING_CAUSAL)


# ------------------------------------------------------------------------------ under the mesh


def _flash(q, k, v, seg, prefix, causal, block, platform) -> jax.Array:
  from lvm_jax.kernels import flash_attention  # pylint: disable=g-import-not-at-top
  return flash_attention.flash_attention(
      q, k, v, causal=causal, segment_ids_BL=seg, prefix_len_B=prefix, block_q=block or None,
      block_k=block or None, interpret=platform == "cpu", backend="gpu" if platform == "gpu" else "tpu")


def _sharded(kernel, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, prefix_len_B) -> jax.Array:
  """kernel(q, k, v, seg, prefix) on each device's [batch shard, L, head shard, K] block: a
  Pallas or cuDNN call sees one device's arrays."""
  from lvm_jax import sharding  # pylint: disable=g-import-not-at-top
  B, L = q_BLHK.shape[:2]
  seg = jnp.zeros((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL
  prefix = jnp.zeros((B,), jnp.int32) if prefix_len_B is None else prefix_len_B
  mesh = jax.sharding.get_abstract_mesh()
  spec = sharding.current_spec(("batch", None, "heads", None))
  if mesh.empty or spec is None:
    return kernel(q_BLHK, k_BLHK, v_BLHK, seg, prefix)
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None), P(spec[0])),
                       out_specs=spec, check_vma=False)(q_BLHK, k_BLHK, v_BLHK, seg, prefix)
