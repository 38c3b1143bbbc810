"""The UNet generator: bicubic-upsampled LR face (128x128, [-1, 1]) -> SR face.

As the authors' Keras code builds it (docs/design.md, section 2): `num_downs` encoder blocks of a 4x4
stride-2 Conv (+ BatchNorm except the first and the innermost) + LeakyReLU, `num_downs - 1` decoder
blocks of a 4x4 stride-2 ConvTranspose + BatchNorm (+ Dropout on the first few) + ReLU, each joined
to the matching encoder output by concatenation, and an output ConvTranspose to 3 channels + tanh.
The paper's "7 upsampling blocks" counts that output layer.

`residual=True` (not in the paper; off in `configs/base.py`) adds atanh(bicubic input) to the output
conv before the tanh, so an untrained generator already returns the bicubic face: a narrow
generator (the CPU demo) otherwise spends most of a short run learning to copy its input.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipsr_jax.ops import strided_conv

Dtype = Any


def encoder_widths(ngf: int, num_downs: int, max_width_multiplier: int = 8) -> list[int]:
  """ngf * (1, 2, 4, 8, 8, 8, 8) for the paper's 7 levels."""
  return [ngf * min(2**i, max_width_multiplier) for i in range(num_downs)]


class StridedConv(nn.Module):
  """A 4x4 stride-2 'SAME' Conv (`transpose=False`) or ConvTranspose: the parameters of flax's
  `nn.Conv` / `nn.ConvTranspose` (same names, shapes and initial values), computed by
  `ops.strided_conv`, which avoids XLA:CPU's slow path for the innermost 2x2 maps."""
  features: int
  transpose: bool = False
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  mesh: Any = None  # a training mesh with 'fsdp' > 1: the kernel arrives split (ops/strided_conv.py)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (4, 4, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype) \
        if self.use_bias else None
    # The kernel and bias stay in param_dtype: the op casts them to the compute dtype itself and
    # returns their gradients in param_dtype, summed in float32 (ops/strided_conv.py).
    x = x.astype(self.dtype)
    op = strided_conv.conv_transpose_4x4_s2 if self.transpose else strided_conv.conv_4x4_s2
    return op(x, kernel, bias, self.mesh)


class UNet(nn.Module):
  ngf: int = 64
  num_downs: int = 7
  max_width_multiplier: int = 8
  num_dropout_blocks: int = 3
  dropout_rate: float = 0.5
  leaky_relu_slope: float = 0.3
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  init_stddev: float = 0.02
  out_channels: int = 3
  residual: bool = False
  dtype: Dtype = jnp.float32          # compute dtype (bfloat16 for mixed precision)
  param_dtype: Dtype = jnp.float32
  mesh: Any = None                    # training mesh: FSDP-split kernels are gathered per layer

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.shape[1] % (2**self.num_downs) or x.shape[2] % (2**self.num_downs):
      raise ValueError(f'UNet with {self.num_downs} downsamplings needs sides divisible by '
                       f'{2**self.num_downs}, got {x.shape[1:3]}')
    init = nn.initializers.normal(self.init_stddev)
    widths = encoder_widths(self.ngf, self.num_downs, self.max_width_multiplier)
    # BatchNorm computes in float32 whatever the compute dtype: its statistics and the gradients
    # of its scale and offset are then float32 sums (over devices too), as big_vision and MaxText
    # keep normalisation; its output goes back to the compute dtype.
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                   epsilon=self.bn_epsilon, dtype=jnp.float32,
                                   param_dtype=self.param_dtype, name=name)
    norm = lambda name: lambda v: bn(name)(v).astype(self.dtype)
    lr_up = x
    x = x.astype(self.dtype)

    skips: list[jax.Array] = []
    for i, width in enumerate(widths):
      use_bn = 0 < i < self.num_downs - 1  # no BN on the first and the innermost block
      x = StridedConv(width, use_bias=not use_bn, kernel_init=init, dtype=self.dtype,
                      param_dtype=self.param_dtype, mesh=self.mesh, name=f'down{i}_conv')(x)
      if use_bn:
        x = norm(f'down{i}_bn')(x)
      x = nn.leaky_relu(x, self.leaky_relu_slope)
      skips.append(x)

    x = skips.pop()  # the innermost (1x1) features start the decoder
    for j in range(self.num_downs - 1):
      width = widths[self.num_downs - 2 - j]
      x = StridedConv(width, transpose=True, use_bias=False, kernel_init=init, dtype=self.dtype,
                      param_dtype=self.param_dtype, mesh=self.mesh, name=f'up{j}_conv')(x)
      x = norm(f'up{j}_bn')(x)
      if j < self.num_dropout_blocks:
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f'up{j}_dropout')(x)
      x = nn.relu(x)
      x = jnp.concatenate([x, skips.pop()], axis=-1)

    x = StridedConv(self.out_channels, transpose=True, kernel_init=init, dtype=self.dtype,
                    param_dtype=self.param_dtype, mesh=self.mesh, name='out_conv')(x)
    x = x.astype(jnp.float32)
    if self.residual:
      # tanh(atanh(input) + delta): the input itself at delta = 0, and the output stays in (-1, 1).
      x = x + jnp.arctanh(jnp.clip(lr_up.astype(jnp.float32), -0.999, 0.999))
    return jnp.tanh(x)


def from_config(model_config, dtype: Dtype = jnp.float32, mesh: Any = None) -> UNet:
  """The generator that `config.model` describes; `mesh`: the training mesh (FSDP)."""
  return UNet(ngf=model_config.ngf, num_downs=model_config.num_downs,
              max_width_multiplier=model_config.max_width_multiplier,
              num_dropout_blocks=model_config.num_dropout_blocks, dropout_rate=model_config.dropout_rate,
              leaky_relu_slope=model_config.leaky_relu_slope, bn_momentum=model_config.bn_momentum,
              bn_epsilon=model_config.bn_epsilon, init_stddev=model_config.init_stddev,
              residual=model_config.get('residual', False), dtype=dtype, mesh=mesh)

