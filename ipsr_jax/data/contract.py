"""The one input contract for pixel arrays, checked on the host before any model runs.

Every entry point that takes face images (`inference.Embedder`, `SuperResolver`, `Pipeline` and
their `stream`) passes them through `as_image_batch`; the exported models (`ipsr_jax.serving.jax_export`,
`ipsr_jax.serving.onnx_export`) state the same contract, `INPUT_CONTRACT`, in their metadata.

  shape   [N, H, W, 3] RGB, or one [H, W, 3] image
  dtype   uint8, or a real float (float16, bfloat16, float32, float64)
  values  0..255 and finite; float pixels in another range are passed with `input_range`

What it refuses would otherwise come out silently wrong: one NaN pixel gives an all-zero
embedding or an all-NaN face, float 0..1 pixels a black face, and an integer dtype other than
uint8 has no single 0..255 reading (16-bit images are 0..65535). numpy and ml_dtypes only (no
JAX), so the export loader, which runs without the model code, can import it.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import ml_dtypes
import numpy as np

# What the exported models' metadata says about their 'images' input (the metadata's input dtype
# says which of the two dtypes a given file takes).
INPUT_CONTRACT = {'layout': 'NHWC', 'channels': 'RGB', 'dtype': 'uint8 or float32',
                  'range': [0, 255], 'finite': True}
_ACCEPTED = 'images must be uint8 or float in 0..255'
_SHOWN_INDICES = 5  # a non-finite error names at most this many images

# How to convert the dtypes people most often hold by mistake (the rest: `_dtype_hint`).
_HINTS = {
    np.dtype(np.bool_): 'a mask? convert with x.astype(np.uint8) * 255',
    np.dtype(np.uint16): 'convert with (x >> 8).astype(np.uint8) or x.astype(np.float32) / 257',
}


def _dtype_hint(dtype: np.dtype) -> str:
  if dtype in _HINTS:
    return _HINTS[dtype]
  if np.issubdtype(dtype, np.integer):
    return 'convert with x.astype(np.uint8) if its values are 0..255'
  return 'convert to uint8, or to float32 in 0..255'


def _is_float(dtype: np.dtype) -> bool:
  """A real float dtype: numpy's, or bfloat16 (ml_dtypes'; not a numpy float subtype)."""
  return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _check_input_range(input_range: Sequence[float] | None) -> tuple[float, float] | None:
  """None or (lo, hi): two finite real numbers, lo < hi."""
  if input_range is None:
    return None
  values = tuple(input_range) if isinstance(input_range, (tuple, list, np.ndarray)) else ()
  real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
  if not (len(values) == 2 and all(real(v) and np.isfinite(v) for v in values)
          and values[0] < values[1]):
    raise ValueError(f'input_range must be two finite numbers (lo, hi) with lo < hi, '
                     f'got {input_range!r}')
  return float(values[0]), float(values[1])


def _nonfinite_message(batch: np.ndarray, single: bool) -> str:
  """Which images hold NaN or inf (the per-image scan, run only once the global check failed)."""
  if single:
    return 'non-finite pixels (NaN or inf) in the image'
  bad = np.flatnonzero(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))
  shown = ', '.join(str(i) for i in bad[:_SHOWN_INDICES])
  if len(bad) > _SHOWN_INDICES:
    shown += f', ... ({len(bad)} in all)'
  return (f'non-finite pixels (NaN or inf) in image{"s" if len(bad) > 1 else ""} {shown} '
          f'of {len(batch)} (0-based batch indices)')


def as_image_batch(images: Any, *, input_range: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, bool]:
  """Images -> (batch [N, H, W, 3], single): uint8 stays uint8, floats become float32 0..255.

  single: one [H, W, 3] image came in (the batch holds it as N = 1). `input_range=(lo, hi)` maps
  float pixels in [lo, hi] linearly to 0..255: (0, 1) for 0..1 images, (0, 255) to pass a batch
  whose maximum is <= 1 (e.g. all black) as 0..255. Without it, such a float batch is refused as
  a likely 0..1 one. Raises ValueError (shape, values, input_range) or TypeError (dtype).
  """
  input_range = _check_input_range(input_range)
  batch = np.asarray(images)
  shape = batch.shape
  single = batch.ndim == 3
  if single:
    batch = batch[None]
  if batch.ndim != 4 or batch.shape[-1] != 3:
    raise ValueError(f'expected [N, H, W, 3] RGB images, got shape {shape}')
  if batch.dtype == np.uint8:  # 0..255 and finite by construction: nothing to scan
    if input_range not in (None, (0.0, 255.0)):
      raise ValueError(f'input_range={input_range} does not apply to uint8 images, which are '
                       '0..255: drop it')
    return batch, single
  if not _is_float(batch.dtype):
    raise TypeError(f'{_ACCEPTED}, got {batch.dtype}: {_dtype_hint(batch.dtype)}')
  batch = batch.astype(np.float32, copy=False)
  if not batch.size:  # an empty batch: no values to check
    return batch, single
  # min and max propagate NaN, and an inf is one of them: two cheap reductions check every pixel.
  lo, hi = batch.min(), batch.max()
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(_nonfinite_message(batch, single))
  if input_range is None:
    if hi <= 1.0:
      signed = lo < -0.5  # the generator's -1..1 rather than 0..1
      looks = '-1..1' if signed else '0..1'
      fix = ('pass input_range=(-1, 1)' if signed else
             'multiply by 255, or pass input_range=(0, 1)')
      raise ValueError(f'float images look like {looks}, not 0..255 (max {float(hi):.4g}): '
                       f'{fix}; really this dark in 0..255: pass input_range=(0, 255)')
    return batch, single
  lo_in, hi_in = input_range
  if (lo_in, hi_in) == (0.0, 255.0):
    return batch, single
  scale = np.float32(255.0 / (hi_in - lo_in))
  return (batch - np.float32(lo_in)) * scale, single
