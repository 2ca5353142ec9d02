"""AIM train-step throughput and MFU on this machine (no reference implementation to race:
ml-aim ships inference only and ml-l3m needs GPUs).

  python bench/aim_train_step.py [--width 384 --depth 6 --image 112 --batch 16]

A full step of python -m lvm_jax.train's AIM objective (prefix-causal trunk, MLP head,
normalized-pixel loss, backward, AdamW) in fp32 on one device. Prints patches/s, images/s and
MFU against the XLA matmul peak measured in the same process (metrics.measured_peak_flops).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_seconds  # noqa: E402

from lvm_jax import config as config_lib, metrics, sharding, train  # noqa: E402
from lvm_jax.models import aim  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--width", type=int, default=384)
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--image", type=int, default=112)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  c = config_lib.aim_config(width=args.width, depth=args.depth, heads=args.width // 64, image_size=args.image)
  c.model.update(head_width=512, head_depth=4, head_mlp=2048, dtype="float32", attention="xla")
  c.global_batch, c.steps = args.batch, 1000
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  b = train.build(c, mesh)
  rng = np.random.default_rng(0)
  batch = {"images": rng.integers(0, 256, (args.batch, args.image, args.image, 3), dtype=np.uint8),
           "prefix": rng.integers(1, c.seq_len, args.batch).astype(np.int32)}
  with jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    state = [jax.jit(b.init, out_shardings=b.state_shardings)(jax.random.key(0))]
    step = train.jit_train_step(c, b)
    batch = {k: jax.device_put(v, b.batch_sharding) for k, v in batch.items()}

    def run():
      state[0], m = step(state[0], batch)
      jax.block_until_ready(m["loss"])

    seconds = median_seconds(run, args.reps, warmup=1)
  flops = aim.flops_per_step(c)
  peak = metrics.measured_peak_flops("float32")
  print(f"AIM width {args.width}, depth {args.depth}, {c.seq_len} patches of {c.model.patch}px, head 4 x 512/2048, "
        f"batch {args.batch}, fp32, {os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"{c.seq_len * args.batch / seconds:8.0f} patches/s, {args.batch / seconds:6.1f} images/s, "
        f"step {seconds * 1e3:.0f} ms, MFU {flops / seconds / peak:.0%} of a measured {peak / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
  main()
