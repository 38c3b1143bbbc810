"""Training: the identity term's gradient, sharding invariance, multi-process, exact resume, guards."""

import functools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import preemption
from ipsr_jax.training import loop
from ipsr_jax.training import losses
from ipsr_jax.runtime import summaries
from ipsr_jax.training import train
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.models import unet as unet_lib
from tests import test_workdir
from tests.conftest import REPO

EMBEDDER_KWARGS = dict(width=0.125, embedding_size=64)


def make_embedder(directory, seed=0):
  module = inception_resnet_v1.InceptionResnetV1(**EMBEDDER_KWARGS)
  variables = inception_resnet_v1.init_variables(module, seed)
  # Non-trivial BatchNorm statistics, as a trained network has.
  rng = np.random.default_rng(seed)
  stats = variables['batch_stats']
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
      lambda path, a: (rng.uniform(0.5, 1.5, a.shape) if 'var' in jax.tree_util.keystr(path)
                       else rng.normal(0.0, 0.1, a.shape)).astype(a.dtype), stats)
  embedder_store.save_embedder(directory, variables, module_kwargs=EMBEDDER_KWARGS, source='random test init')
  return str(directory)


@pytest.fixture(scope='module')
def embedder_dir(tmp_path_factory):
  return make_embedder(tmp_path_factory.mktemp('embedder') / 'e')


def tiny_config(embedder_dir, **overrides):
  config = base.get_config('tiny')
  config.embedder.checkpoint = embedder_dir
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def test_identity_term_trains_the_generator(tmp_path, embedder_dir):
  """beta = 0: the generator still gets a gradient, and it depends on the embedder's weights."""
  config = tiny_config(embedder_dir)
  config.loss.beta = 0.0
  generator = unet_lib.from_config(config.model)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  hr = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  # The trainer's RBG init key: XLA:CPU compiles a threefry init slowly (train.init_key).
  variables = jax.jit(functools.partial(generator.init, train=False))(train.init_key(2), x)
  module = embedder_store.load_embedder(embedder_dir)[0]

  # One compiled gradient per way of embedding; the embedder's variables are an input, as in the
  # training step, so the two embedders share it.
  @functools.partial(jax.jit, static_argnames='detach_sr')
  def grads_for(evars, detach_sr=False):
    embed = lambda px: inception_resnet_v1.embed_images(module, evars, px, config.embedder.input_size)
    if detach_sr:  # the authors' code: embeddings computed outside the gradient tape
      embed_fn = lambda px: jax.lax.stop_gradient(embed(px))
    else:
      embed_fn = embed

    def loss(params):
      sr = generator.apply({**variables, 'params': params}, x, train=False)
      return losses.ipsr_loss(sr, hr, embed_fn, config.loss)[0]

    return jax.grad(loss)(variables['params'])

  def load(path):
    other, evars, _ = embedder_store.load_embedder(path)
    assert other == module  # same network, other weights
    return evars

  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g))))
  g1 = grads_for(load(embedder_dir))
  assert norm(g1) > 1e-6
  g2 = grads_for(load(make_embedder(tmp_path / 'other', seed=1)))
  diff = jax.tree.map(lambda a, b: a - b, g1, g2)
  assert norm(diff) > 0.05 * norm(g1)
  assert norm(grads_for(load(embedder_dir), detach_sr=True)) == 0.0  # why the authors' loss trained nothing


def _faces_pair():
  sr = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  hr = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  return sr, hr


def test_recognizers_by_name_join_the_identity_term(tmp_path, embedder_dir):
  """loss.recognizers=('facenet', 'sface'): the identity term is the mean of both distances,
  SFace's weights are an input of the jitted step, and the run records what it trained against by
  name; an unknown name and the old extra_recognizers key are errors."""
  from ipsr_jax.evaluation import judge  # pylint: disable=import-outside-toplevel
  if not judge.SFaceJudge.available():
    pytest.skip('SFace (extra: sface) is not installed')
  from ipsr_jax.serving import inference  # pylint: disable=import-outside-toplevel
  config = tiny_config(embedder_dir)
  config.loss.recognizers = ('facenet', 'sface')
  config.train.num_train_steps = 2
  config.train.image_summary_every_steps = 0
  # Either term by hand on the same faces: the step's identity is their mean. One compiled
  # program (the networks' variables its inputs) instead of both networks op by op.
  module, evars, _ = embedder_store.load_embedder(embedder_dir)
  recs = train.loss_recognizers(config)
  sface = recs['sface']

  @jax.jit
  def by_hand(evars, svars, sr, hr):
    embed = train.make_embed_fn(module, evars, config.embedder.input_size, recs, {'sface': svars})
    _, terms = losses.ipsr_loss(sr, hr, embed, config.loss)
    own = losses.ipsr_loss(sr, hr, train.make_embed_fn(module, evars, config.embedder.input_size), config.loss)[1]
    px = lambda x: (x + 1.0) * 127.5
    e_sr, e_hr = sface.embed(svars, px(sr)), sface.embed(svars, px(hr))
    theirs = losses.identity_distance(e_sr, e_hr, config.loss.identity_distance, config.loss.temperature)
    return terms, own, theirs

  terms, own, theirs = by_hand(evars, sface.params, *_faces_pair())
  np.testing.assert_allclose(terms['identity'], (own['identity'] + theirs) / 2, rtol=1e-5)
  np.testing.assert_allclose(terms['cosine_similarity'], own['cosine_similarity'], rtol=1e-6)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert inference.SuperResolver.from_checkpoint(tmp_path / 'run').info['trained_against'] == [
      os.path.basename(embedder_dir), 'sface']
  config.loss.recognizers = ('facenet', 'arcface')
  with pytest.raises(ValueError, match=r"loss.recognizers: unknown recognizers of the loss \['arcface'\]"):
    train.Trainer(config, str(tmp_path / 'bad'))
  config.loss.recognizers = ('facenet',)
  config.loss.extra_recognizers = ('sface',)
  with pytest.raises(ValueError, match=r"extra_recognizers.*loss.recognizers=\('facenet', 'sface'\)"):
    train.Trainer(config, str(tmp_path / 'bad'))


def test_feature_term_alone_trains_and_records_its_recognizer(tmp_path, embedder_dir):
  """loss.feature_weight with identity_weight=0: the step's feature term equals the distance of
  the embedder's named layers computed by hand, its gradient reaches the generator, the run trains,
  and it records the embedder as a recognizer it trained against; bad layer names are errors."""
  from ipsr_jax.serving import inference  # pylint: disable=import-outside-toplevel
  config = tiny_config(embedder_dir, **{'loss.identity_weight': 0.0, 'loss.feature_weight': 0.5,
                                        'loss.feature_layers': ('conv2d_2b', 'repeat_1_4')})
  config.train.num_train_steps = 2
  config.train.image_summary_every_steps = 0
  module, evars, _ = embedder_store.load_embedder(embedder_dir)
  layers = config.loss.feature_layers
  embed_fn = lambda evars: train.make_embed_fn(module, evars, config.embedder.input_size, feature_layers=layers)

  feature_only = config.loss.copy_and_resolve_references()
  feature_only.beta = 0.0  # no pixel term: the feature term's gradient alone

  # The checks by hand, in one compiled program (the embedder's variables an input) instead of
  # both networks run op by op.
  @jax.jit
  def by_hand(evars, sr, hr):
    total, terms = losses.ipsr_loss(sr, hr, embed_fn(evars), config.loss)
    px = lambda x: (x + 1.0) * 127.5
    feats = lambda x: inception_resnet_v1.embed_with_features(module, evars, px(x), layers,
                                                              config.embedder.input_size)[1]
    grad = jax.grad(lambda s: losses.ipsr_loss(s, hr, embed_fn(evars), feature_only)[0])(sr)
    return total, terms, losses.feature_distance(feats(sr), feats(hr)), grad

  total, terms, distance, grad = by_hand(evars, *_faces_pair())
  np.testing.assert_allclose(terms['features'], distance, rtol=1e-5)
  np.testing.assert_allclose(total, 5.0 * terms['pixel_mse'] + 0.5 * distance, rtol=1e-5)
  assert 'identity' not in terms
  assert float(jnp.abs(grad).sum()) > 1e-3
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert inference.SuperResolver.from_checkpoint(tmp_path / 'run').info['trained_against'] == [
      os.path.basename(embedder_dir)]
  for bad in (('conv2d',), (), ('conv2d_2b', 'conv2d_2b')):
    config.loss.feature_layers = bad
    with pytest.raises(ValueError, match='feature_layers'):
      train.Trainer(config, str(tmp_path / 'bad'))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train_cmd(workdir, embedder_dir, *extra):
  return [sys.executable, '-m', 'ipsr_jax.main', '--config=configs/base.py:tiny', f'--workdir={workdir}',
          f'--config.embedder.checkpoint={embedder_dir}', *extra]


# For the checks of the loop through `ipsr_jax.main` that hold whatever the loss (signals, finite
# losses): no identity term, whose embedder would only lengthen the compile.
PIXEL_ONLY = '--config.loss.identity_weight=0'

CACHE = pathlib.Path(os.environ.get('TMPDIR', '/tmp')) / f'ipsr-test-jax-cache-{os.getuid()}'


def _env(devices=1, **extra):
  # The runs share compiled programs through JAX's persistent cache: same program, no recompile.
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_COMPILATION_CACHE_DIR=str(CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', **extra)


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in summaries.read_metrics(str(workdir)) if 'train/loss' in r}


def _final_params(workdir):
  step, variables = checkpointing.Checkpointer(str(workdir), read_only=True).restore_model()
  return step, jax.tree.map(np.asarray, variables)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, embedder_dir):
  """6 steps on one CPU device, checkpoints at 3 and 6: the reference run."""
  workdir = tmp_path_factory.mktemp('straight')
  proc = subprocess.run(_train_cmd(workdir, embedder_dir), cwd=REPO, env=_env(1), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (workdir / 'terminal.txt').write_text(proc.stdout + proc.stderr)
  return workdir


def test_terminal_shows_progress_metrics_and_checkpoints_only(straight_run):
  terminal = (straight_run / 'terminal.txt').read_text().splitlines()
  # One line per logged step (log_every_steps=1 in :tiny), checkpoints at 3 and 6 on those lines.
  steps = [l for l in terminal if re.match(r'step \d+/6: loss ', l)]
  assert len(steps) == 6, terminal
  # The async save at 3 is 'started'; the last one is confirmed on disk before it says 'saved'.
  assert [l for l in steps if 'checkpoint' in l] == [steps[2], steps[5]]
  assert 'checkpoint started' in steps[2] and 'checkpoint saved' in steps[5]
  assert 'done in' in steps[-1]
  assert not [l for l in terminal if re.match(r'[IW]\d{4} ', l)], terminal  # no library logs
  assert len(terminal) <= 12, terminal
  log = (straight_run / 'log.txt').read_text()
  assert 'Saving checkpoint at step 6' in log and steps[-1] in log


def test_run_writes_metrics_events_images_config(straight_run):
  losses_by_step = _losses(straight_run)
  assert sorted(losses_by_step) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v) for v in losses_by_step.values())
  config = json.loads((straight_run / 'config.json').read_text())
  assert config['loss']['beta'] == 5.0 and config['model']['ngf'] == 4
  assert list((straight_run / 'images').glob('step_*.png'))
  if summaries.HAS_TENSORBOARD:
    assert list((straight_run / 'tensorboard').glob('events.out.tfevents.*'))
  assert _final_params(straight_run)[0] == 6


def test_eight_devices_match_one(tmp_path, straight_run, embedder_dir):
  # A 4 (data) x 2 (fsdp) mesh: the batch over all 8 devices, large parameters split in two.
  subprocess.run(_train_cmd(tmp_path, embedder_dir, '--config.mesh.fsdp=2'), cwd=REPO, env=_env(8), check=True,
                 timeout=600)
  one, eight = _losses(straight_run), _losses(tmp_path)
  np.testing.assert_allclose([eight[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-4)
  _, p1 = _final_params(straight_run)
  _, p8 = _final_params(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p1, p8)


def test_cpu_device_count_from_config_and_resume_across_it(tmp_path, straight_run, embedder_dir):
  """config.mesh.cpu_devices without an XLA flag sets the count; a one-device run resumes on four
  devices (the count may change on resume, and is recorded) with the same losses. (1 vs 8 devices
  from the start: test_eight_devices_match_one.)"""
  want = _losses(straight_run)
  env = {k: v for k, v in _env(1).items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'IPSR_CPU_DEVICES')}
  resumed = tmp_path / 'resumed'
  shutil.copytree(straight_run, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  proc = subprocess.run(_train_cmd(resumed, embedder_dir, '--config.mesh.cpu_devices=4'), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'from step 3 on 4 cpu device(s)' in proc.stdout
  assert 'Resuming with changed settings: mesh.cpu_devices "auto" -> "4"' in proc.stdout
  assert json.loads((resumed / 'config.json').read_text())['mesh']['cpu_devices'] == '4'
  got = _losses(resumed)
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-4)


def test_two_processes_match_one(tmp_path, straight_run, embedder_dir):
  port = _free_port()
  procs = [subprocess.Popen(_train_cmd(tmp_path, embedder_dir), cwd=REPO,
                            env=_env(2, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                                     JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  # Library INFO lines go to each process's log file; only process 0 talks to the terminal.
  assert 'process 0 of 2' in (tmp_path / 'log.txt').read_text()
  assert 'process 1 of 2' in (tmp_path / 'log.process1.txt').read_text()
  assert 'step 6/6' in outs[0] and 'step 6/6' not in outs[1]
  one, two = _losses(straight_run), _losses(tmp_path)
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-4)


def test_sigkill_then_resume_is_exact(tmp_path, straight_run, embedder_dir):
  cmd = _train_cmd(tmp_path, embedder_dir)
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  step3 = tmp_path / 'checkpoints' / '3'
  deadline = time.time() + 600
  while not (step3 / '_CHECKPOINT_METADATA').exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # no clean exit: no chance to save anything more
  proc.wait()
  steps = checkpointing.Checkpointer(str(tmp_path), read_only=True).all_steps()
  assert 3 in steps
  if 6 in steps:  # the kill came too late to test anything: drop step 6 and resume from 3
    import shutil
    shutil.rmtree(tmp_path / 'checkpoints' / '6')
  # A write interrupted mid-way (Orbax's temporary folder) must not hide step 3.
  (tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp-1234').mkdir()
  (tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp-1234' / 'garbage').write_text('partial')
  assert checkpointing.Checkpointer(str(tmp_path), read_only=True).latest_step() == 3
  resume = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert resume.returncode == 0, resume.stderr[-3000:]
  # The killed process left its name in the lock: taken over, said once.
  assert f'Warning: taking over the lock of {tmp_path} from process {proc.pid} ' in resume.stderr
  assert resume.stderr.count('taking over the lock') == 1
  # Steps 4-6, logged before the kill and again after the resume, have one record each.
  assert test_workdir.one_record_per_step(tmp_path) == 6
  straight, resumed = _losses(straight_run), _losses(tmp_path)
  np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [straight[s] for s in (4, 5, 6)], rtol=1e-6)
  _, a = _final_params(straight_run)
  _, b = _final_params(tmp_path)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, embedder_dir):
  proc = subprocess.Popen(_train_cmd(tmp_path, embedder_dir, '--config.train.num_train_steps=1000',
                                     '--config.train.checkpoint_every_steps=1000', PIXEL_ONLY),
                          cwd=REPO, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not any(r['step'] >= 2 for r in summaries.read_metrics(str(tmp_path))) and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.EXIT_PREEMPTED, err[-3000:]  # a scheduler requeues on it
  assert 'Warning: SIGTERM received: saving a checkpoint and stopping.' in err
  step = checkpointing.Checkpointer(str(tmp_path), read_only=True).latest_step()
  assert 2 <= step < 1000


def test_init_from_starts_from_another_runs_generator_with_a_fresh_optimiser(tmp_path, run_dir):
  source = run_dir  # 2 steps (tests/conftest.py's make_run), only read here
  _, want = checkpointing.Checkpointer(source, read_only=True).restore_model()
  config = base.get_config('tiny')
  config.loss.identity_weight = 0.0
  config.train.num_train_steps = 1
  config.train.learning_rate = 1e-30  # the one step moves the parameters by ~1e-30 at most
  config.train.image_summary_every_steps = 0
  config.train.init_from = source
  state = train.train_and_evaluate(config, str(tmp_path / 'tuned'))
  assert int(state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-20), jax.device_get(state.params),
               jax.device_get(want['params']))
  counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  assert counts and set(counts) == {1}  # Adam's step count: this run's one step, not the source's 3
  config.model.ngf = 8
  with pytest.raises(ValueError, match=rf'--config.train.init_from={re.escape(source)}: its generator does not '
                     r'fit this config.model \(\d+ arrays differ: '):
    train.train_and_evaluate(config, str(tmp_path / 'wider'))


def test_nonfinite_loss_stops_with_message_and_restorable_checkpoint(tmp_path):
  config = tiny_config('')
  config.loss.identity_weight = 0.0  # the loop's check, whatever the loss: no embedder to compile
  config.train.learning_rate = 1e30  # the first update blows the generator up
  config.train.checkpoint_every_steps = 1
  with pytest.raises(loop.NonFiniteLossError, match=r'Non-finite loss at step \d+: training stopped. The last '
                     r'checkpoint \(step \d+, before that step\) is kept and restorable'):
    train.train_and_evaluate(config, str(tmp_path))
  step, variables = checkpointing.Checkpointer(str(tmp_path), read_only=True).restore_model()
  assert step >= 1
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(variables))


def test_nonfinite_loss_before_any_checkpoint_says_so(tmp_path, embedder_dir):
  proc = subprocess.run(_train_cmd(tmp_path, embedder_dir, '--config.train.learning_rate=1e30', PIXEL_ONLY),
                        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert 'Error: NonFiniteLossError: Non-finite loss at step 2: training stopped. No checkpoint was written ' \
         'before that step' in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'Traceback' in (tmp_path / 'log.txt').read_text()
  assert checkpointing.Checkpointer(str(tmp_path), read_only=True).latest_step() is None


def test_eval_mode_restores_the_checkpoint_and_writes_the_report(straight_run, embedder_dir):
  subprocess.run(_train_cmd(straight_run, embedder_dir, '--mode=eval'), cwd=REPO, env=_env(1), check=True,
                 timeout=600)
  out = straight_run / 'eval' / 'synthetic'
  doc = json.loads((out / 'report.json').read_text())
  assert doc['protocol'] == 'generic' and doc['checkpoint_step'] == 6
  assert set(doc['rank1']) == {'4x4', '8x6'}
  assert {'hr', 'bicubic', 'sr', 'sr_concat'} <= set(doc['rank1']['8x6'])
  assert all(0.0 <= v <= 1.0 for v in doc['rank1']['8x6'].values())
  assert (out / 'report.md').exists() and (out / 'faces.png').exists()
  assert (out / 'cmc_8x6.png').exists() and (out / 'cmc_4x4.png').exists()
