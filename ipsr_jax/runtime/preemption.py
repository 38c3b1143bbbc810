"""Stopping a run on a signal: save, then exit with a code a scheduler can tell from success.

Inside a training loop (`Preemption`), SIGTERM (a preemption, `kill`, SLURM's time limit) and the
first Ctrl-C (SIGINT) only ask the loop to save a checkpoint and stop; the loop then raises
`Preempted`, and `ipsr_jax.main` exits with `EXIT_PREEMPTED`, on which the launchers requeue. A
second Ctrl-C ends the process at once. Outside a loop (`interrupt_ends_process`, set by `main`)
there is nothing to save, and Ctrl-C ends the process at once too.

A handler that only sets a flag cannot be lost: a KeyboardInterrupt raised inside a callback of
XLA's (its garbage-collection hook, for one) is swallowed there, and the run would go on.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from ipsr_jax.runtime import console

# EX_TEMPFAIL (sysexits.h): a temporary failure, the same command should be run again.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """The loop stopped on a signal after saving `step`; running the same command resumes there."""

  def __init__(self, step: int, signal_name: str):
    self.step, self.signal_name = int(step), signal_name
    super().__init__(f'Stopped by {signal_name} at step {self.step}; checkpoint {self.step} is saved: run the '
                     f'same command to resume (exit code {EXIT_PREEMPTED}).')


def _end_now(signum: int) -> None:
  """Dies of `signum` with its default action (exit status 128 + signum), whatever is running."""
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


def interrupt_ends_process() -> None:
  """Ctrl-C ends the process at once (main thread only; elsewhere a no-op)."""
  try:
    signal.signal(signal.SIGINT, lambda signum, frame: _end_now(signum))
  except ValueError:  # not the main thread
    pass


class Preemption:
  """While entered: SIGTERM and a first SIGINT set `requested` (the loop saves and stops)."""

  def __init__(self):
    self.requested: str | None = None  # the signal's name once one arrived
    self._said = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'Preemption':
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: the loop runs without signal handling
        break
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      _end_now(signum)
    # Only a flag: printing here could re-enter a write the main thread is in the middle of.
    self.requested = 'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name

  def poll(self) -> bool:
    """Whether a signal asked the loop to stop; says so on the terminal the first time."""
    if self.requested and not self._said:
      self._said = True
      more = ' (Ctrl-C again stops at once, without saving)' if self.requested == 'Ctrl-C' else ''
      console.warn(f'{self.requested} received: saving a checkpoint and stopping{more}.')
    return bool(self.requested)

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def stop(self, step: int) -> None:
    """Raises `Preempted` when a signal asked the loop to stop (call after the final save)."""
    if self.requested:
      raise Preempted(step, self.requested)
