"""A run never dies on its own files: damaged checkpoints, a changed config, a full disk, bad values.

Each case runs the real command (`python -m ipsr_jax.main --config=configs/base.py:tiny`, 6 steps,
checkpoints at 3 and 6) and asserts the terminal text, the exit code, that nothing was deleted and,
where training resumes, that its per-step losses equal the uninterrupted run's.
"""

import os
import shutil
import re
import subprocess
import sys

import numpy as np
import pytest

from ipsr_jax.runtime import workdir as workdir_lib
from tests.conftest import REPO
from tests.test_train import _env, _losses, _train_cmd, make_embedder


@pytest.fixture(scope='module')
def embedder_dir(tmp_path_factory):
  return make_embedder(tmp_path_factory.mktemp('embedder') / 'e')


def _run(workdir, embedder_dir, *extra):
  proc = subprocess.run(_train_cmd(workdir, embedder_dir, *extra), cwd=REPO, env=_env(1), capture_output=True,
                        text=True, timeout=600)
  return proc.returncode, [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, embedder_dir):
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  rc, lines = _run(workdir, embedder_dir)
  assert rc == 0, lines[-20:]
  return workdir


def _copy(reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  return workdir


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize('damage', ['state', 'data_iter'])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly(reference, embedder_dir, tmp_path,
                                                                          damage):
  workdir = _copy(reference, tmp_path)
  ckpts = workdir / 'checkpoints'
  if damage == 'state':
    target = _largest_file(ckpts / '6' / 'state')
    with open(target, 'r+b') as f:
      f.truncate(100)
  else:
    (ckpts / '6' / 'data_iter' / 'process_0-of-1.json').write_text('not json')
  rc, lines = _run(workdir, embedder_dir)
  assert rc == 0, lines[-20:]
  warnings = [l for l in lines if l.startswith('Warning:')]
  assert len(warnings) == 1 and 'checkpoint step 6 cannot be read' in warnings[0], lines
  assert 'set aside as checkpoints/6.unreadable' in warnings[0] and 'trying step 3' in warnings[0]
  assert not any('Traceback' in l or 'Event loop' in l for l in lines), lines
  assert (ckpts / '6.unreadable').is_dir() and (ckpts / '3').is_dir() and (ckpts / '6').is_dir()
  assert any('from step 3' in l for l in lines)
  got, want = _losses(workdir), _losses(reference)
  assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]


def test_no_readable_checkpoint_stops_in_one_line_and_deletes_nothing(reference, embedder_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  for step in ('3', '6'):
    (workdir / 'checkpoints' / step / 'commit_success.txt').unlink()
  rc, lines = _run(workdir, embedder_dir)
  assert rc == 1
  errors = [l for l in lines if l.startswith('Error:')]
  assert len(errors) == 1 and 'no readable checkpoint' in errors[0] and 'steps [3, 6]' in errors[0], lines
  assert not any('Traceback' in l for l in lines)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3.unreadable', '6.unreadable']


def test_changed_model_field_stops_before_touching_checkpoints(reference, embedder_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = sorted(str(p.relative_to(workdir)) for p in (workdir / 'checkpoints').rglob('*'))
  rc, lines = _run(workdir, embedder_dir, '--config.model.ngf=8')
  assert rc == 1 and len(lines) <= 3, lines
  assert lines[0].startswith('Error: ConfigError:') and 'model.ngf=4 there, 8 now' in lines[0]
  assert '--config.model.ngf=4' in lines[0] and 'new --workdir' in lines[0]
  assert sorted(str(p.relative_to(workdir)) for p in (workdir / 'checkpoints').rglob('*')) == before


def test_allowed_changed_field_is_recorded_and_the_run_goes_on(reference, embedder_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  rc, lines = _run(workdir, embedder_dir, '--config.train.num_train_steps=7')
  assert rc == 0, lines[-20:]
  assert 'Resuming with changed settings: train.num_train_steps 6 -> 7' in lines
  assert any('from step 6' in l for l in lines) and 7 in _losses(workdir)
  assert 'train.num_train_steps 6 -> 7' in (workdir / 'log.txt').read_text()


@pytest.mark.parametrize('flag, text', [('--config.train.batch_size=-3', 'config.train.batch_size=-3: must be'),
                                        ('--config.data.source=folder', "config.data.source='folder'")])
def test_bad_config_value_is_one_line(tmp_path, embedder_dir, flag, text):
  rc, lines = _run(tmp_path / 'run', embedder_dir, flag)
  assert rc == 1 and len(lines) == 1, lines
  assert lines[0].startswith('Error: ConfigError: ') and text in lines[0]
  assert not (tmp_path / 'run').exists()  # checked before the workdir is made: nothing written


def test_full_disk_stops_in_one_line_keeps_the_last_checkpoint_and_resumes_exactly(reference, embedder_dir,
                                                                                 tmp_path):
  workdir = tmp_path / 'run'
  mount = workdir / 'checkpoints'
  workdir_lib.check_owned(str(workdir))  # a run's folder, with its checkpoints on a small disk of their own
  mount.mkdir(parents=True)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(reference / 'checkpoints' / '3')
             for f in fs)
  # Room for one checkpoint, not two: the save of step 6 runs out of space.
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={int(size * 1.5)}', 'tmpfs', str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  try:
    rc, lines = _run(workdir, embedder_dir)
    assert rc == 1
    errors = [l for l in lines if l.startswith('Error:')]
    assert len(errors) == 1 and not any('Traceback' in l or 'Event loop' in l for l in lines), lines
    assert 'checkpoint step 6 was not saved (No space left on device' in errors[0]
    assert 'previous checkpoint (step 3) is intact' in errors[0] and 'once there is space again.' in errors[0]
    assert (mount / '3' / 'commit_success.txt').exists() and not (mount / '6').exists()
    subprocess.run(['mount', '-o', f'remount,size={int(size * 4)}', str(mount)], check=True)
    rc, lines = _run(workdir, embedder_dir)
    assert rc == 0, lines[-20:]
    assert any('from step 3' in l for l in lines)
    got, want = _losses(workdir), _losses(reference)
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]
    assert (mount / '6' / 'commit_success.txt').exists()
  finally:
    subprocess.run(['umount', str(mount)], capture_output=True)


def test_super_resolver_falls_back_without_renaming_and_names_the_step(reference, tmp_path, capsys):
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  workdir = _copy(reference, tmp_path)
  with open(_largest_file(workdir / 'checkpoints' / '6' / 'state'), 'r+b') as f:
    f.truncate(100)
  sr = inference.SuperResolver.from_checkpoint(workdir)
  assert sr.info['step'] == 3
  err = capsys.readouterr().err
  assert 'checkpoint step 6 cannot be read' in err and 'trying step 3' in err
  assert (workdir / 'checkpoints' / '6').is_dir()  # read-only users never rename a run's files
  with pytest.raises(Exception, match='checkpoint step 6 .* cannot be read'):
    inference.SuperResolver.from_checkpoint(workdir, step=6)


def _tool(name, *args, cwd):
  proc = subprocess.run([sys.executable, '-m', f'ipsr_jax.tools.{name}', *args], cwd=cwd,
                        env=_env(1, PYTHONPATH=str(REPO)),
                        capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout, proc.stderr


def _probes(folder, n=3):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True)
  for i in range(n):
    Image.fromarray(np.full((8, 7, 3), 60 * i, np.uint8)).save(folder / f'{i}.png')


def test_cli_falls_back_in_one_warning_line_without_library_logs(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  with open(_largest_file(workdir / 'checkpoints' / '6' / 'state'), 'r+b') as f:
    f.truncate(100)
  _probes(tmp_path / 'lr')
  rc, out, err = _tool('super_resolve', '--workdir=run', '--input=lr', '--output=sr', cwd=tmp_path)
  text = out + err
  assert rc == 0, text
  lines = [l for l in text.splitlines() if l.strip()]
  assert '\r' not in text and not [l for l in lines if re.match(r'[IWE]\d{4} ', l)], lines  # no Orbax INFO
  warnings = [l for l in lines if l.startswith('Warning:')]
  assert len(warnings) == 1 and 'checkpoint step 6 cannot be read' in warnings[0], lines
  summary = out.splitlines()[-1]
  assert 'super-resolved 3/3 images' in summary and '(step 3)' in summary, lines
  assert len(lines) <= 4, lines  # the warning, plain progress lines, the summary
  assert (workdir / 'checkpoints' / '6').is_dir()  # read-only: nothing renamed or deleted


@pytest.mark.parametrize('case', ['no_checkpoint', 'missing_input', 'bad_flag'])
def test_cli_errors_are_one_line_with_exit_code_1(reference, tmp_path, case):
  workdir = _copy(reference, tmp_path)
  _probes(tmp_path / 'lr')
  args = ['--workdir=run', '--input=lr', '--output=sr']
  if case == 'no_checkpoint':
    for step in ('3', '6'):
      (workdir / 'checkpoints' / step / 'commit_success.txt').unlink()
    want = 'no readable checkpoint'
  elif case == 'missing_input':
    args[1] = '--input=nowhere'
    want = 'nowhere'
  else:
    args.append('--batch_size=many')
    want = 'batch_size'
  rc, out, err = _tool('super_resolve', *args, cwd=tmp_path)
  text = out + err
  lines = [l for l in text.splitlines() if l.strip()]
  assert rc == 1 and len(lines) <= 3, lines
  errors = [l for l in lines if l.startswith('Error:')]
  assert len(errors) == 1 and want in errors[0] and 'Traceback' not in text, lines
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == sorted(
      p.name for p in (reference / 'checkpoints').iterdir())
