"""The README's main job: python -m lvm_jax.demo --workdir W.

Until the tokenizer, data and prompting stages land, the demo trains the tiny LVM
(configs/lvm_tiny.py) on synthetic visual sentences and shows the loss falling towards the
floor the data allows. Everything it writes is in the workdir: metrics.jsonl, TensorBoard
events and orbax checkpoints (rerunning resumes, and finishes at once if training is done).
"""

import json
import math
import os

from absl import flags

from lvm_jax import cli, train

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def loss_floor(c) -> float:
  """Expected loss of a model that has learnt the synthetic structure: only the first image of
  each sentence is unpredictable (ln(codes) per target token), averaged over all targets."""
  lo, hi = c.data.images_per_sentence
  t = c.tokens_per_image
  targets = sum(n * t - 1 for n in range(lo, hi + 1))
  unpredictable = (hi - lo + 1) * (t - 1) * math.log(c.data.codes)
  return unpredictable / targets


def demo(c, workdir: str) -> None:
  train.train(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  first, last = rows[0], rows[-1]
  print(f"\nloss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
        f"{last['step']} (uniform guess {math.log(c.model.vocab_size):.2f}, "
        f"learnable floor ~{loss_floor(c):.2f})")
  print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}; "
        f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")


def cli_main() -> None:
  config = cli.define_config(os.path.join(_CONFIGS, "lvm_tiny.py"))
  workdir = flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes everything.")
  cli.run(lambda _: demo(config.value, workdir.value), required=[])


if __name__ == "__main__":
  cli_main()
