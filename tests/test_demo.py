"""The embedded default end to end at tiny size, started the way README.md tells a new user to.

README's main command runs verbatim (only the config swapped for its `:tiny` variant) from a fresh
working directory with its relative --workdir: a README edit that breaks the command fails here.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

MAX_TERMINAL_LINES = 60  # the README command's whole output when stdout is a file


def readme_main_command() -> str:
  """The `python -m ipsr_jax.main ...` part of README's first command (after the install)."""
  text = (REPO / 'README.md').read_text(encoding='utf-8')
  section = text.split('## On a fresh machine', 1)[1]
  block = re.search(r'```bash\n(.*?)\n```', section, re.S).group(1).strip()
  command = block.split('&&')[-1].strip()
  assert command.startswith('python -m ipsr_jax.main ') and '--config=configs/demo.py ' in command, command
  return command


def _env(compile_cache=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  if compile_cache:  # JAX's persistent cache: a later run loads the programs an earlier one compiled
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  return env


def _run_readme_command(cwd, *extra, compile_cache=None):
  command = readme_main_command().replace('--config=configs/demo.py ', f'--config={REPO}/configs/demo.py:tiny ')
  args = shlex.split(command) + list(extra)
  args[0] = sys.executable  # the README's `python` is the venv's
  return subprocess.run(args, cwd=cwd, env=_env(compile_cache), capture_output=True, text=True, timeout=1500)


def _workdir(cwd):
  return cwd / shlex.split(readme_main_command()).pop().split('=', 1)[1]  # --workdir=runs/demo


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """This module's own compilation cache, empty at first: the fixture's run compiles every program,
  as a new user's does, and the module's later runs load them (a run then takes ~1/3 of the time)."""
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def readme_run(tmp_path_factory, compile_cache):
  cwd = tmp_path_factory.mktemp('fresh_user')
  return cwd, _run_readme_command(cwd, compile_cache=compile_cache)


def _report(workdir):
  return json.loads((workdir / 'report' / 'synthetic' / 'report.json').read_text())


def test_readme_main_command_runs_from_a_fresh_directory(readme_run):
  cwd, proc = readme_run
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  workdir = _workdir(cwd)
  assert workdir.is_dir() and workdir.parent.parent == cwd  # the relative workdir, under the cwd
  report = workdir / 'report' / 'synthetic'
  doc = _report(workdir)
  assert doc['protocol'] == 'generic'
  assert set(doc['rank1']) == {'7x6', '16x16'}
  assert {'hr', 'bicubic', 'sr', 'pixel_only', 'sr_concat', 'pixel_only_concat'} <= set(doc['rank1']['16x16'])
  assert 'pretrained by ipsr_jax' in doc['embedder']
  for name in ('report.md', 'faces.png', 'cmc_7x6.png', 'cmc_16x16.png'):
    assert (report / name).exists(), name
  for stage in ('ipsr', 'pixel_only'):
    assert (workdir / stage / 'metrics.jsonl').exists()
    saved = json.loads((workdir / stage / 'config.json').read_text())
    assert saved['embedder']['checkpoint'] == str(workdir / 'embedder' / 'embedder')  # absolute
  assert json.loads((workdir / 'pixel_only' / 'config.json').read_text())['loss']['identity_weight'] == 0.0


def test_terminal_is_short_and_the_log_file_complete(readme_run):
  cwd, proc = readme_run
  out = proc.stdout + proc.stderr
  lines = out.splitlines()
  assert len(lines) <= MAX_TERMINAL_LINES, out
  for stage in ('Demo stage 1/4', 'Demo stage 2/4', 'Demo stage 3/4', 'Demo stage 4/4'):
    assert sum(stage in line for line in lines) == 1, stage  # one header per stage
  assert 'Rank-1 identification (%)' in proc.stdout and '| ours: sr |' in proc.stdout
  assert proc.stdout.rstrip().splitlines()[-1].startswith('Log: ')
  assert f'Report: {_workdir(cwd)}/report/synthetic/report.md' in proc.stdout
  assert not [l for l in lines if re.match(r'[IW]\d{4} ', l)], out  # no library INFO/WARNING lines
  assert 'oneDNN' not in out and 'absl::InitializeLog' not in out  # C++ banners go to the log file
  log = (_workdir(cwd) / 'log.txt').read_text()
  assert 'Saving checkpoint at step' in log  # Orbax/absl INFO, kept in the file
  for line in proc.stdout.splitlines():  # everything the terminal showed is in the file
    assert line in log, line


def _second_run_gives_the_same_report(readme_run, cwd, compile_cache=None):
  first_cwd, first = readme_run
  assert first.returncode == 0
  second = _run_readme_command(cwd, compile_cache=compile_cache)
  assert second.returncode == 0, second.stderr[-4000:]
  assert _report(_workdir(cwd)) == _report(_workdir(first_cwd))


def test_two_runs_give_identical_reports(readme_run, tmp_path, compile_cache):
  """A second run in a fresh directory runs every stage again; only the compiled programs come
  from the first run (its compilation cache)."""
  _second_run_gives_the_same_report(readme_run, tmp_path, compile_cache)


@pytest.mark.slow
def test_two_runs_give_identical_reports_compiling_anew(readme_run, tmp_path):
  """The same, and the second run compiles every program itself."""
  _second_run_gives_the_same_report(readme_run, tmp_path)


def test_second_run_resumes_and_a_given_embedder_replaces_stage_1(readme_run, embedder_dir, compile_cache):
  cwd, first = readme_run
  assert first.returncode == 0
  # Everything is done: each stage is recognised as complete.
  second = _run_readme_command(cwd, compile_cache=compile_cache)
  assert second.returncode == 0, second.stderr[-4000:]
  assert 'Embedder already trained' in second.stdout
  assert second.stdout.count('already complete') == 2
  assert 'Training 2 steps' not in second.stdout

  third = _run_readme_command(cwd, f'--config.embedder.checkpoint={embedder_dir}', compile_cache=compile_cache)
  assert third.returncode == 0, third.stderr[-4000:]
  assert 'skipped, the embedder is config.embedder.checkpoint' in third.stdout
  assert 'Embedder already trained' not in third.stdout
  assert _report(_workdir(cwd))['embedder'] == 'random test init'
