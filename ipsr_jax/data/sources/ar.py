"""The AR face database: `<root>/{m,w}-XXX-YY.<ext>` (subfolders allowed, any case: M-001-01.bmp).

XXX is the person (per sex), YY the shot: 1-13 were taken in session 1, 14-26 two weeks later in
session 2. The paper's protocol uses 100 subjects (50 men, 50 women), gallery from session 2 and
probes from session 1; `paper_subjects` picks them.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterable, Sequence

from ipsr_jax.data.sources import base

LAYOUT = '<root>/{m,w}-XXX-YY.<ext> (e.g. m-001-01.bmp; YY 1-13 session 1, 14-26 session 2)'
_NAME = re.compile(r'^([mw])-(\d{3})-(\d{1,2})$', re.IGNORECASE)
SESSION_1_LAST_SHOT = 13


def parse_name(filename: str) -> tuple[str, dict] | None:
  """'m-001-14.bmp' -> ('m-001', {'sex': 'm', 'session': 2, 'shot': 14}); None if not AR-named."""
  match = _NAME.match(os.path.splitext(os.path.basename(filename))[0])
  if not match:
    return None
  sex, person, shot = match.group(1).lower(), match.group(2), int(match.group(3))
  session = 1 if shot <= SESSION_1_LAST_SHOT else 2
  return f'{sex}-{person}', {'sex': sex, 'session': session, 'shot': shot}


class ARFaces(base.FileFaceSource):
  """AR images with meta {'sex', 'session', 'shot'}; `subjects` keeps only those identities."""

  name = 'ar'

  def __init__(self, root: str | os.PathLike, *, subjects: Iterable[str] | None = None,
               max_bad_fraction: float = 0.01, image_size: int | None = None):
    self.root = base.require_root(root, LAYOUT)
    shots, ignored, duplicates = base.find_named_shots(
        self.root, parse_name, lambda identity, meta: (identity, meta['shot']))
    found = {key: (path, meta) for key, (path, _, meta) in shots.items()}
    if ignored or duplicates:
      logging.info('ARFaces(%s): ignored %d non-AR files and %d duplicate shots',
                   self.root, ignored, duplicates)
    self.subjects = None if subjects is None else tuple(sorted(set(subjects)))
    if self.subjects is not None:
      present = {identity for identity, _ in found}
      missing = sorted(set(self.subjects) - present)
      if missing:
        raise ValueError(
            f'{len(missing)} requested AR subjects are not in {self.root!r}: {missing[:10]}')
      found = {k: v for k, v in found.items() if k[0] in self.subjects}
    if not found:
      raise ValueError(f'No AR images under {self.root!r}; expected {LAYOUT}')
    identities = sorted({identity for identity, _ in found})
    label_of = {n: i for i, n in enumerate(identities)}
    records = [base.Record(path=path, label=label_of[identity], identity=identity, meta=meta)
               for (identity, _), (path, meta) in sorted(found.items())]
    super().__init__(records, max_bad_fraction=max_bad_fraction, image_size=image_size)

  def __repr__(self) -> str:
    subjects = None if self.subjects is None else len(self.subjects)
    return (f'ARFaces(root={self.root!r}, subjects={subjects}, identities={self.num_identities}, '
            f'images={len(self)}, image_size={self.image_size})')


def paper_subjects(records: Sequence[base.Record], per_sex: int = 50) -> tuple[str, ...]:
  """The first `per_sex` men and `per_sex` women (sorted ids) with images in both sessions."""
  sessions: dict[str, set[int]] = {}
  for r in records:
    sessions.setdefault(r.identity, set()).add(int(r.meta['session']))
  both = sorted(n for n, s in sessions.items() if s >= {1, 2})
  chosen = []
  for sex in ('m', 'w'):
    of_sex = [n for n in both if n.startswith(sex + '-')]
    if len(of_sex) < per_sex:
      raise ValueError(f'AR has only {len(of_sex)} {sex!r} subjects with both sessions, '
                       f'need {per_sex}')
    chosen.extend(of_sex[:per_sex])
  return tuple(chosen)
