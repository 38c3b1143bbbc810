"""The terminal a person reads, and the complete log file beside it.

`setup(workdir)` (called by `main`) splits the output in two:
  - stdout: stage headers, one progress bar per loop (plain periodic lines when stdout is not a
    terminal), metrics lines, checkpoint lines, the final tables; stderr: warnings (once each)
    and errors, with their message;
  - `WORKDIR/log.txt`: all of that plus every library's INFO logs (Orbax, absl, JAX, Grain) and
    what C++ libraries (TensorFlow, XLA) write to the process's stderr.
`--log_level=info` shows the libraries' INFO logs on the terminal too.

Without `setup` (library use, tests) the same calls print to stdout and log through `logging`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Mapping

from absl import logging as absl_logging

LOG_FILE = 'log.txt'
# Where command-line tools (and runs whose workdir is remote) keep their complete log.
TOOL_LOG_DIR = os.path.join(tempfile.gettempdir(), 'ipsr_jax_logs')
_LOGGER = logging.getLogger('ipsr_jax.runtime.console')
_STATE: dict[str, Any] = dict(primary=True, log_path=None, bar=None, terminal=None)


# Library warnings that say nothing wrong (a read-only checkpoint manager is how models are loaded).
_BENIGN = ('Given directory is read only',)
# Where launchers put this process's index before jax.distributed starts.
_PROCESS_ENV = ('JAX_PROCESS_ID', 'SLURM_PROCID', 'TPU_WORKER_ID')


# Libraries whose records stay in the log file unless --log_level=info: Orbax and TensorStore log
# a failed restore or save as pages of tracebacks (and asyncio adds "Task exception was never
# retrieved" / "Event loop is closed" for the tasks they leave behind); the one line that matters
# is the project's own error, which names the step and what to do.
_QUIET_LOGGERS = ('asyncio', 'orbax', 'tensorstore', 'grain')
_QUIET_PATHS = (f'{os.sep}orbax{os.sep}', f'{os.sep}tensorstore{os.sep}', f'{os.sep}asyncio{os.sep}',
                f'{os.sep}grain{os.sep}')


class _TerminalFilter(logging.Filter):
  """Console messages reach the terminal through `say`, so the terminal handler skips them."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name.startswith(_LOGGER.name):
      return False
    if record.name.startswith(_QUIET_LOGGERS) or any(p in (record.pathname or '') for p in _QUIET_PATHS):
      return False
    return not (record.levelno < logging.ERROR and str(record.msg).startswith(_BENIGN))


def setup(workdir: str, level: str = 'warning', process_index: int | None = None,
          log_name: str = LOG_FILE) -> str:
  """Terminal at `level` for library logs, everything at INFO in the log file; returns its path.

  Call it first thing (before JAX starts its backends, which log); `process_index` defaults to
  what the launcher put in the environment, `set_process_index` corrects it later.
  """
  if process_index is None:
    process_index = launcher_process_index()
  _STATE['primary'] = process_index == 0
  local = workdir if '://' not in workdir else TOOL_LOG_DIR
  os.makedirs(local, exist_ok=True)
  stem, ext = os.path.splitext(log_name)
  path = os.path.join(local, log_name if process_index == 0 else f'{stem}.process{process_index}{ext}')
  _STATE['log_path'] = path
  verbose = level.lower() in ('info', 'debug')
  screen = sys.stderr
  if not verbose:
    # C++ libraries (TF's import banner, XLA) write straight to fd 2, and Python libraries print to
    # sys.stderr (Orbax's worker threads print whole tracebacks there when a save or restore
    # fails): both go to the log file. The terminal keeps its own handle, used by `warn`, `error`
    # and the filtered library-log handler.
    sys.stderr.flush()
    encoding = sys.stderr.encoding or 'utf-8'
    screen = os.fdopen(os.dup(2), 'w', buffering=1, encoding=encoding, errors='backslashreplace')
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(2, 'w', buffering=1, encoding=encoding, errors='backslashreplace', closefd=False)
  _STATE['terminal'] = screen
  absl_logging.set_verbosity('debug' if level.lower() == 'debug' else 'info')
  handler = absl_logging.get_absl_handler()
  handler.python_handler.stream = screen
  handler.setLevel(getattr(logging, level.upper()))
  handler.addFilter(_TerminalFilter())
  to_file = logging.FileHandler(path, encoding='utf-8')
  to_file.setLevel(logging.DEBUG if level.lower() == 'debug' else logging.INFO)
  to_file.setFormatter(absl_logging.PythonFormatter())
  logging.getLogger().addHandler(to_file)
  logging.captureWarnings(True)  # Python warnings: once per place (the default filter), in both
  return path


def launcher_process_index() -> int:
  """This process's index as its launcher set it in the environment (0 when none did)."""
  return next((int(os.environ[k]) for k in _PROCESS_ENV if os.environ.get(k, '').isdigit()), 0)


def set_process_index(process_index: int) -> None:
  """Only process 0 talks to the terminal (every process keeps its log file)."""
  _STATE['primary'] = process_index == 0


def log_path() -> str | None:
  return _STATE['log_path']


def _show(text: str, stream: Any) -> None:
  """Prints on process 0, above a live progress bar if there is one."""
  if not _STATE['primary']:
    return
  bar = _STATE['bar']
  if bar is not None:
    bar.write(text, file=stream)
  else:
    print(text, file=stream, flush=True)


def say(message: str) -> None:
  """One line (or block) for the person at the terminal; always in the log file too."""
  _LOGGER.info(message)
  _show(message, sys.stdout)


def header(text: str) -> None:
  say(f'== {text}')


def terminal() -> Any:
  """The stream errors and warnings reach the person on (stderr before `setup`)."""
  return _STATE['terminal'] or sys.stderr


def warn(message: str) -> None:
  """One line for the person at the terminal (stderr) about something that did not stop the run."""
  _LOGGER.warning(message)
  _show(f'Warning: {message}', terminal())


def one_line(text: str, limit: int = 400) -> str:
  """A library's message as one terminal line: its first line, shortened (the log has it all)."""
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  first = lines[0] if lines else ''
  if len(first) > limit:
    first = first[:limit - 3] + '...'
  return first + (' [...]' if len(lines) > 1 else '')


def error(exc: BaseException) -> None:
  """The message on stderr in one line, the traceback in the log file. Before `setup` there is no
  log file, and nothing else is printed (a library handler would print the whole traceback)."""
  where = ''
  if _STATE['log_path']:
    _LOGGER.error('%s', ''.join(traceback.format_exception(exc)))
    where = f' (traceback in {_STATE["log_path"]})'
  print(f'Error: {type(exc).__name__}: {one_line(str(exc), limit=1000)}{where}', file=terminal(), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for every entry point: a bad flag value, or a --config.<field> override of a
  field the config does not have, is one 'Error:' line and exit code 1, as every other error."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if 'Traceback (most recent call last)' in text:  # a config file raised: its message is the last line
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      text = f'{lines[0]} {lines[-1]}'
    print(f'Error: {one_line(text)} (see --helpfull)', file=sys.stderr, flush=True)
  except (AttributeError, KeyError) as e:  # raised by config_flags for a field the config lacks
    print(f'Error: a --config.<field> override names a field the config does not have: '
          f'{one_line(str(e))} (the command line sets existing fields; a config file adds new ones)',
          file=sys.stderr, flush=True)
  sys.exit(1)


def run_tool(main: Callable[[list[str]], Any], name: str) -> None:
  """`app.run(main)` for a command-line tool, with the main command's terminal conventions.

  Library logs (Orbax, JAX, absl) go only to `TOOL_LOG_DIR/<name>.txt` unless --log_level=info;
  progress is plain lines when stdout is not a terminal (`Progress`); an error is one line on
  stderr naming the log file that holds its traceback, and the exit code is 1.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if 'log_level' not in flags.FLAGS:
    flags.DEFINE_enum('log_level', 'warning', ['debug', 'info', 'warning', 'error'],
                      f'Library logs shown on the terminal (all of INFO always goes to {TOOL_LOG_DIR}).')

  def wrapped(argv):
    level = flags.FLAGS.log_level
    setup(TOOL_LOG_DIR, level, log_name=f'{name}.txt')
    try:
      main(argv)
    except app.UsageError as e:  # absl would print it to sys.stderr, which is the log file now
      print(f'Error: {e} (see --helpfull)', file=terminal(), flush=True)
      sys.exit(1)
    except Exception as e:  # pylint: disable=broad-except
      if level in ('debug', 'info'):
        raise
      error(e)
      sys.exit(1)

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure()  # one XLA CPU device per core unless the user chose; before JAX starts
  app.run(wrapped, flags_parser=parse_flags)


def duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def format_metrics(metrics: Mapping[str, Any], names: tuple[str, ...] | None = None) -> str:
  items = [(k, v) for k, v in metrics.items() if names is None or k in names]
  return ', '.join(f'{k.rsplit("/", 1)[-1]} {float(v):.4g}' for k, v in items)


class Progress:
  """A progress bar on a terminal (tqdm); otherwise a plain line every `plain_every` items.

  `plain_every=0`: no plain lines (the caller prints its own, e.g. metrics lines); `quiet`: neither
  bar nor lines (a tool's --noprogress).
  """

  def __init__(self, total: int, desc: str, *, start: int = 0, unit: str = 'step', plain_every: int | None = None,
               quiet: bool = False):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.n = self.start = int(start)
    self.plain_every = (0 if quiet else max(1, math.ceil(self.total / 4)) if plain_every is None
                        else int(plain_every))
    self._t0 = time.perf_counter()
    self._bar = None
    if _STATE['primary'] and sys.stdout.isatty() and not quiet:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=self.total, initial=self.start, desc=desc, unit=unit, file=sys.stdout,
                       dynamic_ncols=True, leave=True)
      _STATE['bar'] = self._bar

  def rate(self) -> float:
    elapsed = time.perf_counter() - self._t0
    return (self.n - self.start) / elapsed if elapsed > 0 else 0.0

  def eta(self) -> str:
    rate = self.rate()
    return duration((self.total - self.n) / rate) if rate > 0 else '?'

  def status(self) -> str:
    """'12.5 steps/s, ETA 1m20s' (or the total time when finished)."""
    rate = self.rate()
    if self.n >= self.total:
      return f'{rate:.3g} {self.unit}s/s, done in {duration(time.perf_counter() - self._t0)}'
    return f'{rate:.3g} {self.unit}s/s, ETA {self.eta()}'

  def update(self, n: int, postfix: str = '') -> None:
    """Advance to `n` (absolute)."""
    previous, self.n = self.n, int(n)
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix_str(postfix, refresh=False)
      self._bar.update(self.n - previous)
    elif self.plain_every and (self.n // self.plain_every > previous // self.plain_every
                               or self.n >= self.total > previous):  # the end, once
      pct = 100 * self.n / max(1, self.total)
      say(f'{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f}%){", " + postfix if postfix else ""}, '
          f'{self.status()}')

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      if _STATE['bar'] is self._bar:
        _STATE['bar'] = None
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class TrainProgress(Progress):
  """A training loop's bar plus its metrics and checkpoint lines, one line per logged step."""

  def __init__(self, total: int, desc: str, *, start: int = 0, metric_names: tuple[str, ...] | None = None):
    super().__init__(total, desc, start=start, unit='step', plain_every=0)
    self.metric_names = metric_names

  def step(self, step: int, metrics: Mapping[str, Any] | None = None, checkpoint: str = '') -> None:
    """`checkpoint`: '' (none), 'started' (an asynchronous save in flight) or 'saved' (confirmed)."""
    shown = format_metrics(metrics, self.metric_names) if metrics else ''
    self.update(step, postfix=shown)
    parts = ([shown] if shown else []) + ([f'checkpoint {checkpoint}'] if checkpoint else [])
    if parts:
      say(f'{self.desc} {step}/{self.total}: {"; ".join(parts)}; {self.status()}')
