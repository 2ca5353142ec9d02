"""Sharded LVM training: python -m lvm_jax.train --config configs/lvm_tiny.py --workdir W.

Reads top to bottom: config -> mesh -> the data checked against the model -> model and optimizer
shapes -> shardings -> the step -> loop.run (lvm_jax/loop.py: workdir record, verified restore,
non-finite guard, checkpoints, preemption). Restarting with the same workdir resumes from the
newest checkpoint that verifies, data iterator included; SIGTERM saves a checkpoint and exits 0.
"""

import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from lvm_jax import checkpoint, cli, config as config_lib, load, loop, metrics, optim, sharding, workdir as workdir_lib
from lvm_jax.kernels import attention



# ---------------------------------------------------------------------------- the step


def lvm_loss(params: Any, graphdef: Any, batch: dict, z_loss: float) -> tuple[jax.Array, tuple]:
  """Summed next-token cross-entropy over target tokens (and its weight), for accumulation.

  Token t is a target if its loss_mask is 1 and token t-1 is in the same sentence: packed
  sentences never predict across a boundary, and padding (segment 0) is never a target.
  """
  model = nnx.merge(graphdef, params)
  tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
  logits_BLV = model(tokens_BL, seg_BL, batch["positions"])[:, :-1].astype(jnp.float32)
  targets_BL = tokens_BL[:, 1:]
  weights_BL = (batch["loss_mask"][:, 1:] * (seg_BL[:, 1:] == seg_BL[:, :-1]) * (seg_BL[:, 1:] > 0))
  weights_BL = weights_BL.astype(jnp.float32)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll = jnp.sum((log_z_BL - target_logit_BL) * weights_BL)
  z_penalty = z_loss * jnp.sum(jnp.square(log_z_BL) * weights_BL)
  return nll + z_penalty, (nll, jnp.sum(weights_BL))


def aim_loss(params: Any, graphdef: Any, batch: dict, z_loss: float = 0.0) -> tuple[jax.Array, tuple]:
  """AIM's summed next-patch error over non-prefix targets (and their count), for accumulation."""
  del z_loss
  from lvm_jax.models import aim  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, params)
  images = aim.normalize(batch["images"])
  total, count = aim.loss_terms(model(images, batch["prefix"]), images, batch["prefix"], model.cfg.patch)
  return total, (total, count)


def train_step(state: dict, batch: dict, *, graphdef: Any, tx: optax.GradientTransformation,
               grad_accum: int, z_loss: float, lr_schedule: optax.Schedule, objective: str = "lvm",
               vocab_size: int = 0) -> tuple[dict, dict]:
  """One optimizer update from `grad_accum` micro-batches scanned in sequence; a non-finite
  update is skipped (loop.guard). With `vocab_size`, token ids outside it are counted."""
  params = state["params"]
  # Strided split: micro-batch g takes rows g, g+G, ..., so each stays spread over the batch shards.
  micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1),
      batch)
  grad_fn = jax.value_and_grad(aim_loss if objective == "aim" else lvm_loss, has_aux=True)

  def accumulate(carry: tuple, mb: dict) -> tuple[tuple, None]:
    grads, nll, weight = carry
    (_, (mb_nll, mb_weight)), mb_grads = grad_fn(params, graphdef, mb, z_loss)
    return (jax.tree.map(jnp.add, grads, mb_grads), nll + mb_nll, weight + mb_weight), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, nll, weight), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
  # Normalise once by all target tokens of the update, so the loss is a per-token mean
  # however the batch was split or packed.
  grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  loss, grad_norm, param_norm = nll / jnp.maximum(weight, 1.0), optax.tree.norm(grads), optax.tree.norm(new_params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
  new_state, count = loop.guard(state, {"params": new_params, "opt_state": opt_state}, finite)
  out = {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm,
         "learning_rate": lr_schedule(state["step"]), "target_tokens": weight, **count}
  if vocab_size:
    tokens = batch["tokens"]
    out["bad_ids"] = jnp.sum((tokens < 0) | (tokens >= vocab_size))
  return new_state, out


# ---------------------------------------------------------------------------- set-up helpers


def build(c: Any, mesh: jax.sharding.Mesh) -> dict:
  """Model graph, optimizer, abstract state and its shardings: everything before any FLOP."""
  # The attention implementation follows the mesh's devices, not the host's (compile.py).
  platform = mesh.devices.flat[0].platform
  model_lib = importlib.import_module(f"lvm_jax.models.{c.model_name}")  # transformer (LVM) or aim
  model_cfg = model_lib.Config(**{**c.model, "attention": attention.resolve(c.model.attention, platform)})
  abstract_model = nnx.eval_shape(lambda: model_lib.Model(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract_model)
  tx = optim.make(c)

  def init(key: jax.Array) -> dict:
    params = nnx.to_pure_dict(nnx.state(model_lib.Model(model_cfg, rngs=nnx.Rngs(key)), nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), **loop.counters()}

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  param_specs = sharding.param_specs(abstract_model, c.rules)
  state_specs = {"step": jax.sharding.PartitionSpec(), "params": param_specs,
                 "opt_state": sharding.tree_specs_like(abstract_state["opt_state"],
                                                       abstract_state["params"], param_specs),
                 **{k: jax.sharding.PartitionSpec() for k in loop.COUNTERS}}
  state_shardings = sharding.named(mesh, state_specs)
  return dict(model_cfg=model_cfg, graphdef=graphdef, tx=tx, init=init,
              abstract_state=checkpoint.abstract_like(abstract_state, state_shardings),
              state_shardings=state_shardings,
              # Rows over the batch axes, the rest whole: one sharding for arrays of any rank.
              batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.batch_spec(c.rules)[0])))


def jit_train_step(c: Any, b: dict) -> Any:
  """The sharded step: state in and out on its shardings, donated so it is updated in place."""
  return jax.jit(
      functools.partial(train_step, graphdef=b["graphdef"], tx=b["tx"], grad_accum=c.grad_accum,
                        z_loss=c.optim.z_loss, lr_schedule=optim.schedule(c), objective=c.objective,
                        vocab_size=c.model.vocab_size if c.objective == "lvm" else 0),
      in_shardings=(b["state_shardings"], b["batch_sharding"]),
      out_shardings=(b["state_shardings"], None),
      donate_argnums=0)


def train(c: Any, workdir: str, stop_at: int | None = None) -> dict:
  """Trains to c.steps (or until SIGTERM, or `stop_at`); returns the final state."""
  config_lib.validate(c)
  workdir_lib.check_writable(workdir)
  with c.unlocked():
    workdir_lib.absolute_paths(c)
    if "vqgan" in c:  # the tokenizer as data (architecture, absolute paths): tools never run its file
      c.vqgan = load.vqgan_record(c.vqgan)
  mesh = sharding.make_mesh(c.mesh)
  sharding.check_batch(c.global_batch, c.grad_accum, mesh, c.rules)
  data_module = importlib.import_module(f"lvm_jax.data.{c.data.name}")
  # The data's identity, checked against the model and the workdir before anything compiles.
  data = data_module.identity(c) if hasattr(data_module, "identity") else None
  b = build(c, mesh)
  data_iter = data_module.make_iterator(c, sharding.local_rows(b["batch_sharding"], c.global_batch))
  flops_per_step = metrics.train_flops_per_step(b["model_cfg"], c.seq_len, c.global_batch)
  peak = metrics.peak_flops_total(c.peak_tflops, c.model.dtype)

  def row(m: dict, step_time: float) -> dict:
    loss = float(m["loss"])
    extra = {"perplexity": float(np.exp(min(loss, 50.0)))} if c.objective == "lvm" else {}
    return {"loss": loss, **extra, "grad_norm": m["grad_norm"], "param_norm": m["param_norm"],
            "learning_rate": m["learning_rate"], "step_time": step_time,
            "tokens_per_sec": c.global_batch * c.seq_len / step_time, "mfu": flops_per_step / step_time / peak}

  trainer = loop.Trainer(abstract_state=b["abstract_state"], state_shardings=b["state_shardings"], init=b["init"],
                         batch_sharding=b["batch_sharding"], step_fn=jit_train_step(c, b), row=row, data=data)
  return loop.run(c, workdir, trainer, data_iter, mesh, stop_at)


def cli_main() -> None:
  config = cli.define_config()
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here.")
  stop_at = flags.DEFINE_integer("stop_at", None, "Save and exit after this step (a job's budget).")
  cli.run(lambda _: train(config.value, workdir.value, stop_at.value), required=["config", "workdir"])


if __name__ == "__main__":
  cli_main()
