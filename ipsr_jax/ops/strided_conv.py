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

Mixed precision: the kernel (and bias) come in their parameter dtype (float32) and are cast to
the input's compute dtype (bfloat16) inside, and their gradients are summed over the batch with
float32 accumulators and leave in float32. Autodiff of a bf16 convolution instead yields a bf16
kernel gradient, and the data-parallel all-reduce that XLA places right after it would sum the
gradients of 256 chips with an 8-bit mantissa (the compiled v5e-256 step; docs/scale.md).

FSDP (`mesh` with an 'fsdp' axis > 1): the kernel arrives split over that axis; the op gathers
it whole, in the compute dtype, where it uses it (forward, and again in the backward pass: ZeRO-3, nothing whole is kept
between them) and constrains its gradient to the same split right where the batch sum is formed,
so XLA reduce-scatters it instead of all-reducing it whole. Left to place these itself, XLA's
partitioner gathered activations over the global batch and all-reduced whole gradients.
"""

from __future__ import annotations

import functools

import jax
from jax import custom_derivatives
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ipsr_jax.runtime import sharding

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


def _kernel_grad(x: jax.Array, dy: jax.Array, padding, dy_dilation: int, dtype) -> jax.Array:
  """d/dk of `conv(x, k)` (stride `dy_dilation`, `padding`) for cotangent dy: the correlation of
  x with dy over batch and space, [kh, kw, in, out], accumulated and returned in `dtype`."""
  dims = jax.lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(2, 3, 0, 1))
  return jax.lax.conv_general_dilated(x, dy, (1, 1), padding, rhs_dilation=(dy_dilation,) * 2,
                                      dimension_numbers=dims, preferred_element_type=dtype)


def _fsdp(mesh) -> int:
  return 1 if mesh is None else mesh.shape.get('fsdp', 1)


def _whole(param, mesh):
  """The parameter gathered whole (a no-op without FSDP). Callers cast to the compute dtype
  first, asking for a bf16 gather in a bf16 step (TPU's compiler gathers bf16 either way; the
  H100 compile still gathers float32 and casts after, docs/scale.md)."""
  if param is None or _fsdp(mesh) == 1:
    return param
  return jax.lax.with_sharding_constraint(param, NamedSharding(mesh, PartitionSpec()))


def _split(grad, mesh, kernel_shape=None):
  """A parameter's gradient, constrained to the parameter's FSDP split (`sharding.fsdp_spec`).

  With `kernel_shape`, `grad` is a block of taps of that kernel (a phase, the central 2x2): it
  gets the kernel's split when that falls on a channel dimension, so each block is reduce-
  scattered where it is summed instead of all-reduced whole and sliced after assembly.
  """
  if grad is None or _fsdp(mesh) == 1:
    return grad
  spec = sharding.fsdp_spec(grad.shape if kernel_shape is None else kernel_shape, _fsdp(mesh))
  if kernel_shape is not None and any(spec[:2]):
    return grad  # split over taps (tiny channel counts): only the assembled kernel can take it
  return jax.lax.with_sharding_constraint(grad, NamedSharding(mesh, spec))


def _bias_grad(dy: jax.Array, bias):
  return None if bias is None else jnp.sum(dy, axis=(0, 1, 2), dtype=bias.dtype)


def _with_bias(y: jax.Array, bias) -> jax.Array:
  return y if bias is None else y + bias.astype(y.dtype)


def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, mesh=None) -> jax.Array:
  """`lax.conv_transpose(x, kernel, (2, 2), 'SAME') + bias` for a [4, 4, in, out] kernel (flax's
  `nn.ConvTranspose` layout, not flipped): [N, H, W, in] -> [N, 2H, 2W, out], in x's dtype."""
  return _conv_transpose(mesh, x, kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_transpose(mesh, x, kernel, bias):
  return _with_bias(_forward(x, _whole(kernel.astype(x.dtype), mesh)), _whole(bias, mesh))


def _primal(v):
  return None if v is None else v.value


def _residuals(x, kernel, bias):
  """(x, kernel, bias, whether x needs a gradient). The flag is pytree structure (() or None),
  static for the backward pass: the generator's input (the data) needs none, and a custom VJP
  that returned one anyway would keep a dead convolution in the step's jaxpr (its FLOP count)."""
  return (_primal(x), _primal(kernel), _primal(bias), () if x.perturbed else None)


def _transpose_fwd(mesh, x, kernel, bias):
  return _conv_transpose(mesh, _primal(x), _primal(kernel), _primal(bias)), _residuals(x, kernel, bias)


def _transpose_bwd(mesh, residuals, dy):
  x, kernel, bias, needs_dx = residuals
  if isinstance(dy, custom_derivatives.SymbolicZero):  # the output is not used: nothing flows back
    return None, None, None
  # The input gradient is a stride-2 convolution of dy (fast everywhere). The kernel gradient of
  # lax.conv_transpose is a kernel-dilated convolution, XLA:CPU's slow path (810 of 2,615 ms of a
  # configs/lfw.py training step); that of the phase form is four stride-1 ones: phase (a, b) of
  # the output saw taps k[a::2, b::2] of the input padded by one.
  # The input map is linear: transposing it traces no forward pass (nothing to count or prune).
  k = _whole(kernel.astype(x.dtype), mesh)
  dx = jax.linear_transpose(lambda v: _forward(v, k), x)(dy)[0] if needs_dx is not None else None
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [[_split(_kernel_grad(padded[:, a:a + h + 1, b:b + w + 1], dy[:, a::2, b::2], 'VALID', 1, kernel.dtype),
                  mesh, kernel.shape) for b in (0, 1)] for a in (0, 1)]   # [a][b] -> [2, 2, in, out]
  dk = jnp.stack([jnp.stack(row, 2) for row in taps], 1)      # [2 (i), 2 (a), 2 (j), 2 (b), in, out]
  dk = dk.reshape(kernel.shape)                               # tap 2i + a, 2j + b
  return dx, _split(dk, mesh), _split(_bias_grad(dy, bias), mesh)


_conv_transpose.defvjp(_transpose_fwd, _transpose_bwd, symbolic_zeros=True)


def _conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  if (h, w) == (2, 2):  # 'SAME' pads (1, 1): the one output pixel sees taps 1..2 on each axis
    return jnp.dot(x.reshape(n, 4 * c), kernel[1:3, 1:3].reshape(4 * c, -1)).reshape(n, 1, 1, -1)
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), 'SAME', dimension_numbers=DIMENSIONS)


def conv_4x4_s2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, mesh=None) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, (2, 2), 'SAME') + bias` for a [4, 4, in, out] kernel
  and an input of even sides, in x's dtype."""
  return _conv(mesh, x, kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(mesh, x, kernel, bias):
  return _with_bias(_conv_forward(x, _whole(kernel.astype(x.dtype), mesh)), _whole(bias, mesh))


def _conv_fwd(mesh, x, kernel, bias):
  return _conv(mesh, _primal(x), _primal(kernel), _primal(bias)), _residuals(x, kernel, bias)


def _conv_bwd(mesh, residuals, dy):
  x, kernel, bias, needs_dx = residuals
  if isinstance(dy, custom_derivatives.SymbolicZero):
    return None, None, None
  k = _whole(kernel.astype(x.dtype), mesh)
  dx = jax.linear_transpose(lambda v: _conv_forward(v, k), x)(dy)[0] if needs_dx is not None else None
  n, h, w, c = x.shape
  if (h, w) == (2, 2):  # the dot's kernel gradient: only the central 2x2 taps saw the input
    central = jax.lax.dot_general(x.reshape(n, 4 * c), dy.reshape(n, -1), (((0,), (0,)), ((), ())),
                                  preferred_element_type=kernel.dtype)
    central = _split(central.reshape(2, 2, c, -1), mesh, kernel.shape)
    dk = jnp.zeros(kernel.shape, kernel.dtype).at[1:3, 1:3].set(central)
  else:  # 'SAME' for a 4x4 kernel at stride 2 on even sides pads one a side
    dk = _kernel_grad(x, dy, ((1, 1), (1, 1)), 2, kernel.dtype)
  return dx, _split(dk, mesh), _split(_bias_grad(dy, bias), mesh)


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)
