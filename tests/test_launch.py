"""Launchers: dry runs print well-formed commands (v5e-16 slice, 2-node SLURM job), and those
commands, executed against stand-ins for gcloud/curl/srun/scontrol, run `ipsr_jax.main` with the
exact arguments and the jax.distributed environment on every worker."""

import json
import os
import shlex
import socket
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO

TPU = REPO / 'launch' / 'tpu_vm.py'
SLURM = REPO / 'launch' / 'slurm_gpu.py'
# Arguments for ipsr_jax.main that need quoting: a space, a quote, a shell metacharacter.
MAIN_ARGS = ['--config.data.root=/data/vgg face2', "--config.embedder.checkpoint=/ckpt/it's",
             '--config.train.batch_size=256', '--config.data.tfds_name=$HOME;rm -rf x']


def launch(script, *args, env=None, check=True):
  result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def split_commands(text):
  """Printed commands -> argv lists; a command may span lines inside quotes; '#' lines skipped."""
  commands, pending = [], ''
  for line in text.splitlines():
    if not pending and (not line.strip() or line.startswith('#')):
      continue
    pending = f'{pending}\n{line}' if pending else line
    try:
      commands.append(shlex.split(pending))
      pending = ''
    except ValueError:  # an open quote: the command goes on
      continue
  assert not pending, f'unterminated command: {pending!r}'
  return commands


def executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


RECORDER = """#!{python}
import json, os, sys
out = os.environ['RECORD_DIR']
task = os.environ.get('JAX_PROCESS_ID', 'x')
env = {{k: v for k, v in os.environ.items() if k.startswith(('JAX_', 'XLA_'))}}
with open(os.path.join(out, f'call_{{task}}_{{os.getpid()}}.json'), 'w') as f:
  json.dump(dict(argv=sys.argv[1:], env=env, cwd=os.getcwd()), f)
"""


def read_records(directory):
  return [json.loads(p.read_text()) for p in sorted(directory.glob('call_*.json'))]


# ------------------------------------------------------------------------------- Cloud TPU VM


TPU_ARGS = ['--name=ipsr-test', '--zone=us-west4-a', '--project=my-proj', '--accelerator=v5e-16',
            '--workdir=gs://bucket/ipsr/run1', '--env=XLA_FLAGS=--xla_tpu_a=1 --xla_b=2']


def test_tpu_worker_counts():
  sys.path.insert(0, str(TPU.parent))
  try:
    import tpu_vm  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  cases = {'v5e-16': ('v5litepod-16', 16, 4), 'v5litepod-8': ('v5litepod-8', 8, 1),
           'v4-8': ('v4-8', 4, 1), 'v4-32': ('v4-32', 16, 4), 'v5p-128': ('v5p-128', 64, 16),
           'v6e-256': ('v6e-256', 256, 64), 'v3-32': ('v3-32', 16, 4)}
  for name, (accelerator, chips, workers) in cases.items():
    t = tpu_vm.tpu_type(name)
    assert (t.accelerator, t.chips, t.workers) == (accelerator, chips, workers), name
  with pytest.raises(ValueError):
    tpu_vm.tpu_type('v9-16')


# worker-network-endpoints comes in two formats (name:id:ip triples, or hostnames).
ENDPOINTS = {'triples': ('w-0:uid0:10.1.2.3,w-1:uid1:10.1.2.4,w-2:uid2:10.1.2.5,w-3:uid3:10.1.2.6',
                         '10.1.2.3'),
             'hostnames': ('t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3', 't1v-n-0')}


@pytest.mark.parametrize('endpoints', sorted(ENDPOINTS))
def test_tpu_dry_run_v5e_16(tmp_path, endpoints):
  endpoint_list, coordinator = ENDPOINTS[endpoints]
  out = launch(TPU, *TPU_ARGS, '--dry-run', '--', *MAIN_ARGS).stdout
  assert out.startswith('# v5litepod-16: 16 chips on 4 worker(s) (4 per worker)')
  commands = split_commands(out)
  assert [c[0] for c in commands] == ['gcloud', 'tar', 'gcloud', 'gcloud', 'gcloud']
  create, pack, scp, install, train = commands
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ipsr-test',
                    '--zone=us-west4-a', '--project=my-proj', '--accelerator-type=v5litepod-16',
                    '--version=v2-alpha-tpuv5-lite']
  assert pack[-3:] == ['-C', str(REPO), '.'] and '--exclude=.venv' in pack
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert scp[5] == pack[2]  # the archive just packed is what is copied
  for ssh in (install, train):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ipsr-test']
    assert '--worker=all' in ssh and '--zone=us-west4-a' in ssh
  remote_install = install[-1].removeprefix('--command=')
  assert "uv pip install --python ipsr_venv/bin/python -e './ipsr_jax[tpu]'" in remote_install
  assert 'tar -xzf ipsr_jax_src.tar.gz -C ipsr_jax' in remote_install
  for remote in (remote_install, train[-1].removeprefix('--command=')):
    subprocess.run(['bash', '-n', '-c', remote], check=True)  # syntax

  # Run the train step's remote script on a stand-in worker 2 of 4.
  home = tmp_path / 'home'
  (home / 'ipsr_jax').mkdir(parents=True)
  (home / 'ipsr_venv' / 'bin').mkdir(parents=True)
  executable(home / 'ipsr_venv' / 'bin' / 'python', RECORDER.format(python=sys.executable))
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  executable(bin_dir / 'curl', '#!/bin/sh\n'
             'for a; do u="$a"; done\n'
             'case "$u" in\n'
             '  */agent-worker-number) echo 2 ;;\n'
             f'  */worker-network-endpoints) echo "{endpoint_list}" ;;\n'
             '  *) exit 22 ;;\n'
             'esac\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env.update(HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}', RECORD_DIR=str(tmp_path))
  script = train[-1].removeprefix('--command=')
  subprocess.run(['bash', '-c', script], cwd=home, env=env, check=True, timeout=60)
  (record,) = read_records(tmp_path)
  assert record['argv'] == ['-m', 'ipsr_jax.main', '--config=configs/base.py',
                            '--workdir=gs://bucket/ipsr/run1', *MAIN_ARGS]
  assert record['cwd'] == str(home / 'ipsr_jax')
  assert record['env'] == {'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '2',
                           'JAX_COORDINATOR_ADDRESS': f'{coordinator}:8476',
                           'XLA_FLAGS': '--xla_tpu_a=1 --xla_b=2'}


def test_tpu_real_run_runs_the_printed_commands(tmp_path):
  """Without --dry-run, exactly the printed commands run (gcloud and tar are stand-ins)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('gcloud', 'tar'):
    executable(bin_dir / tool, f'#!{sys.executable}\n'
               'import json, os, sys\n'
               "with open(os.environ['RECORD_FILE'], 'a') as f:\n"
               f"  f.write(json.dumps(['{tool}'] + sys.argv[1:]) + '\\n')\n")
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
             RECORD_FILE=str(tmp_path / 'calls.jsonl'))
  args = [*TPU_ARGS, '--steps=create,setup,train,delete', '--spot', '--detach', '--', *MAIN_ARGS]
  printed = split_commands(launch(TPU, *args, env=env).stdout)
  ran = [json.loads(line) for line in (tmp_path / 'calls.jsonl').read_text().splitlines()]
  assert ran == printed
  assert ran[0][-1] == '--spot' and ran[-1][4] == 'delete'
  assert 'nohup ../ipsr_venv/bin/python -m ipsr_jax.main' in ran[-2][-1]


def test_tpu_train_step_runs_again_after_a_preemption(tmp_path):
  """The train step exits 75 (stopped at a saved checkpoint) twice, then 0: it ran three times;
  an error (exit 1) is not retried."""
  sys.path.insert(0, str(TPU.parent))
  import tpu_vm  # pylint: disable=import-outside-toplevel
  from ipsr_jax.runtime import preemption  # pylint: disable=import-outside-toplevel
  assert tpu_vm.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  executable(bin_dir / 'gcloud', '#!/bin/bash\n'  # exits with the next code of $CODES, then 0
             'echo run >> "$RECORD_DIR/runs"; n=$(wc -l < "$RECORD_DIR/runs")\n'
             'codes=($CODES); exit "${codes[$((n - 1))]:-0}"\n')
  for codes, runs, status in (('75 75 0', 3, 0), ('75 75 75 75 75', 4, 1), ('1 0', 1, 1)):
    (tmp_path / 'runs').unlink(missing_ok=True)
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', RECORD_DIR=str(tmp_path), CODES=codes)
    result = launch(TPU, *TPU_ARGS, '--steps=train', '--', *MAIN_ARGS, env=env, check=False)
    assert (tmp_path / 'runs').read_text().count('run') == runs, (codes, result.stdout)
    assert (result.returncode == 0) == (status == 0), result.stderr
    assert result.stdout.count('starting it again to resume') == min(runs - 1, 3)


def test_tpu_refuses_local_workdir_on_multi_host():
  args = [a for a in TPU_ARGS if not a.startswith('--workdir')]
  args += ['--workdir=/tmp/run', '--dry-run']
  result = launch(TPU, *args, check=False)
  assert result.returncode == 2 and '4 workers' in result.stderr
  # A single-host slice may train into a local workdir and copy it back.
  single = [a.replace('v5e-16', 'v5e-8') for a in args] + ['--steps=train,copy-back']
  commands = split_commands(launch(TPU, *single).stdout)
  assert 'JAX_COORDINATOR_ADDRESS' not in commands[0][-1]
  assert commands[1][:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse']
  assert commands[1][6:8] == ['ipsr-test:/tmp/run', '.'] and '--worker=0' in commands[1]


# ------------------------------------------------------------------------------- SLURM, GPUs


def slurm_dry_run(tmp_path, python, *extra):
  out = launch(SLURM, '--nodes=2', '--gpus_per_node=8', '--partition=gpu', '--account=ml',
               '--time=12:00:00', f'--log_dir={tmp_path / "logs"}', f'--python={python}',
               '--workdir=/shared/runs/ipsr', '--setup=echo setting up', *extra, '--dry-run',
               '--', *MAIN_ARGS).stdout
  head, rest = out.split('<<\'IPSR_SBATCH_EOF\'\n', 1)
  script, tail = rest.split('\nIPSR_SBATCH_EOF\n', 1)
  return split_commands(head + "<<'IPSR_SBATCH_EOF'"), script + '\n', split_commands(tail), out


def run_sbatch_script(tmp_path, script, first_node, job_id, ntasks=2, srun=None, scontrol=None):
  """Runs the batch script as SLURM would on 2 nodes: scontrol and srun are stand-ins."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  executable(bin_dir / 'scontrol', scontrol or f'#!/bin/sh\necho {first_node}\necho node-b\n')
  executable(bin_dir / 'srun', srun or '#!/bin/bash\n'
             'while [[ "$1" == --* ]]; do shift; done\n'
             'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & done\n'
             'status=0; for job in $(jobs -p); do wait "$job" || status=1; done; exit $status\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'SLURM_', 'XLA_'))}
  env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_NTASKS=str(ntasks),
             SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST=f'{first_node},node-b',
             RECORD_DIR=str(tmp_path), PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  path = tmp_path / 'job.sbatch'
  path.write_text(script)
  return subprocess.run(['bash', str(path)], env=env, capture_output=True, text=True,
                        timeout=300, cwd=REPO)


def test_slurm_dry_run_two_nodes(tmp_path):
  recorder = executable(tmp_path / 'python-recorder', RECORDER.format(python=sys.executable))
  before, script, after, out = slurm_dry_run(tmp_path, recorder)
  assert out.startswith('# 2 node(s) x 8 GPU(s) = 16 GPUs, 2 JAX process(es)')
  assert before == [['mkdir', '-p', str(tmp_path / 'logs')],
                    ['cat', '>', str(tmp_path / 'logs' / 'ipsr.sbatch'), '<<IPSR_SBATCH_EOF']]
  assert after == [['sbatch', str(tmp_path / 'logs' / 'ipsr.sbatch')]]
  directives = [line.split(' ', 1)[1] for line in script.splitlines() if line.startswith('#SBATCH')]
  assert directives == ['--job-name=ipsr', '--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
                        '--cpus-per-task=32', '--time=12:00:00', f'--chdir={REPO}',
                        f'--output={tmp_path / "logs" / "%x-%j.out"}', '--requeue', '--partition=gpu',
                        '--account=ml', '--exclusive']
  assert script.startswith('#!/bin/bash\n') and 'echo setting up\n' in script
  subprocess.run(['bash', '-n', '-c', script], check=True)  # syntax

  result = run_sbatch_script(tmp_path, script, 'gpu-node-07', job_id=4242)
  assert result.returncode == 0, result.stderr
  assert 'setting up' in result.stdout
  records = read_records(tmp_path)
  assert len(records) == 2
  for record in records:
    assert record['argv'] == ['-m', 'ipsr_jax.main', '--config=configs/base.py',
                              '--workdir=/shared/runs/ipsr', *MAIN_ARGS]
  assert sorted(r['env']['JAX_PROCESS_ID'] for r in records) == ['0', '1']
  for record in records:
    assert record['env']['JAX_NUM_PROCESSES'] == '2'
    assert record['env']['JAX_COORDINATOR_ADDRESS'] == f'gpu-node-07:{12000 + 4242 % 20000}'


def _free_port_in(lo, hi):
  for port in range(lo + os.getpid() % 1000, hi):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
        return port
      except OSError:
        continue
  raise RuntimeError('no free port')


def test_slurm_script_starts_jax_distributed(tmp_path):
  """The script's environment is what ipsr_jax.runtime.sharding.initialize_distributed needs: two real
  processes join one jax.distributed job (CPU) through the coordinator the script picks."""
  probe = tmp_path / 'probe.py'
  probe.write_text(
      'import json, os, sys\n'
      'from ipsr_jax.runtime import sharding\n'
      'import jax\n'
      'sharding.initialize_distributed()\n'
      "with open(os.path.join(os.environ['RECORD_DIR'], f'call_{jax.process_index()}.json'),"
      " 'w') as f:\n"
      '  json.dump(dict(argv=sys.argv[1:], index=jax.process_index(), '
      'count=jax.process_count(), devices=jax.device_count()), f)\n'
      'jax.distributed.shutdown()\n')
  python = executable(tmp_path / 'python-probe',
                      f'#!/bin/sh\nshift 2\nexec {shlex.quote(sys.executable)} {probe} "$@"\n')
  _, script, _, _ = slurm_dry_run(tmp_path, python)
  port = _free_port_in(12000, 32000)
  result = run_sbatch_script(tmp_path, script, 'localhost', job_id=port - 12000)
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_records(tmp_path)
  assert sorted(r['index'] for r in records) == [0, 1]
  assert all(r['count'] == 2 and r['devices'] == 2 for r in records)
  assert all(r['argv'][:2] == ['--config=configs/base.py', '--workdir=/shared/runs/ipsr']
             for r in records)


def test_slurm_requeues_a_preempted_run_and_not_a_failed_one(tmp_path):
  """Exit code 75 (stopped at a saved checkpoint) requeues the job; 1 (an error) does not."""
  from ipsr_jax.runtime import preemption  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(SLURM.parent))
  import slurm_gpu  # pylint: disable=import-outside-toplevel
  assert slurm_gpu.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED == 75
  for code, requeued in ((75, True), (1, False)):
    run_dir = tmp_path / str(code)
    run_dir.mkdir()
    python = executable(run_dir / 'python-exit', f'#!/bin/sh\nexit {code}\n')
    _, script, _, _ = slurm_dry_run(run_dir, python)
    result = run_sbatch_script(
        run_dir, script, 'node-a', job_id=77, ntasks=1,
        srun='#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_PROCID=0 "$@"\n',  # one task
        scontrol='#!/bin/sh\nif [ "$1" = requeue ]; then echo "$2" >> "$RECORD_DIR/requeued"; else echo node-a; fi\n')
    assert result.returncode == code, result.stderr
    assert (run_dir / 'requeued').exists() == requeued
    if requeued:
      assert (run_dir / 'requeued').read_text() == '77\n'
      assert 'job 77 stopped at a saved checkpoint: requeued' in result.stdout
