"""Checkpoints of the expert stack's training state, for resuming an interrupted sweep.

Orbax's `CheckpointManager` with `args.StandardSave` / `args.StandardRestore`. A save is
asynchronous (the write runs in a background thread while training continues) and atomic: orbax
writes into a temporary directory and renames it when complete, so a process killed mid-save
leaves only a temporary directory, which the next manager removes and never restores. Restores
go straight into the trainer's sharded abstract tree (shape, dtype and `NamedSharding` per leaf),
so each device reads only its own rows of the expert axis.

Saves happen at chunk boundaries, after the results of any milestone at that step are stored,
so a checkpoint at step s implies every milestone <= s is in the results store.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every leaf: the target a checkpoint is restored into."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class StackCheckpoints:
  """Training-state checkpoints of one expert stack, saved every `every` steps (0: never)."""

  def __init__(self, directory: str, every: int, *, keep: int = 2):
    if every < 0:
      raise ValueError(f"train.checkpoint_every: must be >= 0 steps (0 = no checkpoints); "
                       f"got {every}")
    self.every = int(every)
    self.directory = os.path.abspath(directory)
    self._mngr = None
    if self.every:
      self._mngr = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, cleanup_tmp_directories=True, create=True))

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, ascending."""
    return sorted(self._mngr.all_steps()) if self._mngr is not None else []

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` (which must not be donated afterwards)."""
    self._mngr.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, like: Any) -> Any:
    """The state saved at `step`, placed like `like` (an initialised state of the same stack)."""
    log.info("restoring the expert stack from %s step %d", self.directory, step)
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract(like)))

  def close(self) -> None:
    """Waits for a save in flight and releases the manager."""
    if self._mngr is not None:
      self._mngr.wait_until_finished()
      self._mngr.close()
