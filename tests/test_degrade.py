"""Multi-scale degradation: PIL-exact host resizes, the on-device degrader, the LR-size sampler."""

from pathlib import Path

import jax
import numpy as np
from PIL import Image
import pytest
from scipy import stats

from configs.base import PAPER_LR_SIZES
from ipsr_jax.data import degrade

ORL = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'orl'


def _pil_resize(image: np.ndarray, hw) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))


def _assert_near_pil(ours: np.ndarray, theirs: np.ndarray, *context) -> None:
  # PIL sums in 22-bit fixed point, we in float32: a pass may round the other way where a sum
  # lands on .5, so two or four passes differ by up to 2 levels (measured mean: 0 to 0.027).
  diff = np.abs(ours.astype(int) - theirs)
  assert diff.max() <= 2 and diff.mean() <= 0.05, (*context, diff.max(), diff.mean())


def _faces_like(n: int, seed: int = 0) -> np.ndarray:
  """Smooth random 128x128 RGB images with edges (a bicubic blow-up of noise, plus a bar)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, (n, 12, 10, 3)).astype(np.float32)
  big = np.clip(np.round(degrade.bicubic_resize(small, (128, 128))), 0, 255).astype(np.uint8)
  big[:, 40:48, 20:100] = 255  # a hard edge: bicubic overshoot gets clipped there
  return big


def _orl_faces():
  if not ORL.is_dir():
    pytest.skip(f'ORL not found at {ORL}')
  paths = sorted(ORL.glob('s*/1.pgm'))[:8]
  assert paths, 'ORL folder holds no s*/1.pgm'
  return [np.asarray(Image.open(p).convert('RGB')) for p in paths]  # 112x92


SIZES = [(7, 6), (16, 16), (21, 15), (112, 96), (128, 128), (160, 160), (250, 190)]


@pytest.mark.parametrize('out_hw', SIZES)
def test_bicubic_resize_matches_pil_on_generated(out_hw):
  faces = _faces_like(3)
  ours = degrade.bicubic_resize(faces, out_hw)
  assert ours.dtype == np.uint8 and ours.shape == (3,) + out_hw + (3,)
  theirs = np.stack([_pil_resize(f, out_hw) for f in faces])
  _assert_near_pil(ours, theirs, out_hw)
  # Single image and float input: same layout rules.
  assert degrade.bicubic_resize(faces[0], out_hw).shape == out_hw + (3,)
  as_float = degrade.bicubic_resize(faces.astype(np.float32), out_hw)
  assert as_float.dtype == np.float32
  assert np.abs(np.clip(np.round(as_float), 0, 255) - theirs).mean() <= 0.5


@pytest.mark.parametrize('out_hw', [(7, 6), (11, 8), (32, 32), (112, 96), (128, 128), (224, 184)])
def test_bicubic_resize_matches_pil_on_orl(out_hw):
  for face in _orl_faces():
    ours = degrade.bicubic_resize(face, out_hw)
    theirs = _pil_resize(face, out_hw)
    assert ours.shape == theirs.shape
    _assert_near_pil(ours, theirs, out_hw)  # measured mean <= 0.009


def test_degrade_is_pil_down_then_up():
  faces = _faces_like(2, seed=1)
  for lr_hw in PAPER_LR_SIZES:
    ours = degrade.degrade(faces, lr_hw)
    assert ours.dtype == np.uint8 and ours.shape == faces.shape
    theirs = np.stack([_pil_resize(_pil_resize(f, lr_hw), (128, 128)) for f in faces])
    _assert_near_pil(ours, theirs, lr_hw)  # four rounded passes: measured mean <= 0.012
  # Smaller LR sizes lose more: the 7x6 input is much further from HR than the 112x96 one.
  err = {s: np.abs(degrade.degrade(faces, s).astype(int) - faces).mean()
         for s in [(7, 6), (112, 96)]}
  assert err[(7, 6)] > 3 * err[(112, 96)]


def test_degrade_unrounded_float_chain():
  faces = _faces_like(2, seed=2)
  rounded = degrade.degrade(faces, (16, 12), round_lr=True)
  unrounded = degrade.degrade(faces, (16, 12), round_lr=False)
  assert unrounded.dtype == np.uint8
  diff = np.abs(rounded.astype(int) - unrounded)
  assert 0 < diff.mean() < 1.0  # the 8-bit LR image changes a few levels, not the picture
  as_float = degrade.degrade(faces.astype(np.float32), (16, 12), round_lr=False)
  assert as_float.dtype == np.float32
  assert np.abs(np.clip(np.round(as_float), 0, 255) - unrounded).max() <= 1


def test_degrade_batch_groups_by_size():
  faces = _faces_like(5, seed=3)
  lr_index = np.array([0, 9, 0, 3, 9])
  out = degrade.degrade_batch(faces, lr_index, PAPER_LR_SIZES)
  for b, k in enumerate(lr_index):
    np.testing.assert_array_equal(out[b], degrade.degrade(faces[b], PAPER_LR_SIZES[k]))


def _degrade_each_size_group(hr, lr_index, lr_sizes, round_lr=True):
  """The whole-group host degradation (`degrade`, numpy einsum, per size group): the reference the batched path is held to."""
  out = np.empty_like(hr)
  for k in np.unique(lr_index):
    rows = np.flatnonzero(lr_index == k)
    out[rows] = degrade.degrade(hr[rows], lr_sizes[k], hr.shape[1:3], round_lr=round_lr)
  return out


def _degrade_each_face(hr, lr_index, lr_sizes, round_lr=True):
  return np.stack([degrade.degrade(h, lr_sizes[k], hr.shape[1:3], round_lr=round_lr)
                   for h, k in zip(hr, lr_index)])


def test_degrade_batch_is_bit_identical_to_degrade_on_each_face():
  # White noise puts the most float32 sums near a .5 boundary: any change in the matmuls (their
  # shapes, operand order or summation) shows up here as +-1 levels somewhere.
  rng = np.random.default_rng(5)
  odd_sizes = ((128, 64), (64, 128), (128, 128), (1, 1), (127, 5), (7, 6))  # passes skipped, tiny
  cases = [(64, PAPER_LR_SIZES), (13, PAPER_LR_SIZES), (1, PAPER_LR_SIZES), (12, odd_sizes)]
  for n, sizes in cases:
    hr = rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
    lr_index = rng.integers(0, len(sizes), n)
    fast = degrade.degrade_batch(hr, lr_index, sizes)
    assert fast.dtype == np.uint8 and fast.shape == hr.shape
    np.testing.assert_array_equal(fast, _degrade_each_face(hr, lr_index, sizes))
  # A whole batch at one size (data.lr_per='batch'), every paper size, and a non-square image.
  faces = rng.integers(0, 256, (16, 128, 128, 3), dtype=np.uint8)
  for k in range(len(PAPER_LR_SIZES)):
    same = np.full(16, k)
    np.testing.assert_array_equal(degrade.degrade_batch(faces, same, PAPER_LR_SIZES),
                                  _degrade_each_face(faces, same, PAPER_LR_SIZES))
  wide = rng.integers(0, 256, (6, 40, 36, 3), dtype=np.uint8)
  small = ((4, 4), (8, 6), (16, 16))
  np.testing.assert_array_equal(degrade.degrade_batch(wide, np.arange(6) % 3, small),
                                _degrade_each_face(wide, np.arange(6) % 3, small))
  # Float input and round_lr=False keep the general path.
  as_float = faces[:4].astype(np.float32)
  np.testing.assert_array_equal(
      degrade.degrade_batch(as_float, np.array([0, 9, 3, 0]), PAPER_LR_SIZES, round_lr=False),
      _degrade_each_size_group(as_float, np.array([0, 9, 3, 0]), PAPER_LR_SIZES, round_lr=False))


def test_a_face_degrades_the_same_whatever_shares_its_batch():
  # Process-count invariance at the pixel: one process sees a 64-face group of a size where two
  # see 32 each. Whole-group BLAS calls round a few sums
  # differently by the face's place in the group (on this noise, numpy 2.4 + OpenBLAS 0.3.31:
  # 542 of 50M values over 16 batches); one BLAS call per face cannot.
  rng = np.random.default_rng(11)
  hr = rng.integers(0, 256, (64, 128, 128, 3), dtype=np.uint8)
  for k in (0, 2, 7):
    one = degrade.degrade_batch(hr, np.full(64, k), PAPER_LR_SIZES)
    halves = [degrade.degrade_batch(hr[i:i + 32], np.full(32, k), PAPER_LR_SIZES) for i in (0, 32)]
    np.testing.assert_array_equal(one, np.concatenate(halves))
    np.testing.assert_array_equal(one[[5, 63]], degrade.degrade_batch(hr[[5, 63]], np.full(2, k),
                                                                      PAPER_LR_SIZES))


def test_degrade_batch_against_whole_group_blas_calls():
  # Where whole-group BLAS calls round a sum differently from the same face alone, the
  # batched path keeps the face-alone value: +-1 level on a few values in a million (211 of 47M on
  # 960 LFW faces, benchmarks/NOTES.md), never more.
  rng = np.random.default_rng(3)
  for hr in (_faces_like(64, seed=7), rng.integers(0, 256, (64, 128, 128, 3), dtype=np.uint8)):
    lr_index = rng.integers(0, len(PAPER_LR_SIZES), 64)
    diff = np.abs(degrade.degrade_batch(hr, lr_index, PAPER_LR_SIZES).astype(int)
                  - _degrade_each_size_group(hr, lr_index, PAPER_LR_SIZES))
    assert diff.max() <= 1 and diff.mean() < 1e-4


def test_host_degradation_runs_on_one_blas_thread(monkeypatch):
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  blas = threadpoolctl.ThreadpoolController().select(user_api='blas')
  if not blas.lib_controllers:
    pytest.skip('numpy is not linked to a BLAS threadpoolctl can control')
  get = lambda: blas.lib_controllers[0].num_threads
  blas.lib_controllers[0].set_num_threads(2)  # whatever the machine: a pool the limit must shrink and give back
  seen = []
  matmul = np.matmul

  def spy(*args, **kwargs):
    seen.append(get())
    return matmul(*args, **kwargs)

  monkeypatch.setattr(degrade.np, 'matmul', spy)
  hr = np.random.default_rng(0).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
  degrade.degrade_batch(hr, np.arange(8) % 3, PAPER_LR_SIZES)
  assert len(seen) == 12 and set(seen) == {1}  # 3 sizes x 4 passes, every one single-threaded
  assert get() == 2
  with degrade.one_blas_thread():
    with degrade.one_blas_thread():
      assert get() == 1
    assert get() == 1  # the inner user leaving does not lift the outer one's limit
  assert get() == 2


@pytest.mark.parametrize('round_lr', [True, False])
def test_device_degrader_agrees_with_host(round_lr):
  faces = _faces_like(10, seed=4)
  degrader = degrade.DeviceDegrader(PAPER_LR_SIZES, image_hw=(128, 128), round_lr=round_lr)
  lr_index = np.arange(10, dtype=np.int32)[::-1].copy()  # every size, not in size order
  out = np.asarray(jax.jit(degrader.__call__)(faces.astype(np.float32), lr_index))
  assert out.shape == faces.shape
  for b, k in enumerate(lr_index):
    host = degrade.degrade(faces[b], PAPER_LR_SIZES[k], round_lr=round_lr)
    diff = np.abs(out[b] - host)
    assert diff.mean() <= 1.0, (PAPER_LR_SIZES[k], diff.mean())
    assert diff.mean() <= (0.01 if round_lr else 0.5)  # in fact it is PIL to float rounding
  assert out.min() >= 0 and out.max() <= 255
  # A bf16 batch (mixed precision) is degraded in float32: same result.
  as_bf16 = np.asarray(jax.jit(degrader.__call__)(faces.astype(jax.numpy.bfloat16), lr_index))
  assert as_bf16.dtype == np.float32 and np.abs(as_bf16 - out).max() <= 1e-3


def test_sampler_is_uniform():
  sampler = degrade.LRSampler(PAPER_LR_SIZES, per='example', seed=3)
  draws = sampler.for_batch(np.arange(20_000))
  assert draws.dtype == np.int32 and draws.min() >= 0 and draws.max() <= 9
  counts = np.bincount(draws, minlength=10)
  assert stats.chisquare(counts).pvalue > 1e-3, counts
  # A constant or cyclic sampler would fail the test above; a biased one must too.
  biased = np.bincount(np.concatenate([draws, np.zeros(600, np.int32)]), minlength=10)
  assert stats.chisquare(biased).pvalue < 1e-3


def test_sampler_is_reproducible_and_stateless():
  a = degrade.LRSampler(PAPER_LR_SIZES, seed=7)
  b = degrade.LRSampler(PAPER_LR_SIZES, seed=7)
  c = degrade.LRSampler(PAPER_LR_SIZES, seed=8)
  keys = np.arange(1000, 1200)
  np.testing.assert_array_equal(a.for_batch(keys), b.for_batch(keys))
  assert (a.for_batch(keys) != c.for_batch(keys)).mean() > 0.5
  # Asking in another order (a resumed run) gives the same answer for each key.
  assert [a.sample(k) for k in keys[::-1]] == list(a.for_batch(keys)[::-1])


def test_sampler_per_batch_is_constant_within_a_batch():
  sampler = degrade.LRSampler(PAPER_LR_SIZES, per='batch', seed=0)
  firsts = []
  for start in range(0, 64 * 200, 64):
    batch = sampler.for_batch(np.arange(start, start + 64))
    assert (batch == batch[0]).all()
    firsts.append(batch[0])
  assert len(set(firsts)) == 10  # and it still varies from batch to batch
  with pytest.raises(ValueError):
    degrade.LRSampler(PAPER_LR_SIZES, per='epoch')
