"""The embedded default end to end at tiny size: every report file, and a second run resumes."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def _run(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, '-m', 'ipsr_jax.main', '--config=configs/demo.py:tiny',
                         f'--workdir={workdir}', *flags], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200)


def test_demo_pipeline_writes_reports_and_resumes(tmp_path, embedder_dir):
  first = _run(tmp_path)
  assert first.returncode == 0, first.stderr[-4000:]
  for stage in ('Demo stage 1/4', 'Demo stage 2/4', 'Demo stage 3/4', 'Demo stage 4/4'):
    assert stage in first.stderr
  report = tmp_path / 'report' / 'synthetic'
  doc = json.loads((report / 'report.json').read_text())
  assert doc['protocol'] == 'generic'
  assert set(doc['rank1']) == {'7x6', '16x16'}
  methods = set(doc['rank1']['16x16'])
  assert {'hr', 'bicubic', 'sr', 'pixel_only', 'sr_concat', 'pixel_only_concat'} <= methods
  assert 'pretrained by ipsr_jax' in doc['embedder']
  for name in ('report.md', 'faces.png', 'cmc_7x6.png', 'cmc_16x16.png'):
    assert (report / name).exists(), name
  assert '| Method |' in (report / 'report.md').read_text() or '|' in (report / 'report.md').read_text()
  for stage in ('ipsr', 'pixel_only'):
    assert (tmp_path / stage / 'metrics.jsonl').exists() and (tmp_path / stage / 'config.json').exists()
  assert json.loads((tmp_path / 'pixel_only' / 'config.json').read_text())['loss']['identity_weight'] == 0.0

  second = _run(tmp_path)  # everything is done: each stage is recognised as complete, nothing retrains
  assert second.returncode == 0, second.stderr[-4000:]
  assert 'Embedder already trained' in second.stderr
  assert second.stderr.count('already complete') == 2
  assert 'Training 2 steps from step 0' not in second.stderr

  # A given embedder (e.g. converted FaceNet weights) replaces stage 1, and the report names it.
  third = _run(tmp_path, f'--config.embedder.checkpoint={embedder_dir}')
  assert third.returncode == 0, third.stderr[-4000:]
  assert 'skipped, the embedder is config.embedder.checkpoint' in third.stderr
  assert 'Embedder already trained' not in third.stderr
  assert json.loads((report / 'report.json').read_text())['embedder'] == 'random test init'
