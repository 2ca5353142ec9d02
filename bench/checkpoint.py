"""Cost of checkpoint integrity: device fingerprints against the save and restore they guard.

  python bench/checkpoint.py [--d_model 512 --layers 8] [--root /tmp/bench_ckpt | gs://bucket/path]

Builds an LVM train state (params + AdamW moments, fp32), then times in one process:
  fingerprint   checkpoint.fingerprint(state): the jitted bit sums and finiteness, on the devices
  save          Checkpointer.save + wait: fingerprint, orbax write of state (and the JSON)
  restore       Checkpointer.restore: orbax read + fingerprint recomputed and compared
Prints the fingerprint's share of save and of restore. Target (issue 12): a small fraction of
each. Measured on this project's 2-core CPU machine (42M params, 481 MiB of state, local disk):
fingerprint 0.32 s (1.5 GB/s), save 0.79 s, restore 0.87 s: 0.40x and 0.37x. XLA:CPU reduces
integers at ~1 GB/s (floats at ~7), and a local save only reaches the page cache; on a TPU or GPU
the fingerprint is one pass at memory bandwidth while a save crosses PCIe and the network.
"""

import argparse
import os
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from timing import median_seconds  # noqa: E402

from lvm_jax import checkpoint, config as config_lib, sharding, train  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--d_model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--root", default="/tmp/bench_checkpoint")
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  c = config_lib.lvm_config(d_model=args.d_model, ffn=4 * args.d_model, layers=args.layers, heads=args.d_model // 64)
  c.model.dtype = "float32"
  mesh = sharding.make_mesh(c.mesh)
  b = train.build(c, mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    state = jax.jit(b.init, out_shardings=b.state_shardings)(jax.random.key(0))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    print(f"state: {sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6:.1f}M params, "
          f"{nbytes / 2**20:.0f} MiB with optimizer state, {len(jax.devices())} devices")
    t_fp = median_seconds(lambda: checkpoint.fingerprint(state), args.reps)
    if "://" not in args.root:
      shutil.rmtree(args.root, ignore_errors=True)
    saves, restores = [], []
    with checkpoint.Checkpointer(args.root, keep=args.reps + 1, every=1) as ckpt:
      for step in range(1, args.reps + 1):
        t0 = time.perf_counter()
        ckpt.save(step, state, None)
        ckpt.wait()
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(ckpt.restore(step, b.abstract_state))
        restores.append(time.perf_counter() - t0)
  t_save, t_restore = sorted(saves)[len(saves) // 2], sorted(restores)[len(restores) // 2]
  print(f"{'':12s} {'seconds':>8s} {'MiB/s':>8s}")
  for name, t in (("fingerprint", t_fp), ("save", t_save), ("restore", t_restore)):
    print(f"{name:12s} {t:8.3f} {nbytes / 2**20 / t:8.0f}")
  print(f"fingerprint / save    = {t_fp / t_save:.3f}  (included in save)")
  print(f"fingerprint / restore = {t_fp / t_restore:.3f}  (included in restore)")


if __name__ == "__main__":
  main()
