"""An ONNX graph run as a pure JAX function: any face recognizer a user exports, evaluated exactly.

Why: people deploy their own recognizers (ArcFace IResNets, MobileFaceNets, SFace) as ONNX files.
Identity judged with them must run where the project runs (jitted, sharded, differentiable, on
any chip) and compute what onnxruntime computes, so this module reads the file with the `onnx`
package and evaluates its graph with `jax.numpy` and `jax.lax`, node by node in the file's order
(topological, as the ONNX spec requires of every file).

    graph = load_onnx('w600k_r50.onnx')      # OnnxGraphError here for anything not handled
    y = jax.jit(graph.apply)(graph.params, x)  # x as the file takes it (NCHW float32)

What is what:
  * `graph.params`: {tensor name: float32 jnp array}, the weights, a pytree apart from the graph.
    Initializers keep their names; weights the file computes from constants (int8 dequantized by
    DequantizeLinear, float16 cast up, reshaped) are folded at load and named by the tensor the
    folding produced. float16/bfloat16/float64 weights are computed in float32.
  * Integer constants (shapes, axes, indices) stay numpy, in the graph: the ops that need them
    as Python ints (Reshape, Slice, Squeeze...) read them at trace time.
  * Shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as exporters write
    `x.view(x.size(0), -1)`) runs in numpy at trace time: shapes are static under jit, so it
    costs nothing at run time and never bakes a batch size in; each op below computes with numpy
    when all its inputs are numpy and with jax.numpy otherwise (`_xp`).
  * Every op is one function in `OPS` ({op_type: fn(inputs, attrs, node) -> output(s)}); the
    attributes each op handles, and the values accepted where not all are, are in `ATTRIBUTES`.

Everything is checked at load: the file parses, every node's op is in `OPS` (default domain),
its attributes are handled, every tensor it reads exists; constant subgraphs are folded, then the
graph is traced once on its declared input shape (when it has one) so shape errors surface too.
Problems raise `OnnxGraphError` (a ValueError), one line naming the node (index, name, op) or the
file. Convs, MatMul and Gemm run at HIGHEST precision (no TF32/bf16 passes on GPU/TPU): a judge
must not drift with the chip. Depthwise convs and max pools go through `ops.depthwise` and
`ops.pooling` (XLA:CPU runs grouped convolutions and reduce-windows slowly); the graph stays NCHW
as the file has it, transposed around those two only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipsr_jax.ops.depthwise import depthwise_conv
from ipsr_jax.ops.pooling import max_pool

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_DOMAINS = ('', 'ai.onnx')


class OnnxGraphError(ValueError):
  """The ONNX file cannot be run by this reader; one line naming the node (or the file)."""


@dataclasses.dataclass(frozen=True)
class Node:
  """One node of the graph, its attributes read into Python values (strings decoded)."""
  index: int
  name: str
  op_type: str
  inputs: tuple[str, ...]   # '' for an omitted optional input
  outputs: tuple[str, ...]  # '' for an unrequested optional output
  attrs: Mapping[str, Any]

  @property
  def where(self) -> str:
    return f'node {self.index} {self.name!r} (op {self.op_type})'


# ------------------------------------------------------------------------------- the op set

OPS: dict[str, Callable[..., Any]] = {}
# op -> {attribute: accepted values (a tuple), or ANY}; an attribute not listed is refused.
ATTRIBUTES: dict[str, dict[str, Any]] = {}
ANY = None
AUTO_PADS = ('NOTSET', 'SAME_UPPER', 'SAME_LOWER', 'VALID')
_POOL = dict(auto_pad=AUTO_PADS, kernel_shape=ANY, pads=ANY, strides=ANY, dilations=([1, 1],))


# ---------------------------------------------------------------------------------------------
# Array helpers of the ops below, usable on their own (numpy in, numpy out).

_INTEGER_TYPES = (np.int8, np.uint8, np.int16, np.uint16)


def dequantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, *,
                      axis: int = 1, block_size: int = 0) -> np.ndarray:
  """ONNX DequantizeLinear (opset 21): y = (x - zero_point) * scale in float32.

  Per tensor (scale a scalar or one value), per axis (scale 1-D along `axis`) or blocked
  (`block_size` > 0: scale and zero_point have x's rank, with ceil(x.shape[axis] / block_size)
  entries along `axis`; the last block may be short). The integer difference is exact in
  float32 and the one product is correctly rounded, so this is onnxruntime's result bit for bit.
  """
  x = np.asarray(x)
  scale = np.asarray(scale)
  if x.dtype.type not in _INTEGER_TYPES:
    raise ValueError(f'DequantizeLinear input dtype {x.dtype} is not handled '
                     f'(only {[np.dtype(t).name for t in _INTEGER_TYPES]})')
  if scale.dtype != np.float32:
    raise ValueError(f'DequantizeLinear scale dtype {scale.dtype} is not handled (only float32)')
  if zero_point is None:
    zero_point = np.zeros(scale.shape, x.dtype)
  zero_point = np.asarray(zero_point)
  if zero_point.shape != scale.shape or zero_point.dtype != x.dtype:
    raise ValueError(f'DequantizeLinear zero point {zero_point.dtype}{list(zero_point.shape)} '
                     f'must match the scale\'s shape {list(scale.shape)} and the input\'s dtype '
                     f'{x.dtype}')
  if not -x.ndim <= axis < max(x.ndim, 1):
    raise ValueError(f'DequantizeLinear axis {axis} out of range for rank {x.ndim}')
  axis %= max(x.ndim, 1)
  if block_size < 0:
    raise ValueError(f'DequantizeLinear block_size must be >= 0, got {block_size}')
  if block_size:
    blocks = -(-x.shape[axis] // block_size)
    want = x.shape[:axis] + (blocks,) + x.shape[axis + 1:]
    if scale.shape != want:
      raise ValueError(f'blocked DequantizeLinear of {list(x.shape)} (axis {axis}, block_size '
                       f'{block_size}) needs scales of shape {list(want)}, got {list(scale.shape)}')
    index = np.arange(x.shape[axis]) // block_size  # the block of each element along `axis`
    scale, zero_point = (np.take(a, index, axis=axis) for a in (scale, zero_point))
  elif scale.ndim == 0 or scale.shape == (1,):
    scale, zero_point = scale.reshape(()), zero_point.reshape(())
  elif scale.ndim == 1 and scale.shape[0] == x.shape[axis]:
    shape = [1] * x.ndim
    shape[axis] = -1
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
  else:
    raise ValueError(f'DequantizeLinear of {list(x.shape)} (axis {axis}): scale of shape '
                     f'{list(scale.shape)} is neither per tensor, per axis nor blocked')
  diff = x.astype(np.int32) - zero_point.astype(np.int32)
  return diff.astype(np.float32) * scale


def reshape_array(data: np.ndarray, shape: np.ndarray, allowzero: int = 0) -> np.ndarray:
  """ONNX Reshape: 0 copies the input's dimension (unless allowzero), -1 is inferred."""
  shape = [int(s) for s in np.asarray(shape).reshape(-1)]
  if not allowzero:
    shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
  return data.reshape(shape)


def node_attributes(node) -> dict[str, Any]:
  """A NodeProto's attributes as Python values."""
  import onnx  # pylint: disable=g-import-not-at-top  (optional: only the reader needs it)
  return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def onnx_pads(pads: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """ONNX 2-D conv `pads` [top, left, bottom, right] -> lax's ((top, bottom), (left, right))."""
  top, left, bottom, right = (int(p) for p in pads)
  return ((top, bottom), (left, right))


def op(name: str, **attributes: Any) -> Callable[[Callable], Callable]:
  """Registers fn(inputs, attrs, node) as op `name`, handling `attributes`."""
  def register(fn):
    OPS[name], ATTRIBUTES[name] = fn, attributes
    return fn
  return register


def _xp(*values: Any):
  """numpy when every value is static (constants, shapes: numpy arrays), else jax.numpy."""
  return np if all(v is None or isinstance(v, (np.ndarray, np.generic)) for v in values) else jnp


def _static(value: Any, what: str) -> np.ndarray:
  """A value that must be known at trace time (a shape, axes, indices), as numpy."""
  if not isinstance(value, (np.ndarray, np.generic)):
    raise ValueError(f'{what} must be computable from constants and the input\'s shape, '
                     f'not from the input\'s values')
  return np.asarray(value)


def _ints(value: Any, what: str) -> list[int]:
  return [int(v) for v in _static(value, what).reshape(-1)]


def _matmul(a, b):
  return a @ b if _xp(a, b) is np else jnp.matmul(a, b, precision=HIGHEST)


def _float_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _as_float32(value: np.ndarray) -> np.ndarray:
  """Float tensors of any width are computed in float32."""
  value = np.asarray(value)
  return value.astype(np.float32) if _float_dtype(value.dtype) else value


def _spatial_2d(x, node_kind: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{node_kind} handles 2-D NCHW inputs only, got rank {x.ndim}')


def _pads(attrs: Mapping[str, Any], in_hw: Sequence[int], kernel: Sequence[int],
          strides: Sequence[int], dilations: Sequence[int] = (1, 1)):
  """((top, bottom), (left, right)) from `pads` or `auto_pad` (as onnxruntime computes SAME:
  the dilated kernel covers ceil(in / stride) outputs; SAME_UPPER puts the odd pixel last)."""
  mode = attrs.get('auto_pad', 'NOTSET')
  if mode == 'NOTSET':
    return onnx_pads(attrs.get('pads', [0, 0, 0, 0]))
  if mode == 'VALID':
    return ((0, 0), (0, 0))
  pads = []
  for n, k, s, d in zip(in_hw, kernel, strides, dilations):
    total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
    small = total // 2
    pads.append((small, total - small) if mode == 'SAME_UPPER' else (total - small, small))
  return tuple(pads)


def _nhwc(fn, x, *args):
  """fn of an NHWC helper applied to NCHW x."""
  return jnp.transpose(fn(jnp.transpose(x, (0, 2, 3, 1)), *args), (0, 3, 1, 2))


@op('Conv', auto_pad=AUTO_PADS, dilations=ANY, group=ANY, kernel_shape=ANY, pads=ANY,
    strides=ANY)
def conv(inputs, attrs, node):
  x, w, b = (list(inputs) + [None])[:3]
  _spatial_2d(x, 'Conv')
  strides, dilations = attrs.get('strides', [1, 1]), attrs.get('dilations', [1, 1])
  group = int(attrs.get('group', 1))
  kernel = w.shape[2:]
  if list(attrs.get('kernel_shape', kernel)) != list(kernel):
    raise ValueError(f'kernel_shape {attrs["kernel_shape"]} != the weight\'s {list(kernel)}')
  pads = _pads(attrs, x.shape[2:], kernel, strides, dilations)
  channels = x.shape[1]
  if (group == channels == w.shape[0] and w.shape[1] == 1 and list(dilations) == [1, 1]
      and strides[0] == strides[1]):
    # Depthwise: OIHW [C, 1, kh, kw] -> [kh, kw, 1, C], the layout depthwise_conv takes.
    y = _nhwc(depthwise_conv, x, jnp.transpose(w, (2, 3, 1, 0)), int(strides[0]), pads)
  elif (group == 1 and tuple(kernel) == (1, 1) and list(strides) == [1, 1]
        and pads == ((0, 0), (0, 0))):
    # A 1x1 conv is a matrix product over channels: [O, C] @ [N, C, H*W], no layout change.
    n, c, h, wd = x.shape
    y = jnp.einsum('oc,ncp->nop', w[:, :, 0, 0], jnp.reshape(x, (n, c, h * wd)),
                   precision=HIGHEST).reshape(n, -1, h, wd)
  else:
    y = jax.lax.conv_general_dilated(
        x, w, tuple(strides), pads, rhs_dilation=tuple(dilations),
        dimension_numbers=('NCHW', 'OIHW', 'NCHW'), feature_group_count=group, precision=HIGHEST)
  return y if b is None else y + jnp.reshape(b, (1, -1, 1, 1))


@op('ConvTranspose', auto_pad=('NOTSET', 'VALID'), dilations=ANY, group=ANY, kernel_shape=ANY,
    output_padding=ANY, pads=ANY, strides=ANY)
def conv_transpose(inputs, attrs, node):
  x, w, b = (list(inputs) + [None])[:3]
  _spatial_2d(x, 'ConvTranspose')
  strides, dilations = attrs.get('strides', [1, 1]), attrs.get('dilations', [1, 1])
  extra = attrs.get('output_padding', [0, 0])
  group = int(attrs.get('group', 1))
  c_in, c_out_g, kh, kw = w.shape
  # The gradient of a strided conv: dilate the input by the strides, convolve with the flipped
  # kernel, I/O swapped per group ([C_in, C_out/g, k] -> [C_out, C_in/g, k]).
  w = jnp.reshape(w, (group, c_in // group, c_out_g, kh, kw))
  w = jnp.reshape(jnp.swapaxes(w, 1, 2), (group * c_out_g, c_in // group, kh, kw))[:, :, ::-1, ::-1]
  pads = _pads(attrs, x.shape[2:], (kh, kw), strides, dilations)
  padding = [((k - 1) * d - lo, (k - 1) * d - hi + e)
             for (lo, hi), k, d, e in zip(pads, (kh, kw), dilations, extra)]
  y = jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, lhs_dilation=tuple(strides), rhs_dilation=tuple(dilations),
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'), feature_group_count=group, precision=HIGHEST)
  return y if b is None else y + jnp.reshape(b, (1, -1, 1, 1))


@op('BatchNormalization', epsilon=ANY, momentum=ANY, training_mode=(0,), spatial=(1,),
    is_test=ANY, consumed_inputs=ANY)
def batch_norm(inputs, attrs, node):
  if len([o for o in node.outputs if o]) != 1:
    raise ValueError('training outputs (running mean, var) are not supported: inference only')
  x, scale, bias, mean, var = inputs
  xp = _xp(*inputs)
  shape = (1, -1) + (1,) * (x.ndim - 2)  # per channel, axis 1
  eps = np.float32(attrs.get('epsilon', 1e-5))
  inv = xp.reshape(scale / xp.sqrt(var + eps), shape)
  return (x - xp.reshape(mean, shape)) * inv + xp.reshape(bias, shape)


@op('PRelu')
def prelu(inputs, attrs, node):
  x, slope = inputs  # the slope broadcasts numpy-style ([C, 1, 1] per channel of NCHW)
  return _xp(x, slope).where(x >= 0, x, slope * x)


@op('Relu')
def relu(inputs, attrs, node):
  return _xp(*inputs).maximum(inputs[0], 0)


@op('LeakyRelu', alpha=ANY)
def leaky_relu(inputs, attrs, node):
  x = inputs[0]
  return _xp(x).where(x >= 0, x, np.float32(attrs.get('alpha', 0.01)) * x)


@op('Sigmoid')
def sigmoid(inputs, attrs, node):
  x = inputs[0]
  return 1 / (1 + np.exp(-x)) if _xp(x) is np else jax.nn.sigmoid(x)


@op('Clip', min=ANY, max=ANY)
def clip(inputs, attrs, node):
  # opset >= 11: min, max are (optional) inputs; before: attributes.
  x, lo, hi = (list(inputs) + [None, None])[:3]
  lo = attrs.get('min', lo)
  hi = attrs.get('max', hi)
  xp = _xp(x, lo, hi)
  if lo is not None:
    x = xp.maximum(x, xp.asarray(lo, x.dtype))
  if hi is not None:
    x = xp.minimum(x, xp.asarray(hi, x.dtype))
  return x


def _hard_sigmoid(x, alpha, beta):
  xp = _xp(x)
  return xp.maximum(0, xp.minimum(1, np.float32(alpha) * x + np.float32(beta))).astype(x.dtype)


@op('HardSigmoid', alpha=ANY, beta=ANY)
def hard_sigmoid(inputs, attrs, node):
  return _hard_sigmoid(inputs[0], attrs.get('alpha', 0.2), attrs.get('beta', 0.5))


@op('HardSwish')
def hard_swish(inputs, attrs, node):
  return inputs[0] * _hard_sigmoid(inputs[0], 1 / 6, 0.5)


@op('Add')
def add(inputs, attrs, node):
  return inputs[0] + inputs[1]


@op('Sub')
def sub(inputs, attrs, node):
  return inputs[0] - inputs[1]


@op('Mul')
def mul(inputs, attrs, node):
  return inputs[0] * inputs[1]


@op('Div')
def div(inputs, attrs, node):
  a, b = inputs
  xp = _xp(a, b)
  if _float_dtype(a.dtype):
    return a / b
  return xp.sign(a) * xp.sign(b) * (xp.abs(a) // xp.abs(b))  # integers truncate toward zero


@op('Pow')
def power(inputs, attrs, node):
  a, b = inputs
  return _xp(a, b).power(a, b).astype(a.dtype)


@op('Sqrt')
def sqrt(inputs, attrs, node):
  return _xp(*inputs).sqrt(inputs[0])


@op('MatMul')
def matmul(inputs, attrs, node):
  return _matmul(*inputs)


@op('Gemm', alpha=ANY, beta=ANY, transA=ANY, transB=ANY)
def gemm(inputs, attrs, node):
  a, b, c = (list(inputs) + [None])[:3]
  a = a.T if attrs.get('transA', 0) else a
  b = b.T if attrs.get('transB', 0) else b
  y = _matmul(a, b)
  alpha, beta = (np.float32(attrs.get(k, 1.0)) for k in ('alpha', 'beta'))
  if alpha != 1:
    y = alpha * y
  if c is not None:
    y = y + (c if beta == 1 else beta * c)
  return y


@op('Flatten', axis=ANY)
def flatten(inputs, attrs, node):
  x = inputs[0]
  axis = int(attrs.get('axis', 1))
  axis += x.ndim if axis < 0 else 0
  return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op('Reshape', allowzero=ANY)
def reshape(inputs, attrs, node):
  return reshape_array(inputs[0], _static(inputs[1], 'Reshape\'s shape'), int(attrs.get('allowzero', 0)))


@op('Transpose', perm=ANY)
def transpose(inputs, attrs, node):
  x = inputs[0]
  return _xp(x).transpose(x, attrs.get('perm', list(range(x.ndim))[::-1]))


def _axes(inputs, attrs, what: str) -> list[int] | None:
  """`axes` as an attribute (older opsets) or as the second input (newer); None if absent."""
  if 'axes' in attrs:
    return list(attrs['axes'])
  if len(inputs) > 1 and inputs[1] is not None:
    return _ints(inputs[1], f'{what}\'s axes')
  return None


@op('Squeeze', axes=ANY)
def squeeze(inputs, attrs, node):
  x, axes = inputs[0], _axes(inputs, attrs, 'Squeeze')
  xp = _xp(x)
  return xp.squeeze(x) if axes is None else xp.squeeze(x, tuple(a % x.ndim for a in axes))


@op('Unsqueeze', axes=ANY)
def unsqueeze(inputs, attrs, node):
  x, axes = inputs[0], _axes(inputs, attrs, 'Unsqueeze')
  rank = x.ndim + len(axes)
  return _xp(x).expand_dims(x, tuple(sorted(a % rank for a in axes)))


@op('Concat', axis=ANY)
def concat(inputs, attrs, node):
  return _xp(*inputs).concatenate(inputs, axis=int(attrs['axis']))


def _slice(start: int, end: int, step: int, dim: int) -> slice:
  """ONNX Slice's clamping on one axis, as a Python slice (a clamped end of -1 is 'before 0')."""
  start, end = (v + dim if v < 0 else v for v in (start, end))
  if step > 0:
    start, end = min(max(start, 0), dim), min(max(end, 0), dim)
  else:
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
  return slice(start, None if end < 0 else end, step)


@op('Slice', starts=ANY, ends=ANY, axes=ANY)
def slice_(inputs, attrs, node):
  x = inputs[0]
  if 'starts' in attrs:  # opset < 10: attributes, no steps
    starts, ends, axes, steps = attrs['starts'], attrs['ends'], attrs.get('axes'), None
  else:
    starts, ends, axes, steps = (
        _ints(v, f'Slice\'s {what}') if v is not None else None
        for v, what in zip((list(inputs) + [None] * 4)[1:5], ('starts', 'ends', 'axes', 'steps')))
  axes = axes if axes is not None else range(len(starts))
  steps = steps if steps is not None else [1] * len(starts)
  index = [slice(None)] * x.ndim
  for start, end, axis, step in zip(starts, ends, axes, steps):
    if step == 0:
      raise ValueError('Slice step 0')
    index[axis % x.ndim] = _slice(int(start), int(end), int(step), x.shape[axis % x.ndim])
  return x[tuple(index)]


@op('Split', axis=ANY, split=ANY, num_outputs=ANY)
def split(inputs, attrs, node):
  x, axis = inputs[0], int(attrs.get('axis', 0)) % inputs[0].ndim
  sizes = attrs.get('split')
  if sizes is None and len(inputs) > 1 and inputs[1] is not None:
    sizes = _ints(inputs[1], 'Split\'s sizes')
  if sizes is None:  # equal parts; the last one smaller when the axis does not divide
    n = int(attrs.get('num_outputs', len(node.outputs)))
    part = -(-x.shape[axis] // n)
    sizes = [part] * (n - 1) + [x.shape[axis] - part * (n - 1)]
  if sum(sizes) != x.shape[axis] or len(sizes) != len(node.outputs):
    raise ValueError(f'split sizes {sizes} do not cover axis {axis} ({x.shape[axis]}) with '
                     f'{len(node.outputs)} outputs')
  return tuple(_xp(x).split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis))


@op('Gather', axis=ANY)
def gather(inputs, attrs, node):
  x, indices = inputs
  axis = int(attrs.get('axis', 0)) % x.ndim
  xp = _xp(x, indices)
  indices = _xp(indices).where(indices < 0, indices + x.shape[axis], indices)  # ONNX allows < 0
  return xp.take(x, indices, axis=axis)


@op('GlobalAveragePool')
def global_average_pool(inputs, attrs, node):
  x = inputs[0]
  return _xp(x).mean(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@op('GlobalMaxPool')
def global_max_pool(inputs, attrs, node):
  x = inputs[0]
  return _xp(x).max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


def _pool_geometry(x, attrs, node_kind: str):
  _spatial_2d(x, node_kind)
  kernel = [int(k) for k in attrs['kernel_shape']]
  strides = [int(s) for s in attrs.get('strides', [1, 1])]
  return kernel, strides, _pads(attrs, x.shape[2:], kernel, strides)


@op('MaxPool', ceil_mode=ANY, storage_order=(0,), **_POOL)
def max_pool_(inputs, attrs, node):
  if len([o for o in node.outputs if o]) != 1:
    raise ValueError('the Indices output is not supported')
  x = inputs[0]
  kernel, strides, pads = _pool_geometry(x, attrs, 'MaxPool')
  if attrs.get('ceil_mode', 0):
    # One more window where the last one would start inside the input (or its leading pad):
    # onnxruntime's (and PyTorch's) ceil-mode output size; the window's overhang reads -inf.
    ceil_pads = []
    for n, k, s, (lo, hi) in zip(x.shape[2:], kernel, strides, pads):
      out = -(-(n + lo + hi - k) // s) + 1
      if (out - 1) * s >= n + lo:
        out -= 1
      ceil_pads.append((lo, hi + max((out - 1) * s + k - (n + lo + hi), 0)))
    pads = tuple(ceil_pads)
  x = jnp.pad(x, ((0, 0), (0, 0)) + tuple(pads), constant_values=-jnp.inf)
  return _nhwc(max_pool, x, tuple(kernel), tuple(strides))


@op('AveragePool', ceil_mode=(0,), count_include_pad=(0, 1), **_POOL)
def average_pool(inputs, attrs, node):
  x = inputs[0]
  kernel, strides, pads = _pool_geometry(x, attrs, 'AveragePool')
  window = dict(window_dimensions=(1, 1, *kernel), window_strides=(1, 1, *strides),
                padding=((0, 0), (0, 0)) + tuple(pads))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, **window)
  if attrs.get('count_include_pad', 0):
    return total / math.prod(kernel)
  count = jax.lax.reduce_window(jnp.ones((1, 1, *x.shape[2:]), x.dtype), 0.0, jax.lax.add, **window)
  return total / count


def _reduce(inputs, attrs, what: str, fn):
  x, axes = inputs[0], _axes(inputs, attrs, what)
  if not axes:  # absent or empty: every axis, or none with noop_with_empty_axes
    axes = () if attrs.get('noop_with_empty_axes', 0) else None
  axis = None if axes is None else tuple(a % x.ndim for a in axes)
  return fn(_xp(x), x, axis, bool(attrs.get('keepdims', 1)))


_REDUCE = dict(axes=ANY, keepdims=ANY, noop_with_empty_axes=ANY)


@op('ReduceMean', **_REDUCE)
def reduce_mean(inputs, attrs, node):
  return _reduce(inputs, attrs, 'ReduceMean', lambda xp, x, a, k: xp.mean(x, axis=a, keepdims=k))


@op('ReduceSum', **_REDUCE)
def reduce_sum(inputs, attrs, node):
  return _reduce(inputs, attrs, 'ReduceSum', lambda xp, x, a, k: xp.sum(x, axis=a, keepdims=k))


@op('ReduceL2', **_REDUCE)
def reduce_l2(inputs, attrs, node):
  return _reduce(inputs, attrs, 'ReduceL2',
                 lambda xp, x, a, k: xp.sqrt(xp.sum(x * x, axis=a, keepdims=k)))


@op('LpNormalization', axis=ANY, p=(1, 2))
def lp_normalization(inputs, attrs, node):
  x = inputs[0]
  xp, axis = _xp(x), int(attrs.get('axis', -1))
  if attrs.get('p', 2) == 1:
    return x / xp.sum(xp.abs(x), axis=axis, keepdims=True)
  return x / xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))


@op('DequantizeLinear', axis=ANY, block_size=ANY)
def dequantize(inputs, attrs, node):
  values = [None if v is None else _static(v, 'DequantizeLinear\'s input (a quantized weight)')
            for v in inputs]
  return dequantize_linear(*values, axis=int(attrs.get('axis', 1)),
                           block_size=int(attrs.get('block_size', 0)))


@op('Identity')
def identity(inputs, attrs, node):
  return inputs[0]


@op('Dropout', ratio=ANY, seed=ANY, is_test=ANY)
def dropout(inputs, attrs, node):
  x = inputs[0]
  training = inputs[2] if len(inputs) > 2 else None
  if training is not None and bool(_static(training, 'Dropout\'s training_mode')):
    raise ValueError('training_mode is on: only inference (the identity) is supported')
  if len(node.outputs) > 1 and node.outputs[1]:
    return x, _xp(x).ones(x.shape, bool)  # the mask: every element kept
  return x


@op('Constant', value=ANY, value_float=ANY, value_floats=ANY, value_int=ANY, value_ints=ANY)
def constant(inputs, attrs, node):
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  (key, value), = attrs.items()
  if key == 'value':
    return _as_float32(numpy_helper.to_array(value))
  return np.asarray(value, np.float32 if key.startswith('value_float') else np.int64)


@op('Shape', start=ANY, end=ANY)
def shape(inputs, attrs, node):
  dims = inputs[0].shape
  return np.asarray(dims[attrs.get('start', 0):attrs.get('end', len(dims))], np.int64)


@op('Cast', to=ANY, saturate=ANY)
def cast(inputs, attrs, node):
  import onnx  # pylint: disable=g-import-not-at-top
  x = inputs[0]
  dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(attrs['to'])))
  # A cast to float16 or bfloat16 rounds the values as onnxruntime's does; what follows is
  # computed in float32 (float64 is float32 too).
  if _xp(x) is np:
    return _as_float32(np.asarray(x).astype(dtype))
  x = x.astype(jax.dtypes.canonicalize_dtype(dtype))
  return x.astype(jnp.float32) if _float_dtype(dtype) else x


def supported_ops() -> list[str]:
  return sorted(OPS)


# -------------------------------------------------------------------------------- the graph


def _one_line(e: BaseException) -> str:
  """An exception as one line: its message's first line (with its type, unless a ValueError)."""
  lines = str(e).strip().splitlines()
  first = lines[0] if lines else ''
  return first if isinstance(e, ValueError) and first else f'{type(e).__name__}: {first}'


def _run(node: Node, inputs: list[Any]) -> tuple[Any, ...]:
  """The node's op on its inputs; any failure becomes one OnnxGraphError naming the node."""
  try:
    out = OPS[node.op_type](inputs, node.attrs, node)
  except OnnxGraphError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (re-raised with the node named)
    raise OnnxGraphError(f'{node.where}: {_one_line(e)}') from e
  outs = out if isinstance(out, tuple) else (out,)
  # numpy ops on 0-d arrays give numpy scalars: keep every static value an ndarray.
  return tuple(np.asarray(v) if isinstance(v, np.generic) else v for v in outs)


class OnnxGraph:
  """A loaded ONNX graph: `apply(params, x)` runs it (pure, jit-able, differentiable in x and
  params); `params` are its float weights, `constants` its static integer tensors."""

  def __init__(self, nodes: Sequence[Node], input_name: str, input_dims: Sequence[Any],
               outputs: Sequence[str], constants: Mapping[str, np.ndarray],
               params: Mapping[str, Any], path: str | None = None):
    self.nodes = tuple(nodes)
    self.input_name = input_name
    self.input_dims = tuple(input_dims)  # as the file declares them; None where symbolic
    self.outputs = tuple(outputs)
    self.constants = dict(constants)
    self.params = {k: jnp.asarray(v) for k, v in params.items()}
    self.path = path

  def apply(self, params: Mapping[str, Any], x: jax.Array) -> Any:
    """The graph's output for input x (a tuple when the graph has several outputs)."""
    env: dict[str, Any] = {**self.constants, **params, self.input_name: x}
    for node in self.nodes:
      inputs = [env[name] if name else None for name in node.inputs]
      for name, value in zip(node.outputs, _run(node, inputs)):
        if name:
          env[name] = value
    outs = tuple(env[name] for name in self.outputs)
    return outs[0] if len(outs) == 1 else outs

  def __call__(self, x: jax.Array) -> Any:
    return self.apply(self.params, x)

  def output_shape(self, input_shape: Sequence[int]) -> Any:
    """The output's shape (a tuple of them for several outputs) for an input of `input_shape`,
    traced without computing: OnnxGraphError for a graph that cannot run on it."""
    out = jax.eval_shape(self.apply, self.params, jax.ShapeDtypeStruct(tuple(input_shape),
                                                                       jnp.float32))
    return jax.tree.map(lambda s: tuple(s.shape), out)

  def fingerprint(self) -> str:
    """A short hash of the structure (nodes, attributes, integer constants), not the weights."""
    digest = hashlib.sha256(repr([(n.op_type, n.inputs, n.outputs, sorted(n.attrs.items()))
                                  for n in self.nodes]).encode())
    digest.update(repr((self.input_name, self.outputs)).encode())
    for name in sorted(self.constants):
      value = self.constants[name]
      digest.update(f'{name}:{value.dtype}:{value.shape}'.encode() + value.tobytes())
    return digest.hexdigest()[:16]

  def __repr__(self) -> str:
    return (f'OnnxGraph({self.path or "model"}, {len(self.nodes)} nodes, input '
            f'{self.input_name!r} {list(self.input_dims)}, {len(self.params)} weights)')


def _read_attrs(proto) -> dict[str, Any]:
  decode = lambda v: v.decode() if isinstance(v, bytes) else v
  return {k: [decode(u) for u in v] if isinstance(v, list) else decode(v)
          for k, v in node_attributes(proto).items()}


def _check_node(node: Node, domain: str) -> None:
  if domain not in DEFAULT_DOMAINS or node.op_type not in OPS:
    name = node.op_type if domain in DEFAULT_DOMAINS else f'{domain}.{node.op_type}'
    raise OnnxGraphError(f'node {node.index} {node.name!r} (op {name}): not supported by '
                         f'ipsr_jax\'s ONNX reader (supported: {", ".join(supported_ops())})')
  accepted = ATTRIBUTES[node.op_type]
  for key, value in node.attrs.items():
    if key not in accepted:
      raise OnnxGraphError(f'{node.where}: attribute {key}={value!r} is not supported '
                           f'(supported: {", ".join(sorted(accepted)) or "none"})')
    if accepted[key] is not ANY and value not in accepted[key]:
      raise OnnxGraphError(f'{node.where}: attribute {key}={value!r} is not supported '
                           f'(supported: {", ".join(map(repr, accepted[key]))})')


def _dims(value_info) -> list[Any]:
  return [d.dim_value if d.HasField('dim_value') else None
          for d in value_info.type.tensor_type.shape.dim]


def from_model(model, path: str | None = None) -> OnnxGraph:
  """An OnnxGraph from an onnx ModelProto (external data already loaded); checked as the
  module docstring says."""
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  graph = model.graph
  where = path or f'model {graph.name!r}'
  if not graph.node or not graph.output:
    raise OnnxGraphError(f'{where}: not an ONNX model (no graph nodes or outputs)')
  values = {t.name: _as_float32(numpy_helper.to_array(t)) for t in graph.initializer}
  read = {name for n in graph.node for name in n.input if name}
  # Graph inputs that are initializers hold weights (older exporters list both); unread ones
  # are leftovers. What remains is the image.
  inputs = [i for i in graph.input if i.name not in values and i.name in read]
  if len(inputs) != 1:
    raise OnnxGraphError(f'{where}: the graph reads {len(inputs)} inputs '
                         f'{[i.name for i in inputs]}; the reader runs graphs with one input')
  image = inputs[0]
  defined = set(values) | {image.name}
  nodes = []
  for index, proto in enumerate(graph.node):
    node = Node(index, proto.name, proto.op_type, tuple(proto.input), tuple(proto.output),
                _read_attrs(proto))
    _check_node(node, proto.domain)
    missing = [name for name in node.inputs if name and name not in defined]
    if missing:
      raise OnnxGraphError(f'{node.where}: input {missing[0]!r} is missing (no graph input, '
                           f'initializer or earlier node output has that name)')
    defined.update(name for name in node.outputs if name)
    if all(name in values for name in node.inputs if name):  # constants only: fold now
      outs = _run(node, [values[name] if name else None for name in node.inputs])
      values.update((name, _as_float32(v)) for name, v in zip(node.outputs, outs) if name)
    else:
      nodes.append(node)
  outputs = [o.name for o in graph.output]
  for name in outputs:
    if name not in defined:
      raise OnnxGraphError(f'{where}: graph output {name!r} is not computed by any node')
  used = {name for n in nodes for name in n.inputs if name} | set(outputs)
  params = {k: v for k, v in values.items() if k in used and _float_dtype(v.dtype)}
  constants = {k: v for k, v in values.items() if k in used and k not in params}
  loaded = OnnxGraph(nodes, image.name, _dims(image), outputs, constants, params, path)
  batch, *rest = loaded.input_dims or (None,)
  if rest and all(rest):  # every dim but the batch declared: trace once, shape errors at load
    loaded.output_shape((batch or 1, *rest))
  return loaded


def load_onnx(path: str | os.PathLike) -> OnnxGraph:
  """An OnnxGraph from an .onnx file (external data files are read from the file's folder).

  FileNotFoundError without the file; OnnxGraphError for a file that is not ONNX, is truncated,
  or holds an op, attribute or input the reader does not handle.
  """
  import onnx  # pylint: disable=g-import-not-at-top  (optional: only the reader needs it)
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such ONNX file')
  try:
    model = onnx.load(path, load_external_data=True)
  except Exception as e:  # pylint: disable=broad-except  (protobuf's errors have no common base)
    raise OnnxGraphError(f'{path}: not a readable ONNX file ({_one_line(e)})') from e
  return from_model(model, path)
