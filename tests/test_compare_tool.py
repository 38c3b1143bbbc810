"""tools/compare: several generators (and several training runs of one) on one evaluation."""

import json
import types

import pytest
from absl import app

from configs import base
from ipsr_jax.evaluation.evaluators import common
from ipsr_jax.tools import compare


def test_parse_runs_names_and_repeats():
  runs = compare.parse_runs(['pixel_only=a+b', 'ipsr=c+d+e', 'views=f'])
  assert runs == {'pixel_only': ('a', 'b'), 'ipsr': ('c', 'd', 'e'), 'views': ('f',)}
  labels, repeats = common.run_labels(runs)
  assert labels == {'pixel_only': 'a', 'pixel_only#2': 'b', 'ipsr': 'c', 'ipsr#2': 'd', 'ipsr#3': 'e',
                    'views': 'f'}
  assert repeats == {'pixel_only': ['pixel_only', 'pixel_only#2'],
                     'ipsr': ['ipsr', 'ipsr#2', 'ipsr#3']}
  for bad in (['ipsr'], ['=a'], ['ipsr=a+'], ['ipsr=a', 'ipsr=b'], ['bicubic=a'], ['a#2=b'],
              ['x_concat=a'], []):
    with pytest.raises(app.UsageError):
      compare.parse_runs(bad)


def test_config_compare_names_runs_as_the_runs_flag_does():
  """`config.evals.<name>.compare` ({label: 'dir' or 'dir+dir2'}) and --runs: one syntax, one parser."""
  config = base.get_config('tiny')
  config.evals.synthetic.compare = {'pixel_only': 'a+b', 'ipsr': 'c+d+e', 'views': 'f'}
  entry = common.from_config(config, 'synthetic')
  assert entry.runs() == compare.parse_runs(['pixel_only=a+b', 'ipsr=c+d+e', 'views=f'])
  for bad, message in [({'bicubic': 'a'}, "the label 'bicubic' is taken or reserved"),
                       ({'ipsr': 'a+'}, "entries are label=dir or label=dir\\+dir2, got 'ipsr=a\\+'")]:
    config.evals.synthetic.compare = bad
    with pytest.raises(ValueError, match=f'config.evals.synthetic.compare: {message}'):
      common.from_config(config, 'synthetic')


def test_compare_two_runs_each_writes_the_run_by_run_and_mean_gains(run_dir, embedder_dir, tmp_path):
  config = base.get_config('tiny')
  config.evals.synthetic.embedder = embedder_dir
  config.evals.synthetic.trials = 2
  holders = {'config': config, 'eval': 'synthetic', 'judges': None, 'out': str(tmp_path / 'cmp'),
             'runs': [f'pixel_only={run_dir}+{run_dir}', f'ipsr={run_dir}+{run_dir}']}
  compare.main(['compare'], {k: types.SimpleNamespace(value=v) for k, v in holders.items()})
  doc = json.loads((tmp_path / 'cmp' / 'report.json').read_text())
  assert doc['repeats'] == {'pixel_only': ['pixel_only', 'pixel_only#2'], 'ipsr': ['ipsr', 'ipsr#2']}
  assert set(doc['rank1']['8x6']) >= {'bicubic', 'pixel_only', 'pixel_only#2', 'ipsr', 'ipsr#2'}
  gains = doc['gains']['8x6']
  # The same checkpoint four times: every run-to-run and paired difference is exactly zero.
  for label in ('ipsr - pixel_only', 'ipsr#2 - pixel_only#2', 'ipsr#2 - ipsr',
                'pixel_only#2 - pixel_only'):
    assert gains[label] == {'mean': 0.0, 'std': 0.0}, label
  assert gains['ipsr - pixel_only (mean of 2 runs)'] == {'mean': 0.0, 'std': 0.0,
                                                         'runs': [0.0, 0.0], 'runs_std': 0.0}
  assert ('| ipsr - pixel_only (mean of 2 runs) | +0.00 ± 0.00 (runs +0.00 / +0.00; ± 0.00) |'
          in (tmp_path / 'cmp' / 'report.md').read_text())


def test_resolve_config_makes_every_run_of_a_compare_entry_absolute(tmp_path, monkeypatch):
  from ipsr_jax.runtime import paths  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  config = base.get_config('tiny')
  config.evals.synthetic.compare = {'pixel_only': 'runs/a+runs/b', 'ipsr': 'gs://bucket/c'}
  paths.resolve_config(config)
  assert config.evals.synthetic.compare.pixel_only == f'{tmp_path}/runs/a+{tmp_path}/runs/b'
  assert config.evals.synthetic.compare.ipsr == 'gs://bucket/c'
