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
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lvm_jax import checkpoint, cli, config as config_lib, load, metrics, profiler, progress, sharding, storage
from lvm_jax import workdir as workdir_lib

# What a progress line shows of a row, when the trainer reports it (the rest is in metrics.jsonl).
SHOWN = ("loss", "perplexity", "train_psnr", "d_loss", "grad_norm")

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
  init function (init(key), and for train.py's families init(key, loaded params): `fresh`), its
  abstract shapes on their shardings, and the batch's sharding."""
  model_cfg: Any
  graphdef: Any
  tx: Any  # optax.GradientTransformation (the VQGAN trainer adds its critic's, train_vqgan.Built)
  init: Callable[..., dict]
  abstract_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding

  @classmethod
  def make(cls, c: Any, mesh: jax.sharding.Mesh, model_cfg: Any, graphdef: Any, tx: Any,
           init: Callable[..., dict], abstract_state: Any, state_shardings: Any, **extra: Any) -> "Built":
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
    if c.get("init_from"):  # not one of workdir.PATH_KEYS: its ':step' suffix stays
      c.init_from = load.absolute_init_from(c.init_from)
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
  time, the time it waited for input, `rate` (a name and the items one step trains on) and the
  MFU of `flops_per_step`. Every config.eval_every steps `evaluate(state, step)` gives eval
  scalars, every config.sample_every steps `samples(state, step, writer)` writes images; their
  time is kept out of the step time."""
  built: Built
  step_fn: Callable[[Any, dict], tuple[Any, dict]]
  row: Callable[[dict], dict]
  flops_per_step: float
  rate: tuple[str, int]
  evaluate: Optional[Callable[[Any, int], dict]] = None
  samples: Optional[Callable[[Any, int, metrics.Writer], None]] = None
  data: Optional[dict] = None  # the data's identity (tokenizer, ...) for the workdir record


def _check(step: int, health: dict, c: Any, newest: Optional[int]) -> None:
  """Raises if `step`'s metrics say the run went wrong."""
  errors = int(health.get("input_errors", 0))
  if errors:
    raise RunError(f"step {step}: the batch holds {errors} inputs the model cannot take (token ids outside "
                   "[0, model.vocab_size), or, with attention=cudnn, rows of more sentences than its run table "
                   "holds): the data does not match the model's config")
  limit = c.get("max_skipped_steps", 10)
  if int(health["skip_streak"]) >= limit:
    kept = f"the newest checkpoint, step {newest}, is from before them" if newest else "no checkpoint was saved"
    raise RunError(f"step {step}: loss or gradients not finite for {limit} steps in a row (updates skipped, "
                   f"{int(health['skipped_steps'])} in all); stopping: {kept} (lower optim.lr, check the data, "
                   "or raise max_skipped_steps)")


def _batches(c: Any, data_iter: Iterator[dict], sharding_: jax.sharding.Sharding) -> Iterator[dict]:
  for local in data_iter:
    yield sharding.global_batch_array(local, sharding_, c.global_batch)


def _due(step: int, every: int, last: int) -> bool:
  return bool(every) and (step % every == 0 or step == last)


def run(c: Any, workdir: str, t: Trainer, data_iter: Any, mesh: jax.sharding.Mesh,
        stop_at: Optional[int] = None) -> Any:
  """Restores or initialises, trains to c.steps (or SIGTERM, or `stop_at`); returns the state."""
  deadline = c.get("storage_deadline_s", storage.DEADLINE_S)
  ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), c.ckpt_keep, c.ckpt_every, deadline)
  with ckpt, jax.set_mesh(mesh), sharding.axis_rules(c.rules):
    workdir_lib.check_data(c, workdir, t.data)  # before anything compiles
    with progress.phase("restoring the newest checkpoint or initialising"):
      state, start = ckpt.restore_or_init(t.built.abstract_state, data_iter, lambda: fresh(c, t.built))
    # Recorded only once the checkpoint took this config: a start that failed leaves no trace.
    workdir_lib.record_start(c, workdir, start, t.data)
    if start:
      logging.info("restored step %d from %s", start, workdir)
      if c.get("init_from"):  # it names where a NEW run starts; a restart goes on from its own steps
        logging.info("init_from=%s ignored: the run resumes its own checkpoint, step %d", c.init_from, start)
    if stop_at is not None and start >= stop_at:
      logging.info("step %d already reaches --stop_at=%d: nothing to do", start, stop_at)
      return state
    peak = metrics.workdir_peak(workdir, c.get("peak_tflops", 0.0), c.model.get("dtype", "float32"))
    with metrics.Writer(workdir, enabled=jax.process_index() == 0, resume_step=start, deadline_s=deadline) as writer, \
        Preemption(stop_at) as preemption:
      writer.text("config", c.to_json(indent=1), start)
      state = _loop(c, workdir, t, state, start, data_iter, ckpt, writer, preemption, peak)
      ckpt.wait()
  return state


def fresh(c: Any, b: Built) -> Any:
  """A new run's state on its shardings: b.init's, with the weights config.init_from names in
  place of random ones (load.init_params; the trainer's init takes them as its second argument).
  The optimizer state and the step start fresh either way."""
  key = jax.random.key(c.seed)
  if not c.get("init_from"):
    return jax.jit(b.init, out_shardings=b.state_shardings)(key)
  loaded = load.init_params(c, b.abstract_state["params"])
  # Donated: the loaded arrays become the state's parameters rather than a second copy of the model.
  return jax.jit(b.init, out_shardings=b.state_shardings, donate_argnums=1)(key, loaded)


class _Clock:
  """Host time since the last logged row, split: waiting for input, evaluating, the rest."""

  def __init__(self, step: int):
    self.t, self.step, self.data, self.eval = time.perf_counter(), step, 0.0, 0.0

  def split(self, step: int) -> dict:
    """Per-step times since the last row (evaluation excluded), and restarts the count."""
    now, n = time.perf_counter(), max(step - self.step, 1)
    out = {"step_time": (now - self.t - self.eval) / n, "data_wait": self.data / n}
    self.t, self.step, self.data, self.eval = now, step, 0.0, 0.0
    return out


def _loop(c: Any, workdir: str, t: Trainer, state: Any, start: int, data_iter: Any, ckpt: checkpoint.Checkpointer,
          writer: metrics.Writer, preemption: Preemption, peak: float) -> Any:
  """The steps. A logged step's metrics are fetched after the next step is dispatched, and every
  step's health one step late, so the device always has the next step queued."""
  pending, previous, step, clock = None, None, start, _Clock(start)
  chrono = progress.Progress("train", c.steps, start=start, per_unit={t.rate[0].removesuffix("_per_sec"): t.rate[1]})
  profile = profiler.Window(c.get("profile_steps", ()), workdir)
  batches = _batches(c, data_iter, t.built.batch_sharding)
  for step in range(start + 1, c.steps + 1):
    waited = time.perf_counter()
    batch = next(batches, None)
    if batch is None:
      break
    clock.data += time.perf_counter() - waited
    profile.before(step)
    if step == start + 1:
      with progress.phase("compiling the step and running it once"):
        state, m = t.step_fn(state, batch)
        jax.block_until_ready(m)
      chrono.rebase(step)  # the rate and ETA of the steps, not of the compilation
    else:
      state, m = t.step_fn(state, batch)
    profile.after(step, state)
    if previous is not None:
      _check(previous[0], jax.device_get(previous[1]), c, ckpt.latest_step())
    if pending is not None:
      _write(writer, pending, clock, t, peak, chrono)
      pending = None
    previous = (step, {k: m[k] for k in (*COUNTERS, "input_errors") if k in m})
    extra = _watch(c, t, state, step, writer, clock)
    if step % c.log_every == 0 or step == c.steps or extra:
      pending = (step, m, extra)
    stop = preemption.reached(step)
    if ckpt.due(step, force=stop or step == c.steps):
      # The one host wait on the current step, at save steps only: is its state a good one?
      if int(jax.device_get(state["skip_streak"])) == 0:
        ckpt.save(step, state, data_iter, force=True, wait=stop or step == c.steps)
      else:
        logging.warning("step %d: not saved, its update was skipped (non-finite)", step)
    if stop:
      break
  profile.close()
  if previous is not None:
    _check(previous[0], jax.device_get(previous[1]), c, ckpt.latest_step())
  if pending is not None:
    _write(writer, pending, clock, t, peak, chrono)
  if step < c.steps:  # the last line says why the run ended early
    logging.info("stopping early: saved step %s in %s", ckpt.latest_step(), workdir)
  return state


def _watch(c: Any, t: Trainer, state: Any, step: int, writer: metrics.Writer, clock: _Clock) -> dict:
  """Evaluation and samples due at `step`, timed apart from the steps; returns the eval scalars."""
  eval_due = t.evaluate is not None and _due(step, c.get("eval_every", 0), c.steps)
  samples_due = t.samples is not None and _due(step, c.get("sample_every", 0), c.steps)
  if not (eval_due or samples_due):
    return {}
  jax.block_until_ready(state)  # the step itself is not evaluation time
  began = time.perf_counter()
  extra = t.evaluate(state, step) if eval_due else {}
  if samples_due:
    t.samples(state, step, writer)
  seconds = time.perf_counter() - began
  clock.eval += seconds
  logging.info("step %d: evaluated in %.1f s%s", step, seconds,
               "".join(f", {k}={v:.4g}" for k, v in extra.items()))
  return extra


def _write(writer: metrics.Writer, pending: tuple, clock: _Clock, t: Trainer, peak: float,
           chrono: progress.Progress) -> None:
  """Writes a logged step's row and its progress line. The first row after a (re)start includes
  compilation in its step time."""
  step, m, extra = pending
  m = jax.device_get(m)
  timing = clock.split(step)
  timing.update({t.rate[0]: t.rate[1] / timing["step_time"], "mfu": t.flops_per_step / timing["step_time"] / peak})
  row = t.row(m)
  writer.write(step, {**row, **timing, "skipped_steps": m["skipped_steps"], **extra})
  shown = [k for k in SHOWN if k in row][:3] + ["mfu"]
  chrono.log(step, ", ".join(f"{k} {v:.4g}" for k, v in {**row, **timing}.items() if k in shown))
