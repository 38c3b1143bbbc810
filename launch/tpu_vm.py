#!/usr/bin/env python3
r"""Train on a Cloud TPU VM or pod slice: create it, install the project on every worker, run.

    python launch/tpu_vm.py --name=ipsr --zone=us-west4-a --accelerator=v5e-16 \
        --workdir=gs://my-bucket/ipsr/run1 --dry-run -- \
        --config.data.source=tfds --config.data.tfds_data_dir=gs://my-bucket/tfds \
        --config.embedder.checkpoint=gs://my-bucket/ckpt/facenet_vggface2

Steps (`--steps`, default create,setup,train): `create` the TPU VM (`gcloud compute tpus tpu-vm
create`), `setup` (pack this checkout, copy it to all workers, install Python and the project
with its `tpu` extra in a venv on each), `train` (the same `python -m ipsr_jax.main
--config=... --workdir=...` on every worker at once, `--worker=all`), `copy-back` (a single-host
run's local workdir to this machine) and `delete`. Everything after `--` is passed to
`ipsr_jax.main` unchanged. `--dry-run` prints the exact commands instead of running them.

A multi-host slice needs a workdir every worker sees: a `gs://` path (Orbax writes each host's
shards there). Each worker gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from
the TPU VM metadata, which `ipsr_jax.runtime.sharding.initialize_distributed` passes to
`jax.distributed.initialize`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('create', 'setup', 'train', 'copy-back', 'delete')
REMOTE_DIR = 'ipsr_jax'            # relative to the remote home directory (ssh starts there)
REMOTE_VENV = 'ipsr_venv'
REMOTE_ARCHIVE = 'ipsr_jax_src.tar.gz'
COORDINATOR_PORT = 8476
# ipsr_jax.main's exit code after SIGTERM/Ctrl-C stopped it at a saved checkpoint
# (ipsr_jax.runtime.preemption.EXIT_PREEMPTED; this script runs without the project installed).
EXIT_PREEMPTED = 75
METADATA_URL = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes'
# Paths of a checkout not worth shipping to the workers.
EXCLUDES = ('.git', '.venv', 'venv', '__pycache__', '*.egg-info', '.pytest_cache', 'runs')


@dataclasses.dataclass(frozen=True)
class TpuType:
  """Accelerator type as gcloud names it, and the shape of the slice."""
  accelerator: str   # e.g. v5litepod-16
  version: str       # default runtime (software) version
  chips: int
  workers: int       # hosts (TPU VMs) in the slice

  @property
  def chips_per_worker(self) -> int:
    return self.chips // self.workers


# generation -> (gcloud prefix, default runtime, counts cores (2 per chip) instead of chips,
#                largest single-host chip count, chips per host in multi-host slices)
_GENERATIONS = {
    'v2': ('v2', 'tpu-ubuntu2204-base', True, 4, 4),
    'v3': ('v3', 'tpu-ubuntu2204-base', True, 4, 4),
    'v4': ('v4', 'tpu-ubuntu2204-base', True, 4, 4),
    'v5p': ('v5p', 'v2-alpha-tpuv5', True, 4, 4),
    'v5e': ('v5litepod', 'v2-alpha-tpuv5-lite', False, 8, 4),
    'v5litepod': ('v5litepod', 'v2-alpha-tpuv5-lite', False, 8, 4),
    'v6e': ('v6e', 'v2-alpha-tpuv6e', False, 8, 4),
}


def tpu_type(accelerator: str) -> TpuType:
  """'v5e-16' or 'v5litepod-16' -> TpuType('v5litepod-16', ..., chips=16, workers=4)."""
  match = re.fullmatch(r'(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)', accelerator.strip().lower())
  if not match:
    raise ValueError(f'unknown TPU accelerator type {accelerator!r} '
                     f'(expected e.g. v5e-16, v5litepod-16, v4-32, v5p-64, v6e-16)')
  generation, count = match.group(1), int(match.group(2))
  prefix, version, counts_cores, max_single, per_host = _GENERATIONS[generation]
  chips = count // 2 if counts_cores else count
  if chips < 1:
    raise ValueError(f'{accelerator}: too small')
  workers = 1 if chips <= max_single else -(-chips // per_host)
  return TpuType(f'{prefix}-{count}', version, chips, workers)


def _gcloud_target(args) -> list[str]:
  out = [f'--zone={args.zone}']
  if args.project:
    out.append(f'--project={args.project}')
  return out


def _ssh(args, command: str, worker: str = 'all') -> list[str]:
  return (['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name] + _gcloud_target(args)
          + [f'--worker={worker}', f'--command={command}'])


def archive_path(args) -> str:
  return os.path.join(args.local_tmp, f'ipsr_jax_src_{args.name}.tar.gz')


def distributed_env(workers: int) -> str:
  """Shell lines exporting jax.distributed's settings from this TPU VM's metadata (worker id, and
  worker 0's address: 'worker-network-endpoints' holds 'name:id:ip' triples or hostnames)."""
  meta = f'curl -sf -H Metadata-Flavor:Google {METADATA_URL}'
  return (f'export JAX_NUM_PROCESSES={workers}\n'
          f'export JAX_PROCESS_ID="$({meta}/agent-worker-number)"\n'
          f'export JAX_COORDINATOR_ADDRESS="$({meta}/worker-network-endpoints'
          f" | cut -d, -f1 | awk -F: '{{print $NF}}'):{COORDINATOR_PORT}\"\n")


def setup_commands(args) -> list[list[str]]:
  excludes = [f'--exclude={e}' for e in EXCLUDES]
  pack = ['tar', '-czf', archive_path(args)] + excludes + ['-C', args.repo, '.']
  copy = (['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive_path(args),
           f'{args.name}:{REMOTE_ARCHIVE}'] + _gcloud_target(args) + ['--worker=all'])
  extra = shlex.quote(f'./{REMOTE_DIR}[{args.extras}]') if args.extras else f'./{REMOTE_DIR}'
  install = (
      'set -euo pipefail\n'
      f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}\n'
      # The TPU images ship Python 3.10; the project needs >= 3.11: uv fetches one.
      'export PATH="$HOME/.local/bin:$PATH"\n'
      'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh\n'
      f'uv venv --python {shlex.quote(args.python)} --allow-existing {REMOTE_VENV}\n'
      f'uv pip install --python {REMOTE_VENV}/bin/python -e {extra}\n'
      # No backend start here: on a pod slice that waits for every worker.
      f'{REMOTE_VENV}/bin/python -c "import ipsr_jax, jax; print(jax.__version__)"\n')
  return [pack, copy, _ssh(args, install)]


def train_command(args, tpu: TpuType) -> list[str]:
  main = ([f'../{REMOTE_VENV}/bin/python', '-m', 'ipsr_jax.main', f'--config={args.config}',
           f'--workdir={args.workdir}'] + list(args.main_args))
  script = 'set -euo pipefail\n'
  if tpu.workers > 1:
    script += distributed_env(tpu.workers)
  for env in args.env:
    key, _, value = env.partition('=')
    script += f'export {key}={shlex.quote(value)}\n'
  script += f'cd {REMOTE_DIR}\n'
  if args.detach:  # keeps running after ssh returns; follow it with `tail -f ~/ipsr_train.log`
    script += f'nohup {shlex.join(main)} > ../ipsr_train.log 2>&1 < /dev/null &\n'
  else:
    script += f'{shlex.join(main)}\n'
  return _ssh(args, script)


def commands(args) -> list[list[str]]:
  """Every command the chosen steps run, in order (argv lists; what --dry-run prints)."""
  tpu = tpu_type(args.accelerator)
  out = []
  for step in args.steps:
    if step == 'create':
      create = (['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name]
                + _gcloud_target(args) + [f'--accelerator-type={tpu.accelerator}',
                                          f'--version={args.version or tpu.version}'])
      if args.spot:
        create.append('--spot')
      out.append(create)
    elif step == 'setup':
      out.extend(setup_commands(args))
    elif step == 'train':
      out.append(train_command(args, tpu))
    elif step == 'copy-back':
      remote = args.workdir if os.path.isabs(args.workdir) else f'{REMOTE_DIR}/{args.workdir}'
      out.append(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse',
                  f'{args.name}:{remote}', args.copy_back_to] + _gcloud_target(args)
                 + ['--worker=0'])
    elif step == 'delete':
      out.append(['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name]
                 + _gcloud_target(args) + ['--quiet'])
  return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  main_args = []
  if '--' in argv:
    cut = argv.index('--')
    argv, main_args = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--name', required=True, help='TPU VM name.')
  p.add_argument('--zone', required=True, help='e.g. us-west4-a (v5e), us-central2-b (v4).')
  p.add_argument('--project', default=None, help='GCP project (default: gcloud config).')
  p.add_argument('--accelerator', required=True,
                 help='Slice type: v5e-16 (= v5litepod-16), v4-32, v5p-64, v6e-16, ...')
  p.add_argument('--version', default=None, help='TPU runtime version (default per generation).')
  p.add_argument('--spot', action='store_true', help='Create a Spot (preemptible) TPU VM.')
  p.add_argument('--workdir', required=True,
                 help='Run directory: gs://bucket/path (required for multi-host slices).')
  p.add_argument('--config', default='configs/base.py', help='Config file (+ ":variant").')
  p.add_argument('--steps', default='create,setup,train',
                 help=f'Comma-separated subset of {",".join(STEPS)}, run in that order.')
  p.add_argument('--repo', default=REPO, help='Checkout to install (default: this one).')
  p.add_argument('--extras', default='tpu', help='pip extras of the project to install.')
  p.add_argument('--python', default='3.11', help='Python version of the remote venv.')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='Environment variable for the training processes (repeatable).')
  p.add_argument('--requeue', type=int, default=3,
                 help=f'train without --detach: when training stops at a saved checkpoint on SIGTERM (exit '
                      f'{EXIT_PREEMPTED}: maintenance, preemption), start it again, resuming, up to this many times.')
  p.add_argument('--detach', action='store_true',
                 help='Start training in the background (log: ~/ipsr_train.log on each worker).')
  p.add_argument('--copy_back_to', default='.', help='copy-back: local destination folder.')
  p.add_argument('--local_tmp', default='/tmp', help='Where the source archive is written.')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                 help='Print the commands, run nothing.')
  args = p.parse_args(argv)
  args.main_args = main_args
  args.steps = [s.strip() for s in args.steps.split(',') if s.strip()]
  bad = [s for s in args.steps if s not in STEPS]
  if bad:
    p.error(f'unknown steps {bad}; choose from {STEPS}')
  args.steps = [s for s in STEPS if s in args.steps]
  for env in args.env:
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', env):
      p.error(f'--env needs KEY=VALUE, got {env!r}')
  try:
    tpu = tpu_type(args.accelerator)
  except ValueError as e:
    p.error(str(e))
  remote_workdir = '://' in args.workdir
  if tpu.workers > 1 and not remote_workdir:
    p.error(f'{tpu.accelerator} has {tpu.workers} workers: --workdir must be a path every worker '
            f'shares (gs://...), got {args.workdir!r}')
  if 'copy-back' in args.steps and remote_workdir:
    p.error('copy-back is for a local workdir on a single-host TPU VM; gs:// needs none '
            f'(gsutil -m cp -r {args.workdir} .)')
  return args


def run_requeued(command: list[str], requeue: int) -> None:
  """Runs `command`; while it exits with EXIT_PREEMPTED (training stopped at a saved checkpoint),
  runs it again, up to `requeue` more times: each run resumes from the last checkpoint."""
  for attempt in range(requeue + 1):
    status = subprocess.run(command).returncode
    if status != EXIT_PREEMPTED or attempt == requeue:
      break
    print(f'# training stopped at a saved checkpoint (exit {EXIT_PREEMPTED}): starting it again to resume '
          f'({attempt + 1}/{requeue})', flush=True)
  if status:
    raise subprocess.CalledProcessError(status, command)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  tpu = tpu_type(args.accelerator)
  print(f'# {tpu.accelerator}: {tpu.chips} chips on {tpu.workers} worker(s) '
        f'({tpu.chips_per_worker} per worker); steps: {",".join(args.steps)}')
  train = train_command(args, tpu) if 'train' in args.steps else None
  for command in commands(args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      run_requeued(command, args.requeue if command == train and not args.detach else 0)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
