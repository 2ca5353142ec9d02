"""Sharded LVM training: python -m lvm_jax.train --config configs/lvm_tiny.py --workdir W.

Reads top to bottom: config -> processes -> mesh -> model and optimizer shapes -> shardings ->
jit(init) -> data -> restore -> jit(step) -> loop. Restarting with the same workdir resumes from
the newest checkpoint, data iterator included; SIGTERM saves a checkpoint and exits cleanly.
"""

import dataclasses
import functools
import importlib
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from lvm_jax import checkpoint, cli, config as config_lib, metrics, optim, sharding
from lvm_jax.kernels import attention
from lvm_jax.models import transformer



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
               grad_accum: int, z_loss: float, lr_schedule: optax.Schedule, objective: str = "lvm") -> tuple[dict, dict]:
  """One optimizer update from `grad_accum` micro-batches scanned in sequence."""
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
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
               "opt_state": opt_state}
  loss = nll / jnp.maximum(weight, 1.0)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                     "learning_rate": lr_schedule(state["step"]), "target_tokens": weight}


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
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  param_specs = sharding.param_specs(abstract_model, c.rules)
  state_specs = {"step": jax.sharding.PartitionSpec(), "params": param_specs,
                 "opt_state": sharding.tree_specs_like(abstract_state["opt_state"],
                                                       abstract_state["params"], param_specs)}
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
                        z_loss=c.optim.z_loss, lr_schedule=optim.schedule(c), objective=c.objective),
      in_shardings=(b["state_shardings"], b["batch_sharding"]),
      out_shardings=(b["state_shardings"], None),
      donate_argnums=0)


def check_workdir(workdir: str) -> None:
  """Fail in one line, before compiling, if the workdir (local or gs://) cannot be written."""
  probe = epath.Path(workdir) / f".write_test_{jax.process_index()}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # OSError locally; the gs:// clients raise their own types (no bucket, no permission).
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
    raise PermissionError(f"workdir {workdir} is not writable: {reason}") from None


class Preemption:
  """SIGTERM -> save and stop. Multi-host jobs agree on the step through the JAX coordinator.

  `stop_at` ends the run after that step as if preempted: a job with a time budget trains
  N steps per submission, and the resume test uses it to stop at a known step.
  """

  def __init__(self, stop_at: int | None = None):
    self.requested = False
    self.stop_at = stop_at
    self.previous = None

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)

  def _handle(self, *_: Any) -> None:
    self.requested = True

  def reached(self, step: int) -> bool:
    if self.stop_at is not None and step >= self.stop_at:
      return True
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def batches(c: Any, data_iter: Iterator[dict], batch_sharding: jax.sharding.Sharding) -> Iterator[dict]:
  for local in data_iter:
    yield sharding.global_batch_array(local, batch_sharding, c.global_batch)


# ---------------------------------------------------------------------------- the loop


def load_params(c: Any, workdir: str) -> tuple[transformer.Config, dict, int]:
  """(model config, params as numpy pure dicts, step) of the newest checkpoint in a workdir."""
  mesh = sharding.make_mesh(c.mesh)
  b = build(c, mesh)
  with checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), c.ckpt_keep, c.ckpt_every) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise checkpoint.CheckpointError(f"no checkpoint in {workdir}/checkpoints (train with python -m lvm_jax.train)")
    state = ckpt.restore(step, b["abstract_state"])
  inference = {"attention": "auto", **({"remat": "none"} if hasattr(b["model_cfg"], "remat") else {})}
  model_cfg = dataclasses.replace(b["model_cfg"], **inference)
  return model_cfg, jax.tree.map(np.asarray, state["params"]), step


def train(c: Any, workdir: str, stop_at: int | None = None) -> dict:
  """Trains to c.steps (or until SIGTERM, or `stop_at`); returns the final state."""
  config_lib.validate(c)
  check_workdir(workdir)
  config_lib.save_to_workdir(c, workdir)
  mesh = sharding.make_mesh(c.mesh)
  sharding.check_batch(c.global_batch, c.grad_accum, mesh, c.rules)
  b = build(c, mesh)
  batch_sharding = b["batch_sharding"]
  data_module = importlib.import_module(f"lvm_jax.data.{c.data.name}")
  data_iter = data_module.make_iterator(c, sharding.local_rows(batch_sharding, c.global_batch))

  ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), c.ckpt_keep, c.ckpt_every)
  with ckpt, jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    init = jax.jit(b["init"], out_shardings=b["state_shardings"])
    state, start = ckpt.restore_or_init(b["abstract_state"], data_iter, lambda: init(jax.random.key(c.seed)))
    if start:
      print(f"restored step {start} from {workdir}", flush=True)

    step_fn = jit_train_step(c, b)

    if stop_at is not None and start >= stop_at:
      print(f"step {start} already reaches --stop_at={stop_at}: nothing to do", flush=True)
      return state
    flops_per_step = metrics.train_flops_per_step(b["model_cfg"], c.seq_len, c.global_batch)
    peak = metrics.peak_flops_total(c.peak_tflops, c.model.dtype)
    with metrics.Writer(workdir, enabled=jax.process_index() == 0, resume_step=start) as writer, \
        Preemption(stop_at) as preemption:
      pending, clock, step = None, (time.perf_counter(), start), start
      for step, batch in zip(range(start + 1, c.steps + 1), batches(c, data_iter, batch_sharding)):
        state, step_metrics = step_fn(state, batch)
        # Read the previous step's metrics only now, so the host never waits on the step it
        # just dispatched.
        if pending is not None:
          clock = _log(writer, *pending, clock, flops_per_step, peak, c)
          pending = None
        if step % c.log_every == 0 or step == c.steps:
          pending = (step, step_metrics)
        stop = preemption.reached(step)
        ckpt.save(step, state, data_iter, force=stop or step == c.steps)
        if stop:
          print(f"stopping early: saved step {step} in {workdir}", flush=True)
          break
      if pending is not None:
        _log(writer, *pending, clock, flops_per_step, peak, c)
      ckpt.wait()
  return state


def _log(writer: metrics.Writer, step: int, m: dict, clock: tuple[float, int], flops_per_step: float,
         peak: float, c: Any) -> tuple[float, int]:
  """Writes step's metrics; `clock` is (time, step) of the previous log, returned updated.

  The first row after a (re)start includes compilation in its step time.
  """
  m = jax.device_get(m)
  now = time.perf_counter()
  step_time = (now - clock[0]) / max(step - clock[1], 1)
  loss = float(m["loss"])
  extra = {"perplexity": float(np.exp(min(loss, 50.0)))} if c.objective == "lvm" else {}
  writer.write(step, {
      "loss": loss, **extra, "grad_norm": m["grad_norm"],
      "learning_rate": m["learning_rate"], "step_time": step_time,
      "tokens_per_sec": c.global_batch * c.seq_len / step_time,
      "mfu": flops_per_step / step_time / peak,
  })
  return now, step


def cli_main() -> None:
  config = cli.define_config()
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here.")
  stop_at = flags.DEFINE_integer("stop_at", None, "Save and exit after this step (a job's budget).")
  cli.run(lambda _: train(config.value, workdir.value, stop_at.value), required=["config", "workdir"])


if __name__ == "__main__":
  cli_main()
