"""tools/loss_balance: each weighted term's value and gradient norm at SR = bicubic input."""

import json
import subprocess
import sys
import types

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


def _cli(embedder_dir, *extra):
  return [sys.executable, '-m', 'ipsr_jax.tools.loss_balance', '--config=configs/base.py:tiny',
          f'--config.embedder.checkpoint={embedder_dir}', '--config.loss.identity_weight=0.5', '--faces=4', *extra]


def _check_report(out_dir, printed):
  report = json.loads((out_dir / 'loss_balance.json').read_text())
  assert report['faces'] == 4 and list(report['results']) == ['8x6']
  assert set(report['results']['8x6']) == {'pixel', 'identity'}
  assert 'identity' in printed and 'x pixel' in printed


def _rejects_bad_sizes(embedder_dir, out_dir):
  bad = subprocess.run(_cli(embedder_dir, '--sizes=8by6', f'--out={out_dir}'), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 1 and 'Error: --sizes entries are HxW' in bad.stderr


def test_main_writes_json_and_the_cli_rejects_bad_sizes(tmp_path, embedder_dir, capfd):
  """The tool's `main` with the command's settings, in this process, where the test above has
  compiled the measurement's ops; the command line for a bad --sizes, which stops before measuring.
  (The whole command measuring in a process of its own: the slow test below.)"""
  config = base.get_config('tiny')
  config.embedder.checkpoint = embedder_dir
  config.loss.identity_weight = 0.5
  flags = dict(config=config, faces=4, sizes=['8x6'], seed=0, out=str(tmp_path / 'lb'))
  loss_balance.main(['loss_balance'], {name: types.SimpleNamespace(value=v) for name, v in flags.items()})
  _check_report(tmp_path / 'lb', capfd.readouterr().out)
  _rejects_bad_sizes(embedder_dir, tmp_path / 'bad')


@pytest.mark.slow
def test_cli_writes_json_and_rejects_bad_sizes(tmp_path, embedder_dir):
  done = subprocess.run(_cli(embedder_dir, '--sizes=8x6', f'--out={tmp_path}/lb'), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  _check_report(tmp_path / 'lb', done.stdout)
  _rejects_bad_sizes(embedder_dir, tmp_path / 'bad')
