"""Orbax checkpoints of a run: the train state and, beside it, the Grain iterator state.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it when the
save is complete), so a process killed mid-write leaves the previous checkpoint restorable.
Arrays restore onto whatever mesh the caller gives: a run saved on N devices resumes on M.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from typing import Any, NamedTuple

import grain
import grain.python as grain_python
import jax
import orbax.checkpoint as ocp

STATE, DATA = 'state', 'data_iter'
# The train state's field holding the parameter EMA (train.EmaTrainState), when the run keeps one.
PARAMS_EMA = 'params_ema'
EMA, RAW = 'ema', 'raw'  # which parameters `restore_generator` read


class Generator(NamedTuple):
  """A restored generator: its checkpoint step, {'params', 'batch_stats'}, and which parameters
  those are: EMA ('ema', the parameter EMA) or RAW ('raw', the optimiser's)."""
  step: int
  variables: dict
  weights: str


class _ReadOnlyNotice(logging.Filter):
  """Orbax warns 'Given directory is read only' whenever a read-only manager opens a folder, which
  is how every model is loaded: a user's script would print it on each load."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


logging.getLogger('absl').addFilter(_ReadOnlyNotice())


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


def has_checkpoints(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds any step folder (readable or not), without Orbax."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(checkpoint_dir(workdir))
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written; the message is one line saying what to do."""


class CheckpointSaveError(CheckpointError):
  pass


UNREADABLE_SUFFIX = '.unreadable'
# Orbax writes this last, just before the atomic rename; a step folder without it never finished.
COMMIT_MARKER = 'commit_success.txt'


def _root_cause(exc: BaseException) -> tuple[BaseException, int | None]:
  """The innermost exception and its errno: Orbax wraps TensorStore's precise message ("...
  Requested byte range [197331, 227095) is not valid for value of size 100") in generic ones."""
  while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
    exc = exc.__cause__ or exc.__context__
  code = getattr(exc, 'errno', None)
  found = re.search(r"os_error_code='(\d+)'", str(exc))  # TensorStore's way of passing errno on
  if code is None and found:
    code = int(found.group(1))
  return exc, code


def _reason(exc: BaseException) -> str:
  """The root cause in one line."""
  from ipsr_jax.runtime import console  # pylint: disable=g-import-not-at-top
  exc, code = _root_cause(exc)
  if code:
    return f'{os.strerror(code)} [errno {code}]'
  return f'{type(exc).__name__}: {console.one_line(str(exc), limit=240)}'


_SPACE = {errno.ENOSPC, errno.EDQUOT}
_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def _remedy(exc: BaseException) -> str:
  """When running the same command again will work, from the failure's errno."""
  code = _root_cause(exc)[1]
  if code in _SPACE:
    return 'once there is space again'
  if code in _PERMISSION:
    return 'once the folder is writable again'
  return 'once the cause above is fixed'


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` holding the items 'state' and 'data_iter'.

  Never dies on its own files:
    - `restore` (no step given) takes the newest checkpoint that reads back completely, state and
      iterator state together; each unreadable one is named in one terminal line and, when
      writable, set aside as `<step>.unreadable` (renamed, never deleted);
    - a save that fails (full disk, permissions) raises `CheckpointSaveError` naming the step
      and the intact checkpoint a restart resumes from;
    - retention is done here, after a save is confirmed complete, so the newest complete
      checkpoint is never deleted (Orbax's own `max_to_keep` would prune even when the save it
      follows failed).
  """

  def __init__(self, workdir: str, *, keep: int = 3, use_async: bool = True, best_metric: str | None = None,
               read_only: bool = False):
    self.keep, self.read_only = keep, read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, enable_async_checkpointing=use_async,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode='max', read_only=read_only, save_interval_steps=0 if read_only else 1,
        cleanup_tmp_directories=not read_only)  # a half-written save's temporary folder
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain_python.PyGrainCheckpointHandler()}
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
    self._pending: int | None = None   # step of a save not yet confirmed complete
    self._failed = False               # a save failed: close quietly, keep what is on disk

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # Saving.

  def save(self, step: int, state: Any, data_iter: ConsumedIteratorState | None = None,
           metrics: dict | None = None, force: bool = False) -> bool:
    self._confirm_pending()
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA] = grain_python.PyGrainCheckpointSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if saved:
      self._pending = step
      logging.info('Saving checkpoint at step %d (asynchronously).', step)
    return saved

  def _confirm_pending(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed, else prunes."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if not self._committed(step):
      raise self._save_error(step, OSError(f'{self.directory}/{step} is incomplete after the save'))
    self._prune()

  def _save_error(self, step: int, exc: BaseException) -> CheckpointSaveError:
    self._failed = True
    logging.info('Checkpoint save of step %d failed', step, exc_info=exc)  # the log file only
    intact = [s for s in self._steps_on_disk() if s != step]
    kept = (f'the previous checkpoint (step {intact[-1]}) is intact, and running the same command again '
            f'resumes from it' if intact else 'no earlier checkpoint exists, so a restart begins at step 0')
    return CheckpointSaveError(
        f'checkpoint step {step} was not saved ({_reason(exc)}) in {self.directory}; training stopped. '
        f'Nothing was deleted: {kept} {_remedy(exc)}.')

  def _committed(self, step: int | str) -> bool:
    """Whether a local step folder holds its commit marker (remote folders: trust Orbax)."""
    return '://' in self.directory or os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER))

  def _steps_on_disk(self) -> list[int]:
    """Committed step folders, read from the directory (Orbax's list drops a step whose save failed)."""
    if '://' in self.directory or not os.path.isdir(self.directory):
      return self.all_steps()
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit() and self._committed(n))

  def _prune(self) -> None:
    if self.read_only or not self.keep:
      return
    for step in self.all_steps()[:-self.keep]:
      self.manager.delete(step)

  # Restoring.

  def _restore_newest(self, step: int | None, restore_fn) -> tuple[int, Any]:
    """restore_fn(step) on `step`, or on each step newest first until one reads back."""
    candidates = [step] if step is not None else self.all_steps()[::-1]
    if not candidates:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    unreadable = []
    for s in candidates:
      try:
        if not self._committed(s):
          raise CheckpointError(f'{COMMIT_MARKER} is missing: the save of this step never finished')
        result = restore_fn(s)
      except Exception as e:  # pylint: disable=broad-except
        logging.info('Checkpoint step %d could not be restored', s, exc_info=e)  # the log file only
        if step is not None:
          raise CheckpointError(f'checkpoint step {s} in {self.directory} cannot be read ({_reason(e)}); '
                                f'readable steps: {self._others(s)}') from e
        unreadable.append(s)
        self._set_aside(s, e, candidates)
        continue
      if unreadable:
        self.manager.reload()
      return s, result
    self.manager.reload()
    where = 'set aside as <step>' + UNREADABLE_SUFFIX if not self.read_only else 'left in place'
    raise CheckpointError(f'no readable checkpoint in {self.directory}: steps {sorted(unreadable)} cannot be '
                          f'read ({where}); use a new --workdir, or put an intact checkpoint back.')

  def _others(self, step: int) -> str:
    others = [s for s in self.all_steps() if s != step]
    return ', '.join(map(str, others)) if others else 'none'

  def _set_aside(self, step: int, exc: BaseException, candidates: list[int]) -> None:
    """One terminal line; a writable run renames the folder so that no later save or prune
    touches it and the next start does not try it again."""
    from ipsr_jax.runtime import console  # pylint: disable=g-import-not-at-top
    older = [s for s in candidates if s < step]
    then = f'trying step {older[0]}' if older else 'no older checkpoint to try'
    if self.read_only or '://' in self.directory or jax.process_count() > 1:
      console.warn(f'checkpoint step {step} cannot be read ({_reason(exc)}); {then}.')
      return
    src = os.path.join(self.directory, str(step))
    dst, n = src + UNREADABLE_SUFFIX, 1
    while os.path.exists(dst):
      dst, n = f'{src}{UNREADABLE_SUFFIX}.{n}', n + 1
    os.rename(src, dst)
    console.warn(f'checkpoint step {step} cannot be read ({_reason(exc)}); set aside as '
                 f'{os.path.relpath(dst, os.path.dirname(self.directory))}, {then}.')

  def restore(self, abstract_state: Any, data_iter: ConsumedIteratorState | None = None,
              step: int | None = None) -> tuple[int, Any]:
    """Restores `step` (default: the newest readable one) onto `abstract_state`'s shardings."""

    def restore_step(s):
      items = {STATE: ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items[DATA] = grain_python.PyGrainCheckpointRestore(data_iter)
      return self.manager.restore(s, args=ocp.args.Composite(**items))[STATE]

    step, state = self._restore_newest(step, restore_step)
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return step, state

  def state_fields(self, step: int) -> list[str]:
    """The top-level fields of the train state saved at `step`, from its metadata alone."""
    metadata = self.manager.item_metadata(step)[STATE]
    return sorted(getattr(metadata, 'tree', metadata))

  def restore_generator(self, step: int | None = None, sharding: Any = None,
                        ema: bool | None = None) -> Generator:
    """For evaluation and serving: the generator's {'params', 'batch_stats'}, without building the
    optimiser. `ema` None: the parameter EMA when the run keeps one, else the parameters; True: the
    EMA (an error without one); False: the parameters. BatchNorm statistics are the run's own
    either way. The tree is read from the checkpoint's metadata and placed with `sharding`
    (default: the first local device). Without `step`, the newest checkpoint that reads back."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore_step(s):
      metadata = self.manager.item_metadata(s)[STATE]
      tree = getattr(metadata, 'tree', metadata)
      weights = EMA if PARAMS_EMA in tree and ema is not False else RAW
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
      state = self.manager.restore(s, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}))[STATE]
      params = state[PARAMS_EMA] if weights == EMA else state['params']
      return {'params': params, 'batch_stats': state['batch_stats']}, weights

    s, (variables, weights) = self._restore_newest(step, restore_step)
    if ema and weights == RAW:
      raise CheckpointError(f'checkpoint step {s} in {self.directory} holds no parameter EMA (its run had '
                            'train.ema_decay=0); ask for ema=False or None')
    return Generator(s, variables, weights)

  def restore_model(self, step: int | None = None, sharding: Any = None,
                    ema: bool | None = None) -> tuple[int, dict]:
    """(step, {'params', 'batch_stats'}) of `restore_generator`: by default the generator a user
    gets, its parameter EMA when the run keeps one."""
    restored = self.restore_generator(step, sharding, ema)
    return restored.step, restored.variables

  def wait(self) -> None:
    self._confirm_pending()

  def close(self) -> None:
    """Waits for the save in flight (raising CheckpointSaveError if it failed) and closes."""
    try:
      if not self._failed:
        self._confirm_pending()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
        logging.info('Closing the checkpoint manager after a failed save', exc_info=True)


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
