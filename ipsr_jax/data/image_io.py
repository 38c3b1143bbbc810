"""Decoding face images from disk into uint8 RGB arrays, the one format the pipeline carries.

Every source decodes with the same function, so a folder source, the TFDS build made from it and
the evaluation protocols see identical pixels (PIL's decoder; OpenCV's JPEG IDCT differs slightly).
The command-line tools also pass a size cap (`max_side`): a 6000x6000 photo is then reduced while
it is decoded (a JPEG in the DCT domain, never held at full size) instead of filling gigabytes.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

from ipsr_jax.data import degrade as degrade_lib
from ipsr_jax.ops import resize as resize_lib

# Extensions that count as images when listing a folder; anything else (.txt, .DS_Store) is ignored.
IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.pgm', '.ppm', '.pbm', '.pnm', '.bmp',
                              '.tif', '.tiff', '.gif', '.webp'})


def is_image_file(path: str | os.PathLike) -> bool:
  name = os.path.basename(os.fspath(path))
  return not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def as_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3]: grey replicated to three
  channels, alpha dropped (what PIL's convert('RGB') does to L and RGBA images)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {image.dtype}')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'expected [H, W], [H, W, 1|3|4] image, got shape {image.shape}')
  if image.shape[-1] == 1:
    return np.repeat(image, 3, -1)
  return image[..., :3]


def _to_rgb(image: Image.Image) -> np.ndarray:
  if image.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
    # 16-bit PGM/PNG: keep the top 8 bits rather than letting convert() clip everything to 255.
    wide = np.asarray(image, dtype=np.int64)
    grey = (wide >> 8).astype(np.uint8) if wide.max(initial=0) > 255 else wide.astype(np.uint8)
    return as_rgb(grey)
  if image.mode != 'RGB':
    image = image.convert('RGB')  # L (ORL's PGM), P, RGBA, CMYK -> 3 channels
  return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes | str | os.PathLike | BinaryIO,
                 image_size: int | tuple[int, int] | None = None,
                 max_side: int | None = None) -> np.ndarray:
  """Decodes a file path, bytes or file object into uint8 [H, W, 3] RGB.

  Raises on empty, truncated or unknown data (PIL's own errors): callers count those as bad images.
  `max_side`: a larger image is reduced on decode so that its larger side is <= max_side
  (`decode_image_and_size`). `image_size` then resizes to a square (int) or (height, width) with
  PIL-exact bicubic.
  """
  return decode_image_and_size(data, image_size, max_side)[0]


def decode_image_and_size(data: bytes | str | os.PathLike | BinaryIO,
                          image_size: int | tuple[int, int] | None = None,
                          max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
  """`decode_image`, and the (width, height) the file holds, before any reduction or resize.

  Over `max_side`, a JPEG is decoded at the coarsest DCT scale (1/2, 1/4 or 1/8) that keeps its
  larger side >= max_side (`Image.draft`: the full-size image is never held), then every image is
  box-reduced by an integer factor (`Image.reduce`) to bring its larger side to <= max_side.
  """
  if max_side is not None and max_side < 1:
    raise ValueError(f'max_side must be >= 1, got {max_side}')
  if isinstance(data, (bytes, bytearray, memoryview)):
    if not data:
      raise ValueError('empty image data')
    data = io.BytesIO(data)
  with Image.open(data) as image:
    original = image.size
    if max_side is not None and max(original) > max_side:
      scale = max_side / max(original)
      # A no-op for formats other than JPEG, which have no reduced decode.
      image.draft('RGB', tuple(max(1, math.ceil(side * scale)) for side in original))
    image.load()  # decode now: a truncated JPEG raises here, not later in a worker
    array = _to_rgb(image)
  if max_side is not None and max(array.shape[:2]) > max_side:
    factor = math.ceil(max(array.shape[:2]) / max_side)
    array = np.asarray(Image.fromarray(array).reduce(factor))
  if image_size is not None:
    array = resize_to(array, image_size)
  return np.ascontiguousarray(array), original


def resize_to(image: np.ndarray, image_size: int | tuple[int, int]) -> np.ndarray:
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if tuple(image.shape[:2]) == hw:
    return image
  # One BLAS thread: OpenBLAS's idle threads spin, and beside the pipeline's decoding threads a
  # 250 -> 128 resize cost ~20 ms of CPU instead of ~1 (benchmarks/NOTES.md, "Input pipeline").
  with degrade_lib.one_blas_thread():
    return resize_lib.resize_np(image, hw)


def encode_png(image: np.ndarray) -> bytes:
  """Lossless encoding: decode_image(encode_png(x)) == x exactly."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def to_grey(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] RGB -> the same shape in grey: PIL's `convert('L')` (ITU-R 601-2 luma in its
  16-bit fixed point, so equal to PIL to the grey level), replicated to three channels.

  ORL's faces are grey, and so are many surveillance cameras: the dev protocol scores its faces
  in grey (`config.evals.<name>.grey`) and training may see some in grey (`data.random_grey`).
  """
  rgb = np.asarray(image, np.uint8).astype(np.uint32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
  return np.repeat(luma.astype(np.uint8)[..., None], 3, axis=-1)


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
  """Central `fraction` of each side: a stand-in for alignment on pre-centred photos (LFW)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'crop fraction must be in (0, 1], got {fraction}')
  h, w = image.shape[:2]
  ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
  top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]
