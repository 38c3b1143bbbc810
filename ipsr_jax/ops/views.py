"""One random view of a face pair: the same small warp, blur, noise and colour change for SR and HR.

The identity term compares E(SR) with E(HR) through one frozen recognizer. Compared pixel-exact,
the generator can raise that similarity with patterns only this network reads (its own
features), which other recognizers do not see. Drawn anew every step and applied alike to both
faces, a random view keeps what matters for identity (the two faces still match) and takes away
what does not survive a sub-pixel shift, a slight rotation or a blur: an expectation over
transformations, so the SR face must match HR in ways any recognizer would read
(`config.loss.views`; docs/method.md).

Pixels are 0..255 float images [N, H, W, 3]; every draw is per example, from one key.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# Keys of config.loss.views (`enabled` switches the views on).
FIELDS = ('enabled', 'shift', 'scale', 'rotate', 'flip', 'blur', 'noise', 'colour')


def _warp(images: jax.Array, matrix: jax.Array, offset: jax.Array) -> jax.Array:
  """Bilinear resampling of one [H, W, C] image: output (y, x) reads input matrix @ (y, x) + offset,
  edges clamped (a border pixel repeats, no black corners for the recognizer to read)."""
  h, w = images.shape[:2]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  src = jnp.einsum('ij,jhw->ihw', matrix, jnp.stack([yy, xx])) + offset[:, None, None]
  sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, [src[0], src[1]], order=1,
                                                             mode='nearest')
  return jax.vmap(sample, in_axes=2, out_axes=2)(images)


def _blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur of one [H, W, C] image (sigma ~ 0 leaves it as it is)."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * jnp.square(taps / jnp.maximum(sigma, 1e-3)))
  kernel = kernel / jnp.sum(kernel)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='edge')
  h, w = image.shape[:2]
  rows = sum(kernel[i] * padded[i:i + h] for i in range(2 * radius + 1))
  return sum(kernel[i] * rows[:, i:i + w] for i in range(2 * radius + 1))


def draw(key: jax.Array, batch: int, image_hw: tuple[int, int], cfg: Any) -> dict[str, jax.Array]:
  """Per-example view parameters: the affine map to the source pixel, blur sigma, colour gain.

  shift (pixels), scale (relative), rotate (degrees) are the ranges of uniform draws; flip a
  coin per face; blur the largest sigma (pixels); colour the largest relative gain per channel.
  """
  k = jax.random.split(key, 7)
  h, w = image_hw
  angle = jnp.deg2rad(cfg.rotate) * jax.random.uniform(k[0], (batch,), minval=-1.0, maxval=1.0)
  log_scale = math.log1p(cfg.scale) * jax.random.uniform(k[1], (batch,), minval=-1.0, maxval=1.0)
  shift = cfg.shift * jax.random.uniform(k[2], (batch, 2), minval=-1.0, maxval=1.0)
  flip = (jax.random.bernoulli(k[3], 0.5, (batch,)) if cfg.flip
          else jnp.zeros((batch,), bool))
  cos, sin, inv_scale = jnp.cos(angle), jnp.sin(angle), jnp.exp(-log_scale)
  # Output -> input: undo the shift, the rotation and the scale about the centre, then the flip.
  rot = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2) * inv_scale[:, None, None]
  mirror = jnp.where(flip[:, None], jnp.array([1.0, -1.0]), jnp.array([1.0, 1.0]))
  matrix = mirror[:, :, None] * rot
  centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])
  offset = centre - jnp.einsum('nij,j->ni', matrix, centre) - jnp.einsum('nij,nj->ni', matrix, shift)
  return {
      'matrix': matrix, 'offset': offset,
      'sigma': cfg.blur * jax.random.uniform(k[4], (batch,)),
      'gain': 1.0 + cfg.colour * jax.random.uniform(k[5], (batch, 1, 1, 3), minval=-1.0, maxval=1.0),
      'noise_key': k[6],
  }


def apply(params: dict[str, jax.Array], images: jax.Array, cfg: Any) -> jax.Array:
  """The drawn views of a batch of 0..255 images (the same `params` for SR and for HR)."""
  images = images.astype(jnp.float32)
  out = jax.vmap(_warp)(images, params['matrix'], params['offset'])
  if cfg.blur > 0:
    radius = max(1, int(math.ceil(2.0 * cfg.blur)))
    out = jax.vmap(lambda im, s: _blur(im, s, radius))(out, params['sigma'])
  out = out * params['gain']
  if cfg.noise > 0:
    out = out + cfg.noise * jax.random.normal(params['noise_key'], out.shape, jnp.float32)
  return jnp.clip(out, 0.0, 255.0)


def same_view(key: jax.Array, sr: jax.Array, hr: jax.Array, cfg: Any) -> tuple[jax.Array, jax.Array]:
  """(view of sr, view of hr): one random view per face pair, identical for both faces."""
  params = draw(key, sr.shape[0], sr.shape[1:3], cfg)
  return apply(params, sr, cfg), apply(params, hr, cfg)


def validate(cfg: Any) -> None:
  """Clear errors for a bad `config.loss.views`."""
  missing = [f for f in FIELDS if f not in cfg]
  if missing:
    raise ValueError(f'config.loss.views lacks {missing}; fields: {FIELDS}')
  for f in ('shift', 'scale', 'rotate', 'blur', 'noise', 'colour'):
    value = cfg[f]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      raise ValueError(f'config.loss.views.{f} must be a number >= 0, got {value!r}')
  if cfg.colour >= 1 or cfg.scale >= 1:
    raise ValueError('config.loss.views.colour and .scale must be < 1 (relative ranges)')
