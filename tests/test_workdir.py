"""A run's workdir is owned and locked, and a run stops on signals the way a scheduler can read.

In-process: which folders `workdir.check_owned` takes and refuses (nothing of the user's changes),
the lock's holder, release and stale takeover, the JSON files named in their errors, a failed
save's remedy, metrics.jsonl rows after a resume. Real processes of `ipsr_jax.main`: a user's folder
and the source checkout refused with one line; two trainings on one workdir (the second stops at
once naming the first); Ctrl-C saves and exits 75; a second Ctrl-C ends the process at once.
"""

import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import paths
from ipsr_jax.runtime import preemption
from ipsr_jax.runtime import summaries
from ipsr_jax.runtime import workdir as workdir_lib
from tests.conftest import REPO


def tree_hashes(root):
  """{relative path: sha256} of every file under root (the user's files, before and after)."""
  out = {}
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def user_folder(path):
  """A folder of the user's that looks like a run's outputs but is not one."""
  (path / 'images').mkdir(parents=True)
  (path / 'config.json').write_text('{"mine": 1}\n')
  (path / 'log.txt').write_text('my notes\n')
  (path / 'metrics.jsonl').write_text('{"step": 4}\n')
  (path / 'images' / 'step_00000004.png').write_bytes(b'\x89PNG not really')
  return path


# ----------------------------------------------------------------------------------- ownership


def test_missing_and_empty_folders_become_marked_runs(tmp_path):
  for folder in (tmp_path / 'new' / 'run', tmp_path / 'empty'):
    if folder.name == 'empty':
      folder.mkdir()
    workdir_lib.check_owned(str(folder))
    assert sorted(os.listdir(folder)) == [workdir_lib.MARKER]
    assert json.loads((folder / workdir_lib.MARKER).read_text())['pid'] == os.getpid()
    workdir_lib.check_owned(str(folder))  # a marked folder is a run: taken again


def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path):
  folder = user_folder(tmp_path / 'mine')
  before = tree_hashes(folder)
  with pytest.raises(workdir_lib.NotARunError) as e:
    workdir_lib.check_owned(str(folder))
  assert str(e.value) == (f'{folder} holds files that are not an ipsr_jax run (config.json, images, log.txt and '
                          '1 more); nothing was written there: choose a new or empty --workdir.')
  assert tree_hashes(folder) == before
  # Another process's log file alone (a multi-host start) does not make a folder the user's.
  other = tmp_path / 'multi'
  other.mkdir()
  (other / 'log.process1.txt').write_text('')
  workdir_lib.check_owned(str(other))


def test_a_run_written_before_runs_were_marked_is_taken_and_marked(tmp_path):
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)
  (tmp_path / 'config.json').write_text('{}')
  workdir_lib.check_owned(str(tmp_path))
  assert (tmp_path / workdir_lib.MARKER).exists()


def one_record_per_step(run):
  """Checks that no metric of metrics.jsonl is logged twice for a step; returns the last loss step."""
  rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  keys = [(r['step'], tuple(sorted(r))) for r in rows]
  assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1][:3]
  return max(r['step'] for r in rows if 'train/loss' in r)


# ------------------------------------------------------------------------------------- the lock


HOLDER = """
import sys, time
from ipsr_jax.runtime import workdir
workdir.claim(sys.argv[1])
print('held', flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_naming_the_holder_then_takes_the_lock_once_free(tmp_path):
  run = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lib.WorkdirLockedError) as e:
      workdir_lib.claim(str(run))
    message = str(e.value)
    assert message.startswith(f'{run} is in use by process {holder.pid} on ')
    assert message.endswith('nothing was written: wait for it to finish or stop it, or choose another --workdir.')
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its name is still in the file, the kernel's lock is gone.
  assert str(holder.pid) in (run / workdir_lib.LOCK).read_text()
  lock = workdir_lib.claim(str(run))
  assert lock.taken_over.startswith(f'taking over the lock of {run} from process {holder.pid} ')
  assert lock.taken_over.endswith(': no longer running.')
  assert json.loads((run / workdir_lib.LOCK).read_text())['pid'] == os.getpid()
  assert workdir_lib.claim(str(run)) is lock  # this process holds it already
  lock.release()
  assert (run / workdir_lib.LOCK).read_text() == ''  # a clean release names nobody


# ------------------------------------------------------------------------------ files and logs


def test_json_errors_name_their_file(tmp_path):
  bad = tmp_path / 'config.json'
  bad.write_text('{"model": ')
  with pytest.raises(ValueError, match=rf'^{bad} is not valid JSON \(Expecting value: line 1 column 11'):
    paths.read_json(bad)
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"step": \n')
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 2, is not valid JSON'):
    summaries.read_metrics(str(tmp_path))


def test_corrupt_embedder_files_name_the_file(tmp_path):
  from ipsr_jax.models import embedder_store  # pylint: disable=import-outside-toplevel
  from tests.conftest import make_embedder  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(make_embedder(tmp_path / "e"))
  info = directory / embedder_store.INFO_FILE
  good = info.read_text()
  info.write_text(good[:20])
  with pytest.raises(ValueError, match=rf'^{info} is not valid JSON'):
    embedder_store.load_embedder(directory)
  info.write_text(good)
  metadata = directory / embedder_store.VARIABLES_DIR / '_METADATA'
  metadata.write_text('{"tree_metadata": ')
  with pytest.raises(ValueError, match=rf'a metadata file of {directory / embedder_store.VARIABLES_DIR} is not '
                     'valid JSON'):
    embedder_store.load_embedder(directory)


def test_a_corrupt_run_config_is_named_and_loading_a_run_prints_nothing(tmp_path):
  from ipsr_jax import api  # pylint: disable=import-outside-toplevel
  from tests.conftest import make_run  # pylint: disable=import-outside-toplevel
  run = make_run(tmp_path / 'run')
  # A user's script: Orbax's notice for every read-only manager would reach its stderr.
  script = f'from ipsr_jax import api\nprint(api.SuperResolver.from_checkpoint({run!r}).info["step"])\n'
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert (proc.returncode, proc.stdout) == (0, '2\n'), proc.stderr
  assert 'read only' not in proc.stderr
  config = tmp_path / 'run' / 'config.json'
  config.write_text(config.read_text()[:-30])
  with pytest.raises(ValueError, match=rf'^{config} is not valid JSON'):
    api.SuperResolver.from_checkpoint(run)


def test_a_failed_save_says_when_running_again_will_work():
  remedy = checkpointing._remedy  # pylint: disable=protected-access
  assert remedy(OSError(errno.ENOSPC, 'full')) == 'once there is space again'
  assert remedy(RuntimeError('wrapped', )) == 'once the cause above is fixed'
  wrapped = RuntimeError('orbax')
  wrapped.__cause__ = PermissionError(errno.EACCES, 'denied')
  assert remedy(wrapped) == 'once the folder is writable again'
  assert remedy(RuntimeError("tensorstore: os_error_code='28'")) == 'once there is space again'
  assert remedy(FileNotFoundError(errno.ENOENT, 'gone')) == 'once the cause above is fixed'


def test_a_resumed_run_drops_the_rows_it_will_log_again(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'train/loss': s / 10}) + '\n' for s in range(1, 7)) + '{"step": 7')
  assert summaries.drop_rows_after(str(path), 3) == 4  # steps 4-6 and the torn line
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3]
  assert summaries.drop_rows_after(str(path), 3) == 0


# ------------------------------------------------------------------------- the command itself


def _main(workdir, *extra, **popen):
  cmd = [sys.executable, '-m', 'ipsr_jax.main', '--config=configs/base.py:tiny', f'--workdir={workdir}',
         '--config.loss.identity_weight=0', '--config.train.image_summary_every_steps=0', *extra]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  popen.setdefault('stderr', subprocess.PIPE)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, **popen)


def _refused(workdir):
  proc = _main(workdir)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err.strip().splitlines()


def test_main_refuses_a_users_folder_and_the_checkout_writing_nothing(tmp_path):
  folder = user_folder(tmp_path / 'mine')
  before = tree_hashes(folder)
  rc, out, err = _refused(folder)
  assert rc == 1 and out == '' and len(err) == 1
  assert err[0].startswith(f'Error: NotARunError: {folder} holds files that are not an ipsr_jax run')
  assert tree_hashes(folder) == before
  listing = sorted(os.listdir(REPO))
  rc, _, err = _refused(REPO)
  assert rc == 1 and len(err) == 1 and err[0].startswith(f'Error: NotARunError: {REPO} holds files')
  assert sorted(os.listdir(REPO)) == listing


def _wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if any(r['step'] >= step for r in summaries.read_metrics(str(workdir))):
      return
    time.sleep(0.1)
  raise AssertionError(f'no step {step} logged: {proc.poll()}')


def test_two_trainings_on_one_workdir_then_ctrl_c_saves_and_exits_75(tmp_path):
  run = tmp_path / 'run'
  first = _main(run, '--config.train.num_train_steps=1000', '--config.train.checkpoint_every_steps=1000',
                '--config.train.log_every_steps=1')
  try:
    _wait_for_step(run, 2, first)
    second = _main(run)
    out, err = second.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith(f'Error: WorkdirLockedError: {run} is in use by process {first.pid} on ')
    first.send_signal(signal.SIGINT)  # Ctrl-C: save, stop, exit 75
    out, err = first.communicate(timeout=300)
  finally:
    first.kill()
  assert first.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
  assert 'Warning: Ctrl-C received: saving a checkpoint and stopping (Ctrl-C again stops at once' in err
  step = checkpointing.Checkpointer(str(run), read_only=True).latest_step()
  assert 2 <= step < 1000
  assert f'Stopped by Ctrl-C at step {step}; checkpoint {step} is saved: run the same command to resume' in out
  assert 'Traceback' not in err
  # The run's folder: log lines of one process only, one metrics row per step.
  log = (run / 'log.txt').read_text()
  assert 'is in use by process' not in log
  assert (run / workdir_lib.LOCK).read_text() == ''  # released on the way out: the next run takes it quietly
  assert one_record_per_step(run) == step
  config = json.loads((run / 'config.json').read_text())
  assert config['environment']['python'].startswith(f'{sys.version_info[0]}.{sys.version_info[1]}')


def test_a_second_ctrl_c_ends_the_process_at_once(tmp_path):
  run, terminal = tmp_path / 'run', tmp_path / 'stderr.txt'
  with open(terminal, 'w') as stderr:
    proc = _main(run, '--config.train.num_train_steps=1000', '--config.train.checkpoint_every_steps=1000',
                 '--config.train.log_every_steps=1', stderr=stderr)
  try:
    _wait_for_step(run, 1, proc)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 120  # the loop has seen the first one once it says so
    while 'Ctrl-C received' not in terminal.read_text() and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGINT, terminal.read_text()[-3000:]
