"""MTCNN's three cascaded nets (PNet, RNet, ONet) in Flax, loaded from facenet-pytorch's weights.

Layer for layer the nets of `facenet_pytorch/models/mtcnn.py` (themselves Zhang et al.'s Caffe
MTCNN), NHWC instead of NCHW. Two details a port must keep to reproduce the torch outputs:
  * MaxPool2d(ceil_mode=True): the last, partial window counts, so the input is padded at the
    bottom/right with -inf up to the ceil size;
  * before RNet's and ONet's first dense layer torch permutes NCHW -> NWHC and flattens, so the
    flatten order is (W, H, C): we transpose NHWC -> NWHC before flattening.

Weights: the `pnet.pt`, `rnet.pt`, `onet.pt` state dicts that ship inside the facenet-pytorch
wheel (`facenet_pytorch/data/`), read without torch by `ipsr_jax.models.pt_reader`.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Any]
NET_NAMES = ('pnet', 'rnet', 'onet')


class PReLU(nn.Module):
  """Per-channel PReLU (torch's nn.PReLU(C)) over the last axis."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param('negative_slope', nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope * x)


def max_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
  """torch MaxPool2d(window, stride, ceil_mode=True) on NHWC, no padding."""
  pads = []
  for size in x.shape[1:3]:
    out = math.ceil((size - window) / stride) + 1
    if (out - 1) * stride >= size:  # torch drops a window that would start in the padding
      out -= 1
    pads.append((0, max(0, (out - 1) * stride + window - size)))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding='VALID', name=name)


def _flatten_like_torch(x: jax.Array) -> jax.Array:
  # torch: x.permute(0, 3, 2, 1) on NCHW -> (N, W, H, C), then view(N, -1).
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
  """Proposal net, fully convolutional: [N, H, W, 3] in [-1, 1] -> (reg [N, h, w, 4], prob [N, h, w, 2])."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = PReLU(name='prelu1')(_conv(10, 3, 'conv1')(x))
    x = max_pool_ceil(x, 2, 2)
    x = PReLU(name='prelu2')(_conv(16, 3, 'conv2')(x))
    x = PReLU(name='prelu3')(_conv(32, 3, 'conv3')(x))
    prob = jax.nn.softmax(_conv(2, 1, 'conv4_1')(x), axis=-1)
    reg = _conv(4, 1, 'conv4_2')(x)
    return reg, prob


class RNet(nn.Module):
  """Refinement net: [N, 24, 24, 3] -> (reg [N, 4], prob [N, 2])."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = PReLU(name='prelu1')(_conv(28, 3, 'conv1')(x))
    x = max_pool_ceil(x, 3, 2)
    x = PReLU(name='prelu2')(_conv(48, 3, 'conv2')(x))
    x = max_pool_ceil(x, 3, 2)
    x = PReLU(name='prelu3')(_conv(64, 2, 'conv3')(x))
    x = PReLU(name='prelu4')(nn.Dense(128, name='dense4')(_flatten_like_torch(x)))
    prob = jax.nn.softmax(nn.Dense(2, name='dense5_1')(x), axis=-1)
    reg = nn.Dense(4, name='dense5_2')(x)
    return reg, prob


class ONet(nn.Module):
  """Output net: [N, 48, 48, 3] -> (reg [N, 4], landmarks [N, 10] (5 x then 5 y), prob [N, 2])."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = PReLU(name='prelu1')(_conv(32, 3, 'conv1')(x))
    x = max_pool_ceil(x, 3, 2)
    x = PReLU(name='prelu2')(_conv(64, 3, 'conv2')(x))
    x = max_pool_ceil(x, 3, 2)
    x = PReLU(name='prelu3')(_conv(64, 3, 'conv3')(x))
    x = max_pool_ceil(x, 2, 2)
    x = PReLU(name='prelu4')(_conv(128, 2, 'conv4')(x))
    x = PReLU(name='prelu5')(nn.Dense(256, name='dense5')(_flatten_like_torch(x)))
    prob = jax.nn.softmax(nn.Dense(2, name='dense6_1')(x), axis=-1)
    reg = nn.Dense(4, name='dense6_2')(x)
    landmarks = nn.Dense(10, name='dense6_3')(x)
    return reg, landmarks, prob


NETS = {'pnet': PNet, 'rnet': RNet, 'onet': ONet}


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """facenet-pytorch MTCNN state dict -> flax params ({'params': {layer: {...}}}).

  Conv OIHW -> HWIO, Linear [out, in] -> [in, out], PReLU weight -> negative_slope.
  """
  layers: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    layer, kind = key.rsplit('.', 1)
    value = np.asarray(value, np.float32)
    if layer.startswith('prelu'):
      layers.setdefault(layer, {})['negative_slope'] = value
    elif kind == 'weight':
      layers.setdefault(layer, {})['kernel'] = (np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4
                                                else value.T)
    elif kind == 'bias':
      layers.setdefault(layer, {})['bias'] = value
    else:
      raise ValueError(f'unexpected MTCNN state-dict key {key!r}')
  return {'params': {k: {n: jnp.asarray(v) for n, v in d.items()} for k, d in layers.items()}}


def default_weights_dir() -> pathlib.Path:
  """facenet_pytorch/data inside the installed wheel, found without importing the package.

  (Importing facenet_pytorch runs its __init__, which needs torch and torchvision.)
  """
  # PathFinder searches sys.path only: no import, and no trouble with a stub in sys.modules.
  spec = importlib.machinery.PathFinder.find_spec('facenet_pytorch')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'MTCNN weights not found: install facenet-pytorch (pip install --no-deps facenet-pytorch) '
        'or pass the folder holding pnet.pt, rnet.pt and onet.pt (--mtcnn_weights=DIR)')
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'data'


def load_params(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """{'pnet': params, 'rnet': params, 'onet': params} from `<weights_dir>/{pnet,rnet,onet}.pt`."""
  from ipsr_jax.models import pt_reader  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(weights_dir) if weights_dir else default_weights_dir()
  params = {}
  for name in NET_NAMES:
    path = root / f'{name}.pt'
    if not path.is_file():
      raise FileNotFoundError(f'MTCNN weights file {path} is missing')
    params[name] = convert_state_dict(pt_reader.read_state_dict(path))
  return params
