"""Orbax checkpoints of the train state and the data iterator, saved together in one step, and
verified when read back.

Saves are asynchronous: the step loop goes on while arrays are written. A step counts only
once complete (orbax writes to a temporary name and renames on local disks, and marks the step
committed on gs://), so a killed job restarts from the last whole checkpoint.

Every save also commits, as a third item of the step, a fingerprint of each array computed on
the devices (a wrapping uint32 sum of the array's bits weighted by position: any flipped bit
changes it, and so does, but for a 2^-32 chance, any other damage) and refuses state that is not
finite. A restore recomputes the fingerprints; a step that does not restore or does not match is
moved aside to `<directory>.damaged/` (renamed, never deleted) with a one-line warning, and the
run resumes from the newest step that verifies.
"""

import logging as std_logging
import os
import sys
from typing import Any, Callable, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lvm_jax import progress, storage


def _drop_failed_read_echoes() -> None:
  """When one array of a restore fails to read, orbax raises that error and closes its event loop;
  the reads still in flight then fail too, and Python prints each of them (a TensorStore spec of
  ~100 lines, 'Event loop is closed' from the thread pool) long after the restore has raised the
  one error that matters. Those echoes are dropped; every other warning passes."""
  def is_echo(exc: BaseException | None, obj: Any = None) -> bool:
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        getattr(obj, "__qualname__", "").endswith("_read_array_index_and_device_put"))

  class Filter(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
      return not (record.exc_info and is_echo(record.exc_info[1]))

  std_logging.getLogger("concurrent.futures").addFilter(Filter())
  std_logging.getLogger("asyncio").addFilter(Filter())
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if is_echo(u.exc_value, u.object) else previous(u)


_drop_failed_read_echoes()


class CheckpointError(ValueError):
  """A checkpoint exists but cannot be restored into this run's state."""


class Damaged(Exception):
  """A step whose files cannot be read back as written; the message says what failed."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip().split(" See full TensorStore details")[0]  # the rest is a repr of the spec
  return text.splitlines()[0][:300] if text else type(e).__name__


def _bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (elementwise, so a sharded array stays sharded)."""
  if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if x.dtype.itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no fingerprint for dtype {x.dtype}")


def _odd_weights(shape: tuple[int, ...]) -> jax.Array:
  """2 x (flat index) + 1 mod 2^32, elementwise: no reshape, so a sharded array stays sharded."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % (1 << 32))
    stride *= shape[d]
  return 2 * index + 1


def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of bits x odd position weights mod 2^32, all finite).

  Integer sums wrap, so the result does not depend on how a sharded reduction is ordered, and an
  odd weight keeps every single-bit change visible. Integer reductions are the slow part on a
  CPU, so there is one: the last axis is reduced first with column weights, then its row sums
  with row weights. Finiteness is a float sum of x * 0 (NaN unless every element is finite).
  """
  bits = _bits(x).reshape((1,) if x.ndim == 0 else x.shape)
  rows = jnp.sum(bits * (2 * jax.lax.broadcasted_iota(jnp.uint32, bits.shape, bits.ndim - 1) + 1), axis=-1,
                 dtype=jnp.uint32)
  total = jnp.sum(rows * _odd_weights(rows.shape), dtype=jnp.uint32)
  finite = jnp.isfinite(jnp.sum(x * 0)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
  return total, finite


@jax.jit
def _fingerprints(state: Any) -> tuple[Any, Any]:
  # Two maps, not one map of pairs: optax states are tuples themselves.
  return (jax.tree.map(lambda x: _leaf_fingerprint(x)[0], state),
          jax.tree.map(lambda x: _leaf_fingerprint(x)[1], state))


def fingerprint(state: Any) -> tuple[dict[str, int], list[str]]:
  """({array path: checksum}, paths of arrays holding NaN or inf) of a state."""
  totals, finite = jax.device_get(_fingerprints(state))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  bad = [p for p, ok in zip(paths, jax.tree.leaves(finite)) if not ok]
  return {p: int(t) for p, t in zip(paths, jax.tree.leaves(totals))}, bad


def _name(path: tuple) -> str:
  """'opt_state/1/0/mu/wq' for a tree path, whether containers are dicts, lists or named tuples
  (orbax's metadata turns named tuples into dicts)."""
  keys = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return "/".join(str(k) for k in keys)


def _move(src: str, dst: str) -> None:
  """Renames a directory; on gs://, which has no directories, copies its objects then deletes them
  (what `gsutil mv` does), so an interrupted move leaves a full copy behind, never a partial one."""
  if "://" not in src:
    os.rename(src, dst)
    return
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  bucket, _, prefix = src[len("gs://"):].partition("/")
  new_prefix = dst[len("gs://"):].partition("/")[2]
  kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": ""}).result()
  keys = [k.decode() for k in kv.list(ts.KvStore.KeyRange(prefix + "/", prefix + "0")).result()]
  for key in keys:
    kv.write(new_prefix + key[len(prefix):], kv.read(key).result().value).result()
  kv.delete_range(ts.KvStore.KeyRange(prefix + "/", prefix + "0")).result()
  # Orbax lists steps through etils.epath's gcsfs instance, which caches listings.
  epath.backend.fsspec_backend.fs(dst).invalidate_cache()


def _check_shapes(manager: ocp.CheckpointManager, directory: str, step: int, abstract_state: Any) -> None:
  """A checkpoint of another architecture is the config's fault, not damage: say so, move nothing.
  `abstract_state` may be part of the saved state (a subtree under its own keys)."""
  try:
    stored = manager.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise Damaged(f"metadata unreadable: {_first_line(e)}") from None
  if stored is None:
    raise Damaged("no state metadata")
  want = {_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  have = {_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]
          if isinstance(getattr(x, "shape", None), (tuple, list))}
  params_first = lambda k: (not k.startswith("params"), k)
  missing = sorted(want.keys() - have.keys(), key=params_first)
  changed = sorted((k for k in want.keys() & have.keys() if tuple(want[k]) != have[k]), key=params_first)
  if missing or changed:
    what = (f"{changed[0]} is {have[changed[0]]} in the checkpoint, {tuple(want[changed[0]])} in this config"
            if changed else f"the checkpoint has no {missing[0]}")
    raise CheckpointError(f"cannot restore step {step} from {directory}: {what} (the config does not "
                          "match the checkpoint's model; use the config it was trained with or a new workdir)")


def _verify(fingerprints: Optional[dict], restored: Any) -> None:
  """Raises Damaged unless every restored array has the fingerprint recorded at save time."""
  if not fingerprints:
    raise Damaged("no fingerprint recorded")
  prints, _ = fingerprint(restored)
  wrong = sorted(k for k in prints if fingerprints.get(k) != prints[k])
  if wrong:
    raise Damaged(f"{len(wrong)} array(s) differ from what was saved ({', '.join(wrong[:3])})")


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`, each {state, data, fingerprint}."""

  def __init__(self, directory: str, keep: int, every: int, deadline_s: float = storage.DEADLINE_S,
               create: bool = True):
    self.every, self.deadline_s = every, deadline_s
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "fingerprint": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=create),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `step` is on the save interval (or forced) and not saved already."""
    on_interval = force or (self.every > 0 and step % self.every == 0)
    return on_interval and step not in self.manager.all_steps()

  def save(self, step: int, state: Any, data_iter: Any, force: bool = False, wait: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether it saved. Non-finite state is
    never written: it raises instead. Storage outages are retried up to the deadline, then a
    one-line storage.StorageError; with `wait`, until the step is committed (a run's last save)."""
    if not self.due(step, force):
      return False
    prints, bad = fingerprint(state)
    if bad:
      raise CheckpointError(f"step {step}: not saved, the state holds NaN or inf in {', '.join(bad[:3])}")
    items = {"state": ocp.args.StandardSave(state), "fingerprint": ocp.args.JsonSave(prints)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)

    def attempt() -> bool:
      # A failed earlier attempt (or an earlier step's background write) raises here first.
      if step not in self.manager.all_steps():
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
      if wait:
        self.manager.wait_until_finished()
        self.manager.reload()
        if step not in self.manager.all_steps():
          raise ConnectionError(f"step {step} was not committed")  # transient: save it again
      return True

    return storage.retry(attempt, what=f"saving checkpoint step {step} in {self.directory}",
                         deadline_s=self.deadline_s)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores `state` onto the shardings in `abstract_state`, and the iterator in place
    (without one, the state alone: for tools that only read the weights). Raises
    CheckpointError for a config that does not match, Damaged for files that do not verify."""
    _check_shapes(self.manager, self.directory, step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state), "fingerprint": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    with progress.phase(f"restoring step {step} from {self.directory}"):  # minutes for a large model
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        # Reads may finish after restore returns; a failed one must raise here, not in the next
        # computation that uses the array.
        jax.block_until_ready(restored.state)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and TensorStore raise plain Exceptions with multi-page specs: keep the first line.
        raise Damaged(f"unreadable: {_first_line(e)}") from None
      _verify(restored.fingerprint, restored.state)
    return restored.state

  def move_aside(self, step: int, reason: str) -> str:
    """Renames step's directory into `<directory>.damaged/` (process 0; the others wait)."""
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory + ".damaged") / str(step)
    if jax.process_index() == 0:
      dst.parent.mkdir(parents=True, exist_ok=True)
      n = 1
      while dst.exists():
        dst, n = epath.Path(self.directory + ".damaged") / f"{step}.{n}", n + 1
      _move(str(src), str(dst))
      (epath.Path(str(dst) + ".reason.txt")).write_text(reason + "\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self.manager.reload()
    return str(dst)

  def restore_or_init(self, abstract_state: Any, data_iter: Any, init: Callable[[], Any]) -> tuple[Any, int]:
    """(state, step) from the newest checkpoint that verifies, or (init(), 0) when there is none.

    Damaged steps are moved aside one by one; if every step was damaged the run stops rather
    than silently starting over."""
    moved = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(step, abstract_state, data_iter), step
      except Damaged as e:
        where = self.move_aside(step, str(e))
        logging.warning("checkpoint step %d is damaged (%s): moved to %s", step, e, where)
        moved.append(step)
    if moved:
      raise CheckpointError(f"no checkpoint in {self.directory} verifies (steps {', '.join(map(str, moved))} "
                            f"moved to {self.directory}.damaged/); start a new workdir or restore a copy")
    return init(), 0

  def wait(self) -> None:
    """Waits for the pending save; a write that failed in the background is reported in one
    line (the steps committed before it are intact)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise storage.StorageError(f"checkpoint write in {self.directory} failed: {storage.first_line(e)}") from None

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc: Any) -> None:
    # On an error too: a pending async save is finished (or its error surfaces) and orbax's
    # background threads stop before the process exits.
    self.close()


def read_weights(directory: str, item: str, abstract: Any, step: Optional[int] = None) -> tuple[Any, int]:
  """(state[item] as numpy arrays, step) of the newest step in `directory` that verifies, or of
  the named `step` (that one or a one-line error, never another): only the weights a tool runs
  (e.g. the params, not the optimizer's moments), read from disk alone. Moves nothing (a tool is
  not the run's owner); one line when no step verifies."""
  with Checkpointer(directory, keep=1, every=0, create=False) as ckpt:
    directory = ckpt.directory  # absolute: orbax's readers refuse a relative path
    steps = sorted(ckpt.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {directory}")
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no step {step} in {directory} (steps: {', '.join(map(str, sorted(steps)))})")
      steps = [step]
    wanted = {item: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    errors = []
    for step in steps:
      try:
        _check_shapes(ckpt.manager, directory, step, wanted)
        with progress.phase(f"reading the {item} of step {step} from {directory}"):
          try:  # the state item alone, and of it the wanted subtree (orbax's partial restore)
            restored = ocp.PyTreeCheckpointer().restore(
                epath.Path(directory) / str(step) / "state",
                args=ocp.args.PyTreeRestore(wanted, restore_args=as_numpy, partial_restore=True))
            prints = ckpt.manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
          except Exception as e:  # pylint: disable=broad-except
            raise Damaged(f"unreadable: {_first_line(e)}") from None
          _verify(prints.fingerprint, {item: restored[item]})
        return restored[item], step
      except Damaged as e:
        logging.warning("checkpoint step %d is damaged (%s): trying the one before", step, e)
        errors.append(f"step {step}: {e}")
  raise CheckpointError(f"no checkpoint in {directory} verifies ({'; '.join(errors)})")


def abstract_like(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
