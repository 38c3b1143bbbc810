"""Convolutions of a frozen network whose input gradient reads a kernel prepared once per run.

The identity loss differentiates the SR faces through the frozen embedder: every convolution's
input gradient is a convolution with its kernel flipped in space and with input and output
channels swapped. XLA:CPU materialises that kernel with a transpose on every training step: in
configs/lfw.py's step ~150 of ~2,700 thread-ms went to `transpose_copy_fusion` of FaceNet's
kernels (benchmarks/NOTES.md, "The training step's frozen embedder"). The kernels never change,
so `with_input_grad_kernels` computes them once and stores them in their own variable collection
(INPUT_GRAD, same tree paths as the params); `Conv` then takes its input gradient from that
kernel: the same convolution jax's own transpose rule emits, with the same values bit for bit
(tests/test_frozen_conv.py), without the per-step copy.

`Conv` is nn.Conv (explicit padding, groups 1, no dilation) with the same parameters, names,
shapes and initialisers; without the collection it is plain autodiff. With it, the kernel's own
gradient is still the exact one, built only when something differentiates the kernel; the prepared
kernel gets a zero gradient: it is a cache of the kernel, not a parameter.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

INPUT_GRAD = 'input_grad'
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

Padding = tuple[tuple[int, int], tuple[int, int]]


def input_grad_kernel(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> the kernel of its input gradient: flipped in space, in/out swapped (HWOI)."""
  return jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS)


def _input_grad_padding(in_size: int, kernel_size: int, stride: int, pad: tuple[int, int],
                        out_size: int) -> tuple[int, int]:
  """Padding of the input-gradient convolution along one axis (jax's `_conv_general_vjp_lhs_padding`
  for unit dilation): the gradient, dilated by the stride, padded to cover every input position."""
  before = kernel_size - 1 - pad[0]
  after = in_size + kernel_size - 1 - ((out_size - 1) * stride + 1) - before
  return before, after


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_with_input_grad_kernel(x: jax.Array, kernel: jax.Array, grad_kernel: jax.Array,
                                strides: tuple[int, int], padding: Padding) -> jax.Array:
  """conv(x, kernel); its gradient with respect to x is computed with `grad_kernel`, which must be
  `input_grad_kernel(kernel)`."""
  del grad_kernel
  return _conv(x, kernel, strides, padding)


def _fwd(x, kernel, grad_kernel, strides, padding):
  # symbolic_zeros: `perturbed` says which inputs are differentiated. The kernel's gradient is
  # built only when asked for, so a frozen network's jaxpr carries no dead weight-gradient
  # convolutions (benchmarks count the jaxpr's FLOPs).
  saved_x = x.value if kernel.perturbed else None
  return _conv(x.value, kernel.value, strides, padding), (saved_x, x.value.shape, kernel.value, grad_kernel.value)


def _bwd(strides, padding, residuals, g):
  x, x_shape, kernel, grad_kernel = residuals
  pads = tuple(_input_grad_padding(x_shape[1 + d], kernel.shape[d], strides[d], padding[d], g.shape[1 + d])
               for d in range(2))
  gx = lax.conv_general_dilated(g, grad_kernel.astype(g.dtype), (1, 1), pads, lhs_dilation=strides,
                                dimension_numbers=_DIMENSIONS)
  gk = None
  if x is not None:
    # The conv is linear in the kernel: its transpose is the weight gradient, with no second forward.
    (gk,) = jax.linear_transpose(lambda k: _conv(x, k, strides, padding), kernel)(g)
  return gx, gk, None


conv_with_input_grad_kernel.defvjp(_fwd, _bwd, symbolic_zeros=True)


class Conv(nn.Module):
  """nn.Conv(features, kernel_size, strides, padding=explicit pairs, use_bias) with the same
  parameters; reads INPUT_GRAD/kernel when the caller's variables carry it."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    strides, padding = tuple(self.strides), tuple(tuple(p) for p in self.padding)
    if self.has_variable(INPUT_GRAD, 'kernel'):
      y = conv_with_input_grad_kernel(x, kernel, self.get_variable(INPUT_GRAD, 'kernel'), strides, padding)
    else:
      y = _conv(x, kernel, strides, padding)
    return y + bias if bias is not None else y


def with_input_grad_kernels(variables: dict[str, Any]) -> dict[str, Any]:
  """`variables` plus INPUT_GRAD: `input_grad_kernel` of every 4-d 'kernel' in its params, at the
  same path. Traceable (jax.eval_shape gives the abstract tree for ahead-of-time compilation)."""
  def prepared(tree):
    out = {}
    for name, value in tree.items():
      if hasattr(value, 'items'):  # a dict or FrozenDict of submodules
        sub = prepared(value)
        if sub:
          out[name] = sub
      elif name == 'kernel' and getattr(value, 'ndim', 0) == 4:
        out[name] = input_grad_kernel(value)
    return out
  return {**variables, INPUT_GRAD: prepared(variables['params'])}
