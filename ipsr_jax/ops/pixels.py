"""Pixel ranges: the generator works in [-1, 1], everything a person or a recognizer sees in 0..255.

Training, inference, evaluation and export all convert through these, so a change of convention
is one edit; inference and evaluation need not import the loss to do it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_pixels(x: jax.Array) -> jax.Array:
  """[-1, 1] generator range -> 0..255 pixels."""
  return (x + 1.0) * 127.5


def from_pixels(x: jax.Array) -> jax.Array:
  """0..255 pixels (any int or float dtype) -> float32 [-1, 1]."""
  return x.astype(jnp.float32) / 127.5 - 1.0


def round_to_uint8(pixels: jax.Array) -> jax.Array:
  """float 0..255 -> uint8, rounded half to even and clipped (what a uint8 caller gets back)."""
  return jnp.clip(jnp.round(pixels), 0.0, 255.0).astype(jnp.uint8)
