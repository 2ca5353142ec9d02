"""Model families, one module each, chosen by name (config.model_name, as big_vision does).

Each family module exports the same contract, and the code outside models/ uses nothing else:

  Config                 frozen dataclass of the architecture, Config(**c.model) (static under
                         jit); train.py's families have an `attention` field, resolved for the
                         mesh's devices (kernels/attention.for_platform)
  Model                  the nnx.Module: Model(cfg, rngs=...)
  inference(cfg)         the Config to run trained weights with (e.g. no recompute)
  batch_spec(c)          the global batch the loss takes: name -> jax.ShapeDtypeStruct
  loss(model, batch, **c.loss) -> (summed objective, sums to report incl. "loss", "targets")
  summary(loss)          host metrics derived from a logged step's mean loss
  flops_per_step(c)      model FLOPs of one optimizer update (the MFU's numerator)
  validate(c)            one-line config.ConfigError for settings of this family that cannot run
  WEIGHTS                the checkpoint item holding the weights to run (load.py)
  EVALUATION             evaluate.py's report for the family (perplexity | probe), if it has one

transformer (the LVM) and aim are trained by train.py; vqgan by train_vqgan.py, whose loss also
takes the critic and perceptual terms.
"""

import types

import jax
from flax import nnx


def abstract(family: types.ModuleType, cfg: object) -> nnx.Module:
  """A family's Model with shapes only: no memory, no FLOPs."""
  return nnx.eval_shape(lambda: family.Model(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
  """Parameters of a model or any part of it, abstract or not."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
