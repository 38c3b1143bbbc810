"""configs/lfw.py end to end at tiny size, started the way README.md gives it: generated LFW and
ORL trees in their real layouts, a small random embedder in place of FaceNet, the judges whose
extras are installed. Then the resume: a second run trains nothing and embeds nothing."""

import json
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from ipsr_jax import experiments
from tests.conftest import REPO
from tests.test_demo import MAX_TERMINAL_LINES


def readme_lfw_command() -> str:
  text = (REPO / 'README.md').read_text(encoding='utf-8')
  section = text.split("## Real faces: the paper's LFW experiment", 1)[1]
  block = re.search(r'```bash\n(.*?)\n```', section, re.S).group(1).strip()
  command = block.split('&&')[-1].strip()
  assert command.startswith('python -m ipsr_jax.main --config=configs/lfw.py '), command
  return command


def _face(rng, size):
  small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), np.float32)


def _write_lfw(root, rng):
  """LFW's layout: images_deepfunneled/<Name>/<Name>_<NNNN>.jpg; 10 people with >= 4 images
  (the protocol) and 12 with 1-3 (training)."""
  counts = [4, 5, 4, 6, 4, 4, 5, 4, 4, 4] + [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]
  for i, n in enumerate(counts):
    name = f'Person_{i:02d}'
    base = _face(rng, 32)
    folder = root / 'images_deepfunneled' / name
    folder.mkdir(parents=True)
    for j in range(1, n + 1):
      img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(folder / f'{name}_{j:04d}.jpg', quality=95)


def _write_orl(root, rng):
  """ORL's layout: s<k>/<n>.pgm, grey 92x112."""
  for k in range(1, 6):
    base = _face(rng, 112)[:, 10:102, 0]
    (root / f's{k}').mkdir(parents=True)
    for n in range(1, 5):
      img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(img, 'L').save(root / f's{k}' / f'{n}.pgm')


@pytest.fixture(scope='module')
def lfw_run(tmp_path_factory, embedder_dir):
  cwd = tmp_path_factory.mktemp('lfw_user')
  rng = np.random.default_rng(0)
  _write_lfw(cwd / 'lfw', rng)
  _write_orl(cwd / 'orl', rng)
  command = (readme_lfw_command()
             .replace('--config=configs/lfw.py ', f'--config={REPO}/configs/lfw.py:tiny ')
             .replace('../shared/data/lfw', 'lfw').replace('../shared/data/orl', 'orl'))
  # Generated faces are not faces to MTCNN: no stage 0 here (tests/test_align.py covers it).
  args = shlex.split(command) + [f'--config.embedder.checkpoint={embedder_dir}', '--config.demo.align=False']
  args[0] = sys.executable

  def run():
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1500,
                          env={'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1',
                               **{k: v for k, v in __import__('os').environ.items()
                                  if k not in ('JAX_PLATFORMS',)}})
  return cwd, run, run()


def _judges_installed():
  from ipsr_jax.evaluation import judge  # pylint: disable=import-outside-toplevel
  return [n for n, (cls, _) in judge.JUDGES.items() if cls.available()]


def test_lfw_config_runs_every_stage(lfw_run):
  cwd, _, proc = lfw_run
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  judged = _judges_installed()
  total = 5 if judged else 4
  for i in range(1, total + 1):
    assert f'Demo stage {i}/{total}' in out, (i, out)
  # Four evaluations (dev, dev in grey, LFW, ORL), each a table per scorer: bounded, not a log.
  assert len(out.splitlines()) <= (2 + len(judged)) * MAX_TERMINAL_LINES
  workdir = cwd / 'runs' / 'lfw'
  lfw = json.loads((workdir / 'report' / 'lfw' / 'report.json').read_text())
  assert lfw['conditions'] == ['7x6', '14x12'] and lfw['trials'] == [0, 1, 2]
  assert lfw['num_identities'] == 10  # the people with >= 4 images; the rest trained the models
  assert set(lfw['methods']) >= {'hr', 'bicubic', 'sr', 'pixel_only'}
  assert set(lfw['gains']['14x12']) == {'sr - bicubic', 'pixel_only - bicubic', 'sr - pixel_only'}
  gain = lfw['gains']['14x12']['sr - pixel_only']
  per_trial = np.subtract(lfw['rank1_trials']['14x12']['sr'], lfw['rank1_trials']['14x12']['pixel_only'])
  assert gain['mean'] == pytest.approx(100 * per_trial.mean()) and gain['std'] == pytest.approx(100 * per_trial.std())
  md = (workdir / 'report' / 'lfw' / 'report.md').read_text()
  assert 'Table 2' in md and 'Gains, paired per trial' in md and 'faces.png' in md
  orl = json.loads((workdir / 'report' / 'orl' / 'report.json').read_text())
  assert orl['conditions'] == ['7x6', '16x16'] and orl['num_identities'] == 5
  dev = json.loads((workdir / 'report' / 'lfw_dev' / 'report.json').read_text())
  assert dev['protocol'] == 'lfw_dev' and dev['num_identities'] == 4  # the held-out dev people
  assert dev['conditions'] == lfw['conditions'] and dev['trials'] == [0, 1]
  dev_grey = json.loads((workdir / 'report' / 'lfw_dev_grey' / 'report.json').read_text())
  assert dev_grey['protocol'] == 'lfw_dev' and dev_grey['num_identities'] == 4 and dev_grey['conditions'] == ['7x6']
  chroma = {}
  for name in ('lfw_dev', 'lfw_dev_grey'):
    faces = np.asarray(Image.open(workdir / 'report' / name / 'faces.png').convert('RGB'), np.int16)
    chroma[name] = np.abs(faces[..., 0] - faces[..., 2]).max()
  # The generated faces are vividly coloured; in grey only the (untrained) generators' SR may tint.
  assert chroma['lfw_dev'] > 100 and chroma['lfw_dev_grey'] <= 8, chroma
  assert lfw['trained_against']['pixel_only'] == [] and len(lfw['trained_against']['sr']) == 1
  assert lfw.get('judges', []) == dev.get('judges', []) == judged
  assert orl.get('judges', []) == dev_grey.get('judges', []) == []  # tiny: judged on LFW and dev only
  for name in judged:
    assert f'## Judge: {name}' in md and f'judge_{name}_gains' in lfw and f'judge_{name}_rank1' in dev
    assert (workdir / 'report' / 'lfw' / f'cmc_judge_{name}_14x12.png').exists()
  assert list((workdir / 'report' / 'lfw' / 'cache').rglob('*.npz'))


def test_lfw_config_second_run_trains_and_embeds_nothing(lfw_run):
  cwd, run, first = lfw_run
  assert first.returncode == 0
  before = (cwd / 'runs' / 'lfw' / 'report' / 'lfw' / 'report.json').read_text()
  second = run()
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count('already complete') == 2
  finals = [l for l in second.stdout.splitlines() if 'evaluating:' in l and '100%' in l]
  assert finals and all(' 0 faces embedded' in l for l in finals), finals
  assert (cwd / 'runs' / 'lfw' / 'report' / 'lfw' / 'report.json').read_text() == before


def test_stage0_aligns_the_evaluation_sets_and_drops_an_empty_one(tmp_path, monkeypatch):
  from configs import lfw as lfw_config  # pylint: disable=import-outside-toplevel
  from ipsr_jax.data import face_align  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_align_tree(src, out, size, pad, progress):
    calls.append((str(src), str(out), size, pad))
    (tmp_path / out).mkdir(parents=True, exist_ok=True)
    (tmp_path / out / 'report.json').write_text(json.dumps(dict(aligned=1, total=1)))
    return dict(aligned=1, total=1)

  monkeypatch.setattr(face_align, 'align_tree', fake_align_tree)
  (tmp_path / 'lfw' / 'images_deepfunneled').mkdir(parents=True)
  config = lfw_config.get_config()
  config.data.root = str(tmp_path / 'lfw')
  config.evals.orl.root = str(tmp_path / 'orl')
  aligned = experiments._aligned(config, str(tmp_path / 'w'))  # pylint: disable=protected-access
  assert calls == [(str(tmp_path / 'lfw' / 'images_deepfunneled'), str(tmp_path / 'w' / 'aligned'), 128, 0.0),
                   (str(tmp_path / 'orl'), str(tmp_path / 'w' / 'aligned_orl'), 128, 0.25)]
  assert aligned.data.root == str(tmp_path / 'w' / 'aligned')
  assert aligned.evals.orl.root == str(tmp_path / 'w' / 'aligned_orl')
  assert config.evals.orl.root == str(tmp_path / 'orl')  # the caller's config is left alone
  again = experiments._aligned(config, str(tmp_path / 'w'))  # pylint: disable=protected-access
  assert len(calls) == 2 and again.evals.orl.root == aligned.evals.orl.root  # done: reused
  config.evals.orl.root = ''
  assert 'orl' not in experiments._aligned(config, str(tmp_path / 'w2')).evals  # pylint: disable=protected-access
