"""A run's workdir: owned by the run that made it, and locked by the process writing it.

    lock = workdir.claim('runs/ipsr')   # before anything is written there
    ...
    lock.release()                      # or leave it to process exit

`claim` refuses a folder that holds files but no run (the user's own folder, a source checkout):
one error line, nothing written. A run marks its folder with `MARKER` when it creates it; a folder
that holds a run's `config.json` and `checkpoints/` without the marker (written by a version that
did not mark its runs) is taken as a run and marked.

The lock is an exclusive `flock` on `LOCK`, so the kernel releases it when its process dies however
it dies; the file also names its holder (host, pid, start, command), which a second process shows
in its error, and which a clean release clears. A holder's name left in the file by a process that
died is a stale lock: the next run takes it over with a warning. Only local folders are locked:
object stores (gs://) have no exclusive lock, so a remote workdir is marked and checked but one
run per workdir is the user's to keep (docs/scale.md). In a multi-host run process 0 claims the
workdir; the other processes only write their own `log.process<N>.txt` there.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys
from typing import Any

from etils import epath

MARKER = '.ipsr_jax_run'
LOCK = '.ipsr_jax_lock'
# What a run may hold before process 0 marks it: the other processes' log files, written at start.
_OWN_FILES = re.compile(r'^(\.ipsr_jax_run|\.ipsr_jax_lock|log\.process\d+\.txt)$')

_HELD: dict[str, 'WorkdirLock'] = {}  # path -> this process's lock on it


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message is one line saying why and what to do."""


class NotARunError(WorkdirError):
  pass


class WorkdirLockedError(WorkdirError):
  pass


def _is_remote(path: str) -> bool:
  return '://' in path


def _holds_unmarked_run(names: list[str]) -> bool:
  """config.json and a checkpoints/ folder: a run written by a version that did not mark its runs."""
  return 'config.json' in names and 'checkpoints' in names


def _about_this_process() -> dict[str, Any]:
  return dict(host=socket.gethostname(), pid=os.getpid(),
              started=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              command=' '.join([os.path.basename(sys.executable)] + sys.argv)[:300])


def check_owned(workdir: str) -> None:
  """Makes `workdir` a run's folder, or raises NotARunError having written nothing.

  A missing or empty folder is created and marked; a marked one (or an unmarked run) is a run.
  """
  folder = epath.Path(workdir)  # local or gs://
  names = [p.name for p in folder.iterdir()] if folder.exists() else None
  if names is not None and MARKER in names:
    return
  if names is not None and not _holds_unmarked_run(names):
    others = sorted(n for n in names if not _OWN_FILES.match(n))
    if others:
      shown = ', '.join(others[:3]) + (f' and {len(others) - 3} more' if len(others) > 3 else '')
      raise NotARunError(f'{workdir} holds files that are not an ipsr_jax run ({shown}); nothing was written '
                         'there: choose a new or empty --workdir.')
  folder.mkdir(parents=True, exist_ok=True)
  (folder / MARKER).write_text(json.dumps(dict(_about_this_process(), what='ipsr_jax run folder'), indent=1) + '\n')


class WorkdirLock:
  """An exclusive lock on a local workdir, held until `release` or the process's exit."""

  def __init__(self, workdir: str, fd: int | None, taken_over: str | None = None):
    self.workdir, self._fd = workdir, fd
    # Set when a dead process's lock was taken over: the warning to show once logging is set up.
    self.taken_over = taken_over

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # a clean exit leaves no holder's name behind
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None
      _HELD.pop(self.workdir, None)

  def __enter__(self) -> 'WorkdirLock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _holder(text: str) -> dict[str, Any]:
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return 'another process'
  return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')} "
          f"({holder.get('command', '')})")


def _alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, ValueError, TypeError) as e:
    return isinstance(e, PermissionError)
  return True


def lock(workdir: str) -> WorkdirLock:
  """Takes the exclusive lock of a local workdir, or raises WorkdirLockedError naming its holder.

  A holder's name left by a process that died (it never released) is taken over; the lock's
  `taken_over` then says so, for the caller to warn (`main` does, in one terminal line).
  """
  if _is_remote(workdir):
    return WorkdirLock(workdir, None)
  key = os.path.abspath(workdir)
  if key in _HELD:
    return _HELD[key]
  fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    text = os.pread(fd, 4096, 0).decode('utf-8', 'replace')
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise
    raise WorkdirLockedError(f'{workdir} is in use by {_describe(_holder(text))}; nothing was written: wait for '
                             'it to finish or stop it, or choose another --workdir.') from None
  previous = _holder(os.pread(fd, 4096, 0).decode('utf-8', 'replace'))
  taken_over = None
  if previous:
    same_host = previous.get('host') == socket.gethostname()
    why = 'no longer running' if same_host and not _alive(previous.get('pid')) else 'it left its lock behind'
    taken_over = f'taking over the lock of {workdir} from {_describe(previous)}: {why}.'
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(_about_this_process()) + '\n').encode(), 0)
  held = _HELD[key] = WorkdirLock(key, fd, taken_over)
  return held


def claim(workdir: str) -> WorkdirLock:
  """`check_owned` then `lock`: what an entry point does before it writes into a workdir."""
  check_owned(workdir)
  return lock(workdir)
