"""bench/accelerator.py's JAX part: attention, train steps, a profile, the sampler, the VQGAN."""

import gc
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from accelerator_parts import PEAK_BF16, SIZES, Rows
from profile_summary import summarize

from lvm_jax import config as config_lib, models, sample, sharding, train
from lvm_jax.kernels import attention as attn, flash_attention_gpu
from lvm_jax.models import tokenize, transformer, vqgan

MAX_SENTENCES = 8  # the GPU configs' model.max_sentences: cuDNN's run table of 9 (kernels/attention.py)
# Triton (block_q, block_k, warps, stages) tried at L 4096, head dim 128.
SWEEP = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 2))


def seconds(fn, *args, reps: int = 10, warmup: int = 2) -> float:
  """Median seconds of fn(*args) (blocked on), after warmup calls (compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run(rows: Rows, quick: bool, flags_only: bool = False, skip: tuple = ()) -> None:
  """The measurements, those that decide defaults first (a part stopped by its budget keeps them).
  `skip`: sections not to run (numerics, sweep, vqgan, ...); flags_only: the sampler and the step
  under extra XLA flags (the orchestrator sets XLA_FLAGS for that process)."""
  gpu = jax.default_backend() == "gpu"
  small, large = ("tiny", "tiny") if quick else ("lvm_300m", "lvm_1b")
  if flags_only:
    rows.guarded("env", "ceilings", lambda: ceilings(rows, quick))
    rows.guarded("sampler", "flags", lambda: sampler(rows, quick, tag="+flags"), need=50)
    rows.guarded("step", "flags", lambda: train_step(rows, small, "auto", "none", quick, tag="+flags", scan=False),
                 need=60)
    return
  dev = jax.devices()[0]
  rows.add("env", "device", dev.device_kind, note=f"jax {jax.__version__}, backend {jax.default_backend()}")
  rows.guarded("env", "ceilings", lambda: ceilings(rows, quick))
  if "numerics" not in skip:
    rows.guarded("numerics", "kernels", lambda: numerics(rows, quick, gpu))
  lengths = (256, 512) if quick else (4096, 8192)
  if "attention" not in skip:
    rows.guarded("attention", f"L{lengths[0]}", lambda: attention_speed(
        rows, quick, gpu, lengths[0], first=True, tune="sweep" not in skip), need=60)
  # auto is cuDNN on GPUs: if its packed form failed above, the steps measure the Triton kernel.
  if "sampler" not in skip:  # before the steps: cheap, and a budget that runs out stops at the steps
    rows.guarded("sampler", "generate", lambda: sampler(rows, quick), need=50)
  if "vqgan" not in skip:
    rows.guarded("vqgan", "encode/decode", lambda: vqgan_rate(rows, quick), need=30)
  cudnn_ok = not gpu or any(str(r.get("key", "")).startswith("ours_seg:") for r in rows.rows)
  best = "auto" if cudnn_ok else "flash"
  # (Under lax.scan and with the Triton kernel the 300M step measured 1.25x and 1.28x slower on
  # 2026-11-26: those rows are in the README, not rerun.) Packed: 4 runs a row, as masks().
  steps = () if "steps" in skip else ((small, False, True), (large, False, False), (small, True, False))
  for size, packed, profile in steps:
    rows.guarded("step", f"{size} {best} packed={packed}", need=70 if size == large else 45,
                 fn=lambda a=(size, best, "none", quick), kw=dict(scan=False, profile=profile, packed=packed):
                 train_step(rows, *a, **kw))
    gc.collect()  # the step's state and executable died with train_step
    jax.clear_caches()
  if "attention" not in skip:
    rows.guarded("attention", f"L{lengths[1]}", lambda: attention_speed(rows, quick, gpu, lengths[1]), need=30)


def ceilings(rows: Rows, quick: bool) -> None:
  n = 1024 if quick else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  t = seconds(jax.jit(lambda x: x @ x), a)
  rows.add("env", f"bf16 matmul {n}^3", 2 * n ** 3 / t / 1e12, "TFLOP/s")
  rates = []
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jax.random.normal(jax.random.key(1), (1 << (20 if quick else 28),), dtype)
    rates.append(2 * x.nbytes / seconds(jax.jit(lambda v: v * 1.5), x) / 1e9)
  rows.add("env", "copy bandwidth (read + write)", max(rates), "GB/s", key="bandwidth",
           note=f"bf16 {rates[0]:.0f}, fp32 {rates[1]:.0f}")


# ------------------------------------------------------------------------------ attention


def qkv(B, L, H, K, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, (B, L, H, K), jnp.float32).astype(dtype) for k in ks]


def masks(B: int, L: int) -> dict:
  """The masks' extra inputs: packed sentences (whole images and a padding run), one sentence a
  row (the causal mask's work through the packed path), per-example prefixes."""
  cuts = np.asarray([0, 3 * L // 8, 5 * L // 8, 15 * L // 16, L])
  seg = np.zeros((B, L), np.int32)
  for s, (a, b) in enumerate(zip(cuts[:-2], cuts[1:-1]), 1):
    seg[:, a:b] = s  # the last run (cuts[-2]:L) stays 0: padding
  prefix = np.random.default_rng(0).integers(1, L, B).astype(np.int32)
  mixed = seg.copy()
  mixed[0] = 1  # row 0 one sentence, the others packed
  return {"causal": {}, "segments": {"segment_ids_BL": jnp.asarray(seg)}, "mixed": {"segment_ids_BL": jnp.asarray(mixed)},
          "one segment": {"segment_ids_BL": jnp.ones((B, L), jnp.int32)}, "prefix": {"prefix_len_B": jnp.asarray(prefix)}}


def visible_pairs(B: int, L: int, kw: dict) -> float:
  """(query, key) pairs the mask lets through, summed over the batch: the work a kernel that
  skips masked blocks does (FLOPs = 4 K H pairs forward)."""
  tri = lambda n: n * (n + 1) / 2
  if "prefix_len_B" in kw:
    P = np.asarray(kw["prefix_len_B"], np.float64)
    return float(np.sum(P * P + tri(L) - tri(P)))
  if "segment_ids_BL" in kw:
    seg = np.asarray(kw["segment_ids_BL"])
    starts = [np.flatnonzero(np.r_[True, row[1:] != row[:-1]]) for row in seg]
    return float(sum(tri(np.diff(np.r_[st, L])).sum() for st in starts))
  return B * tri(L)


def attention_fn(impl: str, kw: dict, backward: bool, tuning=None):
  def fwd(q, k, v):
    if impl == "cudnn_ref":
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if tuning:
      bq, bk, w, s = tuning
      return flash_attention_gpu.flash_attention(q, k, v, causal=True, block_q=bq, block_k=bk, warps=w, stages=s, **kw)
    return attn.attention(q, k, v, causal=True, impl=impl, **kw)
  if not backward:
    return jax.jit(fwd)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fwd, q, k, v)
    return out, vjp(do)
  return jax.jit(fwd_bwd)


def numerics(rows: Rows, quick: bool, gpu: bool) -> None:
  """max relative error (out, dq, dk, dv) of each kernel and mask against fp32 XLA: cuDNN causal,
  packed, one sentence a row and mixed rows in bf16 (the Triton kernel was checked for every mask
  at K 64 and 128 before: two cases here)."""
  B, L, H = (1, 128, 2) if quick else (2, 1024, 4)
  flash = "flash:gpu" if gpu else "flash:cpu"
  cases = [(flash, "prefix", 128, jnp.bfloat16), (flash, "segments", 128, jnp.float32)]
  cases += [("cudnn", name, K, jnp.bfloat16) for name in ("causal", "segments") for K in (64, 128)] if gpu else []
  cases += [("cudnn", name, 128, jnp.bfloat16) for name in ("one segment", "mixed")] if gpu else []
  for impl, name, K, dtype in cases:
    q, k, v, do = qkv(B, L, H, K, jnp.float32, seed=K)
    kw = masks(B, L)[name]
    ref = attention_fn("xla", kw, True)(q, k, v, do)
    got = attention_fn(impl, kw, True)(*[x.astype(dtype) for x in (q, k, v, do)])
    errs = [float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
    rows.add("numerics", f"{impl} {name} K{K} {jnp.dtype(dtype).name} (out, dq, dk, dv)", max(errs), "rel err",
             note="NOT FINITE" if not np.all(np.isfinite(errs)) else "")


def attention_speed(rows: Rows, quick: bool, gpu: bool, L: int, first: bool = False, tune: bool = True) -> None:
  """TFLOP/s at one length, counting the work each mask leaves (visible_pairs). The first length
  also sizes cuDNN's run table and (with `tune`) sweeps the Triton configs."""
  B, H, K = (1, 2, 64) if quick else (4, 16, 128)
  flash = "flash:gpu" if gpu else "flash:cpu"
  q, k, v, do = qkv(B, L, H, K, jnp.bfloat16)
  ms = masks(B, L)

  def time_row(what, impl, kw, key=None, modes=("fwd+bwd", "fwd")):
    flops = 4 * H * K * visible_pairs(B, L, kw)  # forward; backward = 2.5x forward (FlashAttention's count)
    for mode in modes:
      backward = mode == "fwd+bwd"
      args = (q, k, v, do) if backward else (q, k, v)
      t = seconds(attention_fn(impl, kw, backward), *args, reps=3 if quick else 10)
      rows.add("attention", f"{what} L{L} {mode}", (3.5 if backward else 1.0) * flops / t / 1e12, "TFLOP/s",
               ms=t * 1e3, **({"key": f"{key}:{L}:{mode}"} if key else {}))

  if gpu:
    rows.guarded("attention", f"cudnn causal L{L}", lambda: time_row("cuDNN causal (jax.nn)", "cudnn_ref", {}, "cudnn"))
    table = attn.max_runs(L, MAX_SENTENCES)
    for name, key in (("one segment", "ours_seg1"), ("segments", "ours_seg"), ("mixed", "ours_mixed")):
      rows.guarded("attention", f"ours cudnn {name} L{L}", lambda name=name, key=key: time_row(
          f"ours cudnn, {name} (table {table})", "cudnn", {**ms[name], "max_sentences": MAX_SENTENCES}, key))
  if first and gpu:  # the table for every sentence that fits (max_sentences 0): what its size costs
    for name in ("one segment", "segments"):
      rows.guarded("attention", f"cudnn full table {name}", lambda name=name: time_row(
          f"ours cudnn, {name} (table {attn.max_runs(L)})", "cudnn", ms[name], modes=("fwd+bwd",)))
    if tune:
      flash_attention_gpu.TUNING[128] = sweep(rows, q, k, v, do, 4 * H * K * visible_pairs(B, L, {}))
  for name in ("causal", "prefix"):
    modes = ("fwd+bwd", "fwd") if name == "causal" else ("fwd+bwd",)
    rows.guarded("attention", f"triton {name} L{L}",
                 lambda n=name, m=modes: time_row(f"ours triton, {n}", flash, ms[n], f"triton_{n}", m))


def sweep(rows: Rows, q, k, v, do, flops) -> tuple:
  """The Triton configs of SWEEP, causal fwd+bwd; returns the fastest as a TUNING entry."""
  best, best_t = flash_attention_gpu.TUNING[128], float("inf")
  for cfg in SWEEP:
    if rows.left() < 60:
      break
    try:
      t = seconds(attention_fn("flash:gpu", {}, True, cfg), q, k, v, do, reps=5)
    except Exception as e:  # pylint: disable=broad-except
      rows.add("sweep", f"triton {cfg}", "failed", note=f"{type(e).__name__}")
      continue
    rows.add("sweep", f"triton bq,bk,warps,stages {cfg} causal fwd+bwd", 3.5 * flops / t / 1e12, "TFLOP/s")
    if t < best_t:
      best, best_t = cfg, t
  rows.add("sweep", "best", str(best))
  return best


# ------------------------------------------------------------------------------ train step


def lvm(size: str, impl: str, remat: str, quick: bool):
  d, f, n, h = SIZES[size]
  c = config_lib.lvm_config(d, f, n, h)
  c.model.update(attention=impl, remat=remat, dtype="bfloat16", max_sentences=MAX_SENTENCES)
  c.seq_len, c.global_batch, c.steps = (128, 2, 100) if quick else (4096, 8, 1000)
  c.optim.warmup = 10
  return c


def train_step(rows: Rows, size: str, impl: str, remat: str, quick: bool, tag: str = "",
               profile: bool = False, scan: bool = True, packed: bool = False) -> None:
  """Tokens/s, MFU and compiled memory of one LVM train step; with `profile`, then three more
  steps under jax.profiler, summarised by kernel kind. Rows hold one sentence each, or with
  `packed` four runs (3 sentences and padding, as masks()); MFU counts full causal rows."""
  c = lvm(size, impl, remat, quick)
  c.model.scan_layers = scan
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  b = train.build(c, mesh)
  B, L = c.global_batch, c.seq_len
  tokens = np.random.default_rng(0).integers(0, 8192, (B, L)).astype(np.int32)
  # One sentence a row: the same attention work as the reference's unpacked rows.
  seg = np.asarray(masks(B, L)["segments"]["segment_ids_BL"]) if packed else np.ones_like(tokens)
  batch = {"tokens": tokens, "segment_ids": seg, "loss_mask": (seg > 0).astype(np.int32),
           "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()}
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    state = jax.jit(b.init, out_shardings=b.state_shardings)(jax.random.key(0))
    batch = {k: jax.device_put(jnp.asarray(v), b.batch_sharding) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = train.jit_train_step(c, b).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    gib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
           - mem.alias_size_in_bytes) / 2 ** 30 if mem else float("nan")

    def steps(n):
      nonlocal state
      for _ in range(n):
        state, m = compiled(state, batch)
      return float(m["loss"])  # waits for the last step

    steps(2)
    n = 2 if quick else 8
    t0 = time.perf_counter()
    loss_value = steps(n)
    t = (time.perf_counter() - t0) / n
    flops = transformer.train_flops_per_token(transformer.Config(**c.model), L) * B * L
    resolved = b.model_cfg.attention
    layers = ("scan" if scan else "unrolled") + (" packed 4 runs a row" if packed else "")
    rows.add("step", f"{size} attention {resolved} remat {remat} {layers}{tag}", B * L / t, "tok/s",
             key=f"step{'_packed' if packed else ''}:{size}:{resolved}:{remat}:{layers}{tag}", mfu=flops / t / PEAK_BF16,
             note=f"MFU {flops / t / PEAK_BF16:.1%}, {gib:.1f} GiB, compile {compile_s:.0f} s, loss {loss_value:.3f}")
    if profile:
      profile_rows(rows, "profile", lambda: steps(3), per=3, unit="ms/step")


def profile_rows(rows: Rows, name: str, fn, per: int, unit: str) -> None:
  """fn() once under jax.profiler: device time by kernel kind and the biggest kernels, per `per`
  (steps, tokens); the trace kept as OUT/<name>.trace.json.gz when it is small enough to return."""
  out = Path(os.environ.get("OUT") or "bench_out") / name
  jax.profiler.start_trace(str(out))
  jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  for what, ms, share in summarize(out, steps=per):
    rows.add(name, what, ms, unit, note=f"{share:.1%}")
  trace = max(out.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if trace.stat().st_size < 15 * 2 ** 20:  # the device tool returns files up to 16 MiB, 2 folders deep
    shutil.copy(trace, out.parent / f"{name}.trace.json.gz")
  shutil.rmtree(out, ignore_errors=True)



# ------------------------------------------------------------------------------ sampler and VQGAN


def sampler(rows: Rows, quick: bool, tag: str = "") -> None:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  d, f, n, h = SIZES["tiny" if quick else "lvm_300m"]
  cfg = transformer.Config(d_model=d, ffn=f, layers=n, heads=h, dtype="bfloat16", remat="none", attention="auto")
  model = transformer.Model(cfg, rngs=nnx.Rngs(0))
  n_params = models.count_params(models.abstract(transformer, cfg))
  weight_bytes = 2 * (n_params - cfg.vocab_size * d)  # bf16, every matmul weight (the embedding: one row)
  bandwidth = next((r["value"] for r in rows.rows if r.get("key") == "bandwidth"), None)
  prompt_len, new = (32, 16) if quick else (768, 256)
  fuse = transformer.fuse_for_decoding
  # What sample._generate traces, swapped in per row (the jit cache is cleared): the default (one
  # token on one GPU: [out, in] weights, transformer._vector_layer), the fused [in, out] layout the
  # sampler had before, and that unfused. (A Pallas Triton vector-matrix kernel with the norms,
  # gate and residual adds fused in, commit 2cc76f5, ran 1.03x the default's speed: not kept.)
  # Last, the default with each layer's k and v in two cache arrays (the CPU's layout; two cache
  # writes a token instead of one, transformer._write_cache).
  variants = [("", fuse), (" ([in, out] weights, q/k/v and gate/up fused)", lambda p, dt, vector=False: fuse(p, dt)),
              (" ([in, out] weights, unfused)",
               lambda p, dt, vector=False: {k: w if "norm" in k else w.astype(dt) for k, w in p.items()}),
              (" (k and v in two cache arrays)", fuse)]
  # Each decode step also reads the cache: k and v of every layer, the prompt and the tokens so far
  # (on average half the new ones). For LVM-300M at batch 64 that is 9x the weights' bytes.
  cache_bytes = 2 * n * d * 2 * (prompt_len + new / 2)  # per sequence, bf16
  for B, (what, swap) in [(1, v) for v in variants] + [(64, variants[0])]:
    fn = _swap_sampler(swap, model, B, prompt_len, new, joint=what != variants[-1][0])
    name = f"{'tiny' if quick else 'lvm_300m'} B{B} prompt {prompt_len} + {new} new{what}{tag}"
    bounds = [B * bandwidth * 1e9 / (weight_bytes + c) for c in (0, B * cache_bytes)] if bandwidth else None
    rows.guarded("sampler", name, lambda: sampler_row(rows, name, fn, B * new, bounds,
                                                      f"sampler:{B}{tag}" if not what else None))
    if B == 1 and what in (v[0] for v in variants[:2]) and not tag:  # per token: where the time goes, now and before
      rows.guarded("sampler", "profile", lambda: profile_rows(rows, "sampler" + ("_before" if what else ""), fn,
                                                               per=new, unit="ms/token"))
  transformer.fuse_for_decoding = fuse


def _swap_sampler(fuse, model, B: int, prompt_len: int, new: int, joint: bool = True):
  """generate() with `fuse` as transformer.fuse_for_decoding while it traces, and without
  `joint` a cache of two arrays a layer whatever the backend."""
  prompt = np.random.default_rng(B).integers(0, 8192, (B, prompt_len))
  empty_cache = transformer.Model.empty_cache

  def fn():
    transformer.fuse_for_decoding = fuse
    pair = lambda self, batch, length, dtype=None, joint=False: empty_cache(self, batch, length, dtype)
    transformer.Model.empty_cache = empty_cache if joint else pair
    try:
      return sample.generate(model, prompt, new, jax.random.key(0), codes=8192)
    finally:
      transformer.Model.empty_cache = empty_cache
  jax.clear_caches()
  return fn


def sampler_row(rows: Rows, name: str, fn, tokens: int, bounds, key) -> None:
  """bounds: tokens/s if each step only read the weights, and if it read the weights and the cache."""
  rate = tokens / seconds(fn, reps=2, warmup=1)
  note = (f"{rate / bounds[0]:.1%} of the weight-read bound ({bounds[0]:.0f} tok/s), {rate / bounds[1]:.1%} of "
          f"weights + cache ({bounds[1]:.0f})") if bounds else ""
  rows.add("sampler", name, rate, "tok/s", key=key, share=rate / bounds[0] if bounds else None,
           share_cache=rate / bounds[1] if bounds else None, note=note)


def vqgan_rate(rows: Rows, quick: bool) -> None:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = vqgan.Config(dtype="float32")
  size, B = (64, 2) if quick else (256, 8)
  model = vqgan.Model(cfg, rngs=nnx.Rngs(0))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  tok = tokenize.Tokenizer(model, size, B, mesh)
  images = np.random.default_rng(0).integers(0, 256, (B, size, size, 3), dtype=np.uint8)
  ids = tok.encode(images)
  for name, fn, arg in (("encode", tok.encode, images), ("decode", tok.decode, ids)):
    t = seconds(fn, arg, reps=5)
    rows.add("vqgan", f"amused f16-8192 {name} {size}px B{B} fp32", B / t, "img/s", key=f"vqgan:{name}")
    # Where the time goes (convolutions against norms and elementwise passes), per batch of B.
    rows.guarded("vqgan", f"profile {name}", lambda fn=fn, arg=arg, name=name: profile_rows(
        rows, f"vqgan_{name}", lambda: fn(arg), per=1, unit="ms/batch"))
  # What the fp32 rate depends on: convolutions at full fp32 (torch's are TF32 unless told not),
  # nnx's one-pass fast variance, and this project's layers as they were before 2026-11-28 (the
  # mean-then-deviations GroupNorm, the upsamplers as a conv of the x2 image, each adding its own
  # bias), each measured here.
  ours, upsample, level = vqgan._image_moments, vqgan._upsample_conv, vqgan.Level.__call__
  for what, precision, moments, up, lv in (
      ("precision highest", "highest", ours, upsample, level),
      ("fast-variance GroupNorm", None, one_pass_moments, upsample, level),
      ("upsamplers adding their own bias", None, ours, upsample, level_with_own_bias),
      ("two-pass GroupNorm, x2-image upsampler", None, two_pass_moments, x2_upsample, level_with_own_bias)):
    vqgan._image_moments, vqgan._upsample_conv, vqgan.Level.__call__ = moments, up, lv
    with jax.default_matmul_precision(precision or "default"):
      jax.clear_caches()
      t = tokenize.Tokenizer(model, size, B, mesh)
      for name, fn, arg in (("encode", t.encode, images), ("decode", t.decode, ids)):
        rows.add("vqgan", f"amused f16-8192 {name} {size}px B{B} fp32, {what}", B / seconds(fn, arg, reps=5), "img/s",
                 **({"key": f"vqgan:{name}:full_fp32"} if precision else {}))
    vqgan._image_moments, vqgan._upsample_conv, vqgan.Level.__call__ = ours, upsample, level
  jax.clear_caches()


def level_with_own_bias(self, x: jax.Array, x_bias_C=None) -> tuple:
  """vqgan.Level before 2026-11-28: each upsampler adds its bias itself (timing only)."""
  for i, block in enumerate(self.resnets):
    x = block(x)
    if hasattr(self, "attentions"):
      x = self.attentions[i](x)
  for sampler in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
    x = sampler(x)
  return x, None


def two_pass_moments(x_BHWGc: jax.Array) -> tuple[jax.Array, jax.Array]:
  """GroupNorm's statistics before 2026-11-28: the mean, then the mean squared deviation (timing only)."""
  mean_of = lambda v: jnp.mean(jnp.mean(v, axis=(2, 4), keepdims=True), axis=1, keepdims=True)
  mean = mean_of(x_BHWGc)
  return mean, mean_of(jnp.square(x_BHWGc - mean))


def one_pass_moments(x_BHWGc: jax.Array) -> tuple[jax.Array, jax.Array]:
  """nnx's fast variance, E[x^2] - E[x]^2 in one pass (timing only)."""
  mean = jnp.mean(x_BHWGc, axis=(1, 2, 4), keepdims=True)
  return mean, jnp.mean(jnp.square(x_BHWGc), axis=(1, 2, 4), keepdims=True) - jnp.square(mean)


def x2_upsample(conv, x_BhwC: jax.Array) -> jax.Array:
  """The upsampler before 2026-11-28: the 3x3 conv of the nearest x2 image (timing only)."""
  return conv(jnp.repeat(jnp.repeat(x_BhwC, 2, axis=1), 2, axis=2))
