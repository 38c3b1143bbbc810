"""MTCNN in JAX (nets + full detection) against facenet-pytorch, and the alignment tool on real faces."""

import json
import pathlib
import sys
import types

import numpy as np
import pytest
from PIL import Image

from ipsr_jax.data import face_align
from ipsr_jax.data import image_io
from ipsr_jax.models import mtcnn
from tests.conftest import facenet_pytorch_module, facenet_pytorch_root

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
LFW = SHARED_DATA / 'lfw' / 'images_deepfunneled'
ORL = SHARED_DATA / 'orl'


# ---------------------------------------------------------------------------------------------
# facenet-pytorch's own MTCNN, imported from its module files (its package __init__ and
# detect_face need torchvision, which is not installed: stub the two names detect_face uses).


def _torch_nms(boxes, scores, threshold):
  import torch  # pylint: disable=g-import-not-at-top
  x1, y1, x2, y2 = boxes.unbind(1)
  area = (x2 - x1) * (y2 - y1)
  suppressed = torch.zeros(len(boxes), dtype=torch.bool)
  keep = []
  for i in torch.argsort(scores, descending=True, stable=True).tolist():
    if suppressed[i]:
      continue
    keep.append(i)
    w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
    h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
    suppressed |= w * h / (area[i] + area - w * h) > threshold
  return torch.as_tensor(keep, dtype=torch.long)


def _torch_batched_nms(boxes, scores, idxs, threshold):
  import torch  # pylint: disable=g-import-not-at-top
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.long)
  return _torch_nms(boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None], scores, threshold)


def _facenet_mtcnn_module():
  torch = pytest.importorskip('torch')
  if 'facenet_pytorch.models.mtcnn' in sys.modules:
    return sys.modules['facenet_pytorch.models.mtcnn']
  facenet_pytorch_root()  # skips without facenet-pytorch
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    stubs = {name: types.ModuleType(name) for name in
             ('torchvision', 'torchvision.transforms', 'torchvision.transforms.functional',
              'torchvision.ops', 'torchvision.ops.boxes')}
    for name, module in stubs.items():
      module.__path__ = []
      sys.modules[name] = module
    stubs['torchvision.transforms.functional'].to_tensor = lambda a: torch.as_tensor(a)
    stubs['torchvision.ops.boxes'].batched_nms = _torch_batched_nms
  return facenet_pytorch_module('mtcnn')


@pytest.fixture(scope='module')
def params():
  return mtcnn.load_params()  # via pt_reader, no torch


@pytest.fixture(scope='module')
def detector():
  # The process-wide default detector: align_face() and every test share its compiled functions.
  return face_align.default_aligner(128).detector


def _read(path) -> np.ndarray:
  return image_io.decode_image(path)


def _lfw_sample(n: int) -> list[pathlib.Path]:
  if not LFW.is_dir():
    pytest.skip(f'LFW not found at {LFW}')
  files = sorted(LFW.glob('*/*.jpg'))
  return files[::max(1, len(files) // n)][:n]


# ---------------------------------------------------------------------------------------------
# Nets.


@pytest.mark.parametrize('name,shape', [('pnet', (2, 3, 37, 45)), ('rnet', (5, 3, 24, 24)),
                                        ('onet', (5, 3, 48, 48))])
def test_nets_match_facenet_pytorch(name, shape, params):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  fp = _facenet_mtcnn_module()
  torch_net = {'pnet': fp.PNet, 'rnet': fp.RNet, 'onet': fp.ONet}[name](pretrained=True).eval()
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  with torch.no_grad():
    want = [t.numpy() for t in torch_net(torch.from_numpy(x))]
  got = jax.jit(mtcnn.NETS[name]().apply)(params[name], x.transpose(0, 2, 3, 1))
  got = [np.asarray(o) for o in got]
  if name == 'pnet':  # NHWC maps -> NCHW
    got = [g.transpose(0, 3, 1, 2) for g in got]
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    assert np.abs(g - w).max() <= 1e-4
  # The weights are real (a random net would not give a confident, normalised face probability).
  assert np.allclose(got[-1].sum(1), 1.0, atol=1e-5)


def test_weights_found_without_importing_facenet():
  root = mtcnn.default_weights_dir()
  assert all((root / f'{n}.pt').is_file() for n in mtcnn.NET_NAMES)
  with pytest.raises(FileNotFoundError):
    mtcnn.load_params('/nonexistent/mtcnn_weights')


def test_area_resampling_matches_torch():
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
  sat = np.zeros((62, 48, 3), np.int64)
  sat[1:, 1:] = image.astype(np.int64).cumsum(0).cumsum(1)
  crops = np.array([[0, 61, 0, 47], [5, 50, 3, 20], [10, 17, 30, 41], [40, 41, 2, 3]])  # y0 y1 x0 x1
  for out in (24, 48):
    got = face_align._crop_area_resample(sat, crops, out)
    for crop, g in zip(crops, got):
      t = torch.from_numpy(image[crop[0]:crop[1], crop[2]:crop[3]].astype(np.float32))
      want = torch.nn.functional.interpolate(t.permute(2, 0, 1)[None], size=(out, out), mode='area')
      np.testing.assert_allclose(g, want[0].permute(1, 2, 0).numpy(), atol=1e-3)
  # The pyramid's separable matrices are the same operator.
  wy, wx = face_align.area_weights(61, 37), face_align.area_weights(47, 29)
  got = np.einsum('oh,hwc->owc', wy, image.astype(np.float32))
  got = np.einsum('pw,owc->opc', wx, got)
  want = torch.nn.functional.interpolate(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None],
                                         size=(37, 29), mode='area')[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(got, want, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Detection: the whole cascade against facenet-pytorch's detect_face.


def test_detect_matches_facenet_pytorch(detector):
  import torch  # pylint: disable=g-import-not-at-top
  fp = _facenet_mtcnn_module()
  from facenet_pytorch.models.utils import detect_face as fp_detect  # pylint: disable=g-import-not-at-top
  nets = [fp.PNet().eval(), fp.RNet().eval(), fp.ONet().eval()]
  files = _lfw_sample(3)
  faces = 0
  for path in files:
    image = _read(path)
    with torch.no_grad():
      boxes, points = fp_detect.detect_face(image, 20, *nets, [0.6, 0.7, 0.7], 0.709, 'cpu')
    got = detector.detect(image)
    want_boxes = np.asarray(boxes[0], np.float32).reshape(-1, 5)
    want_points = np.asarray(points[0], np.float32).reshape(-1, 5, 2)
    assert got.boxes.shape == want_boxes.shape, path.name
    np.testing.assert_allclose(got.boxes, want_boxes, atol=1e-2)
    np.testing.assert_allclose(got.landmarks, want_points, atol=1e-2)
    faces += len(got.boxes)
  assert faces >= len(files)


def test_blank_and_tiny_images_are_no_face(detector):
  # One size (100x90) for every blank image of this file: one PNet pyramid to compile.
  for image in (np.full((100, 90, 3), 128, np.uint8), np.full((100, 90), 200, np.uint8),
                np.zeros((10, 8, 3), np.uint8)):
    result = face_align.align_face(image)
    assert result.face is None and result.box is None and result.landmarks is None
    assert result.reason == 'no face' and result.score == 0.0
  assert len(detector.detect(np.full((100, 90, 3), 60, np.uint8)).boxes) == 0


# ---------------------------------------------------------------------------------------------
# Alignment geometry.


def test_similarity_transform_recovers_a_known_one():
  rng = np.random.default_rng(2)
  src = rng.uniform(0, 200, (5, 2))
  angle, scale, shift = 0.3, 0.7, np.array([12.0, -5.0])
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  dst = src @ rot.T + shift
  m = face_align.similarity_transform(src, dst)
  np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
  np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)
  # Mirrored points cannot be reached by a similarity: it must not reflect.
  m = face_align.similarity_transform(src, src * np.array([-1.0, 1.0]))
  assert np.linalg.det(m[:, :2]) > 0


@pytest.mark.parametrize('scale', [1.5, 0.8, 0.3])  # 0.3: box-reduced before the warp
def test_warp_puts_a_pixel_where_the_matrix_says(scale):
  image = np.zeros((200, 160, 3), np.uint8)
  y, x = 90, 70
  image[y - 2:y + 3, x - 2:x + 3] = 255  # a blob centred on index (x, y)
  m = np.array([[scale, 0.0, 64 - scale * x], [0.0, scale, 40 - scale * y]])  # (x, y) -> (64, 40)
  out = face_align.warp(image, m, 128).astype(np.float64)[..., 0]
  yy, xx = np.mgrid[:128, :128]
  cy, cx = (out * yy).sum() / out.sum(), (out * xx).sum() / out.sum()
  assert abs(cx - 64) < 0.3 and abs(cy - 40) < 0.3


def test_template_scales_with_size():
  np.testing.assert_allclose(face_align.template(112), face_align.ARCFACE_TEMPLATE_112)
  np.testing.assert_allclose(face_align.template(128)[0], [43.765, 59.082], atol=1e-3)  # left eye


# ---------------------------------------------------------------------------------------------
# Real faces.


def test_lfw_sample_aligns_eyes_onto_the_template(detector):
  aligner = face_align.FaceAligner(128, detector=detector)
  redetect = face_align.FaceAligner(128, pad=0.25, detector=detector)
  eyes = face_align.template(128)[:2]
  results = [aligner(_read(p)) for p in _lfw_sample(40)]
  ok = [r for r in results if r.face is not None]
  assert len(ok) >= 0.95 * len(results)
  residuals, errors = [], []
  for r in ok:
    assert r.face.shape == (128, 128, 3) and r.face.dtype == np.uint8
    assert 0.9 <= r.score <= 1.0
    # Where the fit sends the detected eyes...
    m = face_align.similarity_transform(r.landmarks, face_align.template(128))
    residuals.append(np.abs(face_align.apply_transform(m, r.landmarks[:2]) - eyes).max())
    # ... and where MTCNN finds them again in the aligned output.
    again = redetect(r.face)
    if again.face is not None:
      errors.append(np.linalg.norm(again.landmarks[:2] - eyes, axis=1).max())
  assert np.median(residuals) < 3.0
  assert len(errors) >= 0.9 * len(ok)
  assert np.median(errors) < 3.0 and np.percentile(errors, 90) < 6.0


def test_orl_sample_with_pad():
  if not ORL.is_dir():
    pytest.skip(f'ORL not found at {ORL}')
  files = sorted(ORL.glob('s*/*.pgm'))[::20]
  aligner = face_align.FaceAligner(128, pad=0.25, detector=face_align.default_aligner(128).detector)
  results = []
  for path in files:
    with Image.open(path) as im:
      grey = np.asarray(im)
    assert grey.ndim == 2  # ORL is 8-bit grey: align_face takes it as is
    results.append(aligner(grey))
  ok = [r for r in results if r.face is not None]
  assert len(ok) >= 0.9 * len(results)
  # Landmarks come back in the unpadded 92x112 frame.
  for r in ok:
    assert r.face.shape == (128, 128, 3)
    assert np.all(r.landmarks[:, 0] > 0) and np.all(r.landmarks[:, 0] < 92)
    assert np.all(r.landmarks[:, 1] > 0) and np.all(r.landmarks[:, 1] < 112)


def test_no_recompilation_per_image(detector):
  files = _lfw_sample(8)
  for path in files:
    detector.detect(_read(path))
  _, pyramid = face_align.pnet_pyramid(250, 250, detector.min_face_size, detector.factor)
  assert pyramid._cache_size() == 1  # one compile for all 250x250 images
  assert 1 <= face_align._rnet_apply._cache_size() <= len(detector.rnet_buckets)
  assert 1 <= face_align._onet_apply._cache_size() <= len(detector.onet_buckets)


# ---------------------------------------------------------------------------------------------
# Folders.


def _write_bad_files(root: pathlib.Path, blank_hw=(100, 90)):
  (root / 'corrupt').mkdir(parents=True)
  (root / 'corrupt' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  (root / 'blank').mkdir()
  Image.fromarray(np.full(tuple(blank_hw) + (3,), 127, np.uint8)).save(root / 'blank' / 'grey.png')
  (root / 'README.txt').write_text('not an image: ignored')


def test_align_tree_reports_failures(tmp_path, detector):
  raw = tmp_path / 'raw'
  _write_bad_files(raw)
  aligner = face_align.FaceAligner(128, detector=detector)
  faces = _lfw_sample(3) if LFW.is_dir() else []
  for path in faces:
    (raw / path.parent.name).mkdir(exist_ok=True)
    (raw / path.parent.name / path.name).write_bytes(path.read_bytes())
  report = face_align.align_tree(raw, tmp_path / 'out', size=128, workers=2, aligner=aligner)
  on_disk = json.loads((tmp_path / 'out' / 'report.json').read_text())
  assert on_disk == report
  assert report['total'] == 2 + len(faces)
  assert report['failed'] == 2 and report['no_face'] == 1 and report['unreadable'] == 1
  reasons = {f['path']: f['reason'] for f in report['failures']}
  assert reasons['blank/grey.png'] == 'no face'
  assert reasons['corrupt/broken.jpg'].startswith('unreadable')
  assert report['aligned'] == len(faces)
  for path in faces:  # mirrored <identity>/<image>, PNG, size x size
    out = tmp_path / 'out' / path.parent.name / (path.stem + '.png')
    with Image.open(out) as im:
      assert im.size == (128, 128) and im.mode == 'RGB'
  written = sorted(p.relative_to(tmp_path / 'out') for p in (tmp_path / 'out').rglob('*.png'))
  assert len(written) == len(faces)
  assert report['seconds'] > 0


def test_align_tree_jpeg_and_bad_arguments(tmp_path, detector):
  raw = tmp_path / 'raw'
  _write_bad_files(raw)
  if LFW.is_dir():
    face = _lfw_sample(1)[0]
    (raw / 'person').mkdir()
    (raw / 'person' / face.name).write_bytes(face.read_bytes())
  aligner = face_align.FaceAligner(96, detector=detector)
  report = face_align.align_tree(raw, tmp_path / 'out', size=96, workers=1, image_format='jpg',
                            aligner=aligner)
  assert report['format'] == 'jpg' and report['failed'] == 2
  for out in (tmp_path / 'out').rglob('*.jpg'):
    with Image.open(out) as im:
      assert im.size == (96, 96) and im.format == 'JPEG'
  with pytest.raises(ValueError):
    face_align.align_tree(raw, tmp_path / 'x', size=128, aligner=aligner)  # aligner is 96
  with pytest.raises(ValueError):
    face_align.align_tree(raw, tmp_path / 'x', size=96, aligner=aligner, image_format='gif')
  with pytest.raises(FileNotFoundError):
    face_align.align_tree(tmp_path / 'missing', tmp_path / 'x', aligner=aligner)


def test_cli(tmp_path, capsys, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ipsr_jax.tools import align as align_tool  # pylint: disable=g-import-not-at-top
  raw = tmp_path / 'raw'
  _write_bad_files(raw, blank_hw=(92, 82))  # + pad 4 = 100x90, already compiled
  monkeypatch.chdir(tmp_path)  # relative paths, as README writes them
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['align', '--input=raw', '--output=out', '--size=64', '--pad=4'])
  assert align_tool._OUTPUT.value == str(tmp_path / 'out')  # resolved once, as parsed
  try:
    align_tool.main(['align'])
  finally:
    flags.FLAGS.unparse_flags()
  report = json.loads((tmp_path / 'out' / 'report.json').read_text())
  assert report['total'] == 2 and report['failed'] == 2 and report['size'] == 64 and report['pad'] == 4
  assert 'aligned 0/2 images' in capsys.readouterr().out


@pytest.mark.slow  # all of LFW
def test_all_of_lfw(tmp_path, detector):
  if not LFW.is_dir():
    pytest.skip(f'LFW not found at {LFW}')
  report = face_align.align_tree(LFW, tmp_path / 'lfw', size=128,
                            aligner=face_align.FaceAligner(128, detector=detector))
  assert report['total'] == 13233
  assert report['unreadable'] == 0
  assert report['success_rate'] >= 0.98


class _CountingAligner:
  """Stands in for MTCNN: a grey face per image, and a crash after `die_after` faces."""

  def __init__(self, size=16, die_after=None):
    self.size, self.pad, self.die_after, self.seen = size, 0.0, die_after, []

  def __call__(self, image):
    if self.die_after is not None and len(self.seen) >= self.die_after:
      raise KeyboardInterrupt  # the run is killed here
    self.seen.append(image.shape)
    face = np.full((self.size, self.size, 3), int(image.mean()), np.uint8)
    return face_align.AlignResult(face, None, None, 0.99)


def test_align_tree_resumes_a_killed_run(tmp_path):
  for person in range(3):
    for n in range(4):
      path = tmp_path / 'in' / f'p{person}' / f'{n}.jpg'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((24, 20, 3), 40 * person + n, np.uint8)).save(path)
  killed = _CountingAligner(die_after=5)
  with pytest.raises(KeyboardInterrupt):
    face_align.align_tree(tmp_path / 'in', tmp_path / 'out', size=16, workers=1, aligner=killed)
  done = sorted(tmp_path.joinpath('out').rglob('*.png'))
  assert len(done) == 5 and not list(tmp_path.joinpath('out').rglob('*partial*'))
  assert not (tmp_path / 'out' / 'report.json').exists()
  resumed = _CountingAligner()
  report = face_align.align_tree(tmp_path / 'in', tmp_path / 'out', size=16, workers=1, aligner=resumed)
  assert len(resumed.seen) == 12 - 5  # only what the killed run had not written
  assert report['aligned'] == 12 and report['resumed'] == 5 and report['failed'] == 0
  assert len(list(tmp_path.joinpath('out').rglob('*.png'))) == 12


def test_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
  """Piped to a file (as under nohup or a scheduler), the stage prints whole lines, no tqdm redraws."""
  for n in range(8):
    path = tmp_path / 'in' / 'p' / f'{n}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 20, 3), 10 * n, np.uint8)).save(path)
  face_align.align_tree(tmp_path / 'in', tmp_path / 'out', size=16, workers=1, aligner=_CountingAligner(),
                   progress=True)
  out = capsys.readouterr()
  assert '\r' not in out.out + out.err
  lines = [l for l in out.out.splitlines() if l.startswith('align in: ')]
  assert [l.split()[2] for l in lines] == ['2/8', '4/8', '6/8', '8/8'], out.out
  assert 'done in' in lines[-1]
