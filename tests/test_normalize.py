"""ops.normalize.unit_norm: one unit normalisation for numpy and jax, values and gradients pinned."""

import jax
import jax.numpy as jnp
import numpy as np

from ipsr_jax.ops.normalize import unit_norm


def _x():
  return np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)


def test_numpy_in_numpy_out_and_unit_length():
  x = _x()
  y = unit_norm(x)
  assert isinstance(y, np.ndarray) and y.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(unit_norm(np.zeros((2, 3), np.float32)), 0.0)  # no NaN
  np.testing.assert_allclose(unit_norm(x.T, axis=0), y.T, rtol=1e-6)


def test_jax_form_matches_numpy_and_keeps_the_written_out_gradient():
  x = _x()
  y = unit_norm(jnp.asarray(x))
  assert isinstance(y, jax.Array)
  np.testing.assert_allclose(np.asarray(y), unit_norm(x), rtol=1e-6, atol=1e-7)
  # The identity loss differentiates through it: its gradient is bit-identical to
  # x / max(sqrt(sum(x * x)), eps), the form the training trajectory is pinned to (a form with
  # jnp.linalg.norm has the same value but a gradient a few ulp away).
  w = jnp.arange(128, dtype=jnp.float32)
  written = lambda v: jnp.sum(w * (v / jnp.maximum(jnp.sqrt(jnp.sum(v * v, -1, keepdims=True)), 1e-12)))
  ours = lambda v: jnp.sum(w * unit_norm(v))
  np.testing.assert_array_equal(jax.jit(jax.grad(ours))(x), jax.jit(jax.grad(written))(x))
