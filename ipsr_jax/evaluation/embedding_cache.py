"""Per-chunk evaluation results on disk, so a killed evaluation resumes and a rerun reuses them.

`EmbeddingCache` is the on-disk format: one .npz per chunk of images, condition, method and
scorer. `RecordCache` addresses it by record indices, the way `protocols.run_protocol`'s steps
name their chunks. The layout and the keys are a compatibility promise: change either and every
existing cache is silently recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from ipsr_jax.data.sources.base import Record

# The version of the PSNR/SSIM entries: bump it when metrics.psnr or metrics.ssim change.
QUALITY_TAG = 'psnr-ssim-v1'


class EmbeddingCache:
  """Per-chunk results on disk: `<root>/<scorer>/<condition>/<method>/<images>.npz`.

  Each key part is a fingerprint of what decides the values: the scorer's weights and input size,
  the generator's weights (for SR methods; bicubic and HR need none), the image list (each
  image's `FaceSource.image_key`), and `extra` (the protocol and the HR sizes). `tags` maps a
  scorer ('emb', 'judge') or an SR method name to its fingerprint; a scorer or method without one
  is never cached. Files are written whole (rename), so a killed run leaves none half-written.
  """

  def __init__(self, root: str | os.PathLike, tags: Mapping[str, str]):
    self.root = os.fspath(root)
    self.tags = dict(tags)
    self.hits = self.misses = 0

  def path(self, scorer: str, cond: str, method: str, names: Sequence[str], extra: str = '') -> str | None:
    if scorer not in self.tags:
      return None
    if method not in ('hr', 'native', 'bicubic'):
      if method not in self.tags:
        return None
      method = f'{method}-{self.tags[method]}'
    digest = hashlib.sha256('\n'.join([extra, *names]).encode()).hexdigest()[:20]
    return os.path.join(self.root, f'{scorer}-{self.tags[scorer]}', cond.replace('*', 'any'), method,
                        f'{digest}.npz')

  def load(self, path: str | None) -> dict[str, np.ndarray] | None:
    if path is None or not os.path.exists(path):
      self.misses += path is not None
      return None
    try:
      with np.load(path) as f:
        out = {k: f[k] for k in f.files}
    except Exception as e:  # pylint: disable=broad-except  (a damaged file is recomputed)
      logging.warning('embedding cache: ignoring unreadable %s (%s)', path, e)
      self.misses += 1
      return None
    self.hits += 1
    return out

  @staticmethod
  def save(path: str | None, **arrays: np.ndarray) -> None:
    if path is None:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f'{path}.partial.npz'
    np.savez(partial, **arrays)
    os.replace(partial, path)


class RecordCache:
  """An `EmbeddingCache` addressed by indices into a run's `records`, or none at all.

  Without a cache directory every `path` is None, so `load` misses and `save` does nothing: the
  steps need not ask whether there is a cache.

  `probe_tag` names how synthetic LR probes were made when not by bicubic down-sampling (the
  camera model and its settings); it keys every entry made from such probes (`path(...,
  degraded=True)`), so bicubic-probe results are never read back for camera probes. '' (bicubic)
  leaves the keys as they always were.
  """

  def __init__(self, cache: EmbeddingCache | None, keys: Sequence[str] = (), extra: str = '',
               probe_tag: str = ''):
    self.cache, self.keys, self.extra, self.probe_tag = cache, list(keys), extra, probe_tag

  @classmethod
  def open(cls, cache_dir: str | os.PathLike | None, tags: Mapping[str, str], records: Sequence[Record],
           image_key: Callable[[Record], str] | None, extra: str, probe_tag: str = '') -> RecordCache:
    """The cache under `cache_dir` (None: no cache); `extra` keys what changes every image's value,
    `probe_tag` what changes the degraded probes' (see the class)."""
    if cache_dir is None:
      return cls(None)
    cache = EmbeddingCache(cache_dir, {'quality': QUALITY_TAG, **dict(tags)})
    keys = [(image_key or (lambda r: r.path))(r) for r in records]
    if not all(keys) or len(set(keys)) != len(keys):  # two images under one key would share results
      raise ValueError('cache_dir needs a distinct non-empty key per record (paths, or image_key)')
    return cls(cache, keys, extra, probe_tag)

  @property
  def hits(self) -> int:
    return self.cache.hits if self.cache is not None else 0

  def path(self, scorer: str, cond: str, method: str, idx: Sequence[int], degraded: bool = False) -> str | None:
    """The file of records `idx`; `degraded`: made from synthetic LR probes (keyed on `probe_tag`)."""
    if self.cache is None:
      return None
    extra = f'{self.extra}|probes={self.probe_tag}' if degraded and self.probe_tag else self.extra
    return self.cache.path(scorer, cond, method, [self.keys[i] for i in idx], extra)

  def load(self, path: str | None) -> dict[str, np.ndarray] | None:
    return self.cache.load(path) if self.cache is not None else None

  @staticmethod
  def save(path: str | None, **arrays: np.ndarray) -> None:
    EmbeddingCache.save(path, **arrays)

  def log_summary(self, name: str) -> None:
    if self.cache is not None:
      logging.info('%s: %d cached chunks reused, %d computed (%s)', name, self.cache.hits, self.cache.misses,
                   self.cache.root)
