"""Installs this project from the hashed locks beside this file, then checks the venv holds exactly them.

    python requirements/install.py main   # what `python -m ipsr_jax.main` needs
    python requirements/install.py test   # the test set: + extras-nodeps.txt, aot.txt

Run it with the python of a fresh venv: it installs into the environment that runs it. The lock is
the one for that Python (`main-py311.txt`, ...), installed with `pip install --require-hashes`, so
every file is the one the suite ran with; then the project itself goes in with `--no-deps -e`.
`test` adds the packages whose declared dependencies are wrong for this set (extras-nodeps.txt,
`--no-deps`) and the ahead-of-time compilers, outside the venv in ~/.cache/ipsr_jax/aot where only
`ipsr_jax.training.aot` looks (aot.txt). Finally the installed distributions (`pip list`, the same set as
`pip freeze --all`) must equal the locks' pins, beside the project and the venv's own pip,
setuptools and wheel; any difference is named and the exit status is 1. Standard library only.
"""

import importlib.util
import json
import pathlib
import platform
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
AOT_TARGET = pathlib.Path.home() / '.cache' / 'ipsr_jax' / 'aot'
LOOSE = {  # the same sets, resolved on the day instead of locked
    'main': 'pip install -e .',
    'test': 'pip install -e ".[test,judge,facenet,sface]" "torch==2.13.0" '
            '(see requirements/README.md for the rest)',
}
VENV_TOOLS = {'pip', 'setuptools', 'wheel'}  # a venv's own: checked only where a lock pins them
PROJECT = 'ipsr-jax'


def _environment_module():
  """ipsr_jax/runtime/environment.py, loaded by path: its lock reader, without importing the package
  (whose dependencies are what this script installs)."""
  spec = importlib.util.spec_from_file_location('ipsr_jax_environment', ROOT / 'ipsr_jax' / 'runtime' / 'environment.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_ENVIRONMENT = _environment_module()
normalise = _ENVIRONMENT.normalise
pins = _ENVIRONMENT.lock_pins  # {normalised name: version} of a lock's `name==version` lines


def lock_for_python(kind: str) -> pathlib.Path:
  """The lock of `kind` for the running Python, or a one-line exit naming the ones there are."""
  tag = f'py{sys.version_info.major}{sys.version_info.minor}'
  lock = HERE / f'{kind}-{tag}.txt'
  if sys.platform == 'linux' and platform.machine() == 'x86_64' and lock.is_file():
    return lock
  versions = sorted(p.stem.split('-py')[1] for p in HERE.glob(f'{kind}-py*.txt'))
  sys.exit(f'install.py: no {kind} lock for Python {sys.version_info.major}.{sys.version_info.minor} on '
           f'{sys.platform} {platform.machine()} (locks: Python '
           f'{", ".join(v[0] + "." + v[1:] for v in versions)} on linux x86_64); use one of those, or '
           f'the loose install of the newest releases: {LOOSE[kind]}')


def pip(*args: str) -> None:
  subprocess.run([sys.executable, '-m', 'pip', *args], check=True)


def installed(*path: str) -> dict[str, str]:
  """{normalised name: version} of what pip sees in this environment, or in `path` if given."""
  where = ['--path', *path] if path else []
  out = subprocess.run([sys.executable, '-m', 'pip', 'list', '--format=json', *where],
                       check=True, capture_output=True, text=True).stdout
  return {normalise(d['name']): d['version'] for d in json.loads(out)}


def differences(want: dict[str, str], have: dict[str, str], allowed: set[str]) -> list[str]:
  """What stops `have` from being exactly `want` (names in `allowed` may be there unpinned)."""
  out = []
  for name in sorted(set(want) | set(have)):
    if name not in have:
      out.append(f'{name}=={want[name]} missing')
    elif name not in want:
      if name not in allowed:
        out.append(f'{name}=={have[name]} not in the lock')
    elif have[name] != want[name]:
      out.append(f'{name}=={have[name]} (locked {want[name]})')
  return out


def main(kind: str) -> None:
  start = time.monotonic()
  lock = lock_for_python(kind)
  pip('install', '--require-hashes', '-r', str(lock))
  pip('install', '--no-deps', '-e', str(ROOT))
  want, aot_problems = pins(lock), []
  if kind == 'test':
    pip('install', '--no-deps', '--require-hashes', '-r', str(HERE / 'extras-nodeps.txt'))
    want |= pins(HERE / 'extras-nodeps.txt')
    pip('install', '-q', '--no-deps', '--require-hashes', '--upgrade', f'--target={AOT_TARGET}',
        '-r', str(HERE / 'aot.txt'))
    aot_problems = [f'{p} in {AOT_TARGET}'
                    for p in differences(pins(HERE / 'aot.txt'), installed(str(AOT_TARGET)), set())]
  problems = differences(want, installed(), {PROJECT, *VENV_TOOLS}) + aot_problems
  files = ', '.join([lock.name] + (['extras-nodeps.txt', 'aot.txt'] if kind == 'test' else []))
  if problems:
    sys.exit(f'install.py: the install differs from requirements/ ({files}): ' + '; '.join(problems))
  print(f'install.py: installed exactly requirements/ {files} in {time.monotonic() - start:.0f} s')


if __name__ == '__main__':
  if len(sys.argv) != 2 or sys.argv[1] not in LOOSE:
    sys.exit('usage: python requirements/install.py main|test')
  main(sys.argv[1])
