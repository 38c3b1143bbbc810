"""Bicubic resizing that matches PIL's `Image.resize(..., Image.BICUBIC)`, on host and on device
(and, on host, PIL's BILINEAR and BOX filters from the same code).

PIL resizes separably with Keys' cubic (a = -0.5), widening the kernel by the scale factor when
shrinking (antialiasing) and normalising the weights at the borders. Both paths below use the same
[out, in] weight matrices, so the numpy pipeline, the jitted degradation and the embedder's
128 -> 160 resize all agree: a resize is two small matmuls, which XLA runs fast on every chip.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
  return np.maximum(1.0 - np.abs(x), 0.0)


def _box(x: np.ndarray) -> np.ndarray:
  return ((x > -0.5) & (x <= 0.5)).astype(np.float64)  # PIL's box_filter: half-open interval


# PIL's filters (Resample.c): the function of the tap's distance and its support at scale 1.
FILTERS = {'bicubic': (_cubic, 2.0), 'bilinear': (_bilinear, 1.0), 'box': (_box, 0.5)}


@functools.lru_cache(maxsize=256)
def resize_weights(in_size: int, out_size: int, kind: str = 'bicubic') -> np.ndarray:
  """[out_size, in_size] float64 matrix of PIL's coefficients (Resample.c) for filter `kind`.

  'bicubic' (the default), 'bilinear' or 'box' (PIL's BOX, an area average when shrinking).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize sizes must be positive, got {in_size} -> {out_size}')
  if kind not in FILTERS:
    raise ValueError(f'unknown resize filter {kind!r}; known: {sorted(FILTERS)}')
  fn, filter_support = FILTERS[kind]
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = filter_support * filterscale
  weights = np.zeros((out_size, in_size), np.float64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C does
    xmax = min(int(center + support + 0.5), in_size)
    taps = np.arange(xmin, xmax)
    w = fn((taps - center + 0.5) / filterscale)
    total = w.sum()
    weights[xx, xmin:xmax] = w / total if total != 0.0 else w
  weights.setflags(write=False)
  return weights


def _as_batch(images):
  if images.ndim == 3:
    return images[None], True
  if images.ndim == 4:
    return images, False
  raise ValueError(f'expected [H, W, C] or [N, H, W, C] images, got shape {images.shape}')


def resize_np(images: np.ndarray, out_hw: tuple[int, int], kind: str = 'bicubic') -> np.ndarray:
  """Host resize of [H, W, C] or [N, H, W, C] images in 0..255 with PIL's filter `kind`.

  uint8 in -> uint8 out, rounded and clipped after each pass as PIL does (width first, then
  height); float in -> float32 out, unrounded.
  """
  images = np.asarray(images)
  batch, squeeze = _as_batch(images)
  out_h, out_w = (int(s) for s in out_hw)
  is_uint8 = batch.dtype == np.uint8
  x = batch.astype(np.float32)

  def finish(y):
    return np.clip(np.round(y), 0, 255) if is_uint8 else y

  if out_w != x.shape[2]:
    x = finish(np.einsum('ow,nhwc->nhoc', resize_weights(x.shape[2], out_w, kind).astype(np.float32), x,
                          optimize=True))
  if out_h != x.shape[1]:
    x = finish(np.einsum('oh,nhwc->nowc', resize_weights(x.shape[1], out_h, kind).astype(np.float32), x,
                          optimize=True))
  out = x.astype(np.uint8) if is_uint8 else x.astype(np.float32)
  return out[0] if squeeze else out


def _weights_first(weights: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  y = jax.lax.dot_general(weights, x, (((1,), (axis,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, 0, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _apply_matrix(weights: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  return _weights_first(weights, x, axis)


def _apply_fwd(weights, x, axis):
  return _weights_first(weights, x, axis), weights


def _apply_bwd(axis, weights, dy):
  # The map is linear in x: its transpose is the same product with the transposed matrix, again
  # with the matrix first. The weights are constants (PIL's coefficients): no gradient.
  return jnp.zeros_like(weights), _weights_first(weights.T, dy, axis)


_apply_matrix.defvjp(_apply_fwd, _apply_bwd)


def _apply(weights: np.ndarray, x: jax.Array, axis: int) -> jax.Array:
  """weights [out, in] applied along `axis` of x, exactly (HIGHEST precision: no TF32/bf16 passes).

  The weights are the dot's left operand, forward and backward (a custom VJP: autodiff's
  transpose would put them on the right again). With them on the right (`einsum('ow,nhwc->nhoc')`)
  XLA's GPU compiler without autotuning, as ahead-of-time compiles run, fails on the backward
  pass: "Couldn't find output tile sizes" for the Triton GEMM of the [N*W*C, 128] input gradient
  of the embedder's 128 -> 160 resize (H100, `ipsr_jax.tools.aot_compile --topology=h100-8`;
  docs/scale.md). This order compiles on every backend and computes the same sums.
  """
  return _apply_matrix(jnp.asarray(weights, x.dtype), x, axis)


def resize(images: jax.Array, out_hw: tuple[int, int], *, round_between: bool = False) -> jax.Array:
  """Device bicubic resize of float [N, H, W, C] (or [H, W, C]) images; PIL's weights.

  `round_between=True` rounds and clips to 0..255 after each pass, reproducing PIL on uint8 data.
  Computes in the input's floating dtype (bf16 under mixed precision) with float32 weights.
  """
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  batch, squeeze = _as_batch(images)
  out_h, out_w = (int(s) for s in out_hw)
  x = batch

  def finish(y):
    return jnp.clip(jnp.round(y), 0.0, 255.0) if round_between else y

  if out_w != x.shape[2]:
    x = finish(_apply(resize_weights(x.shape[2], out_w), x, axis=2))
  if out_h != x.shape[1]:
    x = finish(_apply(resize_weights(x.shape[1], out_h), x, axis=1))
  return x[0] if squeeze else x
