"""Orbax checkpoints of the train state and the data iterator, saved together in one step.

Saves are asynchronous: the step loop goes on while arrays are written. A step counts only
once complete (orbax writes to a temporary name and renames on local disks, and marks the step
committed on gs://), so a killed job restarts from the last whole checkpoint.
"""

import os
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint exists but cannot be restored into this run's state."""


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`, each {state, data}."""

  def __init__(self, directory: str, keep: int, every: int):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
        force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores `state` onto the shardings in `abstract_state`, and the iterator in place
    (without one, the state alone: for tools that only read the weights)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise plain Exceptions with multi-page specs for unreadable data;
      # the first line names the problem. Nothing is deleted: the user decides.
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"cannot restore step {step} from {self.manager.directory}: {first} (a config that does not "
          f"match the checkpoint, or damaged files: move {step}/ away to resume from the one before)"
      ) from None
    return restored.state

  def restore_or_init(self, abstract_state: Any, data_iter: Any, init: Callable[[], Any]) -> tuple[Any, int]:
    """(state, step) from the newest checkpoint, or (init(), 0) when there is none."""
    start = self.latest_step()
    if start is None:
      return init(), 0
    return self.restore(start, abstract_state, data_iter), start

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc: Any) -> None:
    # On an error too: a pending async save is finished (or its error surfaces) and orbax's
    # background threads stop before the process exits.
    self.close()


def abstract_like(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
