"""The contract every face source keeps: random access to (image, identity label, metadata).

A source is a Grain `RandomAccessDataSource`: `len()`, `source[i]` and a deterministic `repr`
(Grain's checkpoint compares it on restore). Evaluation protocols read `source.records` to split
galleries from probes without decoding any image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ipsr_jax.data import image_io


@dataclasses.dataclass(frozen=True)
class Record:
  """One face image of a source, known without decoding it."""
  path: str                      # file path, '' for generated or array-record sources
  label: int                     # dense identity index within the source, 0..num_identities-1
  identity: str                  # identity name as on disk (folder name, AR 'm-001', SCface '001')
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # AR session, SCface camera...


class BadImageError(RuntimeError):
  """Raised when a source has more unreadable images than the configured fraction allows."""


class FaceSource:
  """Base class: subclasses fill `self.records` and implement `load_image(record)`.

  `source[i]` returns {'image': uint8 [H, W, 3], 'label': int32, 'index': int64} or None when the
  image cannot be decoded; that image is logged with its path and counted (once, however many
  epochs meet it) in `self.bad`, and the pipeline filters the None out (never a crash, never a
  silent hole). `verify()` decodes everything up front. `FileFaceSource` decodes `record.path`.
  """

  name: str = 'faces'

  def __init__(self, records: Sequence[Record], max_bad_fraction: float = 0.01):
    self.records = list(records)
    self.max_bad_fraction = max_bad_fraction
    self.bad: list[str] = []
    identities = sorted({r.identity for r in self.records})
    self.identities = identities

  @property
  def num_identities(self) -> int:
    return len(self.identities)

  def __len__(self) -> int:
    return len(self.records)

  def load_image(self, record: Record) -> np.ndarray:
    raise NotImplementedError

  def image_key(self, record: Record) -> str:
    """A string naming what `load_image(record)` returns, unique within the source: the key of
    cached evaluation results (`protocols.EmbeddingCache`). Default: the record's path."""
    if not record.path:
      raise ValueError(f'{self!r}: a record without a path needs the source to define image_key')
    return record.path

  def _too_many_bad(self, count: int) -> bool:
    return count > max(1, self.max_bad_fraction * len(self))

  def _bad_error(self, bad: Sequence[str]) -> BadImageError:
    return BadImageError(
        f'{self!r}: {len(bad)} of {len(self)} images are unreadable, more than '
        f'data.max_bad_fraction={self.max_bad_fraction}; first: {list(bad[:5])}')

  def note_bad(self, record: Record, error: Exception, key: str | None = None) -> None:
    """Counts an unreadable image once (`key`, default its path), however many epochs meet it."""
    key = key or record.path
    if key in self.bad:
      return
    self.bad.append(key)
    logging.warning('Skipping unreadable image %s: %s', key, error)
    if self._too_many_bad(len(self.bad)):
      raise self._bad_error(self.bad)

  def verify(self, num_threads: int = 8) -> list[str]:
    """Decodes every image once; returns the unreadable ones (paths, or '#<index>' without one).

    Raises BadImageError when they exceed `max_bad_fraction` (the same rule `source[i]` applies),
    so a broken dataset fails before training rather than at step 100k. Decoding releases the GIL
    in PIL, so threads help.
    """
    def check(index: int) -> str | None:
      record = self.records[index]
      try:
        self.load_image(record)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Unreadable image %s: %s', record.path or index, e)
        return record.path or f'#{index}'
      return None

    indices = range(len(self.records))
    if num_threads > 1:
      with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        results = list(pool.map(check, indices))
    else:
      results = [check(i) for i in indices]
    bad = [r for r in results if r is not None]
    self.bad = list(bad)
    if self._too_many_bad(len(bad)):
      raise self._bad_error(bad)
    return bad

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    record = self.records[int(index)]
    try:
      image = self.load_image(record)
    except Exception as e:  # pylint: disable=broad-except
      self.note_bad(record, e, key=record.path or f'#{index}')
      return None
    return {'image': image, 'label': np.int32(record.label), 'index': np.int64(index)}

  def __repr__(self) -> str:
    return f'{type(self).__name__}(name={self.name!r}, size={len(self)})'


def require_root(root: str | os.PathLike, layout: str) -> str:
  """`root` as a str, or a FileNotFoundError that names the path and the layout expected there."""
  root = os.fspath(root)
  if not root:
    raise FileNotFoundError(f'No data root given (config.data.root is empty); expected {layout}')
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'Data root {root!r} does not exist or is not a directory; expected {layout}')
  return root


def find_named_shots(root: str, parse_name, shot_key) -> tuple[dict, int, int]:
  """Image files under `root` whose names `parse_name` reads as (identity, meta), one per shot.

  Walks sorted, hidden folders skipped; a file parse_name refuses is ignored, and a second file of
  the same `shot_key(identity, meta)` (e.g. a copy in another folder) is a duplicate: the first
  is kept. Returns ({key: (path, identity, meta)}, ignored, duplicates).
  """
  found: dict[Any, tuple[str, str, dict]] = {}
  ignored = duplicates = 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for f in sorted(filenames):
      parsed = parse_name(f) if image_io.is_image_file(f) else None
      if parsed is None:
        ignored += 1
        continue
      identity, meta = parsed
      key = shot_key(identity, meta)
      if key in found:
        duplicates += 1
        continue
      found[key] = (os.path.join(dirpath, f), identity, meta)
  return found, ignored, duplicates


class FileFaceSource(FaceSource):
  """A source whose records are image files: decodes with `image_io.decode_image` (PIL, RGB).

  `image_size` (int, square) resizes every decoded image with PIL-exact bicubic.
  """

  def __init__(self, records: Sequence[Record], max_bad_fraction: float = 0.01,
               image_size: int | None = None):
    super().__init__(records, max_bad_fraction=max_bad_fraction)
    self.image_size = None if image_size is None else int(image_size)

  def load_image(self, record: Record) -> np.ndarray:
    return image_io.decode_image(record.path, self.image_size)

  def image_key(self, record: Record) -> str:
    key = super().image_key(record)
    return key if self.image_size is None else f'{key}@{self.image_size}'  # resized on load
