"""Multi-scale degradation: HR face -> bicubic down to a random LR size -> bicubic up to 128x128.

Two implementations of the same operation:
  * host (`degrade`, `degrade_batch`, numpy, in the Grain pipeline): PIL's
    `img.resize(lr).resize(out)` as four rounded float32 matmul passes. Each pass is within one
    grey level of PIL's fixed-point pass; the four-pass chain differs from PIL's in ~0.1% of
    values, by at most 2 (200 LFW faces, the paper's 10 sizes; benchmarks/NOTES.md, "Input
    pipeline");
  * device (`DeviceDegrader`, inside the jitted step): per-example gathered resize matrices.
They share `ipsr_jax.ops.resize.resize_weights`, so they agree to float rounding.

`degrade_batch` issues, face by face, the very matmuls `degrade` does on one face (numpy's einsum),
as one stacked matmul per pass and size, without einsum's copies, and with one BLAS thread:
OpenBLAS threads spin while idle, and beside decoding threads or other workers that spinning
cost ten times the work itself (benchmarks/NOTES.md, "Input pipeline"). Each face's float32 sums
are those of `degrade(face)`, bit for bit, whatever else is in the batch: a BLAS call over a whole
group rounds a few sums differently depending on the group's size (its tail rows), which would make
pixels depend on the batch's composition, hence on the number of processes sharing it.

`LRSampler` picks the LR size from a stateless generator keyed on (seed, key): the choice for a
given example never depends on what the pipeline produced before, so a restored iterator
reproduces the exact same degradations.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from ipsr_jax.ops import resize as resize_lib

Size = tuple[int, int]


def _hw(size: Sequence[int]) -> Size:
  h, w = (int(s) for s in size)
  if h < 1 or w < 1:
    raise ValueError(f'sizes must be positive (height, width), got {tuple(size)}')
  return h, w


def bicubic_resize(images: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
  """PIL-exact bicubic resize of [H, W, C] or [N, H, W, C] images in 0..255.

  uint8 -> uint8 (rounded after each pass, as PIL does); float -> float32 (unrounded).
  """
  return resize_lib.resize_np(images, _hw(out_hw))


def _round_clip(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0.0, 255.0)


def degrade(hr: np.ndarray, lr_hw: Sequence[int], out_hw: Sequence[int] = (128, 128),
            round_lr: bool = True) -> np.ndarray:
  """Bicubic down to `lr_hw`, then bicubic up to `out_hw`: the generator's input.

  uint8 in -> uint8 out. With `round_lr` the small image is 8-bit, as a real LR image is (for uint8
  input this is exactly PIL on uint8 images); without it the whole chain runs in float and only the
  output is rounded.
  """
  hr = np.asarray(hr)
  lr_hw, out_hw = _hw(lr_hw), _hw(out_hw)
  is_uint8 = hr.dtype == np.uint8
  if is_uint8 and round_lr:
    return resize_lib.resize_np(resize_lib.resize_np(hr, lr_hw), out_hw)
  lr = resize_lib.resize_np(hr.astype(np.float32), lr_hw)
  if round_lr:
    lr = _round_clip(lr).astype(np.float32)
  out = resize_lib.resize_np(lr, out_hw)
  return _round_clip(out).astype(np.uint8) if is_uint8 else out


def degrade_batch(hr: np.ndarray, lr_index: np.ndarray, lr_sizes: Sequence[Sequence[int]],
                  round_lr: bool = True) -> np.ndarray:
  """`degrade` of each example of [B, H, W, C] `hr` to `lr_sizes[lr_index[b]]`, back to (H, W).

  Examples sharing a size are resized together (one stacked matmul per pass and distinct size).
  uint8 with `round_lr` (the pipeline's case) takes the fast path: row b is bit-identical to
  `degrade(hr[b], ...)`, so it never depends on the other rows.
  """
  hr = np.asarray(hr)
  lr_index = np.asarray(lr_index)
  if hr.ndim != 4 or lr_index.shape != (hr.shape[0],):
    raise ValueError(f'expected hr [B, H, W, C] and lr_index [B], got {hr.shape}, {lr_index.shape}')
  out = np.empty_like(hr)
  fast = hr.dtype == np.uint8 and round_lr
  with one_blas_thread():
    for k in np.unique(lr_index):
      rows = np.flatnonzero(lr_index == k)
      group = hr if rows.size == hr.shape[0] else hr[rows]
      if fast:
        out[rows] = _degrade_uint8(group, _hw(lr_sizes[int(k)]))
      else:
        out[rows] = degrade(group, lr_sizes[int(k)], hr.shape[1:3], round_lr=round_lr)
  return out


@functools.lru_cache(maxsize=64)
def _weights_t(in_size: int, out_size: int) -> np.ndarray:
  # Transposed view of a C-ordered float32 matrix: the operand numpy's einsum hands to matmul.
  return resize_lib.resize_weights(in_size, out_size).astype(np.float32).T


def _pass(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """One rounded resize pass of [n, H, W, C] `x` along `axis` (1: height, 2: width).

  `resize_np` on one face computes `einsum('oh,nhwc->nowc', w, x)`, which numpy 2 evaluates as
  rows [W*C, H] @ w.T (rows [H*C, W] for the width). Here: those rows, stacked [n, ., .], and a
  stacked matmul, which calls BLAS once per face with that same shape: the same float32 sums bit
  for bit. The copies happen once and rounding is in place.
  """
  order = (0, 2, 3, 1) if axis == 1 else (0, 1, 3, 2)
  rows = np.ascontiguousarray(x.transpose(order), dtype=np.float32)
  stacked = rows.reshape(rows.shape[0], -1, rows.shape[-1])
  y = np.matmul(stacked, _weights_t(rows.shape[-1], size))
  np.rint(y, out=y)
  np.clip(y, 0.0, 255.0, out=y)
  y = y.reshape(rows.shape[:-1] + (size,))
  return y.transpose((0, 3, 1, 2) if axis == 1 else (0, 1, 3, 2))


def _degrade_uint8(hr: np.ndarray, lr_hw: Size) -> np.ndarray:
  """`degrade(hr, lr_hw, hr.shape[1:3])` of uint8 [n, H, W, C] as a float32 view (or `hr`)."""
  h, w = hr.shape[1:3]
  x = hr
  for axis, size in ((2, lr_hw[1]), (1, lr_hw[0]), (2, w), (1, h)):  # PIL: width, then height
    if x.shape[axis] != size:
      x = _pass(x, axis, size)
  return x


def upsample_uint8(lr: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
  """`bicubic_resize` of uint8 [n, h, w, C] faces to `out_hw`, bit for bit, as `degrade_batch`'s
  stacked passes (width, then height): the camera model's up-sampling of its 8-bit LR faces."""
  out_h, out_w = _hw(out_hw)
  x = lr
  for axis, size in ((2, out_w), (1, out_h)):
    if x.shape[axis] != size:
      x = _pass(x, axis, size)
  return np.asarray(x).astype(np.uint8)


# --- one BLAS thread while degrading -------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@functools.lru_cache(maxsize=1)
def _blas() -> threadpoolctl.ThreadpoolController:
  """The BLAS libraries numpy loaded (OpenBLAS in numpy's wheels), found once."""
  return threadpoolctl.ThreadpoolController().select(user_api='blas')


@contextlib.contextmanager
def one_blas_thread():
  """Runs the body with BLAS limited to one thread (restored when the last user leaves).

  Process-wide, so nested and concurrent users (the read threads) are counted.
  """
  global _blas_users, _blas_limiter
  with _blas_lock:
    if _blas_users == 0:
      _blas_limiter = _blas().limit(limits=1)
    _blas_users += 1
  try:
    yield
  finally:
    with _blas_lock:
      _blas_users -= 1
      if _blas_users == 0:
        _blas_limiter.restore_original_limits()
        _blas_limiter = None


def resolve_on_device(setting, backend: str | None = None, degradation='bicubic') -> bool:
  """`config.data.degrade_on_device` as a bool: True/False as given; None or 'auto' is on for a
  GPU/TPU backend and off on CPU, where the host path costs a quarter of the device path's CPU
  time (benchmarks/NOTES.md, "Input pipeline"). Call it in the main process (it starts JAX's
  backend), or name the `backend` the step is compiled for (`ipsr_jax.training.aot`: 'tpu', 'cuda').
  `degradation` (config.data.degradation): a camera model runs on host only (PIL's JPEG), so
  None/'auto' mean off for it and True is an error."""
  if not (degradation is None or (isinstance(degradation, str) and degradation == 'bicubic')):
    if setting is True:
      raise ValueError(f'data.degrade_on_device=True: data.degradation={degradation!r} runs on host only '
                       "(the device path is bicubic); set data.degrade_on_device to False or 'auto'")
    if setting is None or setting is False or (isinstance(setting, str) and setting == 'auto'):
      return False
  if setting is None or (isinstance(setting, str) and setting == 'auto'):
    return (backend or jax.default_backend()) != 'cpu'
  if isinstance(setting, (bool, np.bool_)):
    return bool(setting)
  raise ValueError(f"data.degrade_on_device must be True, False, None or 'auto', got {setting!r}")


class LRSampler:
  """Uniform choice of an index into `lr_sizes`, stateless in (seed, key).

  `per='example'`: every example draws its own size, keyed on its global sample index.
  `per='batch'`: one size for the whole batch (the authors' code), keyed on the batch's key.
  """

  def __init__(self, lr_sizes: Sequence[Sequence[int]], per: str = 'example', seed: int = 0):
    if per not in ('example', 'batch'):
      raise ValueError(f"LRSampler per must be 'example' or 'batch', got {per!r}")
    self.lr_sizes = tuple(_hw(s) for s in lr_sizes)
    if not self.lr_sizes:
      raise ValueError('lr_sizes is empty')
    self.per = per
    self.seed = int(seed)

  @property
  def num_sizes(self) -> int:
    return len(self.lr_sizes)

  def sample(self, key: int) -> int:
    """The size index for one key (a sample index or a step); the same key gives the same size."""
    # A 3-word seed keeps this stream apart from other users of default_rng([seed, index]).
    rng = np.random.default_rng([self.seed, int(key), 0x1F5A])
    return int(rng.integers(self.num_sizes))

  def for_batch(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
    """int32 [B] size indices for a batch whose examples have global sample indices `keys`.

    Per batch, the batch is identified by its first example's index: unique and stateless.
    """
    keys = np.asarray(keys, np.int64).reshape(-1)
    if keys.size == 0:
      return np.zeros((0,), np.int32)
    if self.per == 'batch':
      return np.full(keys.shape, self.sample(int(keys[0])), np.int32)
    return np.array([self.sample(int(k)) for k in keys], np.int32)

  def __repr__(self) -> str:
    return f'LRSampler(lr_sizes={self.lr_sizes}, per={self.per!r}, seed={self.seed})'


def _padded(matrices: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
  out = np.zeros((len(matrices),) + shape, np.float32)
  for k, m in enumerate(matrices):
    out[k, :m.shape[0], :m.shape[1]] = m
  return out


class DeviceDegrader:
  """On-device multi-scale degradation of a [B, H, W, 3] float 0..255 HR batch.

  For each LR size k the down and up resizes are fixed matrices per axis. With `round_lr=False`
  they compose into one [H, H] and one [W, W] matrix per size (up @ down). With `round_lr=True` the
  LR image must be rounded in between, so the two stages stay apart, zero-padded to the largest LR
  size (padded rows produce zeros, which the zero-padded up-columns ignore). Each example gathers
  its own matrices: one batched einsum per pass, no per-size control flow, one compilation.
  The output is float in 0..255; with `round_lr` it is rounded after every pass, like PIL on uint8
  images.
  """

  def __init__(self, lr_sizes: Sequence[Sequence[int]], image_hw: Sequence[int] = (128, 128),
               round_lr: bool = True):
    self.lr_sizes = tuple(_hw(s) for s in lr_sizes)
    self.image_hw = _hw(image_hw)
    self.round_lr = bool(round_lr)
    h, w = self.image_hw
    w_ = resize_lib.resize_weights
    down_h = [w_(h, lh) for lh, _ in self.lr_sizes]    # [lh, h]
    down_w = [w_(w, lw) for _, lw in self.lr_sizes]    # [lw, w]
    up_h = [w_(lh, h) for lh, _ in self.lr_sizes]      # [h, lh]
    up_w = [w_(lw, w) for _, lw in self.lr_sizes]      # [w, lw]
    if self.round_lr:
      max_h = max(lh for lh, _ in self.lr_sizes)
      max_w = max(lw for _, lw in self.lr_sizes)
      self.down_h = _padded(down_h, (max_h, h))
      self.down_w = _padded(down_w, (max_w, w))
      self.up_h = _padded(up_h, (h, max_h))
      self.up_w = _padded(up_w, (w, max_w))
    else:
      self.full_h = np.stack([u @ d for u, d in zip(up_h, down_h)]).astype(np.float32)  # [K, h, h]
      self.full_w = np.stack([u @ d for u, d in zip(up_w, down_w)]).astype(np.float32)  # [K, w, w]

  def __call__(self, hr: jax.Array, lr_index: jax.Array) -> jax.Array:
    """hr: [B, H, W, C] in 0..255 (any dtype); lr_index: int32 [B] -> float32 [B, H, W, C]."""
    # float32 whatever the compute dtype: in bf16 the 0..255 sums would be off by whole levels.
    hr = jnp.asarray(hr).astype(jnp.float32)
    if hr.ndim != 4 or tuple(hr.shape[1:3]) != self.image_hw:
      raise ValueError(
          f'expected hr [B, {self.image_hw[0]}, {self.image_hw[1]}, C], got {hr.shape}')
    lr_index = jnp.asarray(lr_index, jnp.int32)
    hi = jax.lax.Precision.HIGHEST

    def rows(m, x):  # resize along H with per-example [B, out, in] matrices
      return jnp.einsum('boh,bhwc->bowc', jnp.asarray(m)[lr_index], x, precision=hi)

    def cols(m, x):  # resize along W
      return jnp.einsum('bow,bhwc->bhoc', jnp.asarray(m)[lr_index], x, precision=hi)

    if not self.round_lr:
      # Clip like the host path's final uint8 conversion: bicubic overshoots near edges.
      return jnp.clip(rows(self.full_h, cols(self.full_w, hr)), 0.0, 255.0)

    def q(x):
      return jnp.clip(jnp.round(x), 0.0, 255.0)

    # PIL's order on uint8: width pass then height pass, rounding after each.
    lr = q(rows(self.down_h, q(cols(self.down_w, hr))))
    return q(rows(self.up_h, q(cols(self.up_w, lr))))

  def __repr__(self) -> str:
    return (f'DeviceDegrader(lr_sizes={self.lr_sizes}, image_hw={self.image_hw}, '
            f'round_lr={self.round_lr})')
