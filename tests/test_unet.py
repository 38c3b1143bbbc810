import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax.models import unet as unet_lib
from configs import base


def _init(model, batch=2, size=128):
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  return x, model.init(jax.random.key(1), x, train=False)


def test_shapes_range_and_paper_widths():
  model = unet_lib.from_config(base.get_config().model)
  params = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 128, 128, 3)), train=False))['params']
  small = unet_lib.UNet(ngf=4)
  x, variables = _init(small, batch=1)
  y = small.apply(variables, x * 50, train=False)  # large inputs: tanh must still bound the output
  assert y.shape == (1, 128, 128, 3) and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y))) <= 1.0
  # Encoder widths ngf*(1,2,4,8,8,8,8); BN on all but the first and innermost blocks.
  assert [params[f'down{i}_conv']['kernel'].shape[-1] for i in range(7)] == [64, 128, 256, 512, 512, 512, 512]
  assert sorted(k for k in params if k.startswith('down') and k.endswith('_bn')) == [f'down{i}_bn' for i in range(1, 6)]
  assert 'bias' in params['down0_conv'] and 'bias' in params['down6_conv'] and 'bias' not in params['down3_conv']
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert 41_000_000 < n < 42_500_000, n


def test_skip_wiring():
  model = unet_lib.UNet(ngf=4)
  x, variables = _init(model)
  params = variables['params']
  widths = unet_lib.encoder_widths(4, 7)
  # Decoder j>0 reads [up_{j-1}, skip from encoder level 6-j]: twice that level's width.
  for j in range(1, 6):
    assert params[f'up{j}_conv']['kernel'].shape[-2] == 2 * widths[6 - j]
  assert params['out_conv']['kernel'].shape[-2] == 2 * widths[0]
  # Each decoder output has the spatial size of the encoder level it is joined to.
  _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
  inter = inter['intermediates']
  for j in range(6):
    up = inter[f'up{j}_conv']['__call__'][0]
    down = inter[f'down{5 - j}_conv']['__call__'][0]
    assert up.shape[1:3] == down.shape[1:3]
  # The first-level skip carries the input's fine detail: removing it changes the output.
  y = model.apply(variables, x, train=False)
  cut = jax.tree.map(lambda a: a, params)
  cut['out_conv']['kernel'] = cut['out_conv']['kernel'].at[:, :, widths[0]:, :].set(0.0)
  y_cut = model.apply({**variables, 'params': cut}, x, train=False)
  assert float(jnp.max(jnp.abs(y - y_cut))) > 1e-3
  # ...and it is the skip half (the concat's second part) that carries it: cutting the decoder half
  # leaves a different output again.
  cut2 = jax.tree.map(lambda a: a, params)
  cut2['out_conv']['kernel'] = cut2['out_conv']['kernel'].at[:, :, :widths[0], :].set(0.0)
  y_cut2 = model.apply({**variables, 'params': cut2}, x, train=False)
  assert float(jnp.max(jnp.abs(y_cut - y_cut2))) > 1e-3


def test_train_vs_inference_only_dropout_and_batchnorm():
  x = jax.random.uniform(jax.random.key(0), (4, 128, 128, 3), minval=-1, maxval=1)
  # No dropout, momentum 0: one train step stores exactly this batch's statistics, after which
  # inference mode reproduces the train-mode output.
  model = unet_lib.UNet(ngf=4, dropout_rate=0.0, bn_momentum=0.0)
  variables = model.init(jax.random.key(1), x, train=False)
  y_train, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  y_eval = model.apply({**variables, **updates}, x, train=False)
  np.testing.assert_allclose(y_train, y_eval, atol=1e-4)
  # With the stats at init (mean 0, var 1) inference differs from train mode.
  assert float(jnp.max(jnp.abs(model.apply(variables, x, train=False) - y_train))) > 1e-2
  # Dropout: train outputs differ by rng, inference is deterministic.
  model = unet_lib.UNet(ngf=4)
  variables = model.init(jax.random.key(1), x, train=False)
  run = lambda k: model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(k)},
                              mutable=['batch_stats'])[0]
  assert float(jnp.max(jnp.abs(run(0) - run(1)))) > 1e-3
  np.testing.assert_array_equal(run(0), run(0))
  np.testing.assert_array_equal(model.apply(variables, x, train=False), model.apply(variables, x, train=False))


def test_bad_size_is_a_clear_error():
  model = unet_lib.UNet(ngf=4)
  with pytest.raises(ValueError, match='divisible by 128'):
    model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)), train=False)


def test_residual_generator_starts_at_its_input():
  model = unet_lib.UNet(ngf=4, num_downs=5, residual=True)
  x, variables = _init(model, size=32)
  x = x * 0.9  # inside the clip of atanh
  zero_out = jax.tree.map(jnp.zeros_like, variables['params']['out_conv'])
  variables = {**variables, 'params': {**variables['params'], 'out_conv': zero_out}}
  np.testing.assert_allclose(model.apply(variables, x, train=False), x, atol=1e-5)
  # Off (the paper's generator), the same zero output layer gives tanh(0) = 0.
  plain = unet_lib.UNet(ngf=4, num_downs=5)
  np.testing.assert_allclose(plain.apply(variables, x, train=False), 0.0, atol=1e-6)
  # The config field reaches the module.
  config = base.get_config().model
  assert unet_lib.from_config(config).residual is False
  config.residual = True
  assert unet_lib.from_config(config).residual is True


@pytest.mark.parametrize('side, cin, cout', [(1, 16, 8), (2, 32, 16), (4, 16, 8), (16, 8, 3)])
def test_strided_convs_equal_lax_values_and_gradients(side, cin, cout):
  """ops.strided_conv (phase form for tiny maps and for the kernel gradient) = lax's convolutions."""
  from ipsr_jax.ops import strided_conv  # pylint: disable=import-outside-toplevel
  dims = strided_conv.DIMENSIONS
  keys = jax.random.split(jax.random.key(side), 4)
  x = jax.random.normal(keys[0], (3, side, side, cin))
  k = 0.1 * jax.random.normal(keys[1], (4, 4, cin, cout))
  dy = jax.random.normal(keys[2], (3, 2 * side, 2 * side, cout))
  cases = [(strided_conv.conv_transpose_4x4_s2, lambda x, k: jax.lax.conv_transpose(
      x, k, (2, 2), 'SAME', dimension_numbers=dims), dy)]
  if side % 2 == 0:  # the encoder's conv: 2x2 -> 1x1 is the dot-product case
    dz = jax.random.normal(keys[3], (3, side // 2, side // 2, cout))
    cases.append((strided_conv.conv_4x4_s2, lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 2), 'SAME', dimension_numbers=dims), dz))
  bias = jax.random.normal(keys[3], (cout,))
  for ours, reference, cotangent in cases:
    got, got_vjp = jax.vjp(ours, x, k, bias)
    want, want_vjp = jax.vjp(lambda x, k, b: reference(x, k) + b, x, k, bias)
    for a, b in zip((got, *got_vjp(cotangent)), (want, *want_vjp(cotangent))):
      assert a.shape == b.shape
      assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max()), (ours.__name__, side)


@pytest.mark.parametrize('side', [2, 8])
def test_strided_convs_in_bfloat16_return_float32_parameter_gradients(side):
  """bf16 input, float32 kernel and bias: the output is bf16, the kernel and bias gradients are
  float32 sums (what the data-parallel all-reduce then carries), and they agree with float32
  autodiff to bf16 input rounding, unlike a bf16 gradient's 8-bit mantissa alone would promise."""
  from ipsr_jax.ops import strided_conv  # pylint: disable=import-outside-toplevel
  dims = strided_conv.DIMENSIONS
  keys = jax.random.split(jax.random.key(side), 4)
  x = jax.random.normal(keys[0], (64, side, side, 32)).astype(jnp.bfloat16)
  k = 0.1 * jax.random.normal(keys[1], (4, 4, 32, 16))
  b = jax.random.normal(keys[2], (16,))
  dy = jax.random.normal(keys[3], (64, 2 * side, 2 * side, 16)).astype(jnp.bfloat16)
  y, vjp = jax.vjp(strided_conv.conv_transpose_4x4_s2, x, k, b)
  dx, dk, db = vjp(dy)
  assert (y.dtype, dx.dtype, dk.dtype, db.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32)
  reference = lambda k, b: jax.lax.conv_transpose(x.astype(jnp.float32), k, (2, 2), 'SAME',
                                                  dimension_numbers=dims) + b
  _, ref_vjp = jax.vjp(reference, k, b)
  want_dk, want_db = ref_vjp(dy.astype(jnp.float32))
  np.testing.assert_allclose(dk, want_dk, rtol=0, atol=1e-4 * float(jnp.abs(want_dk).max()))
  np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-3)


def test_generator_params_are_flax_conv_params():
  """StridedConv keeps nn.Conv / nn.ConvTranspose's names, shapes and initial values."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  x = jnp.ones((1, 4, 4, 6))
  for transpose, flax_cls in ((False, nn.Conv), (True, nn.ConvTranspose)):
    ours = unet_lib.StridedConv(5, transpose=transpose).init(jax.random.key(0), x)
    theirs = flax_cls(5, (4, 4), strides=(2, 2), padding='SAME').init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
