"""AdamW with global-norm clipping, linear warmup + cosine decay, and a weight-decay mask.

The schedule counts optimizer updates. Gradient accumulation happens inside the train step
(train.py), so optax sees one update per step, unlike the release where `optax.MultiSteps`
made the logged learning rate count micro-steps.
"""

from typing import Any, Sequence

import jax
import optax


def schedule(c: Any) -> optax.Schedule:
  o = c.optim
  decay_steps = max(c.steps, o.warmup + 1)
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup, decay_steps, o.end_lr)


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
  """True for parameters that get weight decay: those whose path names none of `no_decay`."""

  def decays(path: tuple, _: Any) -> bool:
    names = "/".join(str(getattr(k, "key", k)) for k in path)
    return not any(s in names for s in no_decay)

  return jax.tree_util.tree_map_with_path(decays, params)


def make(c: Any) -> optax.GradientTransformation:
  o = c.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip),
      optax.adamw(schedule(c), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=lambda p: decay_mask(p, o.no_decay)),
  )
