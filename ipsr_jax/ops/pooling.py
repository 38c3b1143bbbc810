"""Max pooling as a running maximum over shifted strided slices: XLA:CPU's reduce-window is slow.

`nn.max_pool` lowers to `lax.reduce_window`, and its derivative to a variadic reduce-window over
(value, tangent) pairs. On XLA:CPU (jax 0.10.2) FaceNet's first 3x3 stride-2 pool of 8x77x77x64
takes 1.9 ms forward and 53 ms forward + input gradient; the same window written as 9 strided
slices folded with `where(tap > best, tap, best)` takes 0.32 ms and 14 ms, with the same values
and the same gradient (benchmarks/NOTES.md, "The training step's frozen embedder"). In the
training step that gradient is taken through the frozen embedder for every SR face.

The fold keeps the first maximum in row-major window order, so a gradient goes to one input of
each window, as the reduce-window's does; max is exact, so values equal the reduce-window's bit
for bit, and so do the gradients of inputs without ties (tests/test_pooling.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  """VALID max pooling of x [N, H, W, C] (what `nn.max_pool(x, window, strides, 'VALID')` returns)."""
  (kh, kw), (sh, sw) = window, strides
  out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f'max_pool: window {window} larger than the input {x.shape[1:3]}')
  best = None
  for i in range(kh):
    for j in range(kw):
      tap = x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
      # `| isnan(tap)`: a NaN anywhere in the window comes out, as from the reduce-window.
      best = tap if best is None else jnp.where((tap > best) | jnp.isnan(tap), tap, best)
  return best
