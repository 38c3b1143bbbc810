"""--mode=eval over several checkpoints of one run: a report a step, results kept per step, the curve."""

import json
import os
import shutil

import pytest

from configs import base
from ipsr_jax.evaluation import evaluator
from ipsr_jax.evaluation.evaluators import common
from ipsr_jax.evaluation.evaluators import identification

KEPT = [2, 3]  # a run of 3 steps saving each one and keeping the last two: step 1 is deleted


@pytest.fixture(scope='module')
def walked_run(tmp_path_factory):
  """Three steps of the tiny config, a checkpoint each step, the newest two kept."""
  from ipsr_jax.training import train  # pylint: disable=import-outside-toplevel  (TF via clu: import late)
  config = base.get_config('tiny')
  config.loss.identity_weight = 0.0
  config.train.num_train_steps = 3
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = 2
  config.train.image_summary_every_steps = 0
  workdir = str(tmp_path_factory.mktemp('walked') / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def _config(embedder_dir, steps=None):
  config = base.get_config('tiny')
  config.embedder.checkpoint = embedder_dir
  config.evals.synthetic.resolutions = ((8, 6),)
  if steps is not None:
    config.evals.synthetic.steps = steps
  return config


def _eval(config, run, out, **kwargs):
  """--mode=eval's call (ipsr_jax/main.py) with its reports under `out`."""
  return evaluator.score_runs(config, {'sr': [run]}, os.path.join(out, evaluator.NAME), steps={'sr': None},
                              report_step='sr', entry_runs=True, steps_of='sr', **kwargs)


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_steps_setting_is_checked():
  check = identification.check_steps
  assert check((400, 100), 'w') == (100, 400) and check('all', 'w') == 'all' and check('3, 1', 'w') == (1, 3)
  assert check((), 'w') == () and check('', 'w') == ()
  for bad in ((1, 1), (-1,), (1.5,), 'last', (True,)):
    with pytest.raises(ValueError, match=r"^w: checkpoint steps are 'all' or distinct steps >= 0"):
      check(bad, 'w')
  config = base.get_config('tiny')
  config.evals.synthetic.steps = (5, 5)
  with pytest.raises(ValueError, match=r'^config.evals.synthetic.steps: checkpoint steps are'):
    common.from_config(config, 'synthetic')


def test_two_steps_give_two_reports_and_a_curve_of_their_numbers(walked_run, embedder_dir, tmp_path, capsys):
  config = _config(embedder_dir)
  evaluator.set_steps(config, ','.join(map(str, KEPT)))  # --checkpoint_steps=2,3
  assert common.from_config(config, 'synthetic').steps == tuple(KEPT)
  curve = _eval(config, walked_run, str(tmp_path))['synthetic']
  out = tmp_path / 'synthetic'
  assert sorted(p.name for p in out.iterdir()) == ['cache', 'curve.json', 'curve.md', 'curve.png', 'step_2', 'step_3']
  assert _json(out / 'curve.json') == curve
  assert [r['step'] for r in curve['rows']] == KEPT
  assert [r['faces_seen'] for r in curve['rows']] == [2 * 8, 3 * 8]  # the tiny config's global batch is 8
  for row in curve['rows']:
    doc = _json(out / f'step_{row["step"]}' / 'report.json')
    assert doc['checkpoint_step'] == row['step'] and row['report'] == f'step_{row["step"]}'
    assert row['rank1'] == {'embedder': doc['rank1']} and set(doc['rank1']) == {'8x6'}
  stamps = [_json(out / f'step_{s}' / evaluator.STAMP) for s in KEPT]
  assert stamps[0]['generators']['sr'] != stamps[1]['generators']['sr']  # each step its own SR cache key
  sr_dirs = sorted(p.name for p in (out / 'cache').glob('emb-*/8x6/sr-*'))
  assert sr_dirs == sorted(f'sr-{s["generators"]["sr"]}' for s in stamps)
  md = (out / 'curve.md').read_text()
  top = curve['rows'][0]['rank1']['embedder']['8x6']
  assert f'| 2 | 16 | {100 * top["sr"]:.2f} |' in md and f'| bicubic |  | {100 * top["bicubic"]:.2f} |' in md
  assert capsys.readouterr().out.count('step 3: scoring') == 1

  shutil.copyfile(out / 'curve.json', tmp_path / 'first.json')
  os.remove(out / 'curve.json')
  again = _eval(config, walked_run, str(tmp_path))['synthetic']  # a second call scores nothing
  said = capsys.readouterr().out
  assert said.count('already scored with these settings, checkpoint and scorers') == 2 and ': scoring' not in said
  assert again == _json(tmp_path / 'first.json') == _json(out / 'curve.json')


def test_a_killed_walk_resumes_and_changed_settings_rescore(walked_run, embedder_dir, tmp_path, capsys):
  config = _config(embedder_dir, steps='all')
  _eval(config, walked_run, str(tmp_path), show=None)
  out = tmp_path / 'synthetic'
  os.remove(out / 'step_3' / evaluator.STAMP)  # killed after writing step 3's report, before its stamp
  _eval(config, walked_run, str(tmp_path))
  said = capsys.readouterr().out
  assert 'synthetic step 2: already scored' in said and 'synthetic step 3: scoring' in said
  config.evals.synthetic.max_rank = 3  # another setting: both steps again
  _eval(config, walked_run, str(tmp_path))
  said = capsys.readouterr().out
  assert 'already scored' not in said and said.count(': scoring') == 2


def test_all_lists_the_kept_steps_and_a_missing_step_is_one_error_before_scoring(walked_run, embedder_dir,
                                                                                 tmp_path, monkeypatch):
  config = _config(embedder_dir, steps='all')
  ev = common.from_config(config, 'synthetic')
  assert evaluator.checkpoint_steps(ev, {'sr': (walked_run,)}, 'sr') == KEPT
  assert evaluator.checkpoint_steps(ev, {'sr': (walked_run,)}, None) == []  # callers that walk nothing
  monkeypatch.setattr(evaluator, 'load_embedder', lambda *a: pytest.fail('scored before the check'))
  config = _config(embedder_dir, steps=(1, 2))
  with pytest.raises(ValueError) as e:
    _eval(config, walked_run, str(tmp_path))
  assert str(e.value) == (f'config.evals.synthetic.steps: checkpoint step 1 of {walked_run} is not on disk '
                          '(train.keep_checkpoints deletes older ones); it has steps 2, 3')
  assert not (tmp_path / 'synthetic').exists()


def test_without_steps_the_one_checkpoint_report_is_as_before(walked_run, embedder_dir, tmp_path):
  config = _config(embedder_dir)
  _eval(config, walked_run, str(tmp_path / 'one'), show=None)  # today's --mode=eval: the newest, step 3
  one = tmp_path / 'one' / 'synthetic'
  assert sorted(p.name for p in one.iterdir()) == ['cache', 'cmc_8x6.png', 'faces.png', 'report.json', 'report.md']
  # Today's single path, run by hand: restore, score, write.
  ev = common.from_config(config, 'synthetic')
  sr_fns = {'sr': evaluator.restore_runs({'sr': [walked_run]})['sr'][0]}
  embedder = evaluator.load_embedder(config, embedder_dir)
  by_hand = tmp_path / 'by_hand'
  ev.write(str(by_hand), ev.run(config, sr_fns, embedder, cache_dir=str(by_hand / 'cache')), 3)
  assert (one / 'report.json').read_bytes() == (by_hand / 'report.json').read_bytes()
  config.evals.synthetic.steps = (3,)
  _eval(config, walked_run, str(tmp_path / 'walk'), show=None)
  assert (tmp_path / 'walk' / 'synthetic' / 'step_3' / 'report.json').read_bytes() == (one / 'report.json').read_bytes()


def test_the_curve_has_a_table_and_lines_for_every_judge(tmp_path):
  from ipsr_jax.evaluation import report  # pylint: disable=import-outside-toplevel
  docs = [{'protocol': 'generic', 'judges': ['dlib'], 'rank1': {'8x6': {'bicubic': 0.1, 'sr': r}},
           'judge_dlib_rank1': {'8x6': {'bicubic': 0.05, 'sr': r / 2}}} for r in (0.2, 0.4)]
  rows = [{'step': s, 'faces_seen': 8 * s, 'report': f'step_{s}', 'rank1': report.rank1_by_scorer(d)}
          for s, d in zip((0, 10), docs)]
  assert rows[1]['rank1'] == {'embedder': docs[1]['rank1'], 'dlib': docs[1]['judge_dlib_rank1']}
  curve = {'eval_name': 'e', 'protocol': 'generic', 'run': 'RUN', 'method': 'sr', 'global_batch': 8, 'rows': rows}
  paths = report.write_curve(str(tmp_path), curve)
  md = (tmp_path / 'curve.md').read_text()
  assert '## Judge: dlib (rank-1 %)' in md and '| 10 | 80 | 20.00 |' in md and '| bicubic |  | 5.00 |' in md
  assert '| 0 | 0 | 10.00 |' in md and os.path.getsize(paths['png']) > 0  # step 0: in the table, not on the log axis
  assert _json(paths['json']) == curve
