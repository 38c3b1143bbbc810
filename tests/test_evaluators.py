"""config.evals entries: the type registry, each type's settings, and score_runs (the one way to run them)."""

import json
import shutil

import pytest

from configs import base
from ipsr_jax import config as config_lib
from ipsr_jax.evaluation import evaluator
from ipsr_jax.evaluation.evaluators import common

KNOWN_TYPES = r"known types: \['identification', 'verification'\]"


def test_a_missing_or_unknown_type_is_one_error_naming_the_entry_and_the_types():
  config = base.get_config('tiny')
  del config.evals.synthetic['type']
  for check in (lambda: common.from_config(config, 'synthetic'), lambda: config_lib.validate(config)):
    with pytest.raises(ValueError, match=rf"^config.evals.synthetic: no type; {KNOWN_TYPES} "
                                         r"\(protocol='generic' is type='identification'\)$"):
      check()
  config.evals.synthetic.type = 'identify'
  with pytest.raises(config_lib.ConfigError, match=rf"^config.evals.synthetic: unknown type 'identify'; {KNOWN_TYPES}$"):
    config_lib.validate(config)
  config.evals = {'pairs': dict(protocol='verification', root='faces', pairs='pairs.txt')}
  with pytest.raises(ValueError, match=r"config.evals.pairs: no type; .* \(protocol='verification' is "
                                       r"type='verification'\)"):
    common.from_config(config, 'pairs')


def test_each_type_checks_its_own_settings():
  config = base.get_config('tiny')
  config.evals = {
      'no_protocol': dict(type='identification', source='synthetic'),
      'bad_protocol': dict(type='identification', protocol='lfw2'),
      'pairs_in_identification': dict(type='identification', protocol='lfw', pairs='pairs.txt'),
      'protocol_in_verification': dict(type='verification', protocol='lfw', root='r', pairs='p'),
      'no_pairs': dict(type='verification', root='faces'),
      'old_judge': dict(type='identification', protocol='lfw', judge=True),
      'bad_judge': dict(type='verification', root='r', pairs='p', judges=('dlb',)),
  }
  expected = {
      'no_protocol': 'config.evals.no_protocol: needs protocol',
      'bad_protocol': r"config.evals.bad_protocol.protocol: unknown protocol 'lfw2'; known: \['ar', ",
      'pairs_in_identification': r"config.evals.pairs_in_identification: unknown keys \['pairs'\]; known: ",
      'protocol_in_verification': r"config.evals.protocol_in_verification: unknown keys \['protocol'\]",
      'no_pairs': 'config.evals.no_pairs: type=verification needs root .* and pairs',
      'old_judge': r"config.evals.old_judge.judge: the key is judges",
      'bad_judge': r"config.evals.bad_judge.judges: unknown judges \['dlb'\]",
  }
  for name, message in expected.items():
    with pytest.raises(ValueError, match=message):
      common.from_config(config, name)
  assert common.from_config(base.get_config('tiny'), 'synthetic').settings.trials == 1


def test_every_shipped_config_has_typed_entries():
  from configs import demo, lfw  # pylint: disable=import-outside-toplevel
  for module, variants in ((base, ('tiny',)), (demo, (None, 'tiny')), (lfw, (None, 'dev', 'tiny'))):
    for variant in variants:
      config = module.get_config(variant)
      common.check_config(config)
      assert {common.from_config(config, n).TYPE for n in config.evals} == {'identification'}


def _two_entries(embedder_dir):
  config = base.get_config('tiny')
  config.embedder.checkpoint = embedder_dir
  config.evals.synthetic.update(dict(resolutions=((8, 6),)))
  config.evals.again = dict(config.evals.synthetic.to_dict(), max_rank=3)
  return config


def test_score_runs_restores_each_run_once(run_dir, embedder_dir, tmp_path, monkeypatch):
  from ipsr_jax.serving import inference  # pylint: disable=import-outside-toplevel
  other = str(tmp_path / 'other')
  shutil.copytree(run_dir, other)
  restored = []
  restore = inference.SuperResolver.from_checkpoint
  monkeypatch.setattr(inference.SuperResolver, 'from_checkpoint',
                      classmethod(lambda cls, workdir, **kw: restored.append(workdir) or restore(workdir, **kw)))
  config = _two_entries(embedder_dir)
  config.evals.again.compare = {'copy': other}  # --mode=eval's own runs: one of them already given
  out = str(tmp_path / 'eval' / evaluator.NAME)
  results = evaluator.score_runs(config, {'sr': f'{run_dir}+{run_dir}', 'other': other}, out,
                                 report_step='sr', entry_runs=True, show=None)
  assert sorted(restored) == sorted([run_dir, other])  # two entries, five rows, two runs
  assert set(results) == {'synthetic', 'again'}
  doc = json.loads((tmp_path / 'eval' / 'again' / 'report.json').read_text())
  assert doc['repeats'] == {'sr': ['sr', 'sr#2']} and doc['checkpoint_step'] == 2
  assert [m for m in doc['methods'] if not m.endswith('_concat')] == ['hr', 'bicubic', 'sr', 'sr#2', 'other', 'copy']
  assert (tmp_path / 'eval' / 'synthetic' / 'cache').is_dir()
  config.evals.again.compare = {'other': other}
  with pytest.raises(ValueError, match=r"config.evals.again.compare: the labels \['other'\] are taken"):
    evaluator.score_runs(config, {'other': other}, out, entry_runs=True, show=None)
  with pytest.raises(ValueError, match='2 evaluations would write one folder'):
    evaluator.score_runs(config, {'sr': run_dir}, str(tmp_path / 'one'), show=None)


def test_periodic_evaluator_scores_the_live_generator_and_skips_verification(run_dir, embedder_dir, tmp_path):
  from ipsr_jax.runtime import checkpointing  # pylint: disable=import-outside-toplevel
  config = _two_entries(embedder_dir)
  del config.evals['again']
  config.evals.pairs = dict(type='verification', root=str(tmp_path / 'faces'), pairs=str(tmp_path / 'pairs.txt'))
  evaluate = evaluator.make_periodic_evaluator(config, str(tmp_path))
  _, variables = checkpointing.Checkpointer(run_dir, read_only=True).restore_model()
  scalars = evaluate(7, variables)
  assert set(scalars) == {f'eval/synthetic/8x6/{m}' for m in ('hr', 'bicubic', 'sr', 'sr_concat')}
  doc = json.loads((tmp_path / 'eval' / 'synthetic' / 'step_7' / 'report.json').read_text())
  assert doc['checkpoint_step'] == 7 and doc['rank1']['8x6'] == {m: scalars[f'eval/synthetic/8x6/{m}']
                                                                   for m in doc['rank1']['8x6']}
  assert not (tmp_path / 'eval' / 'pairs').exists() and not (tmp_path / 'eval' / 'synthetic' / 'step_7' / 'cache').exists()
