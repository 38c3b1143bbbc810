"""ops/frozen_conv.py and ops/pooling.py: the frozen embedder's faster backward pass is the same
backward pass (values and gradients equal to lax's / flax's bit for bit), and the training step
gets it."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax.training import train
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.ops import frozen_conv
from ipsr_jax.ops import pooling

DN = ('NHWC', 'HWIO', 'NHWC')
# (strides, padding, input shape, kernel shape): FaceNet's kinds (3x3 same, 3x3 stride 2 valid,
# 1x7 / 7x1, 1x1) and an odd one (asymmetric padding, a stride that does not divide the input).
CASES = [((1, 1), ((1, 1), (1, 1)), (2, 9, 9, 5), (3, 3, 5, 7)),
         ((2, 2), ((0, 0), (0, 0)), (2, 10, 9, 5), (3, 3, 5, 7)),
         ((1, 1), ((0, 0), (3, 3)), (2, 9, 9, 5), (1, 7, 5, 4)),
         ((1, 1), ((0, 0), (0, 0)), (2, 4, 4, 6), (1, 1, 6, 3)),
         ((2, 2), ((1, 0), (2, 1)), (2, 11, 12, 3), (4, 3, 3, 6))]


def _lax_conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


@pytest.mark.parametrize('strides,padding,x_shape,k_shape', CASES)
def test_conv_gradients_equal_lax_autodiff(strides, padding, x_shape, k_shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  kt = frozen_conv.input_grad_kernel(k)
  ref = lambda x, k: jnp.sum(jnp.sin(_lax_conv(x, k, strides, padding)))
  new = lambda x, k: jnp.sum(jnp.sin(frozen_conv.conv_with_input_grad_kernel(x, k, kt, strides, padding)))
  np.testing.assert_array_equal(new(x, k), ref(x, k))
  for argnums in ((0,), (1,), (0, 1)):
    for a, b in zip(jax.grad(ref, argnums)(x, k), jax.grad(new, argnums)(x, k)):
      np.testing.assert_array_equal(a, b)


def test_input_gradient_alone_carries_no_weight_gradient():
  """A frozen network's jaxpr has the forward and the input-gradient convolution only (benchmarks
  count its FLOPs), where lax's autodiff of the same has the same two."""
  strides, padding, x_shape, k_shape = CASES[1]
  x, k = jnp.ones(x_shape), jnp.ones(k_shape)
  kt = frozen_conv.input_grad_kernel(k)
  f = lambda x: jnp.sum(frozen_conv.conv_with_input_grad_kernel(x, k, kt, strides, padding))
  assert str(jax.make_jaxpr(jax.grad(f))(x)).count('conv_general_dilated') == 2
  both = lambda x, k: jnp.sum(frozen_conv.conv_with_input_grad_kernel(x, k, kt, strides, padding))
  assert str(jax.make_jaxpr(jax.grad(both, (0, 1)))(x, k)).count('conv_general_dilated') == 3


@pytest.mark.parametrize('use_bias', [False, True])
def test_conv_module_is_nn_conv(use_bias):
  """Same parameter tree and initial values as nn.Conv (checkpoints and converters unchanged), the
  same outputs, with and without the prepared kernel."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 9, 5)), jnp.float32)
  kw = dict(features=7, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=use_bias)
  ours, theirs = frozen_conv.Conv(**kw), nn.Conv(**kw)
  v_ours, v_theirs = ours.init(jax.random.key(3), x), theirs.init(jax.random.key(3), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_theirs)
  if use_bias:
    v_theirs = jax.tree.map(lambda a: a + 0.5, v_theirs)  # a non-zero bias
  np.testing.assert_array_equal(ours.apply(v_theirs, x), theirs.apply(v_theirs, x))
  frozen = frozen_conv.with_input_grad_kernels(v_theirs)
  np.testing.assert_array_equal(ours.apply(frozen, x), theirs.apply(v_theirs, x))
  g = lambda m, v: jax.grad(lambda x: jnp.sum(jnp.square(m.apply(v, x))))(x)
  np.testing.assert_array_equal(g(ours, frozen), g(theirs, v_theirs))


def test_embedder_gradients_unchanged_by_the_prepared_kernels():
  """The training loss's path: unit embeddings of 0..255 faces and their gradient with respect to
  the faces, through a (small) FaceNet, equal with and without `train.frozen_embedder_variables`;
  the prepared kernels are the flipped, transposed kernels, one per convolution."""
  module = inception_resnet_v1.InceptionResnetV1(width=0.25, embedding_size=32)
  variables = inception_resnet_v1.init_variables(module, 0)
  frozen = train.frozen_embedder_variables(variables)
  kernels = {p: a for p, a in jax.tree_util.tree_leaves_with_path(variables['params']) if a.ndim == 4}
  prepared = dict(jax.tree_util.tree_leaves_with_path(frozen[frozen_conv.INPUT_GRAD]))
  assert len(kernels) == len(prepared) == 132
  some = next(iter(kernels))
  np.testing.assert_array_equal(prepared[some], np.swapaxes(np.flip(kernels[some], (0, 1)), 2, 3))
  faces = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (2, 160, 160, 3)), jnp.float32)
  weights = jnp.linspace(-1.0, 1.0, 32)
  loss = lambda v, x: jnp.sum(inception_resnet_v1.embed_images(module, v, x) * weights)
  # Jitted, as the training step is (and one compile each instead of every op compiled on its own).
  value_and_grad = jax.jit(jax.value_and_grad(loss, 1))
  (a, ga), (b, gb) = (value_and_grad(v, faces) for v in (variables, frozen))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ga, gb)
  assert float(jnp.abs(ga).max()) > 0


@pytest.mark.parametrize('shape,window,strides', [((2, 77, 77, 3), (3, 3), (2, 2)),
                                                   ((2, 8, 8, 4), (3, 3), (2, 2)),
                                                   ((1, 7, 9, 2), (2, 3), (1, 2))])
def test_max_pool_equals_flax(shape, window, strides):
  x = jnp.asarray(np.random.default_rng(4).standard_normal(shape), jnp.float32)
  ref = lambda x: nn.max_pool(x, window, strides=strides, padding='VALID')
  ours = lambda x: pooling.max_pool(x, window, strides)
  np.testing.assert_array_equal(ours(x), ref(x))
  w = jnp.asarray(np.random.default_rng(5).standard_normal(ref(x).shape), jnp.float32)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
  np.testing.assert_array_equal(grad(ours), grad(ref))


def test_max_pool_keeps_nans_and_rejects_small_inputs():
  x = jnp.zeros((1, 5, 5, 1)).at[0, 2, 3, 0].set(jnp.nan)
  out = pooling.max_pool(x, (3, 3), (2, 2))
  assert np.isnan(np.asarray(out)).sum() == np.isnan(np.asarray(nn.max_pool(x, (3, 3), (2, 2), 'VALID'))).sum() == 2
  with pytest.raises(ValueError, match='larger than the input'):
    pooling.max_pool(jnp.zeros((1, 2, 2, 1)), (3, 3), (2, 2))
