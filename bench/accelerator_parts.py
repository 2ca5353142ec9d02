"""The parts of bench/accelerator.py, each run in its own process: `jax`, `jax_flags`, `torch`.

  python bench/accelerator_parts.py PART OUT.json BUDGET_S [--quick]

Each finished measurement is appended to OUT.json at once, so a part stopped by its budget keeps
what it measured. Rows: section, what, value, unit, key (ours) or ref_of (a reference's key), note.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, the datasheet's (MFU's denominator)
SIZES = {"lvm_300m": (1024, 2688, 22, 8), "lvm_1b": (2048, 5504, 22, 16), "tiny": (64, 176, 2, 2)}


class Rows:
  """Rows written to `path` as they come, and a deadline the parts check before each measurement."""

  def __init__(self, path: str, budget: float):
    self.path, self.rows, self.deadline = Path(path), [], time.time() + budget

  def add(self, section: str, what: str, value, unit: str = "", **kw) -> None:
    row = dict(section=section, what=what, value=value, unit=unit, **kw)
    self.rows.append(row)
    self.path.write_text(json.dumps(self.rows, indent=1))
    print(f"{section:<10} {what:<60} {value!s:>14} {unit} {kw or ''}", flush=True)

  def left(self) -> float:
    return self.deadline - time.time()

  def guarded(self, section: str, what: str, fn, need: float = 0.0) -> None:
    """Runs fn(); a failure or too little time left becomes a row saying so, not a lost part."""
    if self.left() < need:
      self.add(section, what, "skipped", note=f"{self.left():.0f} s left, needs ~{need:.0f}")
      return
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      self.add(section, what, "failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def main() -> None:
  part, out, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
  quick = "--quick" in sys.argv
  rows = Rows(out, budget)
  if part == "torch":
    import accelerator_torch  # pylint: disable=g-import-not-at-top
    accelerator_torch.run(rows, quick)
    return
  import accelerator_jax  # pylint: disable=g-import-not-at-top
  skip = tuple(next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--skip=")), ()))
  accelerator_jax.run(rows, quick, flags_only=part == "jax_flags", skip=skip)


if __name__ == "__main__":
  main()
