"""Compiled TPU memory of the LVM train step: Pallas flash attention vs the XLA reference.

  python bench/attention_memory.py [--config configs/lvm_300m.py --topology v5p-8 --seqs 4096,16384]

No TPU needed: libtpu's fake topology and XLA:TPU's real compiler give each step's per-chip
temporaries (jax[tpu] must be installed). One sequence per chip, remat `full` (the 7B setting),
so what grows with the sequence is activations and attention scratch. The kernel keeps
attention memory linear in L; the XLA path holds [L, L] score blocks per head. Prints GiB and
the flash / XLA ratio per sequence length, and each path's growth from the first length to the
last against the length ratio (linear growth = that ratio).
"""

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvm_jax import compile as compile_lib, config as config_lib  # noqa: E402


def temporaries_gib(config: str, topology: str, seq: int, attention: str) -> float:
  c = config_lib.load_file(config)
  dims = compile_lib.topology_name(topology)[1].split(":")[1]
  c.seq_len, c.model.attention, c.model.remat = seq, attention, "full"
  c.global_batch, c.grad_accum = math.prod(int(d) for d in dims.split("x")), 1  # one sequence per chip
  compiled, _, _ = compile_lib.compile_train_step(c, topology)
  return compiled.memory_analysis().temp_size_in_bytes / 1024**3


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/lvm_300m.py")
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--seqs", default="4096,16384")
  args = p.parse_args()
  seqs = [int(s) for s in args.seqs.split(",")]
  print(f"{args.config} on {args.topology}: temporaries per chip (GiB), one sequence per chip, remat full")
  rows = {impl: [temporaries_gib(args.config, args.topology, s, impl) for s in seqs] for impl in ("flash", "xla")}
  for i, s in enumerate(seqs):
    print(f"  seq {s:6d}: flash {rows['flash'][i]:7.2f}   xla {rows['xla'][i]:7.2f}   "
          f"flash/xla {rows['flash'][i] / rows['xla'][i]:.2f}")
  growth = seqs[-1] / seqs[0]
  for impl, values in rows.items():
    print(f"  {impl}: x{values[-1] / values[0]:.1f} from seq {seqs[0]} to {seqs[-1]} (linear: x{growth:.0f})")


if __name__ == "__main__":
  main()
