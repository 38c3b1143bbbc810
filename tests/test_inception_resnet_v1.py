"""The Flax Inception-ResNet-v1: architecture facts, width scaling, train mode, heads, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.ops import resize as resize_lib

SMALL = 80  # the smallest convenient input: 80 -> ... -> 8 (mixed_6a's input) -> 3 -> 1


def test_spatial_sizes_and_widths_at_160():
  module = irv1.InceptionResnetV1()
  x = jax.ShapeDtypeStruct((2, 160, 160, 3), jnp.float32)
  variables = irv1.abstract_variables(module)
  _, state = jax.eval_shape(
      lambda v, x: module.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, x)
  inter = state['intermediates']
  shape = lambda name: inter[name]['__call__'][0].shape
  assert shape('conv2d_1a') == (2, 79, 79, 32)
  assert shape('conv2d_2a') == (2, 77, 77, 32)
  assert shape('conv2d_2b') == (2, 77, 77, 64)
  assert shape('conv2d_3b') == (2, 38, 38, 80)  # after the unpadded 3/2 max pool
  assert shape('conv2d_4a') == (2, 36, 36, 192)
  assert shape('conv2d_4b') == (2, 17, 17, 256)
  assert shape('repeat_1_4') == (2, 17, 17, 256)
  assert shape('mixed_6a') == (2, 8, 8, 896)
  assert shape('repeat_2_9') == (2, 8, 8, 896)
  assert shape('mixed_7a') == (2, 3, 3, 1792)
  assert shape('block8') == (2, 3, 3, 1792)
  assert inter['__call__'][0].shape == (2, 512)

  params = variables['params']
  assert 'bias' not in params['conv2d_1a']['conv']  # BasicConv2d: no conv bias
  assert params['repeat_1_0']['conv2d']['bias'].shape == (256,)  # projections have a bias
  assert 'bn' not in params['repeat_1_0']['conv2d']
  assert params['repeat_2_0']['branch1_1']['conv']['kernel'].shape == (1, 7, 128, 128)
  assert params['repeat_3_0']['branch1_2']['conv']['kernel'].shape == (3, 1, 192, 192)
  assert params['last_linear']['kernel'].shape == (1792, 512)
  assert 'bias' not in params['last_linear']
  assert set(variables['batch_stats']['last_bn']) == {'mean', 'var'}
  assert len([k for k in params if k.startswith('repeat_1_')]) == 5
  assert len([k for k in params if k.startswith('repeat_2_')]) == 10
  assert len([k for k in params if k.startswith('repeat_3_')]) == 5
  assert 'logits' not in params


def test_bn_hyperparameters_match_facenet():
  module = irv1.InceptionResnetV1()
  assert module.bn_epsilon == 1e-3 and module.bn_momentum == 0.9 and module.dropout_rate == 0.6


@pytest.fixture(scope='module')
def small():
  module = irv1.InceptionResnetV1(width=0.25, num_classes=5)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, SMALL, SMALL, 3))
  return module, irv1.init_variables(module, 0), x


def test_width_quarter_builds(small):
  module, variables, x = small
  params = variables['params']
  assert params['conv2d_1a']['conv']['kernel'].shape == (3, 3, 3, 8)
  assert params['conv2d_4b']['conv']['kernel'].shape == (3, 3, 48, 64)
  # Residual projections return the block's input width, whatever rounding did upstream.
  assert params['repeat_2_0']['conv2d']['kernel'].shape[-1] == 96 + 64 + 64
  assert params['last_linear']['kernel'].shape == (448, 512)
  assert params['logits']['kernel'].shape == (512, 5)
  n_small = sum(np.size(p) for p in jax.tree.leaves(params))
  assert 1e6 < n_small < 23482624 / 10


def test_init_variables_matches_module_init(small):
  module, variables, _ = small
  abstract = irv1.abstract_variables(module)
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert spec(variables) == spec(abstract)
  kernel = variables['params']['repeat_1_0']['branch2_1']['conv']['kernel']  # (3, 3, 8, 8)
  bound = 1 / np.sqrt(3 * 3 * 8)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.all(variables['params']['repeat_1_0']['conv2d']['bias'] == 0)
  assert np.all(variables['params']['last_bn']['scale'] == 1)
  assert np.all(variables['batch_stats']['last_bn']['var'] == 1)
  assert np.all(variables['batch_stats']['last_bn']['mean'] == 0)
  # flax's own init of one BasicConv2d draws from the same U(+-1/sqrt(fan_in)).
  conv = irv1.BasicConv2d(32, (3, 3))
  flax_vars = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 16)))
  flax_kernel = np.asarray(flax_vars['params']['conv']['kernel'])
  bound = 1 / np.sqrt(3 * 3 * 16)
  assert np.abs(flax_kernel).max() <= bound and np.abs(flax_kernel).max() > 0.95 * bound
  np.testing.assert_allclose(flax_kernel.std(), bound / np.sqrt(3), rtol=0.05)
  again = irv1.init_variables(module, 0)
  np.testing.assert_array_equal(again['params']['logits']['kernel'],
                                variables['params']['logits']['kernel'])


def test_train_mode_updates_batch_stats_and_uses_dropout(small):
  module, variables, x = small

  @jax.jit
  def train_apply(v, x, key):
    return module.apply(v, x, train=True, rngs={'dropout': key},
                        mutable=['batch_stats', 'intermediates'], capture_intermediates=True)

  emb_a, state = train_apply(variables, x, jax.random.PRNGKey(2))
  emb_b, _ = train_apply(variables, x, jax.random.PRNGKey(3))
  emb_a2, _ = train_apply(variables, x, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(emb_a, emb_a2)
  assert np.abs(np.asarray(emb_a - emb_b)).max() > 1e-3  # dropout(0.6) depends on the rng
  np.testing.assert_allclose(np.linalg.norm(emb_a, axis=-1), 1.0, atol=1e-5)

  # torch's momentum 0.1 == flax's 0.9: new running mean = 0.9 * 0 + 0.1 * batch mean.
  conv_out = state['intermediates']['conv2d_1a']['conv']['__call__'][0]
  new_mean = state['batch_stats']['conv2d_1a']['bn']['mean']
  np.testing.assert_allclose(new_mean, 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  new_var = state['batch_stats']['conv2d_1a']['bn']['var']
  np.testing.assert_allclose(new_var, 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         variables['batch_stats'], state['batch_stats'])
  assert all(jax.tree.leaves(changed))  # every BN layer, last_bn included, updated

  with pytest.raises(Exception, match='dropout'):  # traced only: the error comes before compiling
    jax.eval_shape(lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats']),
                   variables, x)


def test_inference_is_deterministic_and_logits_head(small):
  module, variables, x = small

  @jax.jit
  def both(v, x):
    logits = module.apply(v, x, classify=True)
    emb, state = module.apply(v, x, mutable=['intermediates'], capture_intermediates=True)
    return logits, emb, state['intermediates']['last_bn']['__call__'][0]

  logits, emb, last_bn = both(variables, x)
  assert logits.shape == (4, 5)
  assert emb.shape == (4, 512) and emb.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  assert np.abs(np.asarray(emb[0] - emb[1])).max() > 1e-3  # different inputs, different vectors
  head = variables['params']['logits']
  # facenet-pytorch applies `logits` to the un-normalised last_bn output.
  np.testing.assert_allclose(logits, last_bn @ head['kernel'] + head['bias'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(emb, last_bn / np.linalg.norm(last_bn, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='num_classes'):
    irv1.InceptionResnetV1(width=0.25).apply(
        {'params': {}}, x, classify=True)


def test_bfloat16_compute_returns_float32():
  module = irv1.InceptionResnetV1(width=0.25, dtype=jnp.bfloat16)
  variables = irv1.abstract_variables(module)
  x = jax.ShapeDtypeStruct((2, SMALL, SMALL, 3), jnp.float32)
  out = jax.eval_shape(module.apply, variables, x)
  assert out.dtype == jnp.float32 and out.shape == (2, 512)
  assert jax.tree.leaves(variables['params'])[0].dtype == jnp.float32


def test_embed_images_resizes_standardises_and_passes_gradients(small):
  module, variables, _ = small
  images = np.random.default_rng(0).uniform(0, 255, (2, 64, 56, 3)).astype(np.float32)

  @jax.jit
  def run(images):
    emb = irv1.embed_images(module, variables, images, input_size=SMALL)
    manual = module.apply(variables, irv1.standardize(resize_lib.resize(images, (SMALL, SMALL))))
    first = lambda im: irv1.embed_images(module, variables, im, input_size=SMALL)[0].sum()
    grad = jax.grad(first)(images)
    return emb, manual, grad

  emb, manual, grad = run(images)
  np.testing.assert_allclose(emb, manual, atol=1e-6)
  np.testing.assert_allclose(irv1.standardize(np.array([0.0, 127.5, 255.0])),
                             [-127.5 / 128, 0, 127.5 / 128])
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0  # the frozen embedder passes gradient
  assert np.abs(grad[1]).max() == 0  # ...only to the image whose embedding was differentiated


def test_standardization_is_a_property_of_the_module(small):
  """embed_images standardises the module's way: 'per_image' prewhitens each face."""
  module, variables, _ = small
  per_image = module.clone(standardization='per_image')
  assert module.standardization == 'fixed' and per_image != module
  rng = np.random.default_rng(1)
  images = rng.uniform(0, 255, (2, SMALL, SMALL, 3)).astype(np.float32)
  # A brighter, lower-contrast copy of face 0: prewhitening undoes exactly that change.
  images[1] = 0.5 * images[0] + 100.0

  @jax.jit
  def run(images):
    emb = irv1.embed_images(per_image, variables, images, input_size=SMALL)
    manual = module.apply(variables, irv1.standardize(images, 'per_image'))
    fixed = irv1.embed_images(module, variables, images, input_size=SMALL)
    return emb, manual, fixed

  emb, manual, fixed = run(images)
  np.testing.assert_allclose(emb, manual, atol=1e-6)
  assert np.abs(emb[0] - emb[1]).max() < 1e-4      # per image: the same input twice
  assert np.abs(fixed[0] - fixed[1]).max() > 1e-3  # fixed: two different inputs
  with pytest.raises(ValueError, match='standardization'):
    irv1.InceptionResnetV1(standardization='imagenet')


def test_embed_with_features_returns_the_named_layers_of_the_same_pass():
  """The captured activations are the top-level layers' outputs (checked against running the stem
  by hand), the embeddings equal embed_images', and an unknown layer is a clear error."""
  module = irv1.InceptionResnetV1(width=0.125, embedding_size=16)
  variables = irv1.init_variables(module, 0)
  images = jax.random.uniform(jax.random.key(0), (2, 80, 80, 3)) * 255.0
  layers = ('conv2d_2b', 'repeat_1_4', 'mixed_6a')
  emb, feats = irv1.embed_with_features(module, variables, images, layers, 80)
  np.testing.assert_allclose(emb, irv1.embed_images(module, variables, images, 80), atol=1e-6)
  assert list(feats) == list(layers)
  assert [f.shape[1:3] for f in feats.values()] == [(37, 37), (7, 7), (3, 3)]
  # conv2d_2b by hand: the first three BasicConv2d of the stem on the standardised input.
  x = irv1.standardize(images, 'fixed')  # 80 is the input size: no resize
  for name, kwargs in (('conv2d_1a', dict(features=4, kernel_size=(3, 3), strides=2)),
                       ('conv2d_2a', dict(features=4, kernel_size=(3, 3))),
                       ('conv2d_2b', dict(features=8, kernel_size=(3, 3), padding=(1, 1)))):
    sub = {c: variables[c][name] for c in variables}
    x = irv1.BasicConv2d(**kwargs).apply(sub, x)
  np.testing.assert_allclose(feats['conv2d_2b'], x, atol=1e-5)
  with pytest.raises(ValueError, match='unknown embedder layer'):
    irv1.embed_with_features(module, variables, images, ('conv2d',), 80)
