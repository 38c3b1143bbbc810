"""ops/views.py: the random view of an (SR, HR) pair the identity term may compare."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from ipsr_jax import config as config_lib
from ipsr_jax.training import losses
from ipsr_jax.ops import views


def _cfg(**kw):
  cfg = dict(enabled=True, shift=0.0, scale=0.0, rotate=0.0, flip=False, blur=0.0, noise=0.0, colour=0.0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def _images(n=3, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)), jnp.float32)


def _params(matrix, offset, n, cfg):
  p = views.draw(jax.random.key(0), n, (16, 16), cfg)
  return dict(p, matrix=jnp.broadcast_to(jnp.asarray(matrix, jnp.float32), (n, 2, 2)),
              offset=jnp.broadcast_to(jnp.asarray(offset, jnp.float32), (n, 2)))


def test_zero_ranges_leave_the_faces_as_they_are():
  x = _images()
  sr, hr = views.same_view(jax.random.key(1), x, x + 1.0, _cfg())
  np.testing.assert_allclose(sr, x, atol=1e-3)
  np.testing.assert_allclose(hr, np.clip(x + 1.0, 0, 255), atol=1e-3)


def test_flip_rotation_and_shift_move_pixels_where_they_should():
  x, cfg = _images(), _cfg()
  n = x.shape[0]
  flipped = views.apply(_params([[1, 0], [0, -1]], [0, 15], n, cfg), x, cfg)
  np.testing.assert_allclose(flipped, x[:, :, ::-1], atol=1e-3)
  # Output (y, x) reads input (x, 15 - y): the image turned 90 degrees counter-clockwise.
  turned = views.apply(_params([[0, 1], [-1, 0]], [0, 15], n, cfg), x, cfg)
  np.testing.assert_allclose(turned, np.rot90(np.asarray(x), k=1, axes=(1, 2)), atol=1e-3)
  shifted = views.apply(_params([[1, 0], [0, 1]], [0, 2], n, cfg), x, cfg)  # reads 2 px right
  np.testing.assert_allclose(shifted[:, :, :-2], x[:, :, 2:], atol=1e-3)
  np.testing.assert_allclose(shifted[:, :, -2:], np.repeat(x[:, :, -1:], 2, axis=2), atol=1e-3)  # clamped


def test_draws_stay_in_their_ranges_and_differ_per_face():
  cfg = _cfg(shift=2.0, scale=0.05, rotate=5.0, flip=True, blur=1.0, colour=0.1)
  p = views.draw(jax.random.key(3), 64, (128, 128), cfg)
  det = np.linalg.det(np.asarray(p['matrix']))
  assert np.all(np.abs(np.abs(det) - 1) <= (1 / 0.95**2 - 1) + 1e-5)  # 1/scale^2 within (1/1.05^2, 1/0.95^2)
  assert (det < 0).any() and (det > 0).any()  # both flipped and unflipped faces
  assert np.all((0 <= p['sigma']) & (p['sigma'] <= 1.0)) and np.std(p['sigma']) > 0.1
  assert np.all(np.abs(np.asarray(p['gain']) - 1) <= 0.1 + 1e-6)
  assert len(np.unique(np.round(np.asarray(p['offset']), 4), axis=0)) == 64


def test_sr_and_hr_get_the_same_view():
  cfg = _cfg(shift=2.0, scale=0.05, rotate=5.0, flip=True, blur=1.0, noise=2.0, colour=0.1)
  x = _images(4, 16) * 0.5 + 60.0  # inside 0..255 after the colour gain and the noise: no clipping
  sr, hr = views.same_view(jax.random.key(5), x, x, cfg)
  np.testing.assert_array_equal(sr, hr)
  # Warp, blur and gain are linear and the noise is shared: view(a) - view(b) = gain * warp(a - b).
  a, b = views.same_view(jax.random.key(5), x + 10.0, x, cfg)
  diff = np.asarray(a - b)
  gain = np.asarray(views.draw(jax.random.key(5), 4, (16, 16), cfg)['gain'])
  np.testing.assert_allclose(diff, 10.0 * np.broadcast_to(gain, diff.shape), rtol=1e-3)
  other, _ = views.same_view(jax.random.key(6), x, x, cfg)
  assert float(jnp.abs(other - sr).mean()) > 1.0  # another key, another view


def test_the_identity_term_sends_gradients_through_the_view():
  cfg = base.get_config('tiny').loss
  cfg.identity_weight, cfg.views.enabled = 1.0, True
  hr = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  embed = lambda px: px.reshape(px.shape[0], -1)[:, :8] / jnp.linalg.norm(px.reshape(px.shape[0], -1)[:, :8], axis=1, keepdims=True)
  grad = jax.grad(lambda sr: losses.ipsr_loss(sr, hr, embed, cfg, key=jax.random.key(0))[0])(hr * 0.5)
  assert float(jnp.abs(grad).sum()) > 0
  with pytest.raises(ValueError, match='random key'):
    losses.ipsr_loss(hr, hr, embed, cfg)


def test_bad_view_settings_are_refused():
  config = base.get_config('tiny')
  config.loss.views.rotate = -1.0
  with pytest.raises(ValueError, match='views.rotate'):
    config_lib.validate(config, data_paths=False)
  config.loss.views.rotate, config.loss.views.colour = 5.0, 1.5
  with pytest.raises(ValueError, match='colour'):
    config_lib.validate(config, data_paths=False)
