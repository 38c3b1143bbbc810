"""Embedder pretraining: flips, the optional blur round trip, and stopping on a signal then resuming."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import base
from ipsr_jax.data import degrade
from ipsr_jax.models import embedder_store
from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import preemption
from ipsr_jax.runtime import summaries
from ipsr_jax.training import embedder_train
from tests import test_train
from tests.conftest import REPO


def _faces(n=32, size=32):
  return np.random.default_rng(0).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _closest(out, candidates):
  """Per example, the max |diff| to the nearest of `candidates` (each [N, H, W, C])."""
  return np.min([np.abs(out - c).reshape(len(out), -1).max(axis=1) for c in candidates], axis=0)


def test_flip_only_by_default():
  config = base.get_config('tiny')
  assert embedder_train.blur_degrader(config) is None
  hr = _faces()
  out = np.asarray(embedder_train._augment(hr.astype(np.float32), jax.random.key(0), config))
  assert _closest(out, [hr, hr[:, :, ::-1]]).max() == 0
  flipped = np.abs(out - hr).reshape(len(hr), -1).max(axis=1) > 0
  assert 0 < flipped.sum() < len(hr)


def test_blur_round_trip_matches_the_host_degradation():
  config = base.get_config('tiny')
  config.pretrain.blur_probability = 0.5
  config.pretrain.blur_sizes = ((8, 8), (16, 16))
  blur = embedder_train.blur_degrader(config)
  hr = _faces()
  out = np.asarray(embedder_train._augment(hr.astype(np.float32), jax.random.key(0), config, blur))
  views = [hr, hr[:, :, ::-1]]
  blurred = [degrade.degrade(v, s, (32, 32)).astype(np.float32) for v in views for s in ((8, 8), (16, 16))]
  sharp = _closest(out, views) == 0
  soft = _closest(out, blurred) <= 1.0  # device vs host rounding: at most one level
  assert (sharp | soft).all()
  assert 0 < sharp.sum() < len(hr) and 0 < soft.sum()


# :tiny's six steps of a tiny embedder, saved at the last step only (and on a signal).
_OVERRIDES = {'embedder.width': 0.125, 'embedder.embedding_size': 32, 'data.degrade_on_device': True,
              'train.checkpoint_every_steps': 1000}


def _pretrain_cmd(workdir):
  return [sys.executable, '-m', 'ipsr_jax.main', '--config=configs/base.py:tiny', '--mode=pretrain_embedder',
          f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in _OVERRIDES.items())]


def _embedder_rows(workdir):
  return [(r['step'], r['embedder/loss'], r['embedder/accuracy'])
          for r in summaries.read_metrics(str(workdir)) if 'embedder/loss' in r]


def _assert_resumed_to_the_straight_run(straight, stopped):
  assert _embedder_rows(stopped) == _embedder_rows(straight) and len(_embedder_rows(straight)) == 6
  want, got = (embedder_store.load_embedder(embedder_train.export_dir(str(d)))[1] for d in (straight, stopped))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), want, got)


# The three runs of the test below in one process: the trainer as `--mode=pretrain_embedder` calls
# it, the second run sent SIGTERM by the loop's own input as it takes its third batch. The runs
# share their compiled programs through JAX's persistent cache (test_train._env).
_STOP_AND_RESUME = r'''
import json, os, signal, sys
from configs import base
from ipsr_jax.runtime import checkpointing, cpu_devices, preemption
from ipsr_jax.training import embedder_train, loop
straight, stopped, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = base.get_config('tiny')
config.mode = 'pretrain_embedder'
for key, value in overrides.items():
  section, field = key.split('.')
  config[section][field] = value
cpu_devices.configure_from(config.mesh)
embedder_train.train_embedder(config, straight)
prefetch = loop.prefetch
def prefetch_then_sigterm(iterator, mesh):
  for i, item in enumerate(prefetch(iterator, mesh)):
    if i == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    yield item
loop.prefetch = prefetch_then_sigterm
try:
  embedder_train.train_embedder(config, stopped)
  sys.exit('the run did not stop')
except preemption.Preempted as e:
  saved = checkpointing.Checkpointer(stopped, read_only=True).all_steps()
  exported = os.path.exists(embedder_train.export_dir(stopped))
  print(json.dumps(dict(step=e.step, signal=e.signal_name, saved=saved, exported=exported)), flush=True)
loop.prefetch = prefetch
embedder_train.train_embedder(config, stopped)
'''


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resumes_to_the_same_embedder(tmp_path):
  """SIGTERM mid-run saves that step and stops the embedder's trainer (`Preempted`, which
  `ipsr_jax.main` turns into EXIT_PREEMPTED: test_train.py) without writing the embedder; the
  same call resumes there and ends with the metrics and weights of an uninterrupted run. (Slow: three
  embedder trainings. The embedder's trainer runs through loop.run, whose SIGTERM handling
  tests/test_loop.py checks on a toy step, and tests/test_train.py on the generator's trainer.)"""
  straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
  (tmp_path / 'runs.py').write_text(_STOP_AND_RESUME)
  proc = subprocess.run([sys.executable, str(tmp_path / 'runs.py'), str(straight), str(stopped),
                         json.dumps(_OVERRIDES)], cwd=REPO, env=dict(test_train._env(1), PYTHONPATH=str(REPO)),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Warning: SIGTERM received: saving a checkpoint and stopping.' in proc.stderr
  stop = next(json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{'))
  assert stop['signal'] == 'SIGTERM' and 1 <= stop['step'] < 6
  assert stop['saved'] == [stop['step']] and not stop['exported']
  assert f'for 6 steps from step {stop["step"]}.' in proc.stdout
  _assert_resumed_to_the_straight_run(straight, stopped)


@pytest.mark.slow
def test_sigterm_saves_stops_and_resumes_to_the_same_embedder(tmp_path):
  """As the generator's trainer: SIGTERM mid-run saves that step and exits with EXIT_PREEMPTED,
  without writing the embedder; the same command resumes there and ends with the metrics and
  weights of an uninterrupted run. (Three processes of `ipsr_jax.main` and a real signal; the test
  above runs the three in one process.)"""
  straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
  subprocess.run(_pretrain_cmd(straight), cwd=REPO, env=test_train._env(1), check=True, capture_output=True,
                 timeout=600)
  proc = subprocess.Popen(_pretrain_cmd(stopped), cwd=REPO, env=test_train._env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not _embedder_rows(stopped) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
  assert 'Warning: SIGTERM received: saving a checkpoint and stopping.' in err
  step = checkpointing.Checkpointer(str(stopped), read_only=True).latest_step()
  assert 1 <= step < 6
  assert not os.path.exists(embedder_train.export_dir(str(stopped)))
  resume = subprocess.run(_pretrain_cmd(stopped), cwd=REPO, env=test_train._env(1), capture_output=True, text=True,
                          timeout=600)
  assert resume.returncode == 0, resume.stderr[-3000:]
  assert f'for 6 steps from step {step}.' in resume.stdout
  _assert_resumed_to_the_straight_run(straight, stopped)
