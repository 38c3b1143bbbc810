"""The camera degradation model (data/camera.py): each operator against an independent reference,
the drawn parameters, the seeding, the config, and the evaluation probes made with it."""

import hashlib
import io
import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ipsr_jax import config as config_lib
from ipsr_jax.data import camera
from ipsr_jax.data import degrade
from ipsr_jax.data import pipeline
from ipsr_jax.data.sources.base import Record
from ipsr_jax.evaluation import embedding_cache
from ipsr_jax.evaluation import protocol_steps
from ipsr_jax.evaluation import protocols
from ipsr_jax.evaluation.evaluators import common
from ipsr_jax.ops import resize as resize_lib
from tests import test_protocols

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import base  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(seed=0, hw=(40, 37), channels=3):
  return np.random.default_rng(seed).uniform(0, 255, hw + (channels,))


def _face(seed=0, size=128):
  """A smooth random pattern (a few colours upsampled), uint8 [size, size, 3]."""
  small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def _direct_convolution(image, kernel):
  """sum_d kernel[d] * image[p - d], borders mirrored with the edge repeated: a plain loop."""
  ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
  padded = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode='symmetric')
  h, w = image.shape[:2]
  out = np.zeros_like(image, dtype=np.float64)
  for dy in range(-ph, ph + 1):
    for dx in range(-pw, pw + 1):
      out += kernel[dy + ph, dx + pw] * padded[ph - dy:ph - dy + h, pw - dx:pw - dx + w]
  return out


# ----------------------------------------------------------------------------- blur


@pytest.mark.parametrize('sigma', [0.7, 2.0, 9.0])
def test_isotropic_gaussian_blur_is_scipy_gaussian_filter(sigma):
  image = _image()
  ours = camera.convolve(image, camera.gaussian_kernel(sigma))
  ref = ndimage.gaussian_filter(image, (sigma, sigma, 0), mode='reflect', truncate=3.0)
  np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_anisotropic_gaussian_has_its_covariance_and_convolves_as_scipy():
  sx, sy, angle = 3.0, 1.2, 0.6
  k = camera.gaussian_kernel(sx, sy, angle, truncate=5.0)  # wide, so the sampled moments are close
  r = k.shape[0] // 2
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  cov = np.array([[np.sum(k * x * x), np.sum(k * x * y)], [np.sum(k * x * y), np.sum(k * y * y)]])
  rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  want = rot @ np.diag([sx ** 2, sy ** 2]) @ rot.T
  np.testing.assert_allclose(cov, want, atol=0.02)
  assert k.sum() == pytest.approx(1.0)
  image = _image(1)
  ref = np.stack([ndimage.convolve(image[..., c], k, mode='reflect') for c in range(3)], -1)
  np.testing.assert_allclose(camera.convolve(image, k), ref, atol=1e-9)


def test_defocus_disk_kernel_and_convolution():
  k = camera.defocus_kernel(2.5)
  r = k.shape[0] // 2
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  d = np.hypot(x, y)
  assert k.sum() == pytest.approx(1.0)
  assert np.all(k[d <= 2.0] == k[r, r]) and np.all(k[d >= 3.0] == 0)  # flat inside, nothing outside
  np.testing.assert_allclose(k, k[::-1, ::-1])
  np.testing.assert_allclose(k, k.T)
  image = _image(2)
  np.testing.assert_allclose(camera.convolve(image, k), _direct_convolution(image, k), atol=1e-9)


def test_motion_kernel_is_a_line_of_its_length_and_angle():
  length, angle = 6.0, math.pi / 4
  k = camera.motion_kernel(length, angle)
  r = k.shape[0] // 2
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  along = x * math.cos(angle) + y * math.sin(angle)
  across = -x * math.sin(angle) + y * math.cos(angle)
  assert k.sum() == pytest.approx(1.0)
  assert np.sum(k * across ** 2) < 0.2                        # thin across the motion
  assert np.sqrt(np.sum(k * along ** 2)) == pytest.approx(length / math.sqrt(12), rel=0.2)  # uniform over L
  assert np.all(k[np.abs(across) >= 1.0] == 0) and np.all(k[np.abs(along) > length / 2 + 1] == 0)
  horizontal = camera.motion_kernel(4.0, 0.0)  # along the width: only the middle row
  assert np.count_nonzero(horizontal.sum(axis=1)) == 1
  image = _image(3)
  np.testing.assert_allclose(camera.convolve(image, k), _direct_convolution(image, k), atol=1e-9)


def test_a_kernel_wider_than_the_image_still_convolves():
  image = _image(4, hw=(12, 10))
  k = camera.gaussian_kernel(6.0)  # 37x37 on a 12x10 image
  ref = ndimage.gaussian_filter(image, (6.0, 6.0, 0), mode='reflect', truncate=3.0)
  np.testing.assert_allclose(camera.convolve(image, k), ref, atol=1e-9)


# ----------------------------------------------------------------------------- sampling, JPEG


@pytest.mark.parametrize('kind,pil', [('area', Image.BOX), ('bilinear', Image.BILINEAR)])
@pytest.mark.parametrize('lr_hw', [(16, 14), (7, 6), (32, 32), (20, 17)])
def test_downsampling_is_pil(kind, pil, lr_hw):
  grey = _image(5, hw=(128, 128), channels=1).astype(np.float32)
  ref = np.asarray(Image.fromarray(grey[..., 0], 'F').resize(lr_hw[::-1], pil))
  np.testing.assert_allclose(camera.downsample(grey, lr_hw, kind)[..., 0], ref, atol=1e-3)
  # uint8, one pass (the width): PIL's fixed-point pass rounds half up, the float pass half to
  # even, so they differ by at most a level (two passes can compound to two; the camera's
  # down-sampling is float and unrounded, as checked above).
  face = _face(5)
  ref8 = np.asarray(Image.fromarray(face).resize((lr_hw[1], 128), pil)).astype(int)
  ours8 = resize_lib.resize_np(face, (128, lr_hw[1]), {'area': 'box', 'bilinear': 'bilinear'}[kind]).astype(int)
  assert np.abs(ours8 - ref8).max() <= 1


def test_bicubic_weights_unchanged_by_the_other_filters():
  for n, m in ((128, 7), (16, 128), (128, 160)):
    np.testing.assert_array_equal(resize_lib.resize_weights(n, m), resize_lib.resize_weights(n, m, 'bicubic'))
  with pytest.raises(ValueError, match='unknown resize filter'):
    resize_lib.resize_weights(8, 4, 'lanczos')


def test_upsampling_is_bicubic_resize_bit_for_bit():
  rng = np.random.default_rng(10)
  for lr_hw in ((7, 6), (11, 8), (16, 14), (21, 15), (32, 32), (112, 96), (128, 128)):
    lr = rng.integers(0, 256, (2,) + lr_hw + (3,), dtype=np.uint8)
    got = degrade.upsample_uint8(lr, (128, 128))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, degrade.bicubic_resize(lr, (128, 128)))


@pytest.mark.parametrize('quality', [10, 40, 90])
def test_jpeg_is_pils_encode_decode(quality):
  lr = resize_lib.resize_np(_face(6), (16, 14))
  buffer = io.BytesIO()
  Image.fromarray(lr).save(buffer, format='JPEG', quality=quality)
  want = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))
  got = camera.jpeg(lr.astype(np.float64), quality)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, lr)  # it did compress
  grey = lr[..., :1]
  assert camera.jpeg(grey, quality).shape == (16, 14, 1)


def test_lower_jpeg_quality_loses_more():
  lr = resize_lib.resize_np(_face(7), (32, 32)).astype(np.float64)
  errors = [np.abs(camera.jpeg(lr, q) - lr).mean() for q in (10, 40, 90)]
  assert errors[0] > errors[1] > errors[2] > 0


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_std_colour_and_luma():
  flat = np.full((200, 200, 3), 100.0)
  noisy = camera.gaussian_noise(flat, 8.0, np.random.default_rng(0))
  assert noisy.std() == pytest.approx(8.0, rel=0.02) and noisy.mean() == pytest.approx(100.0, abs=0.1)
  assert abs(np.corrcoef(noisy[..., 0].ravel(), noisy[..., 1].ravel())[0, 1]) < 0.02  # independent
  luma = camera.gaussian_noise(flat, 8.0, np.random.default_rng(0), luma_only=True)
  np.testing.assert_array_equal(luma[..., 0], luma[..., 2])  # one field on every channel
  assert luma.std() == pytest.approx(8.0, rel=0.02)


@pytest.mark.parametrize('level,gain', [(100.0, 1.0), (40.0, 0.25)])
def test_poisson_noise_mean_and_variance(level, gain):
  flat = np.full((200, 200, 3), level)
  noisy = camera.poisson_noise(flat, gain, np.random.default_rng(1))
  assert noisy.mean() == pytest.approx(level, rel=0.01)
  assert noisy.var() == pytest.approx(gain * level, rel=0.03)  # shot noise: variance = gain * mean
  luma = camera.poisson_noise(flat, gain, np.random.default_rng(1), luma_only=True)
  np.testing.assert_allclose(luma[..., 0], luma[..., 1])
  assert luma.var() == pytest.approx(gain * level, rel=0.03)


# ----------------------------------------------------------------------------- drawn parameters, seeding


@pytest.mark.parametrize('name', ['camera_mild', 'camera_hard'])
def test_drawn_parameters_stay_in_their_ranges(name):
  settings = camera.PRESETS[name]
  model = camera.CameraModel.from_config(name, seed=3)
  drawn = [model.params(k) for k in range(1500)]
  seen = {'blur': 0, 'noise': 0, 'jpeg': 0, 'second_pass': 0}
  for p in drawn:
    assert json.loads(json.dumps(p)) == p  # JSON-able, for reports
    assert p['downsample'] in camera.DOWNSAMPLE_KINDS
    for op in seen:
      seen[op] += p[op] is not None
    b = p['blur']
    if b is not None:
      s = settings['blur']
      if b['kind'] in ('gaussian', 'anisotropic'):
        assert s['sigma'][0] <= b['sigma_x'] <= s['sigma'][1] and s['sigma'][0] <= b['sigma_y'] <= s['sigma'][1]
        assert 0 <= b['angle'] <= math.pi
      elif b['kind'] == 'defocus':
        assert s['defocus_radius'][0] <= b['radius'] <= s['defocus_radius'][1]
      else:
        assert s['motion_length'][0] <= b['length'] <= s['motion_length'][1]
    n = p['noise']
    if n is not None:
      if n['kind'] == 'gaussian':
        assert settings['noise']['sigma'][0] <= n['sigma'] <= settings['noise']['sigma'][1]
      else:
        assert settings['noise']['poisson_gain'][0] <= n['gain'] <= settings['noise']['poisson_gain'][1]
    if p['jpeg'] is not None:
      assert settings['jpeg']['quality'][0] <= p['jpeg']['quality'] <= settings['jpeg']['quality'][1]
    if p['second_pass'] is not None:
      assert sorted(p['second_pass']['order']) == sorted(camera.SECOND_PASS_OPS)
  for op in ('blur', 'noise', 'jpeg'):  # each on about as often as its probability
    assert seen[op] / len(drawn) == pytest.approx(settings[op]['probability'], abs=0.04)
  assert seen['second_pass'] / len(drawn) == pytest.approx(settings['second_pass']['probability'], abs=0.04)
  qualities = [p['jpeg']['quality'] for p in drawn if p['jpeg']]
  assert min(qualities) == settings['jpeg']['quality'][0] and max(qualities) == settings['jpeg']['quality'][1]


def test_hard_is_harder_than_mild():
  hr = _face(8)
  errors = {}
  for name in ('camera_mild', 'camera_hard'):
    model = camera.CameraModel.from_config(name)
    errors[name] = np.mean([np.abs(model.degrade(hr, (16, 14), (128, 128), k).astype(float) - hr).mean()
                            for k in range(12)])
  bicubic = np.abs(degrade.degrade(hr, (16, 14)).astype(float) - hr).mean()
  assert errors['camera_hard'] > errors['camera_mild'] > 0.9 * bicubic


def test_same_seed_and_key_same_face_other_key_or_seed_another():
  hr = _face(9)
  a = camera.CameraModel.from_config('camera_hard', seed=5)
  out = a.degrade(hr, (16, 14), (128, 128), key=11)
  assert out.dtype == np.uint8 and out.shape == (128, 128, 3)
  np.testing.assert_array_equal(out, camera.CameraModel.from_config('camera_hard', seed=5).degrade(hr, (16, 14), (128, 128), 11))
  assert not np.array_equal(out, a.degrade(hr, (16, 14), (128, 128), 12))
  assert not np.array_equal(out, camera.CameraModel.from_config('camera_hard', seed=6).degrade(hr, (16, 14), (128, 128), 11))
  # The up-sampling is degrade's: bicubic of the 8-bit LR face.
  lr, up = a.degrade_lr(hr, (16, 14), (128, 128), 11)
  assert lr.shape == (16, 14, 3) and lr.dtype == np.uint8
  np.testing.assert_array_equal(up, degrade.bicubic_resize(lr, (128, 128)))
  np.testing.assert_array_equal(up, out)


_SECOND_PROCESS = """
import hashlib, sys
import numpy as np
from PIL import Image
from ipsr_jax.data import camera
small = np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.uint8)
hr = np.asarray(Image.fromarray(small).resize((128, 128), Image.BICUBIC))
model = camera.CameraModel.from_config('camera_hard', seed=5)
out = np.stack([model.degrade(hr, (16, 14), (128, 128), k) for k in range(6)])
print(hashlib.sha256(out.tobytes()).hexdigest())
"""


def test_a_second_process_makes_the_same_faces():
  model = camera.CameraModel.from_config('camera_hard', seed=5)
  hr = _face(0)
  here = hashlib.sha256(np.stack([model.degrade(hr, (16, 14), (128, 128), k) for k in range(6)]).tobytes()).hexdigest()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  there = subprocess.run([sys.executable, '-c', _SECOND_PROCESS], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
  assert there == here


# ----------------------------------------------------------------------------- the training path


def _batch(n=6, size=32):
  hr = np.stack([_face(s, size) for s in range(n)])
  return {'hr': hr, 'label': np.arange(n), 'sample_index': np.arange(100, 100 + n, dtype=np.int64)}


def test_bicubic_is_exactly_degrade_batch():
  assert camera.CameraModel.from_config('bicubic') is None
  sampler = degrade.LRSampler(((4, 4), (8, 6), (16, 16)), seed=1)
  batch = _batch()
  out = pipeline.DegradeBatch(sampler, 6, camera=camera.CameraModel.from_config('bicubic'))(batch)
  want = degrade.degrade_batch(batch['hr'], sampler.for_batch(batch['sample_index']), sampler.lr_sizes)
  np.testing.assert_array_equal(out['lr'], want)
  np.testing.assert_array_equal(out['lr'], pipeline.DegradeBatch(sampler, 6)(batch)['lr'])


def test_a_camera_batch_is_each_example_through_its_own_key():
  sampler = degrade.LRSampler(((4, 4), (8, 6), (16, 16)), seed=1)
  model = camera.CameraModel.from_config('camera_hard', seed=1)
  batch = _batch()
  out = pipeline.DegradeBatch(sampler, 6, camera=model)(batch)
  for b in range(6):
    lr_hw = sampler.lr_sizes[out['lr_index'][b]]
    np.testing.assert_array_equal(out['lr'][b], model.degrade(batch['hr'][b], lr_hw, (32, 32), 100 + b))
  # Alone or in another batch, an example degrades the same (the key is its sample index).
  half = {k: v[3:] for k, v in batch.items()}
  np.testing.assert_array_equal(pipeline.DegradeBatch(sampler, 6, camera=model)(half)['lr'], out['lr'][3:])
  bicubic = pipeline.DegradeBatch(sampler, 6)(batch)['lr']
  assert not np.array_equal(out['lr'], bicubic)


def test_the_train_dataset_uses_the_configured_camera():
  config = base.get_config('tiny')
  config.data.num_workers = 0
  config.data.read_threads = 0
  config.data.degradation = 'camera_mild'
  first = next(iter(pipeline.make_train_dataset(config, shard_options=_one_shard())))
  model = camera.CameraModel.from_config('camera_mild', seed=config.seed)
  sizes = tuple(tuple(s) for s in config.data.lr_sizes)
  for b in (0, 5):
    np.testing.assert_array_equal(
        first['lr'][b], model.degrade(first['hr'][b], sizes[first['lr_index'][b]], (32, 32), b))


def _one_shard():
  import grain  # pylint: disable=import-outside-toplevel
  return grain.sharding.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)


# ----------------------------------------------------------------------------- config


def _tiny(**data):
  config = base.get_config('tiny')
  for k, v in data.items():
    setattr(config.data, k, v)
  return config


@pytest.mark.parametrize('data,match', [
    (dict(degradation='camera_extreme'), r"config.data.degradation='camera_extreme': must be one of \('bicubic', 'camera_mild', 'camera_hard'\)"),
    (dict(degradation=dict(blur=dict(probability=0.5, sigma=(1, 2)))), r'config.data.degradation=.*needs downsample'),
    (dict(degradation=dict(downsample=dict(area=1.0), jpg=dict(probability=1.0))), r"unknown operators; known: \['blur', 'downsample', 'jpeg', 'noise', 'second_pass'\]"),
    (dict(degradation=dict(downsample=dict(area=1.0), jpeg=dict(probability=1.0, quality=(5, 99)))), r'config.data.degradation.jpeg.quality=\(5, 99\): must be \(low, high\) with 1 <= low <= high <= 95'),
    (dict(degradation=dict(downsample=dict(area=1.0), noise=dict(probability=1.5, sigma=(1, 2)))), r'config.data.degradation.noise.probability=1.5: must be a probability'),
    (dict(degradation=dict(downsample=dict(nearest=1.0))), r"config.data.degradation.downsample=\['nearest'\]: unknown keys; known: \['area', 'bilinear', 'bicubic'\]"),
    (dict(degradation=dict(downsample=dict(area=0.0))), r'config.data.degradation.downsample=.*must map some of .* not all 0'),
    (dict(degradation=dict(downsample=dict(area=1.0), blur=dict(probability=0.5, kinds=dict(motion=1.0)))), r'blur kind .motion. needs motion_length'),
    (dict(degradation='camera_hard', degrade_on_device=True), r'config.data.degrade_on_device=True: .*runs on host only'),
    (dict(degradation='camera_mild', round_lr=False), r'config.data.round_lr=False: .*8-bit'),
])
def test_config_errors_name_the_key(data, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(_tiny(**data), data_paths=False)


def test_good_degradation_configs_validate_and_resolve_to_host():
  for setting in ('bicubic', 'camera_mild', 'camera_hard', camera.CAMERA_HARD,
                  dict(downsample=dict(area=1.0), jpeg=dict(probability=1.0, quality=(30, 30)))):
    config_lib.validate(_tiny(degradation=setting), data_paths=False)
  assert degrade.resolve_on_device('auto', 'tpu', degradation='camera_hard') is False
  assert degrade.resolve_on_device(None, 'cuda', degradation='camera_mild') is False
  assert degrade.resolve_on_device('auto', 'tpu', degradation='bicubic') is True
  with pytest.raises(ValueError, match='runs on host only'):
    degrade.resolve_on_device(True, 'tpu', degradation='camera_hard')
  assert 'data.degradation' in config_lib.RESUME_LOCKED['train']  # a resume keeps its data stream


# ----------------------------------------------------------------------------- evaluation probes


def _plan(**overrides):
  kwargs = dict(name='generic', natural=False, conditions=('7x6', '16x14'), lr_sizes={'7x6': (7, 6), '16x14': (16, 14)},
                probe_group={'7x6': protocols.ALL, '16x14': protocols.ALL}, methods=('hr', 'bicubic', 'sr'),
                sr_names=('sr',), hr_size=(128, 128), hr_probe_size=None, natural_lr_size=(64, 64))
  return protocol_steps.Plan(**{**kwargs, **overrides})


def test_camera_probes_are_fixed_per_probe_and_size():
  hr = np.stack([_face(s) for s in range(3)])
  model = protocols.probe_camera('camera_hard')
  chains = protocol_steps.degrade_probes(_plan(probe_camera=model), protocol_steps.Lazy(lambda: hr),
                                         protocol_steps.Lazy(lambda: pytest.fail('no raw face')), [4, 9, 2])
  lr, up = chains['16x14']
  for n, i in enumerate([4, 9, 2]):
    want_lr, want_up = model.degrade_lr(hr[n], (16, 14), (128, 128), (i, 16, 14))
    np.testing.assert_array_equal(lr()[n], want_lr)
    np.testing.assert_array_equal(up()[n], want_up)
  np.testing.assert_array_equal(up(), degrade.bicubic_resize(lr(), (128, 128)))  # the baseline's input
  bicubic = protocol_steps.degrade_probes(_plan(), protocol_steps.Lazy(lambda: hr), None)
  assert not np.array_equal(up(), bicubic['16x14'][1]())
  # The same probes in another chunk order: the same faces (keyed by record, not position).
  again = protocol_steps.degrade_probes(_plan(probe_camera=model), protocol_steps.Lazy(lambda: hr[::-1]),
                                        None, [2, 9, 4])
  np.testing.assert_array_equal(again['16x14'][0]()[::-1], lr())
  with pytest.raises(ValueError, match='natural-LR'):
    protocols.probe_camera('camera_mild', natural=True)


def test_the_cache_keys_degraded_probes_on_the_camera(tmp_path):
  records = [Record(path=f'/x/{i}.png', label=i, identity=str(i)) for i in range(3)]
  plain = embedding_cache.RecordCache.open(tmp_path, {'emb': 'E'}, records, None, extra='generic')
  hard = embedding_cache.RecordCache.open(tmp_path, {'emb': 'E'}, records, None, extra='generic',
                                          probe_tag=protocols.probe_tag(protocols.probe_camera('camera_hard')))
  mild = embedding_cache.RecordCache.open(tmp_path, {'emb': 'E'}, records, None, extra='generic',
                                          probe_tag=protocols.probe_tag(protocols.probe_camera('camera_mild')))
  probes = [c.path('emb', '7x6', 'bicubic', [0, 1], degraded=True) for c in (plain, hard, mild)]
  assert len(set(probes)) == 3
  # Bicubic keys are what they always were (no degraded flag is the same file); gallery faces
  # are shared by every probe degradation.
  assert probes[0] == plain.path('emb', '7x6', 'bicubic', [0, 1])
  assert hard.path('emb', 'hr', 'hr', [0, 1]) == plain.path('emb', 'hr', 'hr', [0, 1])
  assert protocols.probe_tag(None) == ''


def test_run_protocol_camera_probes_are_not_read_from_the_bicubic_cache(tmp_path):
  records, load = test_protocols._toy_dataset(num_ids=6, noise=6.0)
  kw = dict(embed_fn=None, sr_fns={'sr': lambda x: np.asarray(x)[:, :, ::-1]}, resolutions=((16, 14),),
            cache_dir=tmp_path, cache_tags={'emb': 'toy', 'sr': 'g'})
  calls = []
  bicubic = protocols.run_protocol('generic', records, load, **{**kw, 'embed_fn': test_protocols._toy_embed(calls)})
  first = sum(calls)
  hard = protocols.run_protocol('generic', records, load, probe_degradation='camera_hard',
                                **{**kw, 'embed_fn': test_protocols._toy_embed(calls)})
  # The gallery and the 'hr' reference probes came back from the cache; every degraded probe
  # (bicubic and SR) was embedded again.
  split = protocols.generic_identity_split(records, 0)
  probes = len(split.all_probes())
  assert first == len(split.gallery) + 3 * probes and sum(calls) - first == 2 * probes
  assert hard['psnr'] != bicubic['psnr']
  calls.clear()
  again = protocols.run_protocol('generic', records, load, probe_degradation='camera_hard',
                                 **{**kw, 'embed_fn': test_protocols._toy_embed(calls)})
  assert calls == [] and again['rank1'] == hard['rank1']  # its own entries are reused


def _report_digests(out_dir, entry):
  config = base.get_config('tiny')
  ev = common.from_entry('synthetic', {**config.evals.synthetic.to_dict(), **entry})

  class Embed:
    info = {'source': 'toy'}
    fingerprint = 'toy'

    def __call__(self, images):
      return test_protocols._toy_embed([])(images)

  scored = ev.run(config, {'sr': lambda x: np.asarray(x)[:, ::-1]}, Embed())
  paths = ev.write(str(out_dir), scored, 5)
  return scored, {os.path.basename(p): hashlib.sha256(open(p, 'rb').read()).hexdigest()
                  for p in paths.values() if p.endswith(('.json', '.md'))}


# The tiny config's synthetic evaluation (toy embedder, a mirroring "generator") with bicubic
# probes, as report.json and report.md: a probe_degradation of 'bicubic' must leave them as they
# are. A deliberate change to the report, the protocols or the synthetic source updates these.
_BICUBIC_REPORT = {'report.json': 'bb8e622f33132081c9ea1324ed22c2d41d3842deb75667cc0320e933ef8de724',
                   'report.md': '253da6ba8bf7a4975a364db97e3e6182791c8fcab393c45580b42034d4839f24'}


def test_bicubic_probes_leave_the_report_as_it_was_and_a_camera_is_named(tmp_path):
  scored, default = _report_digests(tmp_path / 'default', {})
  _, bicubic = _report_digests(tmp_path / 'bicubic', {'probe_degradation': 'bicubic'})
  assert default == bicubic == _BICUBIC_REPORT
  assert 'probe_degradation' not in scored.extra
  hard_scored, hard = _report_digests(tmp_path / 'hard', {'probe_degradation': 'camera_hard'})
  assert hard_scored.extra['probe_degradation'] == 'camera_hard'
  assert json.load(open(tmp_path / 'hard' / 'report.json'))['probe_degradation'] == 'camera_hard'
  assert 'probe_degradation: camera_hard' in (tmp_path / 'hard' / 'report.md').read_text()
  assert hard_scored.results['rank1'] != scored.results['rank1'] or hard_scored.results['psnr'] != scored.results['psnr']


@pytest.mark.parametrize('entry,match', [
    (dict(probe_degradation='camera_extreme'), r"config.evals.x.probe_degradation: 'camera_extreme' is not a probe degradation; known: \['bicubic', 'camera_mild', 'camera_hard'\]"),
    (dict(probe_degradation=dict(downsample=dict(area=1.0))), r'config.evals.x.probe_degradation: .* is not a probe degradation'),
    (dict(protocol='scface_p1', probe_degradation='camera_hard'), r"config.evals.x.probe_degradation: protocol 'scface_p1' has natural LR probes"),
])
def test_probe_degradation_setting_is_checked(entry, match):
  with pytest.raises(ValueError, match=match):
    common.from_entry('x', {'type': 'identification', 'protocol': 'generic', **entry})
  config = base.get_config('tiny')
  config.evals.x = ml_collections.ConfigDict({'type': 'identification', 'protocol': 'generic', **entry})
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config, data_paths=False)
