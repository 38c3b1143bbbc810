"""Where the command-line tools write: checked before any work, never over the user's files.

Every tool that writes calls `prepare_file` (one output file) or `prepare_folder` (an output
folder) before it loads a model or reads an image. Both create the missing parent folders and prove
the place writable by creating and removing a probe file there, so a read-only filesystem, a path
under a regular file or a missing permission is one error line at once, not after an hour of work:

    OSError: cannot write --output /ro/out.npz: Read-only file system

An existing output file, or a non-empty folder that the same tool did not write, is refused unless
`overwrite` (the tools' `--overwrite`). Files are written under a temporary name in the same folder
and renamed into place (`atomic_path`, `write_json`): a run killed mid-write leaves the previous
file or none, never a torn one. This module needs nothing but the standard library, so the library
functions behind the tools (`data.face_align.align_tree`) use it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Collection, Iterator

REPORT_FILE = 'report.json'
# Temporary files are hidden (`.name.<pid>.partial`): folder listings skip them, and a killed
# run's leftovers are recognised as the tool's own.
PARTIAL_SUFFIX = '.partial'


def _blocking_file(folder: str) -> str | None:
  """The regular file in the way when `folder`'s nearest existing ancestor is not a folder."""
  path = folder
  while path and not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
  return path if path and not os.path.isdir(path) else None


def make_writable_dir(folder: str, *, path: str | None = None, flag: str = '--output') -> None:
  """Creates `folder` (and its parents) and proves it writable with a probe file, removed again.

  Raises OSError('cannot write <flag> <path>: <the OS's reason>').
  """
  folder = os.path.abspath(folder)
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_probe.', suffix=PARTIAL_SUFFIX, dir=folder)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    blocking = _blocking_file(folder)
    reason = (f'{os.strerror(errno.ENOTDIR)} ({blocking} is a file)' if blocking
              else e.strerror or str(e))
    raise OSError(f'cannot write {flag} {path or folder}: {reason}') from e


def prepare_file(path: str, *, overwrite: bool = False, flag: str = '--output') -> str:
  """Makes `path` ready to be written (see the module docstring); returns it absolute."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f'{flag} {path} is a folder; name the file to write')
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f'{flag} {path} exists; pass --overwrite to replace it')
  make_writable_dir(os.path.dirname(path), path=path, flag=flag)
  return path


def read_report(folder: str) -> dict[str, Any]:
  """`<folder>/report.json` as a dict; {} when absent or not a JSON object."""
  try:
    with open(os.path.join(folder, REPORT_FILE), encoding='utf-8') as f:
      report = json.load(f)
  except (OSError, ValueError):
    return {}
  return report if isinstance(report, dict) else {}


def written_by(folder: str, tool: str, expected: Collection[str] = ()) -> bool:
  """Whether `folder` is empty or holds only what `tool` writes there.

  That is: its report.json names `tool`, or every file in it is one of `expected` (relative POSIX
  paths the tool would write for this input) or a temporary file of an interrupted write.
  """
  if read_report(folder).get('tool') == tool:
    return True
  for dirpath, _, filenames in os.walk(folder):
    rel = os.path.relpath(dirpath, folder)
    for f in filenames:
      name = f if rel == '.' else os.path.join(rel, f).replace(os.sep, '/')
      if name not in expected and not (f.startswith('.') and f.endswith(PARTIAL_SUFFIX)):
        return False
  return True


def prepare_folder(path: str, *, tool: str, overwrite: bool = False, flag: str = '--output',
                   expected: Collection[str] = ()) -> str:
  """Makes the output folder `path` ready (see the module docstring); returns it absolute.

  A non-empty folder is refused unless `written_by(path, tool, expected)` or `overwrite`; the
  files in it are left alone either way, and only those the tool writes are replaced.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path) and not overwrite and not written_by(path, tool, expected):
    raise FileExistsError(f'{flag} {path} is not empty and was not written by {tool}; '
                          'pass --overwrite to write into it')
  make_writable_dir(path, flag=flag)
  return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary name beside `path`; renamed to `path` when the block succeeds, removed
  when it fails."""
  path = os.fspath(path)
  folder, name = os.path.split(path)
  partial = os.path.join(folder, f'.{name}.{os.getpid()}{PARTIAL_SUFFIX}')
  try:
    yield partial
    os.replace(partial, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = False) -> None:
  """`value` as indented JSON at `path`, written atomically."""
  with atomic_path(path) as partial, open(partial, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=sort_keys)
