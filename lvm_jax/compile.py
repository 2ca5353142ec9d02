"""AOT-compile the sharded train step for a TPU topology, on any machine with libtpu installed.

  python -m lvm_jax.compile --config configs/lvm_7b.py --topology v5p-128

libtpu's fake topology gives the devices; XLA:TPU compiles the real step (same shardings,
remat and attention as training) and reports per-chip memory and FLOPs, so a config that would
not fit fails here, before a pod is reserved. Needs `pip install -e .[tpu]`; no TPU.
"""

import math
from typing import Any

import jax
from absl import flags

from lvm_jax import cli, config as config_lib, metrics, sharding, train

# HBM per chip in GiB, by TPU generation.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# TPU generations whose slice names count TensorCores (2 per chip) and whose chips form 3D tori.
_THREE_D = ("v4", "v5p")


def topology_name(topology: str) -> tuple[str, str]:
  """'v5p-128' -> ('v5p', 'v5p:4x4x4'); 'v5e:4x4' passes through. The first dims stay smallest,
  as in the published slice shapes."""
  if ":" in topology:
    return topology.split(":")[0], topology
  gen, _, size = topology.partition("-")
  if gen not in HBM_GIB or not size.isdigit():
    raise config_lib.ConfigError(
        f"--topology={topology!r}: expected e.g. v5p-128, v5e-16, v4-8, v6e-64 or v5p:4x4x4")
  chips = int(size) // 2 if gen in _THREE_D else int(size)
  dims = [2, 2, 1] if gen in _THREE_D else [1, 1]  # the smallest 3D slice is one 2x2x1 host
  while math.prod(dims) < chips:
    smallest = min(dims)
    last = max(i for i, d in enumerate(dims) if d == smallest)
    dims[last] *= 2
  if math.prod(dims) != chips:
    raise config_lib.ConfigError(f"--topology={topology!r}: {chips} chips is not a power of two")
  return gen, f"{gen}:{'x'.join(map(str, dims))}"


def compile_train_step(c: Any, topology: str, num_slices: int = 1) -> Any:
  """Lowers and compiles the train step for the topology; returns the compiled executable."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  config_lib.validate(c)
  _, name = topology_name(topology)
  try:
    devices = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                           num_slices=num_slices).devices
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "lockfile" in str(e):  # libtpu admits one process per host
      raise config_lib.ConfigError(f"cannot get TPU topology {name}: another process on this host holds libtpu "
                                   "(/tmp/libtpu_lockfile); wait for it to end, or compile on another host") from None
    raise config_lib.ConfigError(f"cannot get TPU topology {name} (is libtpu installed? pip install "
                                 f"'lvm_jax[tpu]'): {first}") from None
  mesh = sharding.make_mesh(c.mesh, devices)
  sharding.check_batch(c.global_batch, c.grad_accum, mesh, c.rules)
  b = train.build(c, mesh)
  batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b.batch_sharding)
           for k, x in config_lib.model_module(c).batch_spec(c).items()}
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    lowered = train.jit_train_step(c, b).lower(b.abstract_state, batch)
    return lowered.compile(), mesh, b


def report(c: Any, topology: str, num_slices: int = 1) -> dict:
  """Compiles and prints per-chip memory (arguments, temporaries, total vs HBM) and FLOPs."""
  compiled, mesh, b = compile_train_step(c, topology, num_slices)
  gen, name = topology_name(topology)
  mem = compiled.memory_analysis()
  gib = 1024**3
  args, out, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  total = args + out + temp - mem.alias_size_in_bytes  # donated state is counted once
  chips = mesh.devices.size
  model_flops = config_lib.model_module(c).flops_per_step(c)
  r = dict(topology=name, chips=chips, mesh=dict(mesh.shape), arguments_gib=args / gib,
           temporaries_gib=temp / gib, total_gib=total / gib, hbm_gib=HBM_GIB[gen],
           model_flops_per_chip=model_flops / chips)
  peak = dict(metrics.PEAK_TFLOPS)[gen] * 1e12
  print(f"{name} x{num_slices}: {chips} chips, mesh {dict(mesh.shape)}")
  print(f"per chip: arguments {r['arguments_gib']:.2f} GiB, temporaries {r['temporaries_gib']:.2f} GiB, "
        f"total {r['total_gib']:.2f} GiB of {HBM_GIB[gen]} GiB HBM "
        f"({'fits' if total / gib <= HBM_GIB[gen] else 'DOES NOT FIT'})")
  # XLA's cost analysis counts a scanned layer once, so the analytic count is the one reported.
  print(f"per chip per step: {r['model_flops_per_chip'] / 1e12:.1f} model TFLOPs "
        f"({c.global_batch * c.seq_len} tokens), {r['model_flops_per_chip'] / peak:.2f} s at 100% MFU")
  return r


def cli_main() -> None:
  config = cli.define_config()
  topology = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-16, v5p:4x4x4.")
  slices = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (config.mesh.dcn).")
  cli.run(lambda _: report(config.value, topology.value, slices.value), required=["config", "topology"])


if __name__ == "__main__":
  cli_main()
