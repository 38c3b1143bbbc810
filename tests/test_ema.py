"""The generator's parameter EMA (config.train.ema_decay): the update, the state and its checkpoints,
exact resume, the readers that pick it (restore_model, SuperResolver, export) and resume checks."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from ipsr_jax import config as config_lib
from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import summaries
from ipsr_jax.serving import inference
from ipsr_jax.training import train
from tests.conftest import REPO

DECAY = 0.15  # min(0.15, (1 + t) / (10 + t)): the warm-up's 0.1 at the first update, 0.15 after
STEPS = 3
PLAIN_FIELDS = ['batch_stats', 'nonfinite_step', 'opt_state', 'params', 'rng', 'step']


def ema_config(decay=DECAY, steps=STEPS):
  """The tiny config, pixel-only (no embedder to compile), a checkpoint after every step."""
  config = base.get_config('tiny')
  config.loss.identity_weight = 0.0
  config.train.num_train_steps = steps
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = steps
  config.train.image_summary_every_steps = 0
  config.train.ema_decay = decay
  return config


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in summaries.read_metrics(str(workdir)) if 'train/loss' in r}


def _restore(workdir, step=None, ema=None):
  restored = checkpointing.Checkpointer(str(workdir), read_only=True).restore_generator(step=step, ema=ema)
  return restored.weights, jax.tree.map(np.asarray, restored.variables)


def _fields(workdir, step):
  return checkpointing.Checkpointer(str(workdir), read_only=True).state_fields(step)


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ema') / 'run'
  config = ema_config()
  initial = jax.device_get(train.Trainer(config, str(workdir)).initial_state())
  state = train.train_and_evaluate(config, str(workdir))
  return workdir, initial, state


@pytest.fixture(scope='module')
def plain_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('plain') / 'run'
  state = train.train_and_evaluate(ema_config(decay=0.0), str(workdir))
  return workdir, state


def test_ema_is_the_formula_by_hand_over_three_steps(ema_run):
  workdir, initial, state = ema_run
  assert isinstance(state, train.EmaTrainState) and int(state.step) == STEPS
  jax.tree.map(np.testing.assert_array_equal, initial.params_ema, initial.params)  # starts at the init
  raw = [jax.device_get(initial.params)] + [_restore(workdir, s, ema=False)[1]['params'] for s in (1, 2, 3)]
  want = jax.tree.map(lambda p: p.astype(np.float64), raw[0])
  for t, decay_t in enumerate((0.1, 0.15, 0.15)):  # min(0.15, 1/10), min(0.15, 2/11), min(0.15, 3/12)
    assert float(train.ema_decay_at(t, DECAY)) == pytest.approx(decay_t)
    want = jax.tree.map(lambda e, p: decay_t * e + (1 - decay_t) * p, want, raw[t + 1])
    weights, got = _restore(workdir, t + 1)
    assert weights == 'ema'
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got['params'], want)
  # The EMA lags: it differs from the parameters by about decay_t of the last update.
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(raw[3]), jax.tree.leaves(raw[2])))
  lag = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got['params']), jax.tree.leaves(raw[3])))
  assert 0.05 * moved < lag < moved
  assert _fields(workdir, STEPS) == sorted(PLAIN_FIELDS + ['params_ema'])


def test_off_leaves_the_state_checkpoints_and_losses_as_before(ema_run, plain_run):
  (ema_dir, _, ema_state), (plain_dir, plain_state) = ema_run, plain_run
  assert type(plain_state) is train.TrainState  # pylint: disable=unidiomatic-typecheck
  assert _fields(plain_dir, STEPS) == PLAIN_FIELDS
  assert json.loads((plain_dir / 'config.json').read_text())['train']['ema_decay'] == 0.0
  # The EMA reads the parameters and never feeds back: same losses, same parameters.
  assert _losses(ema_dir) == _losses(plain_dir) and len(_losses(plain_dir)) == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema_state.params), jax.device_get(plain_state.params))
  weights, variables = _restore(plain_dir)
  assert weights == 'raw'
  jax.tree.map(np.testing.assert_array_equal, variables['params'], jax.device_get(plain_state.params))


def test_resume_with_ema_is_exact(tmp_path, ema_run):
  workdir, _, _ = ema_run
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  for step in (2, 3):
    shutil.rmtree(resumed / 'checkpoints' / str(step))
  state = train.train_and_evaluate(ema_config(), str(resumed))
  assert int(state.step) == STEPS
  for ema in (True, False):
    _, want = _restore(workdir, STEPS, ema=ema)
    _, got = _restore(resumed, STEPS, ema=ema)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_readers_take_the_ema_by_default_and_raw_on_request(ema_run, plain_run):
  workdir, _, state = ema_run
  _, ema = _restore(workdir, ema=True)
  _, raw = _restore(workdir, ema=False)
  jax.tree.map(np.testing.assert_array_equal, ema['params'], jax.device_get(state.params_ema))
  jax.tree.map(np.testing.assert_array_equal, raw['params'], jax.device_get(state.params))
  step, default = checkpointing.Checkpointer(str(workdir), read_only=True).restore_model()
  assert step == STEPS
  jax.tree.map(np.testing.assert_array_equal, default, ema)
  jax.tree.map(np.testing.assert_array_equal, ema['batch_stats'], raw['batch_stats'])  # the run's own
  faces = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3)).astype(np.float32)
  by_default = inference.SuperResolver.from_checkpoint(workdir, buckets=(2,))
  as_raw = inference.SuperResolver.from_checkpoint(workdir, ema=False, buckets=(2,))
  assert (by_default.info['weights'], as_raw.info['weights']) == ('ema', 'raw')
  assert np.max(np.abs(by_default(faces) - as_raw(faces))) > 1e-4  # they are other generators
  from ipsr_jax.serving import onnx_export  # pylint: disable=import-outside-toplevel  (needs onnx)
  for sr, weights in ((by_default, 'ema'), (as_raw, 'raw')):  # an exported file says which
    assert onnx_export.read_metadata(onnx_export.export_super_resolver(sr))['weights'] == weights
  plain_dir, _ = plain_run
  assert inference.SuperResolver.from_checkpoint(plain_dir, buckets=(2,)).info['weights'] == 'raw'
  with pytest.raises(checkpointing.CheckpointError, match=r'holds no parameter EMA .*train\.ema_decay=0'):
    inference.SuperResolver.from_checkpoint(plain_dir, ema=True)


def test_ema_decay_is_locked_on_resume(tmp_path, ema_run, plain_run):
  """A changed decay is refused by config.json's lock; EMA on for checkpoints without one (also
  a config.json from before the key) is refused before Orbax reads anything, nothing changed."""
  workdir, _, _ = ema_run
  saved = json.loads((workdir / 'config.json').read_text())
  with pytest.raises(config_lib.ConfigError, match=r'train\.ema_decay=0\.15 there, 0\.5 now'):
    config_lib.resume_changes(saved, ema_config(decay=0.5), 'train', str(workdir))
  plain = tmp_path / 'plain'
  shutil.copytree(plain_run[0], plain)
  config_json = plain / 'config.json'
  document = json.loads(config_json.read_text())
  del document['train']['ema_decay']  # a run written before the key existed
  config_json.write_text(json.dumps(document))
  before = config_json.read_text()
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.ema_decay=0\.999: the checkpoints in .* hold no '
                     r'parameter EMA .*--config\.train\.ema_decay=0, or .*--config\.train\.init_from='):
    train.train_and_evaluate(ema_config(decay=0.999, steps=STEPS + 1), str(plain))
  assert config_json.read_text() == before and _fields(plain, STEPS) == PLAIN_FIELDS


@pytest.mark.parametrize('value', [1.0, -0.1, 1.5])
def test_ema_decay_must_be_in_zero_one(value):
  config = ema_config(decay=value)
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.ema_decay=.*must be a number in \[0, 1\)'):
    config_lib.validate(config)
  config_lib.validate(ema_config(decay=0.999))


# Two CPU devices, fsdp=2: the EMA is split as the parameters are, and ends where one device's does.
_SHARDED = '''
import sys
import jax, numpy as np
from jax.sharding import PartitionSpec
from tests import test_ema
from ipsr_jax.training import train
config = test_ema.ema_config()
config.mesh.fsdp = 2
state = train.train_and_evaluate(config, sys.argv[1])
assert jax.device_count() == 2
specs = lambda tree: [leaf.sharding.spec for leaf in jax.tree.leaves(tree)]
assert specs(state.params_ema) == specs(state.params)
assert any('fsdp' in spec for spec in specs(state.params_ema))
np.savez(sys.argv[2], *[np.asarray(leaf) for leaf in jax.tree.leaves(state.params_ema)])
'''


def test_fsdp_over_two_devices_gives_the_same_ema_as_one(tmp_path, ema_run):
  out = tmp_path / 'ema.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-c', _SHARDED, str(tmp_path / 'run'), str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  one = jax.tree.leaves(jax.device_get(ema_run[2].params_ema))
  assert len(got.files) == len(one)
  for i, want in enumerate(one):
    np.testing.assert_allclose(got[f'arr_{i}'], want, atol=2e-5)


def test_init_from_an_ema_run_starts_from_its_ema(tmp_path, ema_run):
  """A new run's generator and its EMA both start at the source's EMA parameters."""
  workdir, _, source = ema_run
  config = ema_config(steps=1)
  config.train.learning_rate = 1e-30  # the one step moves the parameters by ~1e-30 at most
  config.train.init_from = str(workdir)
  state = train.train_and_evaluate(config, str(tmp_path / 'tuned'))
  want = jax.device_get(source.params_ema)
  for tree in (state.params, state.params_ema):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-20), jax.device_get(tree), want)


def test_report_says_which_weights_when_an_ema_is_in_play(tmp_path):
  from ipsr_jax.evaluation import report  # pylint: disable=import-outside-toplevel
  from tests import test_report  # pylint: disable=import-outside-toplevel
  fake = test_report._fake_results  # pylint: disable=protected-access
  results = fake('ar', ['11x8'], ['hr', 'bicubic', 'sr', 'pixel_only'])
  report.write_report(tmp_path / 'ema', 'ar', results, None, extra={'weights': {'sr': 'ema', 'pixel_only': 'raw'}})
  md = (tmp_path / 'ema' / 'report.md').read_text()
  assert 'Generator weights: sr: parameter EMA; pixel_only: raw parameters.' in md
  assert json.loads((tmp_path / 'ema' / 'report.json').read_text())['weights'] == {'sr': 'ema', 'pixel_only': 'raw'}
  report.write_report(tmp_path / 'raw', 'ar', results, None, extra={'weights': {'sr': 'raw'}})
  assert 'Generator weights' not in (tmp_path / 'raw' / 'report.md').read_text()  # as before the EMA


def test_evaluations_score_the_ema_and_record_it(tmp_path, ema_run, plain_run, embedder_dir):
  """--mode=eval's path and the periodic evaluator both score the EMA generator and say so."""
  from ipsr_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  workdir, _, state = ema_run
  config = ema_config()
  config.embedder.checkpoint = embedder_dir
  config.evals.synthetic.resolutions = ((8, 6),)
  runs = {'sr': str(workdir), 'plain': str(plain_run[0])}
  restored = evaluator.score_runs(config, runs, str(tmp_path / 'restored'), show=None)['synthetic']
  doc = json.loads((tmp_path / 'restored' / 'report.json').read_text())
  assert doc['weights'] == {'sr': 'ema', 'plain': 'raw'}
  live = evaluator.make_periodic_evaluator(config, str(tmp_path / 'live'))(STEPS, train.generator_variables(state))
  doc = json.loads((tmp_path / 'live' / 'eval' / 'synthetic' / f'step_{STEPS}' / 'report.json').read_text())
  assert doc['weights'] == {'sr': 'ema'}
  assert live['eval/synthetic/8x6/sr'] == restored['rank1']['8x6']['sr']  # the same generator
