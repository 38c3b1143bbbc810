"""SCface: frontal mugshots `<id>_frontal.<ext>` and surveillance shots `<id>_cam<c>_<d>.<ext>`.

Files are searched recursively: the distribution spreads them over `mugshot_frontal_cropped_all/`,
`surveillance_cameras_distance_<d>/cam<c>/` and also copies them into `surveillance_cameras_all/`,
so a shot found twice is kept once. Distances d: 1 = 4.2 m (far), 2 = 2.6 m, 3 = 1.0 m (close).
Other files (rotation mugshots such as 001_L1.jpg) are ignored.
"""

from __future__ import annotations

import logging
import os
import re

from ipsr_jax.data.sources import base

LAYOUT = ('<root>/**/<id>_frontal.<ext> (mugshots) and <root>/**/<id>_cam<c>_<d>.<ext> '
          '(surveillance, d in 1..3)')
DISTANCE_METRES = {1: 4.2, 2: 2.6, 3: 1.0}
_MUGSHOT = re.compile(r'^(\d+)_frontal$', re.IGNORECASE)
_SURVEILLANCE = re.compile(r'^(\d+)_cam(\d+)_([123])$', re.IGNORECASE)


def parse_name(filename: str) -> tuple[str, dict] | None:
  """'001_cam2_3.jpg' -> ('001', {'kind': 'surveillance', 'camera': 2, 'distance': 3, ...}).

  None for names that are neither a mugshot nor a surveillance shot.
  """
  stem = os.path.splitext(os.path.basename(filename))[0]
  match = _MUGSHOT.match(stem)
  if match:
    return match.group(1), {'kind': 'mugshot'}
  match = _SURVEILLANCE.match(stem)
  if match:
    distance = int(match.group(3))
    return match.group(1), {'kind': 'surveillance', 'camera': int(match.group(2)),
                            'distance': distance, 'metres': DISTANCE_METRES[distance]}
  return None


def _shot_key(identity: str, meta: dict) -> tuple:
  if meta['kind'] == 'mugshot':
    return identity, 0, 0
  return identity, meta['camera'], meta['distance']


class SCface(base.FileFaceSource):
  """SCface mugshots and surveillance images with meta {'kind', 'camera', 'distance', 'metres'}."""

  name = 'scface'

  def __init__(self, root: str | os.PathLike, *, max_bad_fraction: float = 0.01,
               image_size: int | None = None):
    self.root = base.require_root(root, LAYOUT)
    found, ignored, duplicates = base.find_named_shots(self.root, parse_name, _shot_key)
    if ignored or duplicates:
      logging.info('SCface(%s): ignored %d other files and %d duplicate copies',
                   self.root, ignored, duplicates)
    if not found:
      raise ValueError(f'No SCface images under {self.root!r}; expected {LAYOUT}')
    identities = sorted({identity for _, identity, _ in found.values()})
    label_of = {n: i for i, n in enumerate(identities)}
    records = [base.Record(path=path, label=label_of[identity], identity=identity, meta=meta)
               for _, (path, identity, meta) in sorted(found.items())]
    super().__init__(records, max_bad_fraction=max_bad_fraction, image_size=image_size)

  def __repr__(self) -> str:
    return (f'SCface(root={self.root!r}, identities={self.num_identities}, images={len(self)}, '
            f'image_size={self.image_size})')
