"""The UNet's 4x4 stride-2 'SAME' convolutions, with the tiny-map cases computed the fast way.

XLA:CPU runs the decoder's transposed convolution of a 2x2 map (1024 -> 512 channels at ngf 64)
at ~2 GFLOP/s: 330 ms of the generator's 450 ms per batch of 8 on a 2-core Xeon, where the same
layer at 4x4 and above runs at 120-250 GFLOP/s (benchmarks/NOTES.md, "CPU devices and the
UNet's strided convolutions"). The encoder's 2x2 -> 1x1 conv is slow the same way (20 ms,
3 GFLOP/s). Both are computed here as the sums they are, with the same weights:

- transposed, input side <= 2: the four output phases, y[2m + a] = k[a] x[m - 1 + a] +
  k[a + 2] x[m + a] (per axis), as four 2x2 stride-1 convolutions interleaved (20x faster);
  larger inputs keep `lax.conv_transpose`, which is faster there;
- the transposed conv's kernel gradient, at every size, from the phase form: autodiff of
  `lax.conv_transpose` gives a kernel-dilated convolution, slow the same way (31% of a
  configs/lfw.py training step on CPU);
- forward, 2x2 input: the only output pixel sees the kernel's central 2x2 taps, a dot product.

The results equal the generic convolution up to float summation order (<= 1e-6 relative,
tests/test_unet.py), on every backend; gradients are those of the same sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')
PHASE_MAX_SIDE = 2  # transposed convs of inputs up to this side use the phase form


def _phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The transposed conv as its four output phases (per axis y[2m + a] = k[a] x[m - 1 + a] +
  k[a + 2] x[m + a]): four 2x2 stride-1 convolutions of the padded input, interleaved."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = []
  for a in (0, 1):
    phases = [jax.lax.conv_general_dilated(padded[:, a:a + h + 1, b:b + w + 1], kernel[a::2, b::2], (1, 1),
                                           'VALID', dimension_numbers=DIMENSIONS) for b in (0, 1)]
    rows.append(jnp.stack(phases, 3))        # [N, H, W, 2 (b), out]
  y = jnp.stack(rows, 2)                     # [N, H, 2 (a), W, 2 (b), out]
  return y.reshape(n, 2 * h, 2 * w, kernel.shape[-1])


def _forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  if max(x.shape[1:3]) > PHASE_MAX_SIDE:
    return jax.lax.conv_transpose(x, kernel, (2, 2), 'SAME', dimension_numbers=DIMENSIONS)
  return _phases(x, kernel)


@jax.custom_vjp
def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`lax.conv_transpose(x, kernel, (2, 2), 'SAME')` for a [4, 4, in, out] kernel (flax's
  `nn.ConvTranspose` layout, not flipped): [N, H, W, in] -> [N, 2H, 2W, out]."""
  return _forward(x, kernel)


def _fwd(x, kernel):
  return _forward(x, kernel), (x, kernel)


def _bwd(residuals, dy):
  x, kernel = residuals
  # The input gradient is a stride-2 convolution of dy (fast everywhere). The kernel gradient of
  # lax.conv_transpose is a kernel-dilated convolution, XLA:CPU's slow path (810 of 2,615 ms of a
  # configs/lfw.py training step); that of the phase form is four stride-1 ones.
  # Both maps are linear: transposing them traces no forward pass (nothing to count or prune).
  dx = jax.linear_transpose(lambda v: _forward(v, kernel), x)(dy)[0]
  dk = jax.linear_transpose(lambda k: _phases(x, k), kernel)(dy)[0]
  return dx, dk


conv_transpose_4x4_s2.defvjp(_fwd, _bwd)


def conv_4x4_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, (2, 2), 'SAME')` for a [4, 4, in, out] kernel."""
  n, h, w, c = x.shape
  if (h, w) == (2, 2):  # 'SAME' pads (1, 1): the one output pixel sees taps 1..2 on each axis
    return jnp.dot(x.reshape(n, 4 * c), kernel[1:3, 1:3].reshape(4 * c, -1)).reshape(n, 1, 1, -1)
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), 'SAME', dimension_numbers=DIMENSIONS)
