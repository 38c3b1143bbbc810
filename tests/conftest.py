"""Shared test setup: CPU only, float32 matmuls at full precision, paths to the shared real data."""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_matmul_precision', 'highest')

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data():
  """../shared/data beside the checkout (LFW, ORL); tests using it skip when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real face data not found at {SHARED_DATA}')
  return SHARED_DATA
