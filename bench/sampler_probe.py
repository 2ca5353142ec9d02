"""The batch-1 sampler's variants side by side, each in its own process on the same GPU.

  python bench/sampler_probe.py [--quick] [--budget S]

Variants: base (probe_base/: `git archive 2026acf lvm_jax | tar -x -C probe_base`, the code before), vt (values cached [K, S]),
vt+kN (and the split-cache Triton decode attention, N slots a program); each also under
CUDA-graph while loops (+graphs). Per variant: tokens/s at B 1 (and B 64 for some), the share of
the weight-read bound, and a profile: device time and kernels per token.
"""

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTRITON = "--xla_gpu_enable_triton_gemm=false"  # matmuls on cuBLAS, not XLA's Triton GEMMs
GRAPHS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"


def one(variant: str, quick: bool) -> None:
  root = HERE.parent / "probe_base" if variant.startswith("base") else HERE.parent
  sys.path.insert(0, str(root))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from lvm_jax import models, sample
  from lvm_jax.kernels import attention as attn
  from lvm_jax.models import transformer
  assert Path(transformer.__file__).is_relative_to(root), transformer.__file__
  m = re.search(r"\+k(\d+)", variant)
  if m:
    from lvm_jax.kernels import decode_attention as da
    plain = attn.cache_attention

    def kernel(q, k, v, mask):
      if q.shape[1] != 1:
        return plain(q, k, v, mask)
      return da.decode_attention(q[:, 0], k, v, mask[:, 0, 0], block=int(m.group(1)),
                                 interpret=jax.default_backend() != "gpu")[:, None]
    attn.cache_attention = kernel
  d, f, n, h = (64, 176, 2, 2) if quick else (1024, 2688, 22, 8)
  if variant.startswith("torch"):
    return torch_gemv(d, f, n, quick)
  if "novec" in variant:  # the [in, out] fused layout at batch 1 too
    fuse = transformer.fuse_for_decoding
    transformer.fuse_for_decoding = lambda p, dt, vector=False: fuse(p, dt)
  if "m2" in variant:  # one token's products as two identical rows: a matmul (cuBLAS or Triton), not a reduction
    vector_layer = transformer._vector_layer
    einsum = jnp.einsum

    def two_rows(spec, a, b, **kw):
      if spec == "td,fd->tf" and a.shape[0] == 1:
        return einsum(spec, jnp.concatenate([a, a]), b, **kw)[:1]
      return einsum(spec, a, b, **kw)

    def layer(*args, **kw):
      jnp.einsum = two_rows
      try:
        return vector_layer(*args, **kw)
      finally:
        jnp.einsum = einsum
    transformer._vector_layer = layer
  cfg = transformer.Config(d_model=d, ffn=f, layers=n, heads=h, dtype="bfloat16", remat="none", attention="auto")
  model = transformer.Model(cfg, rngs=nnx.Rngs(0))
  weight_bytes = 2 * (models.count_params(models.abstract(transformer, cfg)) - cfg.vocab_size * d)
  x = jnp.ones((1 << (20 if quick else 28),), jnp.bfloat16)
  copy = jax.jit(lambda v: v * 1.5)
  jax.block_until_ready(copy(x))
  t0 = time.perf_counter()
  for _ in range(5):
    y = copy(x)
  jax.block_until_ready(y)
  bw = 2 * x.nbytes * 5 / (time.perf_counter() - t0)
  del x, y
  prompt_len, new = (112, 16) if quick else (768, 256)
  out = {"variant": variant, "bandwidth_GBs": bw / 1e9, "weight_MB": weight_bytes / 1e6}
  if "gemv" in variant:
    out.update(jax_gemv(d, f, n, quick))
    print(json.dumps(out), flush=True)
  for B in (1, 64) if ("B64" in variant) else (1,):
    prompt = np.random.default_rng(B).integers(0, 8192, (B, prompt_len))
    fn = lambda: sample.generate(model, prompt, new, jax.random.key(0), codes=8192)
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out[f"compile_s_B{B}"] = time.perf_counter() - t0
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    rate = B * new / min(times)
    out[f"tok_s_B{B}"] = rate
    out[f"share_B{B}"] = rate / (B * bw / weight_bytes)
    print(json.dumps(out), flush=True)
  if True:  # the profile runs on CPUs too (it then finds no GPU stream lines)
    out.update(profile(fn, new))
  print("RESULT " + json.dumps(out), flush=True)


def shapes(d, f):
  return [(3 * d, d), (d, d), (2 * f, d), (d, f)]  # [out, in]: q/k/v, o, gate/up, down


def jax_gemv(d, f, n, quick) -> dict:
  """GB/s of the layers' vector-matrix products alone, chained, distinct weights per layer."""
  import jax
  import jax.numpy as jnp
  res = {}
  for layout in ("out_in", "in_out"):
    ws = [jnp.ones(s if layout == "out_in" else s[::-1], jnp.bfloat16) * 0.001 for _ in range(n) for s in shapes(d, f)]
    nbytes = sum(w.nbytes for w in ws)

    def token(i, x):
      for w in ws:
        if layout == "out_in":
          y = jnp.einsum("d,fd->f", x[:w.shape[1]], w)
        else:
          y = jnp.einsum("d,df->f", x[:w.shape[0]], w)
        x = jnp.resize(y, (2 * f,))  # the next product's input, whatever its length
      return x
    fn = jax.jit(lambda x: jax.lax.fori_loop(0, 256, token, x))
    x = jnp.ones((2 * f,), jnp.bfloat16)
    jax.block_until_ready(fn(x))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    res[f"gemv_{layout}_GBs"] = nbytes * 256 / (time.perf_counter() - t0) / 1e9
  return res


def torch_gemv(d, f, n, quick) -> None:
  """The same chain in PyTorch (cuBLAS), eager and as one CUDA graph per token."""
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  ws = [torch.full(s, 0.001, dtype=torch.bfloat16, device=dev) for _ in range(n) for s in shapes(d, f)]
  nbytes = sum(w.numel() * 2 for w in ws)
  x0 = torch.ones(1, 2 * f, dtype=torch.bfloat16, device=dev)

  def token(x):
    for w in ws:
      y = torch.nn.functional.linear(x[:, :w.shape[1]], w)
      x = y.repeat(1, -(-2 * f // y.shape[1]))[:, :2 * f]
    return x
  out = {"variant": "torch"}
  for mode in ("eager", "graph"):
    fn = token
    if mode == "graph" and dev == "cuda":
      g, static = torch.cuda.CUDAGraph(), x0.clone()
      token(static)
      torch.cuda.synchronize()
      with torch.cuda.graph(g):
        res = token(static)
      fn = lambda x: (g.replay(), res)[1]
    fn(x0)
    if dev == "cuda":
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(256):
      fn(x0)
    if dev == "cuda":
      torch.cuda.synchronize()
    out[f"torch_gemv_{mode}_GBs"] = nbytes * 256 / (time.perf_counter() - t0) / 1e9
  print("RESULT " + json.dumps(out), flush=True)


def profile(fn, per: int) -> dict:
  """Device time, kernel launches and the wall span per token, and the biggest kernels."""
  import jax
  d = tempfile.mkdtemp()
  jax.profiler.start_trace(d)
  jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  path = max(Path(d).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  events = json.loads(gzip.open(path).read())["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  dev = {p for p, name in procs.items() if re.search(r"/device:GPU", name)}
  lines = {k for k, name in threads.items() if k[0] in dev and name.startswith("Stream")}
  ks = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines]
  if not ks:
    return {"profile": "no device events"}
  busy = sum(float(e.get("dur", 0)) for e in ks)
  span = max(float(e["ts"]) + float(e.get("dur", 0)) for e in ks) - min(float(e["ts"]) for e in ks)
  by = {}
  for e in ks:
    name = re.sub(r"[._]\d+$", "", e["name"])[:60]
    t, c = by.get(name, (0.0, 0))
    by[name] = (t + float(e.get("dur", 0)), c + 1)
  top = sorted(by.items(), key=lambda kv: -kv[1][0])[:14]
  return {"device_ms_per_token": busy / 1e3 / per, "span_ms_per_token": span / 1e3 / per,
          "kernels_per_token": len(ks) / per,
          "top": [(k, round(t / 1e3 / per, 4), round(c / per, 2)) for k, (t, c) in top]}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--budget", type=float, default=420)
  p.add_argument("--one", default="")
  p.add_argument("--variants", default="base B64,vt B64,vt+k64 B64,vt+k128,vt+k64 +graphs,vt +graphs,vt+k32,"
                 "base +graphs")
  args = p.parse_args()
  if args.one:
    return one(args.one, args.quick)
  out = Path(os.environ.get("OUT") or "bench_out")
  out.mkdir(parents=True, exist_ok=True)
  t0, results = time.time(), []
  for v in args.variants.split(","):
    left = args.budget - (time.time() - t0)
    if left < 40:
      print(f"{v}: skipped, {left:.0f} s left", flush=True)
      continue
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    env["XLA_FLAGS"] = " ".join(([GRAPHS] if "+graphs" in v else []) + ([NOTRITON] if "+notriton" in v else []))
    t1 = time.time()
    try:
      r = subprocess.run([sys.executable, __file__, "--one", v] + (["--quick"] if args.quick else []), env=env,
                         capture_output=True, text=True, timeout=left)
      got = [json.loads(l[7:]) for l in r.stdout.splitlines() if l.startswith("RESULT ")]
      if not got:
        print(f"{v}: exit {r.returncode}\n{r.stderr[-3000:]}", flush=True)
      results += got
    except subprocess.TimeoutExpired:
      print(f"{v}: timed out", flush=True)
    print(f"[{v}] {time.time() - t1:.0f} s", flush=True)
    if results and results[-1]["variant"] == v:
      print(json.dumps(results[-1], indent=1), flush=True)
  (out / "sampler_probe.json").write_text(json.dumps(results, indent=1))
  print(f"\n{'variant':<20} {'B1 tok/s':>9} {'share':>6} {'B64 tok/s':>10} {'dev ms/tok':>10} {'span ms/tok':>11} "
        f"{'kernels/tok':>11}")
  for r in results:
    if "tok_s_B1" not in r:
      continue
    print(f"{r['variant']:<20} {r['tok_s_B1']:9.0f} {r['share_B1']:6.1%} {r.get('tok_s_B64', 0):10.0f} "
          f"{r.get('device_ms_per_token', 0):10.3f} {r.get('span_ms_per_token', 0):11.3f} "
          f"{r.get('kernels_per_token', 0):11.1f}")


if __name__ == "__main__":
  main()
