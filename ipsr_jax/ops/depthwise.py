"""Depthwise convolution as shifted multiply-adds: XLA:CPU runs grouped convolutions slowly.

`lax.conv_general_dilated(..., feature_group_count=C)` on XLA:CPU (jax 0.10.2) takes 10-50x the time
of the same k*k taps written as shifted slices times a per-channel weight, summed: 80 ms against
1.7 ms for a 3x3 depthwise conv of 8x56x56x64 (benchmarks/NOTES.md, "SFace's depthwise
convolutions"). XLA fuses the k*k slices and products into one loop. The sums run in another order
than the convolution's, so values agree to float rounding (~1e-6 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int,
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """x [N, H, W, C] with kernel [kh, kw, 1, C] (flax's layout for feature_group_count=C)."""
  kh, kw, one, channels = kernel.shape
  if one != 1 or channels != x.shape[-1]:
    raise ValueError(f'depthwise kernel must be [kh, kw, 1, {x.shape[-1]}], got {kernel.shape}')
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
      tap = tap * kernel[i, j, 0, :].astype(x.dtype)
      out = tap if out is None else out + tap
  return out
