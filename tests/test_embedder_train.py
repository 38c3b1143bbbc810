"""Embedder pretraining augmentation: flips, and the optional blur round trip."""

import jax
import numpy as np

from configs import base
from ipsr_jax.training import embedder_train
from ipsr_jax.data import degrade


def _faces(n=32, size=32):
  return np.random.default_rng(0).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _closest(out, candidates):
  """Per example, the max |diff| to the nearest of `candidates` (each [N, H, W, C])."""
  return np.min([np.abs(out - c).reshape(len(out), -1).max(axis=1) for c in candidates], axis=0)


def test_flip_only_by_default():
  config = base.get_config('tiny')
  assert embedder_train.blur_degrader(config) is None
  hr = _faces()
  out = np.asarray(embedder_train._augment(hr.astype(np.float32), jax.random.key(0), config))
  assert _closest(out, [hr, hr[:, :, ::-1]]).max() == 0
  flipped = np.abs(out - hr).reshape(len(hr), -1).max(axis=1) > 0
  assert 0 < flipped.sum() < len(hr)


def test_blur_round_trip_matches_the_host_degradation():
  config = base.get_config('tiny')
  config.pretrain.blur_probability = 0.5
  config.pretrain.blur_sizes = ((8, 8), (16, 16))
  blur = embedder_train.blur_degrader(config)
  hr = _faces()
  out = np.asarray(embedder_train._augment(hr.astype(np.float32), jax.random.key(0), config, blur))
  views = [hr, hr[:, :, ::-1]]
  blurred = [degrade.degrade(v, s, (32, 32)).astype(np.float32) for v in views for s in ((8, 8), (16, 16))]
  sharp = _closest(out, views) == 0
  soft = _closest(out, blurred) <= 1.0  # device vs host rounding: at most one level
  assert (sharp | soft).all()
  assert 0 < sharp.sum() < len(hr) and 0 < soft.sum()
