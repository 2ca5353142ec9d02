"""The trainer core that train.py (LVM, AIM) and train_vqgan.py share.

A trainer builds its state, step and data, then hands them to `run`, which owns what every long
job needs: the workdir's record (workdir.py), restore-or-init from verified checkpoints, the
step loop with metrics read one step late (the host never waits on the step it just
dispatched), the non-finite guard, checkpoint cadence, and preemption.

Non-finite guard: each step reports on device whether its loss and gradients are finite; a
step that is not keeps the old parameters and optimizer state (`guard`) and counts the skip
(`skipped_steps`, kept in the state so a resume goes on counting). After
`config.max_skipped_steps` skips in a row the run stops with a one-line error and a non-zero
exit. No checkpoint is saved while the newest update was skipped, so the newest good checkpoint
is never rotated out by a run that has gone wrong.
"""

import dataclasses
import importlib
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils

from lvm_jax import checkpoint, cli, config as config_lib, metrics, sharding, storage, workdir as workdir_lib

# Counters in every trainer's state: total skipped updates and the current run of them.
COUNTERS = ("skipped_steps", "skip_streak")


class RunError(RuntimeError):
  """The run went wrong in a way training cannot fix (diverged, data outside the model)."""


def counters() -> dict:
  return {k: jnp.zeros((), jnp.int32) for k in COUNTERS}


def guard(state: dict, new_state: dict, finite: jax.Array) -> tuple[dict, dict]:
  """(new_state if finite else state with the step advanced, the counters for the metrics).

  A select rather than a cond: it fuses with the optimizer's elementwise update."""
  kept = {k: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state[k], state[k])
          for k in new_state if k not in COUNTERS and k != "step"}
  skipped = (~finite).astype(jnp.int32)
  count = {"skipped_steps": state["skipped_steps"] + skipped,
           "skip_streak": jnp.where(finite, 0, state["skip_streak"] + 1)}
  return {**kept, **count, "step": state["step"] + 1}, count


class Preemption:
  """SIGTERM -> save and stop. Multi-host jobs agree on the step through the JAX coordinator.

  `stop_at` ends the run after that step as if preempted: a job with a time budget trains
  N steps per submission, and the resume test uses it to stop at a known step.
  """

  def __init__(self, stop_at: Optional[int] = None):
    self.stop_at = stop_at
    self.requests = None

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1:
      self.requests = cli.stop_requests()
      self.requests.__enter__()
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.requests is not None:
      self.requests.__exit__(*exc)

  def reached(self, step: int) -> bool:
    if self.stop_at is not None and step >= self.stop_at:
      return True
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return cli.terminated()


@dataclasses.dataclass(frozen=True)
class Built:
  """A trainer's state before any FLOP: the model's graph and config, the optimizer, the state's
  init function, its abstract shapes on their shardings, and the batch's sharding."""
  model_cfg: Any
  graphdef: Any
  tx: Any  # optax.GradientTransformation (the VQGAN trainer adds its critic's, train_vqgan.Built)
  init: Callable[[jax.Array], dict]
  abstract_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding

  @classmethod
  def make(cls, c: Any, mesh: jax.sharding.Mesh, model_cfg: Any, graphdef: Any, tx: Any,
           init: Callable[[jax.Array], dict], abstract_state: Any, state_shardings: Any, **extra: Any) -> "Built":
    return cls(model_cfg=model_cfg, graphdef=graphdef, tx=tx, init=init,
               abstract_state=checkpoint.abstract_like(abstract_state, state_shardings),
               state_shardings=state_shardings, batch_sharding=batch_sharding(c, mesh), **extra)


def batch_sharding(c: Any, mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Rows over the batch axes, the rest whole: one sharding for batch arrays of any rank."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.batch_spec(c.rules)[0]))


def prepare(c: Any, workdir: str, devices: Optional[list] = None) -> jax.sharding.Mesh:
  """Everything a trainer checks before it builds: the config, the workdir, the mesh and batch.
  Local paths in `c` become absolute (the workdir's record means the same from anywhere)."""
  config_lib.validate(c)
  workdir_lib.check_writable(workdir)
  with c.unlocked():
    workdir_lib.absolute_paths(c)
  mesh = sharding.make_mesh(c.mesh, devices)
  sharding.check_batch(c.global_batch, c.get("grad_accum", 1), mesh, c.rules)
  return mesh


def data(c: Any, mesh: jax.sharding.Mesh) -> tuple[Iterator[dict], Optional[dict]]:
  """(this process's iterator over its rows of each global batch, the data's identity) from
  lvm_jax.data.<c.data.name>; the identity (tokenizer, vocabulary) is checked against the model
  first, so data that does not fit fails before anything compiles."""
  module = importlib.import_module(f"lvm_jax.data.{c.data.name}")
  identity = module.identity(c)
  rows = sharding.local_rows(batch_sharding(c, mesh), c.global_batch)
  return module.make_iterator(c, rows), identity


@dataclasses.dataclass
class Trainer:
  """What a trainer hands the loop. `step_fn(state, batch) -> (state, metrics)` must return the
  guard's counters (and may return `input_errors`, inputs outside the model, which stop the run).
  `row(metrics)` turns a logged step's fetched metrics into host scalars; the loop adds the step
  time, `rate` (a name and the items one step trains on) and the MFU of `flops_per_step`."""
  built: Built
  step_fn: Callable[[Any, dict], tuple[Any, dict]]
  row: Callable[[dict], dict]
  flops_per_step: float
  rate: tuple[str, int]
  evaluate: Optional[Callable[[Any, int, metrics.Writer], dict]] = None  # -> extra scalars
  eval_every: int = 0
  data: Optional[dict] = None  # the data's identity (tokenizer, ...) for the workdir record


def _check(step: int, health: dict, c: Any, newest: Optional[int]) -> None:
  """Raises if `step`'s metrics say the run went wrong."""
  errors = int(health.get("input_errors", 0))
  if errors:
    raise RunError(f"step {step}: the batch holds {errors} inputs the model cannot take (e.g. token ids "
                   "outside [0, model.vocab_size)): the data does not match the model's config")
  limit = c.get("max_skipped_steps", 10)
  if int(health["skip_streak"]) >= limit:
    kept = f"the newest checkpoint, step {newest}, is from before them" if newest else "no checkpoint was saved"
    raise RunError(f"step {step}: loss or gradients not finite for {limit} steps in a row (updates skipped, "
                   f"{int(health['skipped_steps'])} in all); stopping: {kept} (lower optim.lr, check the data, "
                   "or raise max_skipped_steps)")


def _batches(c: Any, data_iter: Iterator[dict], sharding_: jax.sharding.Sharding) -> Iterator[dict]:
  for local in data_iter:
    yield sharding.global_batch_array(local, sharding_, c.global_batch)


def run(c: Any, workdir: str, t: Trainer, data_iter: Any, mesh: jax.sharding.Mesh,
        stop_at: Optional[int] = None) -> Any:
  """Restores or initialises, trains to c.steps (or SIGTERM, or `stop_at`); returns the state."""
  deadline = c.get("storage_deadline_s", storage.DEADLINE_S)
  ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), c.ckpt_keep, c.ckpt_every, deadline)
  with ckpt, jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    workdir_lib.check_data(c, workdir, t.data)  # before anything compiles
    init = jax.jit(t.built.init, out_shardings=t.built.state_shardings)
    state, start = ckpt.restore_or_init(t.built.abstract_state, data_iter, lambda: init(jax.random.key(c.seed)))
    # Recorded only once the checkpoint took this config: a start that failed leaves no trace.
    workdir_lib.record_start(c, workdir, start, t.data)
    if start:
      print(f"restored step {start} from {workdir}", flush=True)
    if stop_at is not None and start >= stop_at:
      print(f"step {start} already reaches --stop_at={stop_at}: nothing to do", flush=True)
      return state
    with metrics.Writer(workdir, enabled=jax.process_index() == 0, resume_step=start, deadline_s=deadline) as writer, \
        Preemption(stop_at) as preemption:
      state = _loop(c, workdir, t, state, start, data_iter, ckpt, writer, preemption)
      ckpt.wait()
  return state


def _loop(c: Any, workdir: str, t: Trainer, state: Any, start: int, data_iter: Any,
          ckpt: checkpoint.Checkpointer, writer: metrics.Writer, preemption: Preemption) -> Any:
  """The steps. A logged step's metrics are fetched after the next step is dispatched, and every
  step's health one step late, so the device always has the next step queued."""
  pending, previous, clock, step = None, None, (time.perf_counter(), start), start
  health_keys = (*COUNTERS, "input_errors")
  peak = metrics.peak_flops_total(c.get("peak_tflops", 0.0), c.model.get("dtype", "float32"))
  for step, batch in zip(range(start + 1, c.steps + 1), _batches(c, data_iter, t.built.batch_sharding)):
    state, m = t.step_fn(state, batch)
    if previous is not None:
      _check(previous[0], jax.device_get(previous[1]), c, ckpt.latest_step())
    if pending is not None:
      clock = _write(writer, pending, clock, t, peak)
      pending = None
    previous = (step, {k: m[k] for k in health_keys if k in m})
    extra = {}
    if t.evaluate is not None and t.eval_every and (step % t.eval_every == 0 or step == c.steps):
      extra = t.evaluate(state, step, writer)
    if step % c.log_every == 0 or step == c.steps or extra:
      pending = (step, m, extra)
    stop = preemption.reached(step)
    if ckpt.due(step, force=stop or step == c.steps):
      # The one host wait on the current step, at save steps only: is its state a good one?
      if int(jax.device_get(state["skip_streak"])) == 0:
        ckpt.save(step, state, data_iter, force=True, wait=stop or step == c.steps)
      else:
        print(f"step {step}: not saved, its update was skipped (non-finite)", flush=True)
    if stop:
      break
  if previous is not None:
    _check(previous[0], jax.device_get(previous[1]), c, ckpt.latest_step())
  if pending is not None:
    _write(writer, pending, clock, t, peak)
  if step < c.steps:  # the last line says why the run ended early
    print(f"stopping early: saved step {ckpt.latest_step()} in {workdir}", flush=True)
  return state


def _write(writer: metrics.Writer, pending: tuple, clock: tuple[float, int], t: Trainer,
           peak: float) -> tuple[float, int]:
  """Writes a logged step's row; `clock` is (time, step) of the previous row, returned updated.

  The first row after a (re)start includes compilation in its step time."""
  step, m, extra = pending
  m = jax.device_get(m)
  now = time.perf_counter()
  step_time = (now - clock[0]) / max(step - clock[1], 1)
  timing = {"step_time": step_time, t.rate[0]: t.rate[1] / step_time, "mfu": t.flops_per_step / step_time / peak}
  writer.write(step, {**t.row(m), **timing, "skipped_steps": m["skipped_steps"], **extra})
  return now, step
