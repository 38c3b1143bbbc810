"""CMC / rank, blocked similarity, ROC, PSNR and SSIM against independent references."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_curve, top_k_accuracy_score

from ipsr_jax.evaluation import metrics
from ipsr_jax.evaluation import similarity


def _brute_force_ranks(sim, probe_labels, gallery_labels):
  """Python loop: per identity best image, then order (score desc, true identity last)."""
  ranks = []
  for p in range(sim.shape[0]):
    best = {}
    for g, label in enumerate(gallery_labels):
      best[label] = max(best.get(label, -math.inf), sim[p, g])
    order = sorted(best, key=lambda lab: (-best[lab], lab == probe_labels[p]))
    ranks.append(order.index(probe_labels[p]))
  return np.array(ranks)


def test_cmc_matches_sklearn_one_image_per_identity():
  rng = np.random.default_rng(0)
  n_id, n_probe = 30, 200
  gallery_labels = rng.permutation(n_id) * 3 + 5  # sparse, shuffled labels
  probe_labels = rng.choice(gallery_labels, n_probe)
  sim = rng.normal(size=(n_probe, n_id))
  curve = metrics.cmc(sim, probe_labels, gallery_labels)
  assert curve.shape == (n_id,)
  order = np.argsort(gallery_labels)  # sklearn: score columns follow the sorted labels
  for k in range(1, n_id):
    ref = top_k_accuracy_score(probe_labels, sim[:, order], k=k, labels=gallery_labels[order])
    assert curve[k - 1] == pytest.approx(ref, abs=1e-12), k
  assert curve[-1] == 1.0
  assert 0.0 < curve[0] < 0.2  # random scores: about 1/30


def test_cmc_ties_are_pessimistic_like_sklearn_with_the_truth_nudged_down():
  rng = np.random.default_rng(1)
  n_id, n_probe = 20, 300
  gallery_labels = np.arange(n_id)
  probe_labels = rng.integers(0, n_id, n_probe)
  sim = np.round(rng.uniform(size=(n_probe, n_id)) * 4) / 4  # 5 levels: ties everywhere
  curve = metrics.cmc(sim, probe_labels, gallery_labels)
  # Pessimistic = the true identity strictly below every equal score, above every lower one.
  nudged = sim.copy()
  nudged[np.arange(n_probe), probe_labels] -= 1e-6
  for k in range(1, n_id):
    ref = top_k_accuracy_score(probe_labels, nudged, k=k, labels=gallery_labels)
    assert curve[k - 1] == pytest.approx(ref, abs=1e-12), k
  # Without the pessimistic rule ties would count as hits: the optimistic rank-1 is higher.
  optimistic = np.mean(sim[np.arange(n_probe), probe_labels] >= sim.max(axis=1))
  assert curve[0] < optimistic


def test_cmc_several_gallery_images_per_identity_with_ties_matches_brute_force():
  rng = np.random.default_rng(2)
  gallery_labels = np.repeat(np.arange(15), rng.integers(1, 5, 15))
  rng.shuffle(gallery_labels)
  probe_labels = rng.integers(0, 15, 120)
  sim = np.round(rng.normal(size=(120, len(gallery_labels))) * 2) / 2
  ref = _brute_force_ranks(sim, probe_labels, gallery_labels)
  ranks = metrics.identity_ranks(sim, probe_labels, gallery_labels)
  np.testing.assert_array_equal(ranks, ref)
  curve = metrics.cmc(sim, probe_labels, gallery_labels, max_rank=10)
  np.testing.assert_allclose(curve, [(ref < k).mean() for k in range(1, 11)])
  assert len(np.unique(ref)) > 5  # the case is not degenerate


def test_cmc_all_equal_scores_rank_last_and_absent_identity_raises():
  sim = np.zeros((4, 6))
  gallery_labels = np.array([0, 0, 1, 2, 2, 3])
  np.testing.assert_array_equal(metrics.identity_ranks(sim, [0, 1, 2, 3], gallery_labels), 3)
  np.testing.assert_allclose(metrics.cmc(sim, [0, 1, 2, 3], gallery_labels), [0, 0, 0, 1])
  with pytest.raises(ValueError, match='no gallery image'):
    metrics.cmc(sim, [0, 1, 2, 9], gallery_labels)
  with pytest.raises(ValueError):
    metrics.cmc_from_ranks(np.array([0, -1]), 3)


def _gallery_spread_over_blocks(rng, dim=8, integer=True):
  # 40 identities, 1..20 images each (some longer than a 16-image block), shuffled order.
  counts = rng.integers(1, 21, 40)
  counts[7] = 37  # spans three blocks of 16
  labels = np.repeat(np.arange(40) * 2 + 1, counts)
  perm = rng.permutation(len(labels))
  labels = labels[perm]
  if integer:  # small integers: every dot product exact in float32, so ties are real
    emb = rng.integers(-2, 3, (len(labels), dim)).astype(np.float32)
  else:
    emb = rng.normal(size=(len(labels), dim)).astype(np.float32)
  return emb, labels


def test_blocked_ranks_equal_one_matrix_with_exact_ties():
  rng = np.random.default_rng(3)
  emb, labels = _gallery_spread_over_blocks(rng)
  probe_labels = rng.choice(np.unique(labels), 45)
  probes = rng.integers(-2, 3, (45, 8)).astype(np.float32)
  sim = np.asarray(similarity.cosine_similarity(probes, emb, normalize=False))
  ref = metrics.identity_ranks(sim, probe_labels, labels)
  assert len(emb) > 5 * 16
  ranks = similarity.rank_of_true_identity(probes, probe_labels, emb, labels, gallery_block=16,
                                           probe_block=8, normalize=False)
  np.testing.assert_array_equal(ranks, ref)
  np.testing.assert_array_equal(ref, _brute_force_ranks(sim, probe_labels, labels))
  # Ties exist among the identity maxima (the reason for the integer embeddings).
  assert (np.diff(np.sort(sim, axis=1)) == 0).any()
  # A block larger than the gallery is the one-block case.
  one = similarity.rank_of_true_identity(probes, probe_labels, emb, labels, gallery_block=4096,
                                         normalize=False)
  np.testing.assert_array_equal(one, ref)


def test_blocked_ranks_cosine_and_topk_cmc():
  rng = np.random.default_rng(4)
  emb, labels = _gallery_spread_over_blocks(rng, dim=16, integer=False)
  probe_labels = rng.choice(np.unique(labels), 50)
  probes = emb[rng.integers(0, len(emb), 50)] * 0.1 + rng.normal(size=(50, 16)).astype(np.float32)
  sim = np.asarray(similarity.cosine_similarity(probes, emb))
  ref = metrics.identity_ranks(sim, probe_labels, labels)
  ranks = similarity.rank_of_true_identity(probes, probe_labels, emb, labels, gallery_block=16,
                                           probe_block=16)
  np.testing.assert_array_equal(ranks, ref)
  scores, top = similarity.topk_identities(probes, emb, labels, 10, probe_labels=probe_labels,
                                           gallery_block=16, probe_block=16)
  assert top.shape == (50, 10)
  for row in top:  # every identity once per list
    assert len(set(row.tolist())) == 10
  assert (np.diff(scores, axis=1) <= 0).all()
  # Top-1 identity is the one whose best image scores highest.
  ids = np.unique(labels)
  best = np.stack([sim[:, labels == i].max(axis=1) for i in ids], axis=1)
  np.testing.assert_array_equal(top[:, 0], ids[best.argmax(axis=1)])
  np.testing.assert_allclose(scores[:, 0], best.max(axis=1), rtol=1e-6)
  np.testing.assert_allclose(metrics.cmc_from_topk(top, probe_labels, 10),
                             metrics.cmc(sim, probe_labels, labels, 10))


def test_topk_with_exact_ties_is_pessimistic():
  rng = np.random.default_rng(5)
  emb, labels = _gallery_spread_over_blocks(rng)
  probe_labels = rng.choice(np.unique(labels), 30)
  probes = rng.integers(-2, 3, (30, 8)).astype(np.float32)
  sim = np.asarray(similarity.cosine_similarity(probes, emb, normalize=False))
  ref = _brute_force_ranks(sim, probe_labels, labels)
  _, top = similarity.topk_identities(probes, emb, labels, 40, probe_labels=probe_labels,
                                      gallery_block=16, probe_block=8, normalize=False)
  np.testing.assert_allclose(metrics.cmc_from_topk(top, probe_labels, 40),
                             metrics.cmc_from_ranks(ref, 40))


def test_roc_matches_sklearn_and_tar_at_far_brute_force():
  rng = np.random.default_rng(6)
  same = rng.uniform(size=2000) < 0.3
  scores = np.round(rng.normal(size=2000) + 1.5 * same, 2)  # rounded: tied thresholds
  far, tar, thr = metrics.roc(scores, same)
  ref_far, ref_tar, _ = roc_curve(same, scores, drop_intermediate=False)
  np.testing.assert_allclose(far, ref_far)
  np.testing.assert_allclose(tar, ref_tar)
  assert thr[0] == np.inf and (np.diff(thr) < 0).all()
  for target in (1e-3, 1e-2, 0.1):
    best = 0.0
    for t in np.unique(scores):
      accept = scores >= t
      if accept[~same].mean() <= target:
        best = max(best, accept[same].mean())
    assert metrics.tar_at_far(scores, same, target) == pytest.approx(best), target


def test_eer_known_cases():
  # Genuine {k..k+99}, impostor {0..99}: FAR = FRR at t = (100 + k) / 2, EER = (100 - k) / 200.
  imp = np.arange(100.0)
  for k, expected in ((50, 0.25), (51, 0.245), (80, 0.1)):
    scores = np.r_[imp + k, imp]
    same = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    assert metrics.eer(scores, same) == pytest.approx(expected), k
  sep = np.r_[np.ones(10), np.zeros(10)]
  assert metrics.eer(sep, sep > 0.5) == 0.0
  assert metrics.tar_at_far(sep, sep > 0.5, 1e-3) == 1.0


def test_psnr():
  rng = np.random.default_rng(7)
  hr = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  assert np.all(np.isinf(metrics.psnr(hr, hr)))
  clean = np.full((512, 512, 3), 128.0)
  noisy = clean + rng.normal(scale=5.0, size=clean.shape)
  # 10 log10(255^2 / 25) = 34.1514 dB; 786k samples: the MSE is within ~0.2% (0.01 dB) of 25.
  assert metrics.psnr(noisy, clean) == pytest.approx(34.1514, abs=0.03)
  assert metrics.psnr(clean + 1.0, clean) == pytest.approx(20 * np.log10(255.0))
  batch = np.stack([clean + 1.0, clean + 2.0])
  np.testing.assert_allclose(metrics.psnr(batch, np.stack([clean, clean])),
                             [48.1308, 42.1102], atol=1e-4)


def _ssim_reference(x, y):
  """Independent SSIM: scipy gaussian_filter on the full image, cropped 5 px (skimage's way)."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  vals = []
  for c in range(x.shape[-1]):
    f = lambda im: ndimage.gaussian_filter(im, sigma=1.5, truncate=3.5)  # noqa: E731
    a, b = x[..., c], y[..., c]
    mx, my = f(a), f(b)
    vx, vy, cxy = f(a * a) - mx ** 2, f(b * b) - my ** 2, f(a * b) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    vals.append(s[5:-5, 5:-5].mean())
  return np.mean(vals)


def test_ssim():
  rng = np.random.default_rng(8)
  hr = rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)
  assert metrics.ssim(hr, hr) == pytest.approx(1.0)
  # Constant images a, b: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1).
  a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2
  got = metrics.ssim(np.full((16, 16, 3), a), np.full((16, 16, 3), b))
  assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
  assert got == pytest.approx(24006.5025 / 24406.5025, rel=1e-12)  # = 0.983611
  noisy = np.clip(hr + rng.normal(scale=20, size=hr.shape), 0, 255)
  smooth = ndimage.uniform_filter(hr.astype(float), size=(3, 3, 1))
  for other in (noisy, smooth):
    assert metrics.ssim(other, hr) == pytest.approx(_ssim_reference(other, hr), abs=1e-9)
  assert 0.5 < metrics.ssim(noisy, hr) < 0.99  # uniform-noise image: high variance, high SSIM
  batch = metrics.ssim(np.stack([noisy, smooth]), np.stack([hr, hr]))
  np.testing.assert_allclose(batch, [metrics.ssim(noisy, hr), metrics.ssim(smooth, hr)])


def test_ssim_matches_skimage_when_installed():
  skm = pytest.importorskip('skimage.metrics')
  rng = np.random.default_rng(9)
  hr = rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)
  sr = np.clip(hr + rng.normal(scale=15, size=hr.shape), 0, 255).astype(np.uint8)
  ref = skm.structural_similarity(sr, hr, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=255, channel_axis=-1)
  assert metrics.ssim(sr, hr) == pytest.approx(ref, abs=1e-9)
