#!/usr/bin/env python3
r"""Train on several GPU nodes with SLURM: writes an sbatch script and submits it.

    python launch/slurm_gpu.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=48:00:00 \
        --workdir=/shared/runs/ipsr --python=/shared/venvs/ipsr/bin/python --dry-run -- \
        --config.data.root=/shared/data/vggface2_aligned \
        --config.embedder.checkpoint=/shared/ckpt/facenet_vggface2

One JAX process per node drives all of that node's GPUs (`srun`, one task per node). The script
exports JAX_COORDINATOR_ADDRESS (the job's first node), JAX_NUM_PROCESSES (SLURM_NTASKS) and, per
task, JAX_PROCESS_ID (SLURM_PROCID); `ipsr_jax.runtime.sharding.initialize_distributed` hands them to
`jax.distributed.initialize`. Every process runs the same `python -m ipsr_jax.main --config=...
--workdir=...`; arguments after `--` are passed on unchanged. The workdir must be on a
filesystem all nodes share (or gs://). `--dry-run` prints the exact commands (the script as a
heredoc, then `sbatch`) instead of running them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEREDOC_END = 'IPSR_SBATCH_EOF'
# Coordinator port: one per job id, so two jobs sharing a first node do not collide.
PORT_BASE, PORT_RANGE = 12000, 20000
# ipsr_jax.main's exit code after SIGTERM/Ctrl-C stopped it at a saved checkpoint
# (ipsr_jax.runtime.preemption.EXIT_PREEMPTED; this script runs without the project installed).
EXIT_PREEMPTED = 75


def sbatch_script(args) -> str:
  """The batch script's text."""
  directives = [
      f'--job-name={args.job_name}',
      f'--nodes={args.nodes}',
      '--ntasks-per-node=1',
      f'--gpus-per-node={args.gpus_per_node}',
      f'--cpus-per-task={args.cpus_per_task}',
      f'--time={args.time}',
      f'--chdir={args.repo}',
      f'--output={os.path.join(args.log_dir, "%x-%j.out")}',
      '--requeue',
  ]
  if args.partition:
    directives.append(f'--partition={args.partition}')
  if args.account:
    directives.append(f'--account={args.account}')
  if args.exclusive:
    directives.append('--exclusive')
  directives += args.sbatch_arg
  main = ([args.python, '-m', 'ipsr_jax.main', f'--config={args.config}',
           f'--workdir={args.workdir}'] + list(args.main_args))
  lines = ['#!/bin/bash']
  lines += [f'#SBATCH {shlex.quote(d)}' for d in directives]
  lines += [
      '# Written by launch/slurm_gpu.py.',
      'set -euo pipefail',
      *args.setup,
      *[f'export {k}={shlex.quote(v)}' for k, v in (e.split('=', 1) for e in args.env)],
      'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
      'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
      f':$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_RANGE} ))"',
      'echo "job $SLURM_JOB_ID: $SLURM_NTASKS processes, coordinator $JAX_COORDINATOR_ADDRESS"',
      # The training command travels as arguments of `bash -c`, never re-parsed by a shell.
      'status=0',
      'srun --kill-on-bad-exit=1 bash -c \'export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"\' '
      f'ipsr_task {shlex.join(main)} || status=$?',
      # Preempted (SIGTERM at the time limit or by the scheduler) after saving: run again, resuming.
      f'if [ "$status" -eq {EXIT_PREEMPTED} ]; then',
      '  echo "job $SLURM_JOB_ID stopped at a saved checkpoint: requeued, it resumes there"',
      '  scontrol requeue "$SLURM_JOB_ID"',
      'fi',
      'exit "$status"',
  ]
  return '\n'.join(lines) + '\n'


def script_path(args) -> str:
  return args.script or os.path.join(args.log_dir, f'{args.job_name}.sbatch')


def commands(args) -> list[list[str]]:
  """argv lists run after the script is written: make the log folder, submit."""
  return [['mkdir', '-p', args.log_dir], ['sbatch', script_path(args)]]


def dry_run_text(args) -> str:
  """Exactly what a real run does, as shell: write the script (heredoc), then the commands."""
  script = sbatch_script(args)
  lines = [f'# {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = '
           f'{args.nodes * args.gpus_per_node} GPUs, {args.nodes} JAX process(es)',
           shlex.join(commands(args)[0]),
           f"cat > {shlex.quote(script_path(args))} <<'{HEREDOC_END}'",
           script.rstrip('\n'), HEREDOC_END]
  lines += [shlex.join(c) for c in commands(args)[1:]]
  return '\n'.join(lines) + '\n'


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  main_args = []
  if '--' in argv:
    cut = argv.index('--')
    argv, main_args = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--nodes', type=int, required=True, help='Nodes (one JAX process each).')
  p.add_argument('--gpus_per_node', type=int, default=8)
  p.add_argument('--cpus_per_task', type=int, default=32, help='CPUs per node for input work.')
  p.add_argument('--time', default='24:00:00', help='Wall-clock limit (SLURM format).')
  p.add_argument('--partition', default=None)
  p.add_argument('--account', default=None)
  p.add_argument('--exclusive', action=argparse.BooleanOptionalAction, default=True,
                 help='Whole nodes only (default).')
  p.add_argument('--job_name', default='ipsr')
  p.add_argument('--workdir', required=True, help='Run directory on a shared filesystem or gs://.')
  p.add_argument('--config', default='configs/base.py', help='Config file (+ ":variant").')
  p.add_argument('--repo', default=REPO, help='Checkout the job runs in (shared filesystem).')
  p.add_argument('--python', default='python3', help='Interpreter with ipsr_jax[gpu] installed.')
  p.add_argument('--setup', action='append', default=[], metavar='SHELL_LINE',
                 help='Shell line run before training, e.g. "module load cuda/12.4" (repeatable).')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='Environment variable for the training processes (repeatable).')
  p.add_argument('--sbatch_arg', action='append', default=[], metavar='--OPTION=VALUE',
                 help='Extra #SBATCH directive (repeatable), e.g. --sbatch_arg=--qos=high.')
  p.add_argument('--log_dir', default=None, help='Logs and the script (default: REPO/slurm_logs).')
  p.add_argument('--script', default=None, help='Where to write the sbatch script.')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                 help='Print the commands, run nothing.')
  args = p.parse_args(argv)
  args.main_args = main_args
  args.log_dir = args.log_dir or os.path.join(args.repo, 'slurm_logs')
  if args.nodes < 1 or args.gpus_per_node < 1 or args.cpus_per_task < 1:
    p.error('--nodes, --gpus_per_node and --cpus_per_task must be >= 1')
  for env in args.env:
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', env):
      p.error(f'--env needs KEY=VALUE, got {env!r}')
  if not re.fullmatch(r'[\w.-]+', args.job_name):
    p.error(f'--job_name may hold letters, digits, ".", "_" and "-" only, got {args.job_name!r}')
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  if args.dry_run:
    sys.stdout.write(dry_run_text(args))
    return 0
  subprocess.run(commands(args)[0], check=True)
  with open(script_path(args), 'w', encoding='utf-8') as f:
    f.write(sbatch_script(args))
  print(f'wrote {script_path(args)}')
  for command in commands(args)[1:]:
    print(shlex.join(command), flush=True)
    subprocess.run(command, check=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
