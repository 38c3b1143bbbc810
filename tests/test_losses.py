"""The identity distances against independent numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax.training import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pair(seed=0, n=6, d=16):
  rng = np.random.default_rng(seed)
  hr = _unit(rng.normal(size=(n, d)))
  sr = _unit(hr + 0.7 * rng.normal(size=(n, d)))
  return sr.astype(np.float32), hr.astype(np.float32)


def test_mse_and_cosine_agree_up_to_scale():
  sr, hr = _pair()
  mse = float(losses.identity_distance(jnp.asarray(sr), jnp.asarray(hr), 'mse'))
  cos = float(losses.identity_distance(jnp.asarray(sr), jnp.asarray(hr), 'cosine'))
  assert mse == pytest.approx(np.mean((sr - hr) ** 2), rel=1e-5)
  assert cos == pytest.approx(np.mean(1 - np.sum(sr * hr, -1)), rel=1e-5)
  assert mse * sr.shape[1] == pytest.approx(2 * cos, rel=1e-4)  # |a-b|^2 = 2 - 2cos


def test_contrastive_is_in_batch_cross_entropy():
  sr, hr = _pair(1)
  t = 0.07
  got = float(losses.identity_distance(jnp.asarray(sr), jnp.asarray(hr), 'contrastive', t))
  logits = sr.astype(np.float64) @ hr.T.astype(np.float64) / t
  expected = np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])
  assert got == pytest.approx(expected, rel=1e-5)


def test_contrastive_ignores_a_shared_shift_cosine_rewards_it():
  """Moving every SR embedding toward a common direction raises every cosine (the paper's
  distance falls) but tells the people apart no better (the contrastive term barely moves)."""
  rng = np.random.default_rng(2)
  hr = _unit(rng.normal(size=(8, 32)) + 1.5)  # embeddings with a common (mean-face) component
  sr = _unit(rng.normal(size=(8, 32)))
  mean = _unit(hr.mean(0))
  shifted = _unit(sr + 2.0 * mean)
  cos = lambda a: float(losses.identity_distance(jnp.asarray(a), jnp.asarray(hr), 'cosine'))
  con = lambda a: float(losses.identity_distance(jnp.asarray(a), jnp.asarray(hr), 'contrastive', 0.1))
  assert cos(shifted) < cos(sr) - 0.3
  assert abs(con(shifted) - con(sr)) < 0.25 * con(sr)
  assert con(hr) < 0.5 * con(sr)  # the right match is what lowers it


def test_unknown_distance():
  with pytest.raises(ValueError, match='identity_distance'):
    losses.identity_distance(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 'l1')


def test_feature_distance_is_lpips_form_against_numpy():
  """Channel-normalised squared distance per position, averaged over positions, then over layers."""
  rng = np.random.default_rng(3)
  shapes = {'a': (2, 5, 5, 8), 'b': (2, 2, 2, 16)}
  f_sr = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  f_hr = {k: (rng.normal(size=s) * 7.0).astype(np.float32) for k, s in shapes.items()}
  unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  expected = np.mean([np.mean(np.sum((unit(f_sr[k]) - unit(f_hr[k])) ** 2, -1)) for k in shapes])
  as_jax = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  assert float(losses.feature_distance(as_jax(f_sr), as_jax(f_hr))) == pytest.approx(expected, rel=1e-5)
  # Scale-free per layer: a layer scaled by 100 counts the same; equal activations give 0.
  scaled = {k: v * 100.0 for k, v in f_hr.items()}
  assert float(losses.feature_distance(as_jax(f_sr), as_jax(scaled))) == pytest.approx(expected, rel=1e-5)
  assert float(losses.feature_distance(as_jax(f_hr), as_jax(f_hr))) == pytest.approx(0.0, abs=1e-6)
  assert 0.0 < expected < 4.0
