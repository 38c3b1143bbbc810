"""The locks in requirements/ and the installs made from them, checked without the network.

README's commands install from these files (requirements/install.py), so a lock that is unhashed,
misses a dependency pyproject.toml names, or drifts from its siblings breaks the promise that the
same command installs the same program on any day. Run by .ci/run (IPSR_LOCKED_INSTALL=1), the
suite also fails when the libraries it runs on are not the locked versions.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import re
import sys
import tomllib

from packaging.requirements import Requirement
import pytest

from ipsr_jax.runtime import environment
from tests.conftest import REPO

LOCKS = REPO / 'requirements'
PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text(encoding='utf-8'))
TEST_EXTRAS = ('test', 'judge', 'facenet', 'sface')
TESTED = LOCKS / 'test-py311.txt'  # the set the suite runs with; every other lock follows it
AOT_TARGET = pathlib.Path.home() / '.cache' / 'ipsr_jax' / 'aot'
ENTRY = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;\\]+(\s+--hash=sha256:[0-9a-f]{64})+')


def _install_script():
  spec = importlib.util.spec_from_file_location('requirements_install', LOCKS / 'install.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _entries(lock):
  """A lock's requirement entries, each with its continuation lines joined."""
  text = re.sub(r'\\\n', ' ', lock.read_text(encoding='utf-8'))
  return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def _locks(kind):
  return sorted(LOCKS.glob(f'{kind}-py3*.txt'))


def _python_of(lock):
  digits = lock.stem.split('-py')[1]
  return f'{digits[0]}.{digits[1:]}'


def _names(requirements, python, extras=()):
  """Normalised names pyproject's requirements need on Linux x86_64, `ipsr_jax[...]` expanded."""
  env = {'platform_machine': 'x86_64', 'sys_platform': 'linux', 'platform_system': 'Linux',
         'python_version': python, 'python_full_version': python + '.0', 'extra': ''}
  names = set()
  for text in requirements:
    req = Requirement(text)
    if req.marker and not req.marker.evaluate(env):
      continue
    if environment.normalise(req.name) == 'ipsr-jax':
      names |= _names([r for e in req.extras for r in PYPROJECT['project']['optional-dependencies'][e]],
                      python)
    else:
      names.add(environment.normalise(req.name))
  for extra in extras:
    names |= _names(PYPROJECT['project']['optional-dependencies'][extra], python)
  return names


def test_every_lock_pins_each_package_to_one_version_with_hashes():
  locks = sorted(LOCKS.glob('*.txt'))
  assert {p.name for p in locks} >= {'main-py311.txt', 'test-py311.txt', 'extras-nodeps.txt', 'aot.txt'}
  install = _install_script()
  for lock in locks:
    entries = _entries(lock)
    assert entries, lock
    bad = [e[:120] for e in entries if not ENTRY.fullmatch(e)]
    assert not bad, f'{lock.name}: not `name==version --hash=sha256:...`: {bad}'
    pins = install.pins(lock)
    assert len(pins) == len(entries), f'{lock.name}: a package pinned twice'
    assert pins == environment.lock_pins(lock), lock.name  # install.py and config.json read alike


def test_main_locks_cover_pyproject_dependencies():
  assert [_python_of(p) for p in _locks('main')] == [_python_of(p) for p in _locks('test')]
  for lock in _locks('main'):
    missing = _names(PYPROJECT['project']['dependencies'], _python_of(lock)) - set(environment.lock_pins(lock))
    assert not missing, f'{lock.name} lacks {sorted(missing)}'


def test_test_locks_cover_the_test_extras_and_the_pinned_references():
  pinned = environment.lock_pins(LOCKS / 'test.in')
  assert 'torch' in pinned
  for lock in _locks('test'):
    pins = environment.lock_pins(lock)
    missing = _names(PYPROJECT['project']['dependencies'], _python_of(lock), TEST_EXTRAS) - set(pins)
    assert not missing, f'{lock.name} lacks {sorted(missing)}'
    assert {n: pins.get(n) for n in pinned} == pinned, lock.name


def test_all_locks_are_the_one_tested_set():
  tested = environment.lock_pins(TESTED)
  for lock in _locks('test'):
    assert environment.lock_pins(lock) == tested, f'{lock.name} differs from {TESTED.name}'
  for lock in _locks('main'):
    pins = environment.lock_pins(lock)
    assert {n: tested.get(n) for n in pins} == pins, f'{lock.name} has versions {TESTED.name} lacks'


def test_nodeps_and_aot_locks_match_their_sources():
  assert environment.lock_pins(LOCKS / 'extras-nodeps.txt') == environment.lock_pins(LOCKS / 'extras-nodeps.in')
  extras = PYPROJECT['project']['optional-dependencies']
  declared = dict(r.split('==') for r in extras['aot-tpu'] + extras['aot-gpu'])
  assert environment.lock_pins(LOCKS / 'aot.txt') == declared  # pyproject's aot extras, the same pins
  assert declared['jax-cuda12-pjrt'] == environment.lock_pins(TESTED)['jax']  # the plugin of the locked jax


def test_readme_installs_from_the_locks_and_ci_runs_its_test_line():
  readme = (REPO / 'README.md').read_text(encoding='utf-8').split('## On a fresh machine', 1)[1]
  main_line, test_line = re.findall(r'```bash\n(.*?)\n```', readme, re.S)[:2]
  venv = 'python3 -m venv .venv && . .venv/bin/activate && '
  assert main_line.startswith(venv + 'python requirements/install.py main && python -m ipsr_jax.main ')
  assert test_line.startswith(venv + 'python requirements/install.py test && ')
  ci = (REPO / '.ci' / 'run').read_text(encoding='utf-8')
  assert ci.rstrip().splitlines()[-1] == test_line[len(venv):]  # .ci/run brings its own venv
  assert 'export IPSR_LOCKED_INSTALL=1' in ci


def test_install_script_names_the_locks_there_are_and_the_differences(tmp_path, monkeypatch):
  install = _install_script()
  (tmp_path / 'main-py399.txt').write_text('')
  monkeypatch.setattr(install, 'HERE', tmp_path)
  with pytest.raises(SystemExit) as exit_:
    install.lock_for_python('main')
  message = str(exit_.value)
  assert '\n' not in message and 'Python 3.99 on linux x86_64' in message and 'pip install -e .' in message
  assert install.differences({'a': '1', 'b': '2', 'c': '3'}, {'a': '1', 'b': '2.1', 'd': '4', 'pip': '26'},
                             {'pip'}) == ['b==2.1 (locked 2)', 'c==3 missing', 'd==4 not in the lock']


def test_installed_versions_match_the_lock():
  """Always compared; a difference fails only in a locked install (.ci/run), else it skips."""
  locked = os.environ.get('IPSR_LOCKED_INSTALL') == '1'
  lock = LOCKS / f'test-py{sys.version_info.major}{sys.version_info.minor}.txt'
  if not lock.is_file():
    assert not locked, f'IPSR_LOCKED_INSTALL=1 but there is no {lock.name}'
    pytest.skip(f'no {lock.name}')
  installed = {}
  for dist in importlib.metadata.distributions():
    installed.setdefault(environment.normalise(dist.metadata['Name'] or ''), dist.version)
  want = environment.lock_pins(lock) | environment.lock_pins(LOCKS / 'extras-nodeps.txt')
  wrong = [f'{n} {installed.get(n, "missing")} (locked {v})' for n, v in sorted(want.items()) if installed.get(n) != v]
  if locked:
    aot = {environment.normalise(d.metadata['Name']): d.version
           for d in importlib.metadata.distributions(path=[str(AOT_TARGET)])}
    wrong += [f'{n} {aot.get(n, "missing")} in {AOT_TARGET} (locked {v})'
              for n, v in sorted(environment.lock_pins(LOCKS / 'aot.txt').items()) if aot.get(n) != v]
    assert not wrong, f'not the locked set ({lock.name}): {wrong}'
  elif wrong:
    pytest.skip(f'a loose install, {len(wrong)} differences from {lock.name}, e.g. {wrong[:3]}')


def test_installed_versions_names_python_platform_dependencies_and_lock():
  versions = environment.installed_versions()
  json.dumps(versions)  # config.json records it as it is
  assert versions['python'] == platform.python_version() and versions['platform'] == platform.platform()
  assert versions['jax'] == importlib.metadata.version('jax')
  assert versions['flax'] == importlib.metadata.version('flax')
  declared = {environment.normalise(Requirement(r).name) for r in PYPROJECT['project']['dependencies']}
  assert declared <= {environment.normalise(k) for k in versions}
  assert 'pytest' not in versions  # an extra's package, not a direct dependency
  assert versions['lock'] is None or (LOCKS / versions['lock']).is_file()
  if os.environ.get('IPSR_LOCKED_INSTALL') == '1':
    assert versions['lock'] == f'test-py{sys.version_info.major}{sys.version_info.minor}.txt'
