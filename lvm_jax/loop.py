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
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils

from lvm_jax import checkpoint, cli, metrics, sharding, storage, workdir as workdir_lib

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


@dataclasses.dataclass
class Trainer:
  """What a trainer hands the loop. `step_fn(state, batch) -> (state, metrics)` must return the
  guard's counters (and may return `bad_ids`, inputs outside the model, which stop the run)."""
  abstract_state: Any
  state_shardings: Any
  init: Callable[[jax.Array], Any]
  batch_sharding: jax.sharding.Sharding
  step_fn: Callable[[Any, dict], tuple[Any, dict]]
  row: Callable[[dict, float], dict]  # host metrics of a logged step, its step time -> the row
  evaluate: Optional[Callable[[Any, int, metrics.Writer], dict]] = None  # -> extra scalars
  eval_every: int = 0
  data: Optional[dict] = None  # the data's identity (tokenizer, ...) for the workdir record


def _check(step: int, health: dict, c: Any, newest: Optional[int]) -> None:
  """Raises if `step`'s metrics say the run went wrong."""
  bad_ids = int(health.get("bad_ids", 0))
  if bad_ids:
    raise RunError(f"step {step}: the batch holds {bad_ids} token ids outside the model's vocabulary "
                   f"[0, {c.model.vocab_size}): the data does not match the model (model.vocab_size)")
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
    init = jax.jit(t.init, out_shardings=t.state_shardings)
    state, start = ckpt.restore_or_init(t.abstract_state, data_iter, lambda: init(jax.random.key(c.seed)))
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
  health_keys = (*COUNTERS, "bad_ids")
  for step, batch in zip(range(start + 1, c.steps + 1), _batches(c, data_iter, t.batch_sharding)):
    state, m = t.step_fn(state, batch)
    if previous is not None:
      _check(previous[0], jax.device_get(previous[1]), c, ckpt.latest_step())
    if pending is not None:
      clock = _write(writer, pending, clock, t)
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
    _write(writer, pending, clock, t)
  if step < c.steps:  # the last line says why the run ended early
    print(f"stopping early: saved step {ckpt.latest_step()} in {workdir}", flush=True)
  return state


def _write(writer: metrics.Writer, pending: tuple, clock: tuple[float, int], t: Trainer) -> tuple[float, int]:
  """Writes a logged step's row; `clock` is (time, step) of the previous row, returned updated.

  The first row after a (re)start includes compilation in its step time."""
  step, m, extra = pending
  m = jax.device_get(m)
  now = time.perf_counter()
  step_time = (now - clock[0]) / max(step - clock[1], 1)
  writer.write(step, {**t.row(m, step_time), "skipped_steps": m["skipped_steps"], **extra})
  return now, step
