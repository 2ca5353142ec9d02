"""Where a profiled step's device time goes: kernel time by kind and the biggest kernels.

  python bench/profile_summary.py DIR [STEPS]   # DIR holds a jax.profiler trace (.trace.json.gz)

Reads the newest .trace.json.gz under DIR and sums the durations of the events on the device's
stream lines (the kernels themselves; the derived "XLA Ops" lines would count them twice).
"""

import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# First match wins: cuDNN's attention kernels carry sdpa/flash/fmha in their names, its
# convolutions fprop/dgrad/implicit_gemm (the VQGAN's profile), both before the GEMM patterns.
KINDS = (("attention", r"fmha|flash|attention|sdpa"),
         ("convolution", r"cudnn|fprop|dgrad|wgrad|implicit|convolve|conv2d|winograd"),
         ("matmul", r"gemm|cublas|nvjet|xmma|cutlass|matmul|dot"),
         ("copy/transpose", r"copy|transpose|memcpy|memset"),
         ("fusion (elementwise, norms, loss)", r"fusion|loop_|input_|reduce|scatter|gather"))


def kind(name: str) -> str:
  return next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "other")


def kernel_times(trace_dir: Path) -> dict[str, float]:
  """Microseconds per kernel name over the whole trace, device stream lines only."""
  path = max(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  events = json.loads(gzip.open(path).read())["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
  lines = {key for key, name in threads.items() if key[0] in device and name.startswith("Stream")}
  if not lines:  # no stream lines (a TPU, another profiler version): every device line but the derived ones
    lines = {key for key, name in threads.items() if key[0] in device and not re.match(r"XLA (Ops|Modules)|Steps", name)}
  total = defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines:
      total[e["name"]] += float(e.get("dur", 0))
  return dict(total)


def summarize(trace_dir, steps: int = 1, top: int = 12) -> list[tuple[str, float, float]]:
  """(label, ms per step, share of device time): each kind, then the `top` biggest kernels."""
  times = kernel_times(Path(trace_dir))
  whole = sum(times.values()) or 1.0
  by_kind = defaultdict(float)
  for name, us in times.items():
    by_kind[kind(name)] += us
  out = [(f"kind: {k}", us / 1e3 / steps, us / whole) for k, us in sorted(by_kind.items(), key=lambda x: -x[1])]
  out.append(("device time in all", whole / 1e3 / steps, 1.0))
  biggest = sorted(times.items(), key=lambda x: -x[1])[:top]
  return out + [(f"kernel: {name[:70]}", us / 1e3 / steps, us / whole) for name, us in biggest]


if __name__ == "__main__":
  for label, ms, share in summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1):
    print(f"{label:<80} {ms:9.3f} ms  {share:6.1%}")
