"""The software a run used: Python, the platform, this project's direct dependencies, the lock they match.

Two runs of the same config can differ when the libraries under them do (a jax release changes
XLA's fusions, a numpy release a summation order), so each run records these beside its config.
`requirements/` holds hashed locks of the tested sets (`main-py311.txt`, `test-py311.txt`, ...);
`lock` names the one whose every pin is installed at its version, so a result can be traced to an
exact, reinstallable set, or None for an install that matches none (a loose `pip install -e .` on a
later day, or a checkout without requirements/). Standard library only: it runs before anything
else is known to import.
"""

from __future__ import annotations

import functools
import importlib.metadata
import pathlib
import platform
import re
import sys

LOCKS = pathlib.Path(__file__).resolve().parents[2] / 'requirements'
PROJECT = 'ipsr_jax'


def normalise(name: str) -> str:
  """A distribution name as pip compares them (PEP 503)."""
  return re.sub(r'[-_.]+', '-', name).lower()


def lock_pins(lock: pathlib.Path) -> dict[str, str]:
  """{normalised name: version} of a lock's `name==version` lines."""
  found = re.findall(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)', lock.read_text(), re.M)
  return {normalise(name): version for name, version in found}


def direct_dependencies() -> list[str]:
  """The names in this project's installed metadata `Requires-Dist`, optional extras left out."""
  try:
    requires = importlib.metadata.requires(PROJECT) or []
  except importlib.metadata.PackageNotFoundError:
    return []
  return [re.match(r'[A-Za-z0-9._-]+', r).group(0) for r in requires if 'extra ==' not in r]


def matching_lock(installed: dict[str, str]) -> str | None:
  """The lock for the running Python (test set first) whose every pin is installed, or None."""
  tag = f'py{sys.version_info.major}{sys.version_info.minor}'
  for kind in ('test', 'main'):
    lock = LOCKS / f'{kind}-{tag}.txt'
    if lock.is_file() and all(installed.get(n) == v for n, v in lock_pins(lock).items()):
      return lock.name
  return None


@functools.cache
def _versions() -> tuple[tuple[str, str | None], ...]:
  installed = {}
  for dist in importlib.metadata.distributions():
    installed.setdefault(normalise(dist.metadata['Name'] or ''), dist.version)  # first on sys.path wins
  out = {'python': platform.python_version(), 'platform': platform.platform(),
         PROJECT: installed.get(normalise(PROJECT)), 'lock': matching_lock(installed)}
  out.update({name: installed.get(normalise(name)) for name in direct_dependencies()})
  return tuple(out.items())


def installed_versions() -> dict[str, str | None]:
  """{'python', 'platform', 'ipsr_jax', 'lock', and each direct dependency: its version}.

  None marks a dependency that is not installed, and `lock` None an install that matches no lock.
  Computed once per process (the installed set does not change under a running program).
  """
  return dict(_versions())
