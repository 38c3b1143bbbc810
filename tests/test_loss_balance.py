"""tools/loss_balance: each weighted term's value and gradient norm at SR = bicubic input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from ipsr_jax.tools import loss_balance
from tests.conftest import REPO


def _config(embedder_dir, **loss):
  config = base.get_config('tiny')
  config.embedder.checkpoint = embedder_dir
  config.loss.update(dict(identity_distance='contrastive', **loss))
  return config


def test_terms_scale_with_their_weights_and_pixel_is_the_unit(embedder_dir):
  sizes = [(4, 4), (8, 6)]
  one = loss_balance.measure(_config(embedder_dir, identity_weight=0.1, feature_weight=0.2), 4, sizes)
  two = loss_balance.measure(_config(embedder_dir, identity_weight=0.2, feature_weight=0.2, beta=10.0), 4, sizes)
  assert list(one) == ['4x4', '8x6']
  for size in one:
    assert list(one[size]) == ['pixel', 'identity', 'features']
    assert one[size]['pixel']['over_pixel'] == 1.0
    for term in one[size].values():
      assert term['grad_norm'] > 0 and term['value'] > 0
    # A weight scales its term's value and gradient, and nothing else.
    for term in ('pixel', 'identity'):
      np.testing.assert_allclose(two[size][term]['grad_norm'], 2 * one[size][term]['grad_norm'], rtol=1e-4)
      np.testing.assert_allclose(two[size][term]['value'], 2 * one[size][term]['value'], rtol=1e-4)
    np.testing.assert_allclose(two[size]['features']['grad_norm'], one[size]['features']['grad_norm'], rtol=1e-5)
    np.testing.assert_allclose(two[size]['features']['over_pixel'], one[size]['features']['over_pixel'] / 2,
                               rtol=1e-4)
  # The pixel-only ablation needs no recognizer and reports the pixel term alone.
  assert list(loss_balance.measure(_config('', identity_weight=0.0), 4, sizes)['4x4']) == ['pixel']


def test_cli_writes_json_and_rejects_bad_sizes(tmp_path, embedder_dir):
  cmd = [sys.executable, '-m', 'ipsr_jax.tools.loss_balance', '--config=configs/base.py:tiny',
         f'--config.embedder.checkpoint={embedder_dir}', '--config.loss.identity_weight=0.5',
         '--faces=4', '--sizes=8x6', f'--out={tmp_path}/lb']
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  report = json.loads((tmp_path / 'lb' / 'loss_balance.json').read_text())
  assert report['faces'] == 4 and list(report['results']) == ['8x6']
  assert set(report['results']['8x6']) == {'pixel', 'identity'}
  assert 'identity' in done.stdout and 'x pixel' in done.stdout
  bad = subprocess.run(cmd[:-2] + ['--sizes=8by6', f'--out={tmp_path}/bad'], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 1 and 'Error: --sizes entries are HxW' in bad.stderr
