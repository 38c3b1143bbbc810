"""The folder tools check their output before any work, never overwrite the user's files, give one
line for an empty input, read images with the one shared reader and reduce huge ones on decode.

The terminal text is what a person sees, so those cases run the real commands (all started at once
by one fixture: most fail within seconds, before any model loads); the rest call the tools'
functions in-process. Every case hashes the files of its tree before and after.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
from PIL import Image
import pytest

from ipsr_jax.data import face_align
from ipsr_jax.data import image_folder
from ipsr_jax.data import image_io
from ipsr_jax.tools import embed as embed_tool
from ipsr_jax.runtime import outputs
from ipsr_jax.tools import super_resolve as sr_tool
from tests.conftest import EMBEDDER_INPUT, REPO, make_embedder

EMPTY_MESSAGE = ('no images under {} (read recursively; extensions .bmp, .gif, .jpeg, .jpg, .pbm, '
                 '.pgm, .png, .pnm, .ppm, .tif, .tiff, .webp)')


def tree_hashes(root) -> dict[str, str]:
  """sha256 of every file under root (a link: its target), by relative path."""
  found = {}
  for dirpath, _, filenames in os.walk(root):
    for f in filenames:
      path = os.path.join(dirpath, f)
      rel = os.path.relpath(path, root)
      if os.path.islink(path):
        found[rel] = 'link -> ' + os.readlink(path)
      else:
        with open(path, 'rb') as fh:
          found[rel] = hashlib.sha256(fh.read()).hexdigest()
  return found


def smooth_image(height, width, seed=0) -> np.ndarray:
  """A photo-like image (low-frequency colour), so reductions of it compare closely."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  channels = [127 + 100 * np.sin(x / (width / rng.uniform(2, 5)) + rng.uniform(0, 6))
              * np.cos(y / (height / rng.uniform(2, 5))) for _ in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def write_probes(folder, n=2, size=(12, 10)) -> pathlib.Path:
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(np.full(size + (3,), 50 * i, np.uint8)).save(folder / f'{i}.png')
  return folder


class FakeSR:
  """Stands in for a SuperResolver: returns the (already resized) input."""
  image_size = 16
  info = {'source': 'fake'}

  def __call__(self, images):
    return np.asarray(images, np.uint8)


class RecordingAligner:
  """Stands in for MTCNN: records each decoded image and returns a grey face."""

  def __init__(self, size=16):
    self.size, self.pad, self.seen = size, 0.0, {}

  def __call__(self, image):
    self.seen[len(self.seen)] = image
    return face_align.AlignResult(np.full((self.size, self.size, 3), 99, np.uint8), None, None, 0.9)


# ---------------------------------------------------------------------------------------------
# The real commands: terminal text and exit code.


@contextlib.contextmanager
def read_only_dir(path: pathlib.Path):
  """A folder nobody may write to: a read-only tmpfs as root (root ignores permissions), else
  mode 0o555. Yields the reason a write gets, or None when it cannot be made."""
  path.mkdir(parents=True)
  if os.geteuid() == 0:
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(path)],
                          capture_output=True)
    if proc.returncode != 0:
      yield None
      return
    try:
      yield 'Read-only file system'
    finally:
      subprocess.run(['umount', str(path)], capture_output=True)
  else:
    path.chmod(0o555)
    try:
      yield 'Permission denied'
    finally:
      path.chmod(0o755)


def _cases(tmp: pathlib.Path, embedder_dir: str, read_only: pathlib.Path | None):
  """{case: (cwd, argv)}; each case's files live under its own folder tmp/<case>."""
  cases = {}

  def case(name, tool, *args):
    cwd = tmp / name
    cwd.mkdir(parents=True, exist_ok=True)
    cases[name] = (cwd, [sys.executable, '-m', f'ipsr_jax.tools.{tool}', *args])
    return cwd

  # Weights / runs that do not exist: an error about them would mean the model loaded first.
  no_weights, no_run = '--weights=/nonexistent/embedder', '--workdir=/nonexistent/run'
  write_probes(case('embed_under_file', 'embed', no_weights, '--input=probes',
                    '--output=notes.txt/out.npz') / 'probes')
  (tmp / 'embed_under_file' / 'notes.txt').write_text('the user\'s notes')
  write_probes(case('sr_under_file', 'super_resolve', no_run, '--input=probes',
                    '--output=notes.txt/sr') / 'probes')
  (tmp / 'sr_under_file' / 'notes.txt').write_text('the user\'s notes')
  if read_only is not None:
    write_probes(case('embed_read_only', 'embed', no_weights, '--input=probes',
                      f'--output={read_only}/out.npz') / 'probes')
    write_probes(case('sr_read_only', 'super_resolve', no_run, '--input=probes',
                      f'--output={read_only}/sr') / 'probes')
  cwd = case('embed_exists', 'embed', no_weights, '--input=probes', '--output=emb.npz')
  write_probes(cwd / 'probes')
  (cwd / 'emb.npz').write_bytes(b'the user\'s earlier embeddings')
  cwd = case('sr_foreign', 'super_resolve', no_run, '--input=probes', '--output=photos')
  write_probes(cwd / 'probes')
  write_probes(cwd / 'photos', n=1)  # the user's own pictures, named as an output would be
  (cwd / 'photos' / 'notes.txt').write_text('keep me')
  for name, tool, args in [('embed_empty', 'embed', [no_weights, '--output=out.npz']),
                           ('sr_empty', 'super_resolve', [no_run, '--output=sr']),
                           ('align_empty', 'align', ['--output=aligned']),
                           ('verify_empty', 'verify', ['--pairs=pairs.txt', '--out=report'])]:
    cwd = case(name, tool, *args, '--input=empty' if tool != 'verify' else '--root=empty')
    (cwd / 'empty' / 'person').mkdir(parents=True)
    (cwd / 'empty' / 'person' / 'notes.txt').write_text('not an image')
    (cwd / 'pairs.txt').write_text('1 1\nperson 1 2\n')
  # Over the cap (a small one via --max_side), into an existing output replaced with --overwrite.
  cwd = case('embed_reduced', 'embed', f'--weights={embedder_dir}', '--input=big',
             '--output=emb.npz', '--overwrite', '--max_side=500', '--image_size=32',
             f'--input_size={EMBEDDER_INPUT}')
  (cwd / 'big').mkdir()
  Image.fromarray(smooth_image(2000, 3000)).save(cwd / 'big' / 'wide.jpg', quality=92)
  Image.fromarray(smooth_image(900, 600, seed=1)).save(cwd / 'big' / 'tall.png')
  Image.fromarray(smooth_image(40, 30, seed=2)).save(cwd / 'big' / 'small.png')
  (cwd / 'emb.npz').write_bytes(b'stale')
  return cases


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
  """Every command case run once, three at a time: {case: Result}."""
  tmp = tmp_path_factory.mktemp('cli')
  embedder_dir = make_embedder(tmp / 'embedder')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
  results = {}
  with read_only_dir(tmp / 'read_only') as read_only_reason:
    cases = _cases(tmp / 'cases', embedder_dir, tmp / 'read_only' if read_only_reason else None)
    before = {name: tree_hashes(cwd) for name, (cwd, _) in cases.items()}
    pending, running = list(cases.items()), {}
    while pending or running:
      while pending and len(running) < 3:
        name, (cwd, argv) = pending.pop(0)
        running[name] = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
      name = next(iter(running))
      proc = running.pop(name)
      text, _ = proc.communicate(timeout=600)
      cwd = cases[name][0]
      results[name] = types.SimpleNamespace(
          rc=proc.returncode, text=text, lines=[l for l in text.splitlines() if l.strip()],
          cwd=cwd, before=before[name], after=tree_hashes(cwd), read_only=read_only_reason)
  return results


def _one_error(result, want: str) -> str:
  """The case failed with exit code 1 and one 'Error:' line (of at most 3) holding `want`."""
  errors = [l for l in result.lines if l.startswith('Error:')]
  assert result.rc == 1 and len(result.lines) <= 3, result.text
  assert len(errors) == 1 and want in errors[0] and 'Traceback' not in result.text, result.text
  assert result.after == result.before  # nothing of the user's changed, nothing written
  return errors[0]


def test_output_under_a_file_fails_before_the_model_loads(cli):
  for name, tool, output in [('embed_under_file', 'embed', 'notes.txt/out.npz'),
                             ('sr_under_file', 'super_resolve', 'notes.txt/sr')]:
    result = cli[name]
    path = result.cwd / output
    line = _one_error(result, f'Error: OSError: cannot write --output {path}: Not a directory '
                              f'({result.cwd / "notes.txt"} is a file)')
    assert 'nonexistent' not in line  # the missing weights were never looked at


def test_read_only_output_fails_before_the_model_loads(cli):
  if 'embed_read_only' not in cli:
    pytest.skip('no read-only folder here (root without mount)')
  for name in ('embed_read_only', 'sr_read_only'):
    result = cli[name]
    _one_error(result, f': {result.read_only}')
    assert 'Error: OSError: cannot write --output ' in result.text and 'read_only' in result.text


def test_existing_output_is_refused_without_overwrite(cli):
  result = cli['embed_exists']
  _one_error(result, f'Error: FileExistsError: --output {result.cwd / "emb.npz"} exists; '
                     'pass --overwrite to replace it')
  result = cli['sr_foreign']
  _one_error(result, f'Error: FileExistsError: --output {result.cwd / "photos"} is not empty and '
                     'was not written by super_resolve; pass --overwrite to write into it')


def test_empty_input_is_one_line_in_every_tool(cli):
  for name, flag in [('embed_empty', 'input'), ('sr_empty', 'input'), ('align_empty', 'input'),
                     ('verify_empty', 'root')]:
    result = cli[name]
    line = _one_error(result, 'Error: NoImagesError: ' +
                      EMPTY_MESSAGE.format(result.cwd / 'empty'))
    assert line.startswith('Error: NoImagesError: no images under '), (flag, line)


def test_images_over_the_cap_are_reduced_with_one_line(cli):
  result = cli['embed_reduced']
  assert result.rc == 0, result.text
  assert ('2 images larger than 500 px were reduced on decode '
          '(e.g. tall.png 600x900 -> 300x450)') in result.lines, result.text
  assert 'embedded 3/3 images (dimension 64)' in result.text
  names, vectors, metadata = embed_tool.read_embeddings(str(result.cwd / 'emb.npz'))
  assert names == ['small.png', 'tall.png', 'wide.jpg'] and vectors.shape == (3, 64)
  assert metadata['max_side'] == 500 and metadata['reduced'] == 2
  assert {r['path']: r['size'] for r in metadata['reduced_images']} == {
      'tall.png': [300, 450], 'wide.jpg': [375, 250]}  # PNG: box / 2; JPEG: DCT / 4, box / 2
  changed = {k for k in result.before if result.before[k] != result.after.get(k)}
  assert changed == {'emb.npz'}  # replaced, as --overwrite asked; the inputs untouched
  assert not [k for k in result.after if k.endswith(outputs.PARTIAL_SUFFIX)]


# ---------------------------------------------------------------------------------------------
# In-process: the order of the checks, the folder rules, the reader.


def _holders(**values):
  return {k: types.SimpleNamespace(value=v) for k, v in values.items()}


def test_checks_come_before_any_model_or_image(tmp_path, monkeypatch):
  from ipsr_jax.serving import inference  # pylint: disable=import-outside-toplevel

  def must_not_run(*args, **kwargs):
    raise AssertionError('loaded or decoded before the output was checked')

  for module, name in [(inference, 'load_embedder'), (inference, 'load_run_config'),
                       (inference.SuperResolver, 'from_checkpoint'),
                       (image_io, 'decode_image_and_size')]:
    monkeypatch.setattr(module, name, must_not_run)
  probes = write_probes(tmp_path / 'probes')
  (tmp_path / 'file').write_text('x')
  before = tree_hashes(tmp_path)
  embed_flags = dict(weights='w', sr=None, step=None, mode='sr', input=str(probes),
                     input_size=None, image_size=None, batch_size=4, workers=1, max_side=None,
                     overwrite=False, progress=False)
  with pytest.raises(OSError, match='cannot write --output .*file/x.npz: Not a directory'):
    embed_tool.main(['embed'], _holders(**embed_flags, output=str(tmp_path / 'file' / 'x.npz')))
  sr_flags = dict(workdir='run', step=None, input=str(probes), batch_size=4, workers=1,
                  bfloat16=False, max_side=None, overwrite=False, progress=False)
  with pytest.raises(OSError, match='cannot write --output .*file/sr: Not a directory'):
    sr_tool.main(['sr'], _holders(**sr_flags, output=str(tmp_path / 'file' / 'sr')))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(image_folder.NoImagesError, match='no images under'):
    sr_tool.main(['sr'], _holders(**dict(sr_flags, input=str(tmp_path / 'empty')),
                                  output=str(tmp_path / 'sr')))
  with pytest.raises(image_folder.NoImagesError, match='no images under'):
    face_align.align_tree(tmp_path / 'empty', tmp_path / 'aligned', aligner=RecordingAligner(128))
  assert tree_hashes(tmp_path) == before
  assert sorted(os.listdir(tmp_path)) == ['empty', 'file', 'probes']  # no output created


def test_super_resolve_writes_into_its_own_output_only(tmp_path, capsys):
  probes = write_probes(tmp_path / 'probes', n=3)
  (probes / 'gone.png').symlink_to(tmp_path / 'deleted.png')  # a broken link
  out = tmp_path / 'sr'
  report = sr_tool.super_resolve_folder(FakeSR(), str(probes), str(out), progress=False)
  assert report['tool'] == 'super_resolve' and report['written'] == 3 and report['total'] == 4
  assert [u['path'] for u in report['unreadable']] == ['gone.png']
  assert 'FileNotFoundError' in report['unreadable'][0]['reason']
  err = capsys.readouterr().err
  assert '1 unreadable file(s) skipped:' in err and '  gone.png: FileNotFoundError' in err
  assert json.loads((out / 'report.json').read_text())['tool'] == 'super_resolve'
  # Its own output (report.json of super_resolve) is written into again ...
  sr_tool.super_resolve_folder(FakeSR(), str(probes), str(out), progress=False)
  # ... and so is a killed run's (only the PNGs it writes, no report yet).
  (out / 'report.json').unlink()
  sr_tool.super_resolve_folder(FakeSR(), str(probes), str(out), progress=False)
  # Someone else's file in it: refused, nothing changed; --overwrite writes beside it.
  (out / 'report.json').write_text('{"tool": "align"}')
  (out / 'mine.txt').write_text('keep me')
  before = tree_hashes(tmp_path)
  with pytest.raises(FileExistsError, match='not written by super_resolve'):
    sr_tool.super_resolve_folder(FakeSR(), str(probes), str(out), progress=False)
  assert tree_hashes(tmp_path) == before
  sr_tool.super_resolve_folder(FakeSR(), str(probes), str(out), progress=False, overwrite=True)
  assert (out / 'mine.txt').read_text() == 'keep me'
  assert not [p for p in out.rglob('*') if p.name.endswith(outputs.PARTIAL_SUFFIX)]
  # Over a (tiny) cap: reduced on decode, one line, and the count in the report.
  capsys.readouterr()
  report = sr_tool.super_resolve_folder(FakeSR(), str(probes), str(tmp_path / 'capped'),
                                        progress=False, max_side=8)
  assert report['reduced'] == 3 and report['max_side'] == 8 and report['written'] == 3
  assert ('3 images larger than 8 px were reduced on decode (e.g. 0.png 10x12 -> 5x6)'
          in capsys.readouterr().err.splitlines())


def test_align_reads_as_every_tool_and_keeps_resuming(tmp_path):
  raw = tmp_path / 'raw'
  (raw / 'p').mkdir(parents=True)
  wide = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)  # 16-bit grey, 0..59950
  Image.fromarray(wide).save(raw / 'p' / 'deep.png')
  Image.fromarray(smooth_image(20, 24)).save(raw / 'p' / 'rgb.jpg')
  (raw / 'p' / 'gone.jpg').symlink_to(tmp_path / 'deleted.jpg')
  aligner = RecordingAligner()
  report = face_align.align_tree(raw, tmp_path / 'out', size=16, workers=1, aligner=aligner)
  want = image_io.decode_image(raw / 'p' / 'deep.png')
  assert 40 < want.mean() < 200  # the top 8 bits, not 99.8% white
  np.testing.assert_array_equal(aligner.seen[0], want)  # natural order: deep.png first
  np.testing.assert_array_equal(aligner.seen[1], image_io.decode_image(raw / 'p' / 'rgb.jpg'))
  assert report['tool'] == 'align' and report['total'] == 3 and report['aligned'] == 2
  assert report['unreadable'] == 1 and report['failures'][0]['path'] == 'p/gone.jpg'
  assert report['failures'][0]['reason'].startswith('unreadable: FileNotFoundError')
  # Its own output resumes (with or without its report); anything else is refused.
  (tmp_path / 'out' / 'report.json').unlink()
  again = face_align.align_tree(raw, tmp_path / 'out', size=16, workers=1, aligner=RecordingAligner())
  assert again['resumed'] == 2
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'thesis.pdf').write_text('x')
  with pytest.raises(FileExistsError, match='not written by align; pass --overwrite'):
    face_align.align_tree(raw, tmp_path / 'other', size=16, aligner=RecordingAligner())
  report = face_align.align_tree(raw, tmp_path / 'other', size=16, aligner=RecordingAligner(),
                            overwrite=True)
  assert report['aligned'] == 2 and (tmp_path / 'other' / 'thesis.pdf').read_text() == 'x'


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_over_the_cap_is_reduced_on_decode_close_to_a_resize(tmp_path, fmt):
  full = smooth_image(2000, 3000)
  path = tmp_path / f'big.{fmt}'
  Image.fromarray(full).save(path, **({'quality': 95} if fmt == 'jpeg' else {}))
  folder = image_folder.ImageFolder(tmp_path, max_side=1000)
  image = folder.read(f'big.{fmt}')
  # JPEG: decoded at 1/2 scale in the DCT domain (1500x1000), then box-reduced by 2; PNG: by 3.
  want_hw = (500, 750) if fmt == 'jpeg' else (667, 1000)
  assert image.shape == want_hw + (3,)
  resized = np.asarray(Image.fromarray(image_io.decode_image(path)).resize(
      want_hw[::-1], Image.Resampling.BOX)).astype(np.float32)
  assert np.abs(image.astype(np.float32) - resized).mean() < 2.0
  report = folder.reduced_report()
  assert report == dict(max_side=1000, reduced=1, reduced_images=[dict(
      path=f'big.{fmt}', original=[3000, 2000], size=list(want_hw[::-1]))])
  assert image_folder.reduced_summary(report) == (
      f'1 image larger than 1000 px was reduced on decode (e.g. big.{fmt} 3000x2000 -> '
      f'{want_hw[1]}x{want_hw[0]})')
  # Without a cap (the training pipeline, the evaluation protocols): the full image.
  assert image_io.decode_image(path).shape == (2000, 3000, 3)
  uncapped = image_folder.ImageFolder(tmp_path, max_side=None)
  assert uncapped.read(f'big.{fmt}').shape[:2] == (2000, 3000) and not uncapped.reduced


def test_embeddings_are_written_atomically(tmp_path):
  path = tmp_path / 'emb.npz'
  path.write_bytes(b'earlier')
  with pytest.raises(TypeError):  # fails mid-write: metadata that JSON cannot hold
    embed_tool.write_embeddings(str(path), ['a'], np.zeros((1, 4)), {'bad': object()})
  assert path.read_bytes() == b'earlier' and os.listdir(tmp_path) == ['emb.npz']
  embed_tool.write_embeddings(str(path), [], np.zeros((0, 4)), {'unreadable': []})
  names, vectors, _ = embed_tool.read_embeddings(str(path))
  assert names == [] and vectors.shape == (0, 4)
