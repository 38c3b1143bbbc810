"""A camera-like degradation model: HR face -> what a (surveillance) camera would record -> 128x128.

    camera = CameraModel.from_config('camera_hard', seed=0)
    out = camera.degrade(hr, lr_hw=(16, 14), out_hw=(128, 128), key=sample_index)
    camera.params(sample_index)      # what was drawn for that example (JSON-able)

The chain, in the order a camera applies it:
  optical blur at HR (isotropic or anisotropic Gaussian, defocus disk, short linear motion)
  -> sensor sampling down to the LR size (PIL's BOX = area, BILINEAR or BICUBIC)
  -> sensor noise (Gaussian or Poisson, in colour or in luma only)
  -> JPEG at a quality (PIL, at the LR size)
  -> optionally a second pass of blur / noise / JPEG at the LR size, in a shuffled order
     (BSRGAN's answer to real pipelines that resample, denoise and re-encode in any order)
  -> 8-bit LR image -> bicubic up to the output size, exactly as `degrade.degrade` does.

Blur sizes (sigmas, disk radius, motion length) are in LR pixels, the camera's pixel pitch: the
same setting blurs a 7x6 and a 32x32 face alike relative to their sensors. At HR they are scaled by
the down-sampling factor (the geometric mean of the two axes' factors).

Every random choice for an example comes from `np.random.default_rng([seed, key, tag])`, key the
example's global sample index (as `degrade.LRSampler`): parameters from one tag, noise samples from
another. An example degrades the same in a run and its resume, whatever the number of processes.

Each operator is a pure function of its image and explicit parameters (float 0..255 arrays,
[H, W, C]); `CameraModel` draws the parameters and chains them.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ipsr_jax.data import degrade as degrade_lib
from ipsr_jax.ops import resize as resize_lib

BICUBIC = 'bicubic'  # the name of today's path: bicubic down, uint8, bicubic up (`degrade.degrade`)
BLUR_KINDS = ('gaussian', 'anisotropic', 'defocus', 'motion')
DOWNSAMPLE_KINDS = ('area', 'bilinear', 'bicubic')
_PIL_FILTER = {'area': 'box', 'bilinear': 'bilinear', 'bicubic': 'bicubic'}  # resize_lib's names
SECOND_PASS_OPS = ('blur', 'noise', 'jpeg')
# Streams of default_rng([seed, key, tag]), apart from LRSampler's (0x1F5A) and the augmentations'.
_PARAM_TAG, _NOISE_TAG = 0xCA3E, 0xCA3F
# Luma weights (ITU-R BT.601, PIL's 'L' conversion).
_LUMA = np.array([0.299, 0.587, 0.114])

# --- the presets -----------------------------------------------------------------------------------
# Ranges are (low, high), drawn uniformly; blur sizes in LR pixels; noise in grey levels (0..255).
#
# camera_hard: a cheap or distant surveillance camera. The face covers a few sensor pixels, so the
# lens and focus blur reach about a pixel or more, the sensor integrates over its pixel area
# (mostly area sampling), low light makes noise of 10-15 grey levels (Gaussian read noise, or
# shot noise of a high gain: 0.5-1.5 levels per photo-electron, sigma ~8-14 at mid-grey), and
# the stream is compressed hard (JPEG 10-40, the blocky range of low-bitrate video); a second
# pass (re-encoding, a resample by the recorder) is frequent.
CAMERA_HARD = dict(
    blur=dict(probability=0.9, kinds=dict(gaussian=0.35, anisotropic=0.35, defocus=0.15, motion=0.15),
              sigma=(0.5, 1.6), defocus_radius=(0.6, 1.6), motion_length=(1.0, 3.0)),
    downsample=dict(area=0.7, bilinear=0.2, bicubic=0.1),
    noise=dict(probability=0.9, poisson=0.4, luma=0.3, sigma=(3.0, 15.0), poisson_gain=(0.5, 1.5)),
    jpeg=dict(probability=0.95, quality=(10, 40)),
    second_pass=dict(probability=0.4, blur=0.5, noise=0.5, jpeg=0.7),
)
# camera_mild: a decent camera in daylight at a moderate distance: slight optical softness, little
# noise (1-5 levels; shot noise of 0.02-0.2 levels per electron, sigma ~1.6-5 at mid-grey), the
# moderate compression of recorded video or a web upload (JPEG 50-90); rarely a second pass.
CAMERA_MILD = dict(
    blur=dict(probability=0.7, kinds=dict(gaussian=0.6, anisotropic=0.3, defocus=0.05, motion=0.05),
              sigma=(0.2, 0.7), defocus_radius=(0.3, 0.8), motion_length=(0.5, 1.5)),
    downsample=dict(area=0.4, bilinear=0.3, bicubic=0.3),
    noise=dict(probability=0.7, poisson=0.4, luma=0.5, sigma=(1.0, 5.0), poisson_gain=(0.02, 0.2)),
    jpeg=dict(probability=0.8, quality=(50, 90)),
    second_pass=dict(probability=0.1, blur=0.5, noise=0.5, jpeg=0.5),
)
PRESETS = {'camera_mild': CAMERA_MILD, 'camera_hard': CAMERA_HARD}
NAMES = (BICUBIC,) + tuple(PRESETS)


# --- blur kernels (HR pixels) ------------------------------------------------------------------------


def _grid(radius: int) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) offsets of a (2r+1) x (2r+1) kernel, x along the width, y down the height."""
  r = np.arange(-radius, radius + 1, dtype=np.float64)
  return np.meshgrid(r, r, indexing='xy')


def _normalised(kernel: np.ndarray) -> np.ndarray:
  return kernel / kernel.sum()


def gaussian_kernel(sigma_x: float, sigma_y: float | None = None, angle: float = 0.0,
                    truncate: float = 3.0) -> np.ndarray:
  """2-D Gaussian (sampled at pixel centres, sum 1) with standard deviations `sigma_x` along the
  direction `angle` (radians, counter-clockwise from the width axis) and `sigma_y` across it.

  Radius int(truncate * max sigma + 0.5): for sigma_x == sigma_y the kernel is the outer product of
  scipy.ndimage.gaussian_filter's 1-D kernel with itself.
  """
  sigma_y = sigma_x if sigma_y is None else sigma_y
  if min(sigma_x, sigma_y) <= 0:
    raise ValueError(f'Gaussian sigmas must be > 0, got {sigma_x}, {sigma_y}')
  x, y = _grid(int(truncate * max(sigma_x, sigma_y) + 0.5))
  c, s = math.cos(angle), math.sin(angle)
  u, v = c * x + s * y, -s * x + c * y  # coordinates along and across `angle`
  return _normalised(np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2)))


def defocus_kernel(radius: float) -> np.ndarray:
  """A uniform disk of `radius` pixels (the out-of-focus circle of confusion), sum 1.

  Each pixel is weighted by its covered fraction, estimated as clip(radius + 0.5 - distance, 0, 1)
  (an anti-aliased edge, so the kernel changes smoothly with the radius).
  """
  if radius <= 0:
    raise ValueError(f'defocus radius must be > 0, got {radius}')
  x, y = _grid(int(math.ceil(radius + 0.5)))
  return _normalised(np.clip(radius + 0.5 - np.hypot(x, y), 0.0, 1.0))


def motion_kernel(length: float, angle: float) -> np.ndarray:
  """A straight motion trail of `length` pixels at `angle` (radians from the width axis), sum 1.

  The segment is centred on the origin; each pixel weighs clip(1 - distance to the segment, 0, 1),
  an anti-aliased line one pixel wide.
  """
  if length < 0:
    raise ValueError(f'motion length must be >= 0, got {length}')
  x, y = _grid(int(math.ceil(length / 2 + 1)))
  c, s = math.cos(angle), math.sin(angle)
  along = np.clip(c * x + s * y, -length / 2, length / 2)  # nearest point of the segment
  dist = np.hypot(x - along * c, y - along * s)
  return _normalised(np.clip(1.0 - dist, 0.0, 1.0))


def blur_kernel(params: Mapping[str, Any], scale: float = 1.0) -> np.ndarray:
  """The kernel of drawn blur `params` ({'kind', sizes in LR pixels}) at `scale` pixels per LR pixel."""
  kind = params['kind']
  if kind in ('gaussian', 'anisotropic'):
    return gaussian_kernel(params['sigma_x'] * scale, params['sigma_y'] * scale, params['angle'])
  if kind == 'defocus':
    return defocus_kernel(params['radius'] * scale)
  if kind == 'motion':
    return motion_kernel(params['length'] * scale, params['angle'])
  raise ValueError(f'unknown blur kind {kind!r}; known: {BLUR_KINDS}')


# --- operators (float [H, W, C] in 0..255 -> float64) --------------------------------------------------


def _fast_length(n: int) -> int:
  """The smallest 2^a 3^b 5^c >= n: FFT lengths pocketfft transforms fastest."""
  best = 1 << (n - 1).bit_length()
  p5 = 1
  while p5 < best:
    p35 = p5
    while p35 < best:
      m = p35
      while m < n:
        m *= 2
      best = min(best, m)
      p35 *= 3
    p5 *= 5
  return best


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """2-D convolution of every channel of [H, W, C] `image` with odd-sized `kernel`, borders
  mirrored with the edge pixel repeated (numpy 'symmetric', scipy.ndimage 'reflect').

  Through the FFT of the padded image: a kernel scaled to a 128x128 face may be as wide as the face.
  The transform is zero-padded to a fast length; the pixels kept never wrap around.
  """
  image = np.asarray(image, np.float64)
  kh, kw = kernel.shape
  ph, pw = kh // 2, kw // 2
  padded = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode='symmetric')
  shape = tuple(_fast_length(n) for n in padded.shape[:2])
  spectrum = np.fft.rfft2(padded, s=shape, axes=(0, 1)) * np.fft.rfft2(kernel, s=shape)[..., None]
  full = np.fft.irfft2(spectrum, s=shape, axes=(0, 1))
  # Circular convolution with the kernel's corner at the origin: output (i, j) is centred at
  # padded pixel (i + ph, j + pw), so the image's own pixels start at 2 * pad.
  h, w = image.shape[:2]
  return full[2 * ph:2 * ph + h, 2 * pw:2 * pw + w]


def downsample(image: np.ndarray, lr_hw: Sequence[int], kind: str) -> np.ndarray:
  """PIL's resize of float [H, W, C] to `lr_hw` with 'area' (BOX), 'bilinear' or 'bicubic'; unrounded."""
  if kind not in _PIL_FILTER:
    raise ValueError(f'unknown down-sampling {kind!r}; known: {DOWNSAMPLE_KINDS}')
  return resize_lib.resize_np(np.asarray(image, np.float32), tuple(lr_hw), _PIL_FILTER[kind]).astype(np.float64)


def luma(image: np.ndarray) -> np.ndarray:
  """[H, W, 1] luma of [H, W, 3] (BT.601); a one-channel image is its own luma."""
  image = np.asarray(image, np.float64)
  return image if image.shape[-1] == 1 else (image @ _LUMA)[..., None]


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator, luma_only: bool = False) -> np.ndarray:
  """`image` + N(0, sigma^2) grey levels: independent per channel, or one field on every channel."""
  image = np.asarray(image, np.float64)
  shape = image.shape[:2] + (1,) if luma_only else image.shape
  return image + rng.normal(0.0, sigma, shape)


def poisson_noise(image: np.ndarray, gain: float, rng: np.random.Generator, luma_only: bool = False) -> np.ndarray:
  """Shot noise: `gain` grey levels per photo-electron, so a level v becomes gain * Poisson(v / gain)
  (mean v, variance gain * v). luma_only: the luma's shot noise added to every channel."""
  image = np.asarray(image, np.float64)
  if gain <= 0:
    raise ValueError(f'Poisson gain must be > 0, got {gain}')
  if luma_only:
    y = np.clip(luma(image), 0.0, None)
    return image + (gain * rng.poisson(y / gain) - y)
  return gain * rng.poisson(np.clip(image, 0.0, None) / gain).astype(np.float64)


def to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """PIL's JPEG encode and decode at `quality` (PIL's defaults otherwise) of `image` as uint8."""
  pixels = to_uint8(image)
  grey = pixels.shape[-1] == 1
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if grey else pixels).save(buffer, format='JPEG', quality=int(quality))
  buffer.seek(0)
  with Image.open(buffer) as decoded:
    out = np.asarray(decoded.convert('L' if grey else 'RGB'))
  return (out[..., None] if grey else out).astype(np.float64)


def add_noise(image: np.ndarray, params: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
  """Drawn noise `params` ({'kind': 'gaussian', 'sigma'} or {'kind': 'poisson', 'gain'}, 'luma')."""
  if params['kind'] == 'gaussian':
    return gaussian_noise(image, params['sigma'], rng, params['luma'])
  return poisson_noise(image, params['gain'], rng, params['luma'])


# --- configuration ----------------------------------------------------------------------------------

# Each operator's settings: key -> what it takes. Probabilities in [0, 1]; ranges (low, high).
_SCHEMA = {
    'blur': ('probability', 'kinds', 'sigma', 'defocus_radius', 'motion_length'),
    'downsample': DOWNSAMPLE_KINDS,
    'noise': ('probability', 'poisson', 'luma', 'sigma', 'poisson_gain'),
    'jpeg': ('probability', 'quality'),
    'second_pass': ('probability',) + SECOND_PASS_OPS,
}
_REQUIRED = {'blur': ('probability',), 'noise': ('probability',), 'jpeg': ('probability',),
             'second_pass': ('probability',)}
_WHERE = 'data.degradation'


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check(ok: bool, where: str, value: Any, why: str) -> None:
  if not ok:
    raise ValueError(f'{where}={value!r}: {why}')


def _check_probability(where: str, p: Any) -> None:
  _check(_is_number(p) and 0.0 <= p <= 1.0, where, p, 'must be a probability in [0, 1]')


def _check_range(where: str, r: Any, low: float, high: float, positive: bool = False) -> None:
  ok = (isinstance(r, (tuple, list)) and len(r) == 2 and all(_is_number(v) for v in r)
        and low <= r[0] <= r[1] <= high and (not positive or r[0] > 0))
  _check(ok, where, r, f'must be (low, high) with {low} {"<" if positive else "<="} low <= high <= {high}')


def _check_weights(where: str, weights: Any, names: Sequence[str]) -> None:
  ok = (isinstance(weights, Mapping) and set(weights) <= set(names) and
        all(_is_number(v) and v >= 0 for v in weights.values()) and sum(weights.values()) > 0)
  _check(ok, where, weights, f'must map some of {tuple(names)} to weights >= 0, not all 0')


def check_settings(settings: Mapping[str, Any], where: str = _WHERE) -> None:
  """Raises ValueError naming the first wrong key of a camera model's settings (see the presets)."""
  _check(isinstance(settings, Mapping), where, settings, f'must be one of {NAMES} or a dict of operators')
  unknown = set(settings) - set(_SCHEMA)
  _check(not unknown, where, sorted(unknown), f'unknown operators; known: {sorted(_SCHEMA)}')
  _check('downsample' in settings, where, sorted(settings), 'needs downsample (the sensor sampling)')
  for op, entry in settings.items():
    at = f'{where}.{op}'
    _check(isinstance(entry, Mapping), at, entry, 'must be a dict')
    unknown = set(entry) - set(_SCHEMA[op])
    _check(not unknown, at, sorted(unknown), f'unknown keys; known: {list(_SCHEMA[op])}')
    missing = [k for k in _REQUIRED.get(op, ()) if k not in entry]
    _check(not missing, at, dict(entry), f'needs {" and ".join(missing)}')
  _check_weights(f'{where}.downsample', dict(settings['downsample']), DOWNSAMPLE_KINDS)
  blur = settings.get('blur')
  if blur is not None:
    _check_probability(f'{where}.blur.probability', blur['probability'])
    kinds = dict(blur.get('kinds', {'gaussian': 1.0}))
    _check_weights(f'{where}.blur.kinds', kinds, BLUR_KINDS)
    needs = {'gaussian': 'sigma', 'anisotropic': 'sigma', 'defocus': 'defocus_radius', 'motion': 'motion_length'}
    for kind, weight in kinds.items():
      if weight > 0:
        key = needs[kind]
        _check(key in blur, f'{where}.blur', dict(blur), f'blur kind {kind!r} needs {key}')
        _check_range(f'{where}.blur.{key}', tuple(blur[key]), 0.0, 20.0, positive=key != 'motion_length')
  noise = settings.get('noise')
  if noise is not None:
    _check_probability(f'{where}.noise.probability', noise['probability'])
    _check_probability(f'{where}.noise.poisson', noise.get('poisson', 0.0))
    _check_probability(f'{where}.noise.luma', noise.get('luma', 0.0))
    if noise.get('poisson', 0.0) < 1.0:
      _check('sigma' in noise, f'{where}.noise', dict(noise), 'Gaussian noise needs sigma')
      _check_range(f'{where}.noise.sigma', tuple(noise['sigma']), 0.0, 255.0)
    if noise.get('poisson', 0.0) > 0.0:
      _check('poisson_gain' in noise, f'{where}.noise', dict(noise), 'Poisson noise needs poisson_gain')
      _check_range(f'{where}.noise.poisson_gain', tuple(noise['poisson_gain']), 0.0, 255.0, positive=True)
  jpeg_settings = settings.get('jpeg')
  if jpeg_settings is not None:
    _check_probability(f'{where}.jpeg.probability', jpeg_settings['probability'])
    _check('quality' in jpeg_settings, f'{where}.jpeg', dict(jpeg_settings), 'needs quality')
    q = tuple(jpeg_settings['quality'])
    _check(all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in q) and len(q) == 2,
           f'{where}.jpeg.quality', q, 'must be (low, high) integers')
    _check_range(f'{where}.jpeg.quality', q, 1, 95)
  second = settings.get('second_pass')
  if second is not None:
    for k in ('probability',) + SECOND_PASS_OPS:
      _check_probability(f'{where}.second_pass.{k}', second.get(k, 0.0))
    for op in SECOND_PASS_OPS:
      _check(second.get(op, 0.0) == 0.0 or settings.get(op) is not None, f'{where}.second_pass.{op}',
             second.get(op), f'a second {op} takes its ranges from {where}.{op}, which is not set')


def resolve(setting: Any, where: str = _WHERE) -> tuple[str, dict[str, Any] | None]:
  """`data.degradation` or `probe_degradation` -> (name, settings): ('bicubic', None), a preset's
  (name, its settings) or ('custom', the dict). Raises ValueError naming `where` when it is neither."""
  if hasattr(setting, 'to_dict'):
    setting = setting.to_dict()
  if isinstance(setting, str):
    _check(setting in NAMES, where, setting, f'must be one of {NAMES} or a dict of operator settings')
    return setting, (None if setting == BICUBIC else copy.deepcopy(PRESETS[setting]))
  check_settings(setting, where)
  return 'custom', copy.deepcopy(dict(setting))


def is_bicubic(setting: Any) -> bool:
  """Whether `setting` names today's path (the default; None counts as it too)."""
  return setting is None or (isinstance(setting, str) and setting == BICUBIC)


# --- the model ------------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, r: Sequence[float]) -> float:
  return float(rng.uniform(r[0], r[1]))


def _choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
  names = sorted(weights)
  p = np.array([float(weights[k]) for k in names])
  return names[int(rng.choice(len(names), p=p / p.sum()))]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable (by identity) though settings is a dict
class CameraModel:
  """Draws each example's camera (`params`) and applies it (`apply`, `degrade`); picklable."""
  settings: Mapping[str, Any]
  seed: int = 0
  name: str = 'custom'

  @classmethod
  def from_config(cls, setting: Any, seed: int = 0, where: str = _WHERE) -> CameraModel | None:
    """A preset name, a dict of operator settings, or 'bicubic' (-> None: no camera model)."""
    name, settings = resolve(setting, where)
    return None if settings is None else cls(settings, int(seed), name)

  # -- drawing

  def _draw_blur(self, rng: np.random.Generator) -> dict[str, Any]:
    b = self.settings['blur']
    kind = _choice(rng, dict(b.get('kinds', {'gaussian': 1.0})))
    if kind == 'gaussian':
      sigma = _uniform(rng, b['sigma'])
      return {'kind': kind, 'sigma_x': sigma, 'sigma_y': sigma, 'angle': 0.0}
    if kind == 'anisotropic':
      return {'kind': kind, 'sigma_x': _uniform(rng, b['sigma']), 'sigma_y': _uniform(rng, b['sigma']),
              'angle': _uniform(rng, (0.0, math.pi))}
    if kind == 'defocus':
      return {'kind': kind, 'radius': _uniform(rng, b['defocus_radius'])}
    return {'kind': kind, 'length': _uniform(rng, b['motion_length']), 'angle': _uniform(rng, (0.0, math.pi))}

  def _draw_noise(self, rng: np.random.Generator) -> dict[str, Any]:
    n = self.settings['noise']
    luma_only = bool(rng.random() < n.get('luma', 0.0))
    if rng.random() < n.get('poisson', 0.0):
      return {'kind': 'poisson', 'gain': _uniform(rng, n['poisson_gain']), 'luma': luma_only}
    return {'kind': 'gaussian', 'sigma': _uniform(rng, n['sigma']), 'luma': luma_only}

  def _draw_jpeg(self, rng: np.random.Generator) -> dict[str, Any]:
    low, high = self.settings['jpeg']['quality']
    return {'quality': int(rng.integers(low, high + 1))}

  def _maybe(self, rng: np.random.Generator, op: str, probability: float) -> dict[str, Any] | None:
    """The operator's drawn parameters with `probability` (always one draw, so later draws of an
    example do not shift with the outcome); None when it is off or not configured."""
    on = rng.random() < probability
    if self.settings.get(op) is None:
      return None
    drawn = {'blur': self._draw_blur, 'noise': self._draw_noise, 'jpeg': self._draw_jpeg}[op](rng)
    return drawn if on else None

  def params(self, key: int | Sequence[int]) -> dict[str, Any]:
    """Everything drawn for example `key` (an int, or a tuple of ints such as (record, h, w)):
    {'blur', 'downsample', 'noise', 'jpeg', 'second_pass'}; an operator that is off is None;
    second_pass is None or {'order': [...], op: params or None}. JSON-able."""
    rng = np.random.default_rng([self.seed, *_key_words(key), _PARAM_TAG])
    s = self.settings
    out = {'blur': self._maybe(rng, 'blur', s.get('blur', {}).get('probability', 0.0)),
           'downsample': _choice(rng, dict(s['downsample'])),
           'noise': self._maybe(rng, 'noise', s.get('noise', {}).get('probability', 0.0)),
           'jpeg': self._maybe(rng, 'jpeg', s.get('jpeg', {}).get('probability', 0.0)),
           'second_pass': None}
    second = s.get('second_pass')
    if second is not None and rng.random() < second['probability']:
      order = [SECOND_PASS_OPS[i] for i in rng.permutation(len(SECOND_PASS_OPS))]
      out['second_pass'] = {'order': order, **{op: self._maybe(rng, op, second.get(op, 0.0)) for op in order}}
    return out

  # -- applying

  def apply(self, hr: np.ndarray, lr_hw: Sequence[int], out_hw: Sequence[int], params: Mapping[str, Any],
            key: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 LR [h, w, C], uint8 [out_h, out_w, C] bicubic up-sampling) of uint8 [H, W, C] `hr`
    through drawn `params`; the noise samples come from `key`'s noise stream."""
    hr = np.asarray(hr)
    lr_hw, out_hw = tuple(int(v) for v in lr_hw), tuple(int(v) for v in out_hw)
    noise_rng = np.random.default_rng([self.seed, *_key_words(key), _NOISE_TAG])
    x = hr.astype(np.float64)
    if params['blur'] is not None:
      scale = math.sqrt(hr.shape[0] / lr_hw[0] * hr.shape[1] / lr_hw[1])
      x = convolve(x, blur_kernel(params['blur'], scale))
    x = downsample(x, lr_hw, params['downsample'])
    if params['noise'] is not None:
      x = add_noise(x, params['noise'], noise_rng)
    if params['jpeg'] is not None:
      x = jpeg(x, params['jpeg']['quality'])
    second = params.get('second_pass')
    for op in (second or {}).get('order', ()):
      p = second[op]
      if p is None:
        continue
      if op == 'blur':  # at the LR size: one LR pixel is one pixel
        x = convolve(x, blur_kernel(p, 1.0))
      elif op == 'noise':
        x = add_noise(x, p, noise_rng)
      else:
        x = jpeg(x, p['quality'])
    lr = to_uint8(x)
    return lr, degrade_lib.upsample_uint8(lr[None], out_hw)[0]  # = degrade.degrade's up-sampling

  def degrade_lr(self, hr: np.ndarray, lr_hw: Sequence[int], out_hw: Sequence[int],
                 key: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(LR face, its bicubic up-sampling to `out_hw`) of one uint8 [H, W, C] face for example `key`."""
    return self.apply(hr, lr_hw, out_hw, self.params(key), key)

  def degrade(self, hr: np.ndarray, lr_hw: Sequence[int], out_hw: Sequence[int] = (128, 128),
              key: int | Sequence[int] = 0) -> np.ndarray:
    """The generator's input for one uint8 [H, W, C] face: camera down to `lr_hw`, bicubic up."""
    return self.degrade_lr(hr, lr_hw, out_hw, key)[1]

  def degrade_batch(self, hr: np.ndarray, lr_index: np.ndarray, lr_sizes: Sequence[Sequence[int]],
                    keys: Sequence[int]) -> np.ndarray:
    """`degrade` of each example of uint8 [B, H, W, C] `hr` to `lr_sizes[lr_index[b]]` with key
    `keys[b]` (its global sample index), back to (H, W): `degrade.degrade_batch` for a camera."""
    hr = np.asarray(hr)
    out = np.empty_like(hr)
    for b in range(hr.shape[0]):
      out[b] = self.degrade(hr[b], lr_sizes[int(lr_index[b])], hr.shape[1:3], int(keys[b]))
    return out


def _key_words(key: int | Sequence[int]) -> tuple[int, ...]:
  """A key as seed words for default_rng (non-negative ints)."""
  words = (key,) if isinstance(key, (int, np.integer)) else tuple(key)
  out = tuple(int(w) for w in words)
  if any(w < 0 for w in out):
    raise ValueError(f'camera keys must be non-negative integers, got {key!r}')
  return out
