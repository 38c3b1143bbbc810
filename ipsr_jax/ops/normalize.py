"""Unit normalisation: x / max(||x||, eps) along one axis.

Embeddings are compared by cosine everywhere (training, inference, evaluation, export parity), so
the scaling to unit length is written once. NumPy in gives NumPy out (host-side evaluation stays off
the accelerator); anything else (a jax.Array or a tracer) goes through jax.numpy.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def unit_norm(x: Any, axis: int = -1, eps: float = 1e-12) -> Any:
  """x / max(||x||_2, eps) along `axis`; a zero vector stays zero instead of becoming NaN.

  NumPy's norm is `np.linalg.norm`; the jax form writes it as sqrt(sum(x * x)): `jnp.linalg.norm`
  has the same value but rounds its gradient differently, and the identity loss differentiates
  through this one (a tested, reproducible training trajectory depends on it). The jax form's
  gradient is NaN at an exactly zero vector (the norm's derivative there); losses on activations
  that can be all zero need an eps inside the square root instead.
  """
  if isinstance(x, (np.ndarray, np.generic)):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)), eps)
