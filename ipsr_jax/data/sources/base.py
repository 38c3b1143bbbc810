"""The contract every face source keeps: random access to (image, identity label, metadata).

A source is a Grain `RandomAccessDataSource`: `len()`, `source[i]` and a deterministic `repr`
(Grain's checkpoint compares it on restore). Evaluation protocols read `source.records` to split
galleries from probes without decoding any image.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np


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
  image cannot be decoded; that image is logged with its path and counted in `self.bad`, and the
  pipeline filters the None out (never a crash, never a silent hole).
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

  def note_bad(self, record: Record, error: Exception) -> None:
    self.bad.append(record.path)
    logging.warning('Skipping unreadable image %s: %s', record.path, error)
    if len(self.bad) > max(1, self.max_bad_fraction * len(self.records)):
      raise BadImageError(
          f'{self!r}: {len(self.bad)} of {len(self.records)} images are unreadable, more than '
          f'data.max_bad_fraction={self.max_bad_fraction}; first: {self.bad[:5]}')

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    record = self.records[int(index)]
    try:
      image = self.load_image(record)
    except Exception as e:  # pylint: disable=broad-except
      self.note_bad(record, e)
      return None
    return {'image': image, 'label': np.int32(record.label), 'index': np.int64(index)}

  def __repr__(self) -> str:
    return f'{type(self).__name__}(name={self.name!r}, size={len(self)})'
