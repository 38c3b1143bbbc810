"""Recognition and image-quality metrics: CMC / rank-1, verification ROC, PSNR, SSIM.

Identification follows the paper (Section 4): a probe is matched against gallery IDENTITIES by
cosine similarity; an identity with several gallery images scores by its best image. Ties are
broken pessimistically: the true identity ranks after every other identity with an equal score,
so quantised or saturated similarities can never inflate a result. A probe whose identity is
absent from the gallery is a protocol bug here (closed-set identification), so it raises.

Everything in this file is host numpy: inputs are small ([P, G] similarity for a few thousand
faces, or ranks already computed blockwise by `similarity.rank_of_true_identity`).
"""

from __future__ import annotations

import numpy as np


def identity_ranks(similarity: np.ndarray, probe_labels: np.ndarray,
                   gallery_labels: np.ndarray) -> np.ndarray:
  """0-based rank of each probe's true identity among the gallery identities, int64 [P].

  rank = number of OTHER gallery identities whose best score >= the true identity's best score
  (pessimistic ties). Raises ValueError when a probe's identity has no gallery image.
  """
  similarity = np.asarray(similarity, np.float64)
  probe_labels = np.asarray(probe_labels)
  gallery_labels = np.asarray(gallery_labels)
  if similarity.shape != (len(probe_labels), len(gallery_labels)):
    raise ValueError(f'similarity {similarity.shape} does not match {len(probe_labels)} probes x '
                     f'{len(gallery_labels)} gallery images')
  identities, column = np.unique(gallery_labels, return_inverse=True)
  # Per-identity best score: sort columns by identity, then one max per contiguous run.
  order = np.argsort(column, kind='stable')
  starts = np.flatnonzero(np.r_[True, np.diff(column[order]) != 0])
  best = np.maximum.reduceat(similarity[:, order], starts, axis=1)  # [P, num_identities]
  true_col = np.searchsorted(identities, probe_labels)
  true_col = np.minimum(true_col, len(identities) - 1)
  present = identities[true_col] == probe_labels
  if not present.all():
    missing = np.unique(probe_labels[~present])
    raise ValueError(f'{(~present).sum()} probes have no gallery image of their identity '
                     f'(labels {missing[:10].tolist()}...): closed-set identification needs one')
  true_score = best[np.arange(len(probe_labels)), true_col]
  return (best >= true_score[:, None]).sum(axis=1) - 1


def cmc_from_ranks(ranks: np.ndarray, max_rank: int) -> np.ndarray:
  """CMC curve float64 [max_rank] from 0-based ranks: cmc[k-1] = fraction with rank < k."""
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f'need a non-empty 1-D array of ranks, got shape {ranks.shape}')
  if (ranks < 0).any():
    raise ValueError('negative rank: a probe identity is absent from the gallery')
  if max_rank < 1:
    raise ValueError(f'max_rank must be >= 1, got {max_rank}')
  counts = np.bincount(np.minimum(ranks, max_rank), minlength=max_rank + 1)[:max_rank]
  return np.cumsum(counts) / len(ranks)


def cmc(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
        max_rank: int | None = None) -> np.ndarray:
  """Cumulative match characteristic float64 [max_rank] from a [P, G] similarity matrix.

  cmc[k-1] is the fraction of probes whose true identity is among the k most similar gallery
  identities (k = 1..max_rank; rank-1 = cmc[0]). max_rank defaults to the number of gallery
  identities. Pessimistic ties; absent probe identities raise (see module docstring).
  """
  ranks = identity_ranks(similarity, probe_labels, gallery_labels)
  if max_rank is None:
    max_rank = len(np.unique(gallery_labels))
  return cmc_from_ranks(ranks, max_rank)


def cmc_from_topk(topk_labels: np.ndarray, probe_labels: np.ndarray,
                  max_rank: int | None = None) -> np.ndarray:
  """CMC from per-probe top-K identity lists [P, K] computed elsewhere (e.g. in blocks).

  Each row must list distinct identities best first with ties ordered pessimistically (the
  true identity after equal-scoring others), as `similarity.topk_identities(..., probe_labels=)`
  returns. A true identity missing from its row ranks >= K: a miss for every k <= K.
  """
  topk_labels = np.asarray(topk_labels)
  probe_labels = np.asarray(probe_labels)
  k = topk_labels.shape[1]
  max_rank = k if max_rank is None else max_rank
  if max_rank > k:
    raise ValueError(f'max_rank {max_rank} exceeds the {k} identities listed per probe')
  hit = topk_labels == probe_labels[:, None]
  ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
  return cmc_from_ranks(ranks, max_rank)


# ----------------------------------------------------------------------------- verification


def roc(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC over every distinct threshold: (far, tar, thresholds), thresholds descending.

  A pair is accepted when score >= threshold. The first point is (0, 0) at threshold +inf, the
  last (1, 1) at the lowest score, like sklearn's `roc_curve(drop_intermediate=False)`.
  """
  scores = np.asarray(scores, np.float64).ravel()
  same = np.asarray(same, bool).ravel()
  if scores.shape != same.shape:
    raise ValueError(f'scores {scores.shape} and same {same.shape} differ')
  n_pos, n_neg = int(same.sum()), int((~same).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError('ROC needs both genuine (same) and impostor pairs')
  order = np.argsort(-scores, kind='stable')
  s, y = scores[order], same[order]
  last_of_run = np.r_[np.diff(s) != 0, True]  # all pairs tied at a threshold enter together
  tp = np.cumsum(y)[last_of_run]
  fp = np.cumsum(~y)[last_of_run]
  far = np.r_[0.0, fp / n_neg]
  tar = np.r_[0.0, tp / n_pos]
  thresholds = np.r_[np.inf, s[last_of_run]]
  return far, tar, thresholds


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
  """Highest true-accept rate over thresholds whose false-accept rate is <= far."""
  fars, tars, _ = roc(scores, same)
  return float(tars[fars <= far].max())


def eer(scores: np.ndarray, same: np.ndarray) -> float:
  """Equal error rate: where FAR = FRR (1 - TAR), linearly interpolated between ROC points."""
  fars, tars, _ = roc(scores, same)
  frr = 1.0 - tars
  diff = frr - fars  # decreasing from 1 to -1 along the curve
  i = int(np.flatnonzero(diff <= 0)[0])
  if diff[i] == 0 or i == 0:
    return float(fars[i])
  # Segment between points i-1 (diff > 0) and i (diff <= 0).
  t = diff[i - 1] / (diff[i - 1] - diff[i])
  return float(fars[i - 1] + t * (fars[i] - fars[i - 1]))


# ----------------------------------------------------------------------------- image quality


def psnr(sr: np.ndarray, hr: np.ndarray, data_range: float = 255.0) -> np.ndarray:
  """Peak signal-to-noise ratio in dB per image ([..., H, W, C] -> [...]); inf when equal."""
  sr = np.asarray(sr, np.float64)
  hr = np.asarray(hr, np.float64)
  if sr.shape != hr.shape:
    raise ValueError(f'sr {sr.shape} and hr {hr.shape} differ')
  mse = ((sr - hr) ** 2).mean(axis=(-3, -2, -1))
  with np.errstate(divide='ignore'):
    return 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
  return g / g.sum()


def _correlate_valid(x: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
  """'valid' correlation of x with the 1-D window g along `axis`: one multiply-add per tap
  (11 passes over the array beat a dense banded matmul, which multiplies mostly zeros, ~10x)."""
  k = len(g)
  m = x.shape[axis] - k + 1
  index = lambda j: (slice(None),) * (axis % x.ndim) + (slice(j, j + m),)
  out = g[0] * x[index(0)]
  for j in range(1, k):
    out += g[j] * x[index(j)]
  return out


_SSIM_BLOCK = 4


def ssim(sr: np.ndarray, hr: np.ndarray, data_range: float = 255.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
  """Structural similarity (Wang et al. 2004) per image ([..., H, W, C] -> [...]).

  Gaussian 11x11 window (sigma 1.5), population (co)variances, K1 = .01, K2 = .03; the SSIM
  map over the window positions fully inside the image, averaged over positions and channels.
  That is skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)`.
  """
  x = np.asarray(sr, np.float64)
  y = np.asarray(hr, np.float64)
  if x.shape != y.shape:
    raise ValueError(f'sr {x.shape} and hr {y.shape} differ')
  if x.ndim < 3:
    raise ValueError(f'expected [..., H, W, C] images, got shape {x.shape}')
  if min(x.shape[-3:-1]) < win_size:
    raise ValueError(f'images {x.shape[-3:-1]} are smaller than the {win_size}x{win_size} window')
  g = _gaussian_window(win_size, sigma)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  lead = x.shape[:-3]
  x, y = x.reshape((-1,) + x.shape[-3:]), y.reshape((-1,) + y.shape[-3:])
  out = np.empty(len(x))
  for i in range(0, len(x), _SSIM_BLOCK):  # a few images at a time stay in the CPU caches
    a, b = x[i:i + _SSIM_BLOCK], y[i:i + _SSIM_BLOCK]
    mu_x, mu_y, xx, yy, xy = (_correlate_valid(_correlate_valid(m, g, -2), g, -3)
                              for m in (a, b, a * a, b * b, a * b))
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) *
                                                           (var_x + var_y + c2))
    out[i:i + _SSIM_BLOCK] = ssim_map.mean(axis=(-3, -2, -1))
  return out.reshape(lead) if lead else out[0]
