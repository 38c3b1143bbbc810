"""Tests of the procedural synthetic face source (ipsr_jax/data/synthetic.py)."""

import contextlib
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ipsr_jax.data.synthetic import SyntheticFaces, identity_params, render_face
from ipsr_jax.ops.resize import resize_np

REPO = Path(__file__).resolve().parents[1]

try:  # OpenBLAS threads thrash on a small, shared CPU: 10-30x slower eigh on 500x500 matrices.
  from threadpoolctl import threadpool_limits
  _one_blas_thread = lambda: threadpool_limits(limits=1, user_api='blas')
except ImportError:  # pragma: no cover
  _one_blas_thread = contextlib.nullcontext


def _digest(image: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_render_shape_dtype_and_determinism():
  a = render_face(3, 1)
  assert a.shape == (128, 128, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, render_face(3, 1))
  # A full 0..255 range is used, not a washed-out or blank image.
  assert a.std() > 20.0 and int(a.max()) - int(a.min()) > 150
  small = render_face(3, 1, size=64)
  assert small.shape == (64, 64, 3) and small.dtype == np.uint8


def test_same_pixels_in_a_fresh_process():
  expected = [_digest(render_face(i, j, seed=5)) for i, j in ((0, 0), (123456, 7))]
  code = ('import hashlib, numpy as np\n'
          'from ipsr_jax.data.synthetic import render_face\n'
          'for i, j in ((0, 0), (123456, 7)):\n'
          '  x = np.ascontiguousarray(render_face(i, j, seed=5))\n'
          '  print(hashlib.sha256(x.tobytes()).hexdigest())\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout.split() == expected


def test_source_records_repr_and_rendering():
  src = SyntheticFaces(4, 3, seed=7, identity_offset=10, image_size=64)
  again = SyntheticFaces(4, 3, seed=7, identity_offset=10, image_size=64)
  assert len(src) == 12 and src.num_identities == 4
  assert repr(src) == repr(again) == (
      'SyntheticFaces(seed=7, identity_offset=10, num_identities=4, images_per_identity=3, '
      'image_size=64)')
  assert [r.label for r in src.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  assert [r.meta['image'] for r in src.records[:4]] == [0, 1, 2, 0]
  assert src.records[5].identity == 'synth-000011' and src.records[5].path == ''
  for index in range(len(src)):
    item, other = src[index], again[index]
    record = src.records[index]
    assert item['label'] == np.int32(record.label) and item['index'] == index
    np.testing.assert_array_equal(item['image'], other['image'])
    np.testing.assert_array_equal(
        item['image'], render_face(10 + record.label, record.meta['image'], seed=7, size=64))
  assert src.bad == []
  # Non-overlapping offsets give disjoint identities; a different seed gives different faces.
  held_out = SyntheticFaces(4, 3, seed=7, identity_offset=100000, image_size=64)
  assert not set(src.identities) & set(held_out.identities)
  assert np.abs(src[0]['image'].astype(int) - held_out[0]['image'].astype(int)).mean() > 10
  other_seed = SyntheticFaces(4, 3, seed=8, identity_offset=10, image_size=64)
  assert np.abs(src[0]['image'].astype(int) - other_seed[0]['image'].astype(int)).mean() > 10
  with pytest.raises(ValueError):
    SyntheticFaces(0, 3)
  with pytest.raises(ValueError):
    render_face(-1, 0)


def test_identities_differ_more_than_images_of_one_identity():
  # On the face region, two images of one identity are closer than images of two identities.
  faces = np.stack([[render_face(i, j)[24:104, 32:96] for j in range(4)] for i in range(12)])
  faces = faces.astype(np.float32)
  within = np.mean([np.abs(faces[i, j] - faces[i, k]).mean()
                    for i in range(12) for j in range(4) for k in range(j + 1, 4)])
  between = np.mean([np.abs(faces[i, 0] - faces[k, 0]).mean()
                     for i in range(12) for k in range(i + 1, 12)])
  print(f'mean abs difference on the face: within identity {within:.1f}, between {between:.1f}')
  assert within > 2.0            # the nuisances do change the pixels
  assert between > 1.4 * within
  # Identities differ in their attributes, not only in pixels.
  a, b = identity_params(0), identity_params(1)
  assert a.head_a != b.head_a and not np.array_equal(a.skin, b.skin)


def test_rendering_speed_is_reported():
  render_face(0, 0)
  start, count = time.process_time(), 100
  for i in range(count):
    render_face(i % 20, i)
  rate = count / max(time.process_time() - start, 1e-9)
  print(f'synthetic faces: {rate:.0f} images/s of CPU time at 128x128 (one core)')
  assert rate > 0  # speed is reported, not asserted: the CI machine's load varies


# --- identity signal vs resolution, with a training-free linear matcher --------------------------

_SIZES = ((32, 32), (16, 16), (14, 12), (7, 6))


def _features(images: np.ndarray) -> np.ndarray:
  """Centre face crop, 2x2 average (fast; 1-2 px details stay visible), mean/norm normalised."""
  x = images[:, 16:112, 24:104].astype(np.float32)
  x = x.reshape(len(x), 48, 2, 40, 2, 3).mean((2, 4)).reshape(len(x), -1)
  x -= x.mean(1, keepdims=True)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def _fit_lda(x: np.ndarray, labels: np.ndarray, pca_dims: int = 250, out_dims: int = 150):
  """Fisherfaces: PCA (at most N - C dims), then LDA. Returns (mean, projection [D, k])."""
  classes, index = np.unique(labels, return_inverse=True)
  mean = x.mean(0)
  xc = x - mean
  w, v = np.linalg.eigh(xc @ xc.T)
  keep = np.argsort(w)[::-1][:min(pca_dims, len(x) - len(classes))]
  pca = (xc.T @ v[:, keep]) / np.sqrt(np.maximum(w[keep], 1e-9))
  z = (xc @ pca).astype(np.float64)                     # centred: the global mean is 0
  counts = np.bincount(index).astype(np.float64)
  class_means = np.zeros((len(classes), z.shape[1]))
  np.add.at(class_means, index, z)
  class_means /= counts[:, None]
  between = class_means.T @ (class_means * counts[:, None])
  within = z.T @ z - between
  within += 1e-3 * np.trace(within) / len(within) * np.eye(len(within))
  ew, vw = np.linalg.eigh(within)
  whiten = vw / np.sqrt(ew)
  eb, vb = np.linalg.eigh(whiten.T @ between @ whiten)
  lda = whiten @ vb[:, np.argsort(eb)[::-1][:min(len(classes) - 1, out_dims)]]
  return mean, (pca @ lda).astype(np.float32)


def _rank1(gallery: np.ndarray, probes: np.ndarray, gallery_labels, probe_labels) -> float:
  gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
  return float((gallery_labels[np.argmax(probes @ gallery.T, 1)] == probe_labels).mean())


def _degrade(images: np.ndarray, size) -> np.ndarray:
  return resize_np(resize_np(images, size), (128, 128))


def test_identity_signal_vs_resolution():
  """Identity is clear at 128x128 and partly lost at 16x16 and below, though not all gone.

  The matcher is a proxy for a face embedder trained on high-resolution faces: LDA fit on 100
  training identities, applied to 50 held-out identities (gallery: one image each; probes: the
  other 4, bicubic down to the LR size and back up, as in the paper's protocol).
  """
  with _one_blas_thread():
    _identity_signal_vs_resolution()


def _identity_signal_vs_resolution():
  start = time.perf_counter()
  n_train, n_test, per = 100, 50, 5
  train = np.stack([render_face(i, j) for i in range(n_train) for j in range(per)])
  test = np.stack([render_face(100000 + i, j) for i in range(n_test) for j in range(per)])
  train_labels = np.repeat(np.arange(n_train), per)
  test_labels = np.repeat(np.arange(n_test), per)
  gallery = np.arange(n_test) * per
  probes = np.setdiff1d(np.arange(len(test)), gallery)

  mean, proj = _fit_lda(_features(train), train_labels)
  embed = lambda images: (_features(images) - mean) @ proj
  gallery_emb = embed(test[gallery])

  def rank1(probe_images, emb=embed, gal=gallery_emb):
    return _rank1(gal, emb(probe_images), test_labels[gallery], test_labels[probes])

  hr = rank1(test[probes])
  pixels = _rank1(_features(test[gallery]), _features(test[probes]), test_labels[gallery],
                  test_labels[probes])
  lr = {s: rank1(_degrade(test[probes], s)) for s in _SIZES}
  # What survives at 16x16: LDA fit on HR and 16x16 training faces together (a resolution-aware
  # matcher) finds much more than the HR matcher does, so a model that restores faces can help.
  mean16, proj16 = _fit_lda(
      np.concatenate([_features(train), _features(_degrade(train, (16, 16)))]),
      np.concatenate([train_labels, train_labels]))
  embed16 = lambda images: (_features(images) - mean16) @ proj16
  aware16 = rank1(_degrade(test[probes], (16, 16)), embed16, embed16(test[gallery]))

  table = '  '.join(f'{h}x{w} {lr[(h, w)]:.3f}' for h, w in _SIZES)
  print(f'rank-1, LDA matcher, 50 held-out identities: HR {hr:.3f}  {table}  '
        f'(raw pixels HR {pixels:.3f}; resolution-aware LDA at 16x16 {aware16:.3f}; '
        f'chance 0.020; {time.perf_counter() - start:.1f} s)')
  assert hr >= 0.9
  assert lr[(32, 32)] >= hr - 0.1            # 32x32 keeps most of the identity
  assert lr[(16, 16)] <= hr - 0.15           # partly lost at 16x16 ...
  assert lr[(7, 6)] <= hr - 0.6              # ... mostly lost at 7x6 for a HR matcher
  assert lr[(32, 32)] >= lr[(16, 16)] >= lr[(14, 12)] >= lr[(7, 6)]
  assert lr[(7, 6)] >= 0.05                  # but not all gone (chance is 0.02)
  assert aware16 >= lr[(16, 16)] + 0.1       # and what survives in the LR face is usable
  assert pixels < hr - 0.2                   # identity is more than raw pixel similarity
