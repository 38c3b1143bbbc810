"""The pixel input contract (`ipsr_jax.data.contract`): unit-tested with numpy, then held at the
three API classes (Embedder, SuperResolver, Pipeline) and in the exported models' metadata.

Refused inputs never reach a model (a spy stands in for the device program), so the table of
refusals compiles nothing; the accepted cases share one float32 program per model, plus one
uint8 program for the SuperResolver and the Pipeline.
"""

import json
import re

import ml_dtypes
import numpy as np
import pytest

from benchmarks.onnx_sr import random_variables
from ipsr_jax import api
from ipsr_jax.serving import jax_export as export_lib
from ipsr_jax.data import contract
from ipsr_jax.models import unet as unet_lib
from tests.conftest import EMBEDDER_INPUT

N, SIZE = 4, 16  # a batch of 4 faces at the tiny generator's size (no bicubic before the UNet)
REFUSED_DTYPES = ('bool', 'int8', 'int32', 'int64', 'uint16')
ACCEPTED_DTYPES = ('uint8', 'float16', 'float32', 'float64')
MODELS = ('embedder', 'sr', 'pipeline')


def faces(n=N, size=SIZE, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def with_value(x, value, image, at=(0, 0, 0)):
  """x as float32 with `value` at one pixel of each image in `image`."""
  x = np.array(x, np.float32)
  for i in np.atleast_1d(image):
    x[(i, *at)] = value
  return x


# ------------------------------------------------------------------ the contract, numpy only

@pytest.mark.parametrize('dtype', [*ACCEPTED_DTYPES, ml_dtypes.bfloat16])
def test_accepted_dtypes(dtype):
  x = faces()
  batch, single = contract.as_image_batch(x.astype(dtype))
  assert not single and batch.shape == x.shape
  assert batch.dtype == (np.uint8 if np.dtype(dtype) == np.uint8 else np.float32)
  np.testing.assert_array_equal(batch.astype(np.float32), x.astype(np.float32))  # exact: integers


def test_common_dtypes_are_not_copied():
  """uint8 and float32 0..255 pass as they are: no copy, and uint8 is not even scanned."""
  for x in (faces(), faces().astype(np.float32)):
    assert contract.as_image_batch(x)[0] is x
  single = faces()[0]
  batch, is_single = contract.as_image_batch(single)
  assert is_single and batch.shape == (1, SIZE, SIZE, 3) and np.shares_memory(batch, single)


@pytest.mark.parametrize('dtype,hint', [
    ('bool', 'x.astype(np.uint8) * 255'), ('int8', 'x.astype(np.uint8)'),
    ('int16', 'x.astype(np.uint8)'), ('int32', 'x.astype(np.uint8)'),
    ('int64', 'x.astype(np.uint8)'), ('uint16', '(x >> 8).astype(np.uint8)'),
    ('uint32', 'x.astype(np.uint8)'), ('uint64', 'x.astype(np.uint8)'),
    ('complex64', 'float32 in 0..255'), ('object', 'float32 in 0..255')])
def test_refused_dtypes_name_the_dtype_and_the_fix(dtype, hint):
  with pytest.raises(TypeError) as err:
    contract.as_image_batch(faces().astype(dtype))
  message = str(err.value)
  assert message.startswith(f'images must be uint8 or float in 0..255, got {dtype}: ')
  assert hint in message and '\n' not in message


@pytest.mark.parametrize('shape', [(N, SIZE, SIZE, 1), (N, SIZE, SIZE), (SIZE, SIZE),
                                   (N, SIZE, SIZE, 4), (1, N, SIZE, SIZE, 3), (SIZE, SIZE, 1)])
def test_refused_shapes_name_the_shape(shape):
  # The shape is checked first: a wrong shape of a wrong dtype is still a shape error.
  for dtype in (np.uint8, np.int64):
    with pytest.raises(ValueError,
                       match=re.escape(f'expected [N, H, W, 3] RGB images, got shape {shape}')):
      contract.as_image_batch(np.zeros(shape, dtype))


@pytest.mark.parametrize('value,n,images,single,where', [
    (np.nan, 4, 2, False, 'in image 2 of 4 (0-based batch indices)'),
    (np.inf, 4, [0, 3], False, 'in images 0, 3 of 4 (0-based batch indices)'),
    (-np.inf, 4, 1, False, 'in image 1 of 4 (0-based batch indices)'),
    (np.nan, 9, range(7), False, 'in images 0, 1, 2, 3, 4, ... (7 in all) of 9 (0-based batch '
                                 'indices)'),
    (np.nan, 1, 0, True, 'in the image'),
])
@pytest.mark.parametrize('dtype', ['float16', 'float32', 'float64'])
@pytest.mark.parametrize('input_range', [None, (0, 255), (0, 1)])
def test_non_finite_pixels_name_the_images(value, n, images, single, where, dtype, input_range):
  x = with_value(faces(n), value, images).astype(dtype)
  with pytest.raises(ValueError) as err:
    contract.as_image_batch(x[0] if single else x, input_range=input_range)
  assert str(err.value) == f'non-finite pixels (NaN or inf) {where}'


@pytest.mark.parametrize('scale,offset,looks,fix', [
    (1 / 255, 0.0, '0..1', 'multiply by 255, or pass input_range=(0, 1)'),
    (0.0, 0.0, '0..1', 'multiply by 255, or pass input_range=(0, 1)'),       # all black
    (1 / 127.5, -1.0, '-1..1', 'pass input_range=(-1, 1)'),                   # generator range
])
def test_float_images_that_look_like_another_range_are_refused(scale, offset, looks, fix):
  x = faces().astype(np.float32) * np.float32(scale) + np.float32(offset)
  with pytest.raises(ValueError) as err:
    contract.as_image_batch(x)
  message = str(err.value)
  assert message.startswith(f'float images look like {looks}, not 0..255 (max ')
  assert fix in message and 'input_range=(0, 255)' in message and '\n' not in message


def test_input_range_maps_to_0_255():
  x = faces().astype(np.float32)
  x01 = x / 255
  batch, _ = contract.as_image_batch(x01, input_range=(0, 1))
  assert batch.dtype == np.float32
  np.testing.assert_array_equal(batch, x01 * 255)  # exactly what a caller's x * 255 gives
  batch, _ = contract.as_image_batch(x / 127.5 - 1, input_range=(-1, 1))
  np.testing.assert_allclose(batch, x, atol=1e-4)
  batch, _ = contract.as_image_batch((x / 255).astype(np.float64), input_range=[0.0, 1.0])
  np.testing.assert_allclose(batch, x, atol=1e-4)
  # (0, 255) skips the 0..1 guess: an all-black (or very dark) float batch is 0..255 as it is.
  black = np.zeros((N, SIZE, SIZE, 3), np.float32)
  assert contract.as_image_batch(black, input_range=(0, 255))[0] is black
  dark = np.full((2, 3, 3, 3), 0.5, np.float16)
  np.testing.assert_array_equal(contract.as_image_batch(dark, input_range=(0, 255))[0], 0.5)
  # uint8 is 0..255 by definition: (0, 255) is a no-op, any other range an error.
  x8 = faces()
  assert contract.as_image_batch(x8, input_range=(0, 255))[0] is x8
  with pytest.raises(ValueError, match=r'input_range=\(0.0, 1.0\) does not apply to uint8 '
                                       r'images, which are 0..255: drop it'):
    contract.as_image_batch(x8, input_range=(0, 1))


@pytest.mark.parametrize('bad', [(1, 0), (1, 1), (0,), (0, 1, 2), (0, np.nan), (-np.inf, 1),
                                 '01', (True, 2), ('0', '1'), 255, {0: 1}])
def test_input_range_must_be_two_ordered_finite_numbers(bad):
  for x in (faces(), faces().astype(np.float32)):
    with pytest.raises(ValueError, match='input_range must be two finite numbers'):
      contract.as_image_batch(x, input_range=bad)


def test_an_empty_batch_passes():
  """N = 0 has no pixels to check; the batcher returns zero rows (tests/test_inference.py)."""
  for dtype in (np.uint8, np.float64):
    batch, single = contract.as_image_batch(np.zeros((0, SIZE, SIZE, 3), dtype))
    assert batch.shape == (0, SIZE, SIZE, 3) and not single
    assert batch.dtype == (np.uint8 if dtype == np.uint8 else np.float32)


def test_the_exported_contract_is_plain_json():
  assert json.loads(json.dumps(contract.INPUT_CONTRACT)) == contract.INPUT_CONTRACT
  assert contract.INPUT_CONTRACT == {'layout': 'NHWC', 'channels': 'RGB',
                                     'dtype': 'uint8 or float32', 'range': [0, 255],
                                     'finite': True}


# ------------------------------------------------------------------------- the API classes

@pytest.fixture(scope='module')
def models(embedder_dir):
  """A random 16 px generator (4 downsamplings, ngf 4) and the tiny random embedder, bucket 4."""
  generator = unet_lib.UNet(ngf=4, num_downs=4)
  sr = api.SuperResolver(generator, random_variables(generator, (1, SIZE, SIZE, 3)),
                         image_size=SIZE, buckets=(N,))
  emb = api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT, buckets=(N,))
  return {'embedder': emb, 'sr': sr, 'pipeline': api.Pipeline(sr, emb, mode='sr')}


@pytest.fixture(scope='module')
def reference(models):
  """Each model's output for `faces()` as float32 0..255 (the contract's plainest input)."""
  return {name: model(faces().astype(np.float32)) for name, model in models.items()}


class _NeverRun:
  """Stands in for a model's device program: a refused call must never get there."""

  def __call__(self, *args, **kwargs):
    raise AssertionError('a refused input reached the model')


REFUSALS = [
    *[(dtype, lambda d=dtype: faces().astype(d), None, TypeError, f'got {dtype}: ')
      for dtype in REFUSED_DTYPES],
    ('0..1', lambda: faces().astype(np.float32) / 255, None, ValueError,
     r'look like 0\.\.1, not 0\.\.255 .*multiply by 255, or pass input_range=\(0, 1\)'),
    ('all_zero', lambda: np.zeros((N, SIZE, SIZE, 3), np.float32), None, ValueError,
     r'look like 0\.\.1, .*input_range=\(0, 255\)'),
    ('nan_in_image_2', lambda: with_value(faces(), np.nan, 2), None, ValueError,
     r'non-finite pixels \(NaN or inf\) in image 2 of 4'),
    ('inf_in_images_0_3', lambda: with_value(faces(), np.inf, [0, 3]), (0, 255), ValueError,
     r'in images 0, 3 of 4'),
    ('nan_single', lambda: with_value(faces(), np.nan, 0)[0], None, ValueError,
     r'non-finite pixels \(NaN or inf\) in the image'),
    ('one_channel', lambda: faces()[..., :1], None, ValueError,
     r'got shape \(4, 16, 16, 1\)'),
    ('no_channels', lambda: faces()[..., 0], None, ValueError, r'got shape \(4, 16, 16\)'),
    ('uint8_with_0_1', faces, (0, 1), ValueError, 'does not apply to uint8'),
    ('reversed_range', lambda: faces().astype(np.float32), (255, 0), ValueError,
     'input_range must be two finite numbers'),
]


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('case,make,input_range,error,match', REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_api_refuses_before_running(models, monkeypatch, name, case, make, input_range, error,
                                    match):
  model = models[name]
  compiled = model.num_compilations
  monkeypatch.setattr(model, '_batcher', _NeverRun())
  with pytest.raises(error, match=match):
    model(make(), input_range=input_range)
  with pytest.raises(error, match=match):  # stream checks each batch the same way
    list(model.stream([make()], input_range=input_range))
  monkeypatch.undo()
  assert model.num_compilations == compiled


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('dtype', ACCEPTED_DTYPES)
def test_api_accepts_uint8_and_floats_alike(models, reference, name, dtype):
  model, want = models[name], reference[name]
  got = model(faces().astype(dtype))
  assert got.shape == want.shape
  if name == 'sr' and dtype == 'uint8':  # uint8 in -> uint8 out, the float output rounded
    assert got.dtype == np.uint8
    assert np.abs(got.astype(np.float32) - want).max() <= 0.5 + 1e-3
  else:
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  if name != 'sr':
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  # The embedder turns uint8 into float32 on the host: every dtype shares its one program. The
  # others compile one float32 program (every float dtype becomes float32) and one uint8 one.
  if name == 'embedder':
    assert model.num_compilations == 1
  else:
    assert model.num_compilations <= 2 and (dtype != 'uint8' or model.num_compilations == 2)


@pytest.mark.parametrize('name', MODELS)
def test_api_input_range_and_single_images(models, reference, name):
  model, want = models[name], reference[name]
  x = faces().astype(np.float32)
  x01 = x / 255
  # 0..1 with input_range=(0, 1) is exactly the caller's x * 255.
  np.testing.assert_array_equal(model(x01, input_range=(0, 1)), model(x01 * 255))
  np.testing.assert_allclose(model(x01, input_range=(0, 1)), want, rtol=0,
                             atol=0.05 if name == 'sr' else 1e-4)  # x / 255 * 255 is not x
  streamed = np.concatenate(list(model.stream([x01[:1], x01[1:]], input_range=(0, 1))))
  np.testing.assert_array_equal(streamed, model(x01, input_range=(0, 1)))
  # One [H, W, 3] image in, one output out.
  np.testing.assert_allclose(model(x[2]), want[2], rtol=0, atol=1e-5)
  # An all-black float batch passes as 0..255 with input_range=(0, 255), as uint8 zeros do.
  black = model(np.zeros((N, SIZE, SIZE, 3), np.float32), input_range=(0, 255))
  assert black.shape == want.shape and np.isfinite(black).all()
  np.testing.assert_allclose(black, model(np.zeros((N, SIZE, SIZE, 3), np.uint8)), rtol=0,
                             atol=1e-5 if name != 'sr' else 0.5 + 1e-3)
  # No NaN in, so no NaN out and unit norm: the silent failure the contract closes.
  if name != 'sr':
    np.testing.assert_allclose(np.linalg.norm(black, axis=-1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------ exported metadata

def test_exported_models_state_the_contract(models, tmp_path):
  sr = models['sr']
  path = tmp_path / 'sr.jaxexport'
  export_lib.save(path, {'sr': export_lib.export_super_resolver(sr, platforms=('cpu',))})
  assert export_lib.read_header(path)['input_contract'] == contract.INPUT_CONTRACT
  export_onnx = pytest.importorskip('ipsr_jax.serving.onnx_export')
  meta = export_onnx.read_metadata(export_onnx.export_super_resolver(sr, input_dtype='uint8'))
  assert meta['input_contract'] == contract.INPUT_CONTRACT and meta['input_dtype'] == 'uint8'
