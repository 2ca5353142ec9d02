"""Sharded training of a model family by next-element prediction: the LVM (models/transformer.py,
next token of a visual sentence) or AIM (models/aim.py, next patch's pixels).

  python -m lvm_jax.train --config configs/lvm_tiny.py --workdir W

Reads top to bottom: config -> mesh -> the data checked against the model -> model and optimizer
shapes -> shardings -> the step -> loop.run (lvm_jax/loop.py: workdir record, verified restore
or a new run's state, with the weights config.init_from names if set; non-finite guard,
checkpoints, preemption). The family is `config.model_name`; this file uses only its contract
(Config, Model, loss, flops_per_step, summary), so a new family is a new module under models/
and a config. Restarting with the same workdir resumes from the newest checkpoint
that verifies, data iterator included; SIGTERM saves a checkpoint and exits 0.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvm_jax import cli, config as config_lib, load, loop, models, monitor, optim, sharding
from lvm_jax.kernels import attention


def train_step(state: dict, batch: dict, *, graphdef: Any, tx: optax.GradientTransformation, grad_accum: int,
               loss_fn: Callable[..., tuple[jax.Array, dict]], lr_schedule: optax.Schedule) -> tuple[dict, dict]:
  """One optimizer update from `grad_accum` micro-batches scanned in sequence; a non-finite
  update is skipped (loop.guard). `loss_fn(model, batch)` is the family's loss: a summed
  objective and sums to report, among them "loss" and "targets"."""
  params = state["params"]
  # Strided split: micro-batch g takes rows g, g+G, ..., so each stays spread over the batch shards.
  micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1),
      batch)
  grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(nnx.merge(graphdef, p), mb), has_aux=True)

  def accumulate(carry: tuple, mb: dict) -> tuple[tuple, None]:
    grads, sums = carry
    (_, mb_sums), mb_grads = grad_fn(params, mb)
    return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, sums, mb_sums)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first)[0][1])
  (grads, sums), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, params), zero_sums), micro)
  # Normalise once by all targets of the update, so the loss is a per-target mean however the
  # batch was split or packed.
  targets = jnp.maximum(sums.pop("targets"), 1.0)
  grads = jax.tree.map(lambda g: g / targets, grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  loss, grad_norm, param_norm = sums.pop("loss") / targets, optax.tree.norm(grads), optax.tree.norm(new_params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
  new_state, count = loop.guard(state, {"params": new_params, "opt_state": opt_state}, finite)
  return new_state, {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm, "target_tokens": targets,
                     "learning_rate": lr_schedule(state["step"]), **sums, **count}


def build(c: Any, mesh: jax.sharding.Mesh) -> loop.Built:
  """Model graph, optimizer, abstract state and its shardings: everything before any FLOP."""
  family = config_lib.model_module(c)
  # The attention implementation follows the mesh's devices, not the host's (compile.py).
  model_cfg = attention.for_platform(family.Config(**c.model), mesh.devices.flat[0].platform)
  abstract_model = models.abstract(family, model_cfg)
  graphdef, _ = nnx.split(abstract_model)
  tx = optim.make(c)

  def init(key: jax.Array, loaded: Optional[dict] = None) -> dict:
    params = nnx.to_pure_dict(nnx.state(family.Model(model_cfg, rngs=nnx.Rngs(key)), nnx.Param))
    # Weights a new run starts from (config.init_from, load.init_params) replace whole top-level
    # subtrees (all, or e.g. an ml-aim trunk); under jit the random values they replace are never computed.
    params = {**params, **(loaded or {})}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), **loop.counters()}

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  param_specs = sharding.param_specs(abstract_model, c.rules)
  state_specs = {"step": jax.sharding.PartitionSpec(), "params": param_specs,
                 "opt_state": sharding.tree_specs_like(abstract_state["opt_state"],
                                                       abstract_state["params"], param_specs),
                 **{k: jax.sharding.PartitionSpec() for k in loop.COUNTERS}}
  return loop.Built.make(c, mesh, model_cfg, graphdef, tx, init, abstract_state,
                         sharding.named(mesh, state_specs))


def jit_train_step(c: Any, b: loop.Built) -> Any:
  """The sharded step: state in and out on its shardings, donated so it is updated in place."""
  family = config_lib.model_module(c)
  return jax.jit(
      functools.partial(train_step, graphdef=b.graphdef, tx=b.tx, grad_accum=c.grad_accum,
                        loss_fn=functools.partial(family.loss, **c.get("loss", {})), lr_schedule=optim.schedule(c)),
      in_shardings=(b.state_shardings, b.batch_sharding),
      out_shardings=(b.state_shardings, None),
      donate_argnums=0)


def train(c: Any, workdir: str, stop_at: int | None = None) -> dict:
  """Trains to c.steps (or until SIGTERM, or `stop_at`); returns the final state."""
  mesh = loop.prepare(c, workdir)
  with c.unlocked():
    if "vqgan" in c:  # the tokenizer as data (architecture, absolute paths): tools never run its file
      c.vqgan = load.vqgan_record(c.vqgan)
  family = config_lib.model_module(c)
  # The data's identity, checked against the model and the workdir before anything compiles.
  data_iter, identity = loop.data(c, mesh)
  b = build(c, mesh)

  def row(m: dict) -> dict:
    return {"loss": float(m["loss"]), **family.summary(float(m["loss"])), "grad_norm": m["grad_norm"],
            "param_norm": m["param_norm"], "learning_rate": m["learning_rate"]}

  evaluate, samples = monitor.make(c, b.graphdef)
  trainer = loop.Trainer(built=b, step_fn=jit_train_step(c, b), row=row, data=identity,
                         flops_per_step=family.flops_per_step(c), rate=("tokens_per_sec", c.global_batch * c.seq_len),
                         evaluate=evaluate, samples=samples)
  return loop.run(c, workdir, trainer, data_iter, mesh, stop_at)


def cli_main() -> None:
  cli.train_main(train)


if __name__ == "__main__":
  cli_main()
