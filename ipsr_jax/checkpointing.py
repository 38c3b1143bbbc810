"""Orbax checkpoints of a run: the train state and, beside it, the Grain iterator state.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it when the
save is complete), so a process killed mid-write leaves the previous checkpoint restorable.
Arrays restore onto whatever mesh the caller gives: a run saved on N devices resumes on M.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import grain.python as grain_python
import jax
import orbax.checkpoint as ocp

STATE, DATA = 'state', 'data_iter'


class ConsumedIteratorState:
  """Grain-checkpointable view of an iterator as of the last batch the training loop consumed.

  The loop prefetches one batch ahead; saving the live iterator would skip that batch on resume.
  """

  def __init__(self, iterator):
    self.iterator = iterator
    self.state = iterator.get_state()

  def get_state(self) -> bytes:  # Grain's handler stores bytes for iterators it does not know
    return json.dumps(self.state).encode() if isinstance(self.state, dict) else self.state

  def set_state(self, state) -> None:
    if isinstance(state, bytes) and isinstance(self.iterator, grain.DatasetIterator):
      state = json.loads(state)
    self.iterator.set_state(state)
    self.state = state

  def start_prefetch(self):  # called by Grain's checkpoint handler after a restore
    if hasattr(self.iterator, 'start_prefetch'):
      self.iterator.start_prefetch()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir) if '://' not in workdir else workdir, 'checkpoints')


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` holding the items 'state' and 'data_iter'."""

  def __init__(self, workdir: str, *, keep: int = 3, use_async: bool = True, best_metric: str | None = None,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only, enable_async_checkpointing=use_async,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode='max', read_only=read_only, save_interval_steps=0 if read_only else 1)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain_python.PyGrainCheckpointHandler()}
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: ConsumedIteratorState | None = None,
           metrics: dict | None = None, force: bool = False) -> bool:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA] = grain_python.PyGrainCheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if saved:
      logging.info('Saving checkpoint at step %d (asynchronously).', step)
    return saved

  def restore(self, abstract_state: Any, data_iter: ConsumedIteratorState | None = None,
              step: int | None = None) -> tuple[int, Any]:
    """Restores `step` (default: the newest complete one) onto `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.manager.directory}')
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[DATA] = grain_python.PyGrainCheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('Restored checkpoint step %d from %s', step, self.manager.directory)
    return step, restored[STATE]

  def restore_model(self, step: int | None = None, sharding: Any = None) -> tuple[int, dict]:
    """For evaluation and serving: {'params', 'batch_stats'} of the generator, without building the
    optimiser. The tree is read from the checkpoint's metadata and placed with `sharding` (default:
    the first local device)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.manager.directory}')
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self.manager.item_metadata(step)[STATE]
    tree = getattr(metadata, 'tree', metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}))
    state = restored[STATE]
    return step, {'params': state['params'], 'batch_stats': state['batch_stats']}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
