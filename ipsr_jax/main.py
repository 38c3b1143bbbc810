"""Entry point: parses flags, sets up logging and devices, dispatches on the mode.

  python -m ipsr_jax.main --config=configs/base.py --workdir=runs/ipsr \
      [--config.train.batch_size=8] [--mode=train|eval|pretrain_embedder|demo] [--log_level=info]
  Evaluation: --mode=eval [--checkpoint_step=N | --checkpoint_steps=100,200,400 | --checkpoint_steps=all]

The terminal shows stage headers, progress, metrics and results; WORKDIR/log.txt holds everything,
the libraries' INFO logs included (`ipsr_jax.runtime.console`). The workdir is claimed first
(`ipsr_jax.runtime.workdir`): a folder holding files but no run, or one another process is writing, is
refused before anything is written. Exit codes: 0 done, 1 an error (one `Error:` line),
75 stopped by SIGTERM or Ctrl-C after saving a checkpoint (run the same command to resume).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ipsr_jax.runtime import paths

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
paths.DEFINE_path('workdir', None, 'Directory for checkpoints, metrics, reports and log.txt (local or gs://).')
flags.DEFINE_string('mode', None, 'train | eval | pretrain_embedder | demo; default: config.mode or train.')
flags.DEFINE_integer('checkpoint_step', None, 'eval: restore this step instead of the newest.')
flags.DEFINE_string('checkpoint_steps', None,
                    "eval: score each of these checkpoints ('100,200,400', or 'all' the run kept) into "
                    "eval/<name>/step_<N>/ and a curve eval/<name>/curve.md; sets every entry's `steps`.")
flags.DEFINE_enum('log_level', 'warning', ['debug', 'info', 'warning', 'error'],
                  "Library logs shown on the terminal (all of INFO always goes to WORKDIR/log.txt).")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors stay instant, and TF never grabs the GPU.
  from ipsr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import console  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import preemption  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  mode = FLAGS.mode or config.get('mode', 'train')
  workdir = FLAGS.workdir
  preemption.interrupt_ends_process()  # training loops save first (ipsr_jax.runtime.preemption)
  # A bad config or a workdir that is not free stops here, before anything is written there.
  try:
    with config.unlocked():
      config.mode = mode
    config_lib.validate(config)
    lock = workdir_lib.claim(workdir) if console.launcher_process_index() == 0 else None
  except (config_lib.ConfigError, workdir_lib.WorkdirError, OSError) as e:
    if FLAGS.log_level in ('debug', 'info'):
      raise
    console.error(e)  # before setup: the one line, no log file in a folder not yet claimed
    sys.exit(1)
  try:
    _run(config, mode, workdir, lock)
  finally:  # every way out but a kill: a lock still naming this process marks a dead one
    if lock is not None:
      lock.release()


def _run(config, mode, workdir, lock):
  """Sets up logging and devices, runs the mode; errors become one line and exit code 1."""
  import jax  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import console  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import preemption  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import sharding  # pylint: disable=g-import-not-at-top

  log_file = console.setup(workdir, FLAGS.log_level)
  if lock is not None and lock.taken_over:
    console.warn(lock.taken_over)
  try:
    paths.resolve_config(config)
    cpu_devices.configure_from(config.mesh)  # before JAX starts its backends
    sharding.initialize_distributed()
    console.set_process_index(jax.process_index())
    _hide_gpus_from_tensorflow()
    logging.info('JAX process %d/%d, local devices: %s; CPU embedder fusion: %s', jax.process_index(),
                 jax.process_count(), jax.local_devices(), cpu_devices.embedder_fusion())
    _dispatch(mode, config, workdir)
  except preemption.Preempted as e:
    console.say(str(e))
    sys.exit(preemption.EXIT_PREEMPTED)
  except Exception as e:  # pylint: disable=broad-except
    if FLAGS.log_level in ('debug', 'info'):
      raise
    console.error(e)
    sys.exit(1)
  console.say(f'Log: {log_file}')


def _dispatch(mode, config, workdir):
  if mode == 'train':
    from ipsr_jax.training import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == 'eval':  # every entry on the run (row 'sr') and the runs each entry's `compare` names
    from ipsr_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    if FLAGS.checkpoint_steps is not None:
      if FLAGS.checkpoint_step is not None:
        raise ValueError('--checkpoint_step and --checkpoint_steps: give one (a step, or the steps of a curve)')
      evaluator.set_steps(config, FLAGS.checkpoint_steps)
    evaluator.score_runs(config, {'sr': [workdir]}, os.path.join(workdir, 'eval', evaluator.NAME),
                         steps={'sr': FLAGS.checkpoint_step}, report_step='sr', entry_runs=True, steps_of='sr')
  elif mode == 'pretrain_embedder':
    from ipsr_jax.training import embedder_train  # pylint: disable=g-import-not-at-top
    embedder_train.train_embedder(config, workdir)
  elif mode == 'demo':
    from ipsr_jax import experiments  # pylint: disable=g-import-not-at-top
    experiments.run_demo(config, workdir)


def _hide_gpus_from_tensorflow() -> None:
  """TF (TFDS, TensorBoard) must not pre-allocate accelerator memory JAX needs."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  except RuntimeError:  # already initialised
    pass


def run():
  from ipsr_jax.runtime import console  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=console.parse_flags)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
