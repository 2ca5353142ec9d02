"""Can an LVM recipe learn to copy a moving picture in context? A probe in token space.

  python bench/copy_probe.py                               # the demo LVM's shape, ~4 min on 2 cores
  python bench/copy_probe.py --still --steps 400           # the same-place copy: learnt in ~300 steps
  python bench/copy_probe.py --batch 32 --directions 4     # more tokens a step, easier shifts

The demo's video tasks are solved by copying: each frame is the last one moved by a whole token
(data/demo.py). Here the tokenizer is out of the way: sentences are 4 frames of an 8x8 grid of
codes (a Zipf-like draw over 256), each frame the last one shifted by v tokens (`--shift`: 1 or
2 tokens, 0 for either; in 8 or 4 directions; `--still`: not at all) with a random entering
border. A model that copies predicts frames 2-4 from the frame before; one that does not pays
the draw's entropy (~4.87 nats) on every frame. Prints the held-out NLL of each frame during
training: the gap between frame 1 and frames 2-4 is the in-context copying.

Measured with the demo LVM's shape (d128 x 4 layers, lr 3e-3) on 2026-11-27 (NLL of frame 4):
  batch 8, --still: 2.25 at step 400 (the same-place copy, one attention offset)
  batch 8, shifts of 1-2 tokens in 8 directions: 4.87 -> 4.83 after 2400 steps (4.9M tokens)
  batch 8, 300 --still steps, then those shifts: the copy gone by step 400, 4.85 at step 1200
  batch 32, shifts of 1 token in 4 directions: 4.87 until step ~150, 3.61 at 420, 2.21 at 600
  (4.9M tokens; frame 2, which has only frame 1 to infer the shift from, 3.31)
So the copy that video prompts need appears only after a plateau whose length depends on the
batch and the task's variety.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lvm_jax.models import transformer

GRID, FRAMES, CODES = 8, 4, 256


def videos(rng: np.random.Generator, n: int, shift: int, directions: int) -> np.ndarray:
  """int32 [n, FRAMES * GRID * GRID]: token videos of a window gliding over a random code field."""
  compass = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)][:directions]
  probs = 1.0 / np.arange(1, CODES + 1) ** 0.8
  reach = 2 * (FRAMES - 1)  # the farthest a window moves
  out = np.empty((n, FRAMES, GRID, GRID), np.int32)
  for i in range(n):
    step = rng.integers(1, 3) if shift == 0 else shift
    v = np.asarray(compass[rng.integers(len(compass))]) * step
    field = rng.choice(CODES, size=(GRID + 2 * reach, GRID + 2 * reach), p=probs / probs.sum())
    for f in range(FRAMES):
      y, x = reach + v * f
      out[i, f] = field[y:y + GRID, x:x + GRID]
  return out.reshape(n, -1)


def frame_nll(model: transformer.Model, tokens_BL: jax.Array) -> jax.Array:
  """Mean NLL of each frame's tokens ([FRAMES]); the first token of the sentence has no target."""
  logp_BLV = jax.nn.log_softmax(model(tokens_BL)[:, :-1].astype(jnp.float32))
  nll_BL = -jnp.take_along_axis(logp_BLV, tokens_BL[:, 1:, None], axis=-1)[..., 0]
  per = GRID * GRID
  return jnp.stack([nll_BL[:, max(f * per - 1, 0):(f + 1) * per - 1].mean() for f in range(FRAMES)])


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--shift", type=int, default=0, choices=(0, 1, 2), help="tokens a frame; 0: 1 or 2")
  p.add_argument("--directions", type=int, default=8, choices=(4, 8))
  p.add_argument("--still", action="store_true", help="no motion at all: the same-place copy")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  draw = lambda n: videos(rng, n, args.shift, args.directions) if not args.still else np.tile(
      videos(rng, n, 1, 4)[:, :GRID * GRID], FRAMES)
  cfg = transformer.Config(d_model=args.d_model, ffn=3 * args.d_model, layers=args.layers, heads=args.heads,
                           vocab_size=CODES, remat="none")
  model = transformer.Model(cfg, rngs=nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, args.steps, args.lr / 10)
  opt = nnx.Optimizer(model, optax.adamw(schedule, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
  L = FRAMES * GRID * GRID
  ones_BL = jnp.ones((args.batch, L), jnp.int32)
  batch = lambda t: {"tokens": t, "segment_ids": ones_BL, "positions": jnp.broadcast_to(jnp.arange(L), t.shape),
                     "loss_mask": ones_BL}

  @nnx.jit
  def train_step(model, opt, tokens_BL):
    def mean_loss(m):
      total, aux = transformer.loss(m, batch(tokens_BL))
      return total / aux["targets"]
    value, grads = nnx.value_and_grad(mean_loss)(model)
    opt.update(model, grads)
    return value

  held_out = jnp.asarray(draw(64))
  evaluate = nnx.jit(frame_nll)
  t0 = time.time()
  print(f"{'step':>6} {'loss':>6}  held-out NLL of frames 1-4")
  for s in range(1, args.steps + 1):
    loss_value = train_step(model, opt, jnp.asarray(draw(args.batch)))
    if s % max(1, args.steps // 10) == 0 or s == args.steps:
      nll = np.asarray(evaluate(model, held_out))
      print(f"{s:6d} {float(loss_value):6.3f}  {' '.join(f'{x:5.2f}' for x in nll)}  ({time.time() - t0:.0f} s)",
            flush=True)


if __name__ == "__main__":
  main()
