"""Kernels a generated token launches on an H200, counted without a GPU.

  pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # ~5 GB, once
  python bench/sampler_launches.py [--batch 1 64] [--layers 22]

At batch 1 the sampler is bound by the fixed cost of each kernel (~1-2 us on an H200, measured
in bench/accelerator.py's profile), not by bytes, so the number of kernels in the decode loop is
the figure to move. XLA compiles for a GPU it does not have when given the target's description
(a "deviceless" compile through the CUDA plugin's PJRT topology): this script compiles
lvm_jax.sample's generate for LVM-300M (prompt 768 + 256 new) that way and counts the kernels in
the token loop's body, by kind. The figures are XLA's fusion decisions, not timings; autotuning
is off without a device, which moves GEMM configurations but not the fusions a batch-1 token
runs. Expect, for the committed sampler: 190 kernels a token at batch 1 (297 before the norms
and the residual adds were folded into the products, 214 before k and v shared a cache array,
192 before the final norm went into the head), 298 at batch 64 (320 with separate k and v arrays).
"""

import argparse
import collections
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; the compile targets CUDA

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerator_parts import SIZES  # noqa: E402
from lvm_jax import sample  # noqa: E402
from lvm_jax.models import transformer  # noqa: E402

# An H200 as XLA's GpuTargetConfigProto describes it (the fields its cost models read; figures
# from XLA's own H200 spec file).
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 151397597184 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H200 141GB HBM3e"
"""
LVM_300M = dict(zip(("d_model", "ffn", "layers", "heads"), SIZES["lvm_300m"]))


def h200_device() -> jax.Device:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=H200, topology="1x1x1")
  except Exception as e:  # no CUDA plugin: say how to get one, in one line
    sys.exit(f"sampler_launches: no deviceless CUDA compile here ({type(e).__name__}: {str(e)[:120]}); "
             f"install jax[cuda12]=={jax.__version__}")
  return topology.devices[0]


def compiled_hlo(device: jax.Device, batch: int, layers: int) -> str:
  cfg = transformer.Config(**{**LVM_300M, "layers": layers}, dtype="bfloat16", remat="none", attention="auto")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: transformer.Model(cfg, rngs=nnx.Rngs(0))))
  placed = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
  params = jax.tree.map(lambda a: spec(a.shape, a.dtype), params)
  # generate picks its one-token layout on a GPU backend; this host's backend is the CPU.
  jax.default_backend = lambda: "gpu"
  traced = sample._generate.trace(graphdef, params, spec((batch, 768), jnp.int32), spec((), jax.random.key(0).dtype),
                                  new_tokens=256, codes=8192, temperature=1.0, top_k=0, top_p=1.0, candidates=1,
                                  window=None)
  return traced.lower().compile().as_text()


def loop_kernels(hlo: str) -> collections.Counter:
  """Kernel-launching instructions in the body of the token loop (the while loop with most)."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if head:
      current = bodies.setdefault(head.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  loops = [re.search(r"body=%?([\w.\-]+)", line).group(1) for lines in bodies.values() for line in lines
           if " while(" in line]
  counts = [collections.Counter(kind for line in bodies[b] if (kind := _kind(line))) for b in loops]
  return max(counts, key=lambda c: sum(c.values()), default=collections.Counter())


def _kind(line: str) -> str:
  if " fusion(" in line:
    fusion = re.search(r"calls=%?([\w.\-]+)", line).group(1)
    if "kind=kInput" in line:
      return "reduction (products, norms, logits)"
    if "dynamic_update_slice" in fusion:
      return "cache write"
    if "gemm" in fusion:
      return "GEMM (Triton / cuBLAS)"
    return "custom fusion (softmax x V)" if "kind=kCustom" in line else "elementwise"
  if " custom-call(" in line:
    return "library call " + re.search(r'custom_call_target="([^"]+)"', line).group(1)
  return "copy" if re.search(r" copy(-start)?\(", line) else ""


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
  p.add_argument("--layers", type=int, default=LVM_300M["layers"])
  args = p.parse_args()
  device = h200_device()
  for batch in args.batch:
    kinds = loop_kernels(compiled_hlo(device, batch, args.layers))
    print(f"LVM-300M ({args.layers} layers), batch {batch}: {sum(kinds.values())} kernels a token")
    for kind, n in kinds.most_common():
      print(f"  {n:5d}  {kind}")


if __name__ == "__main__":
  main()
