"""Identity folders, `<root>[/<split>]/<identity>/<image>`: VGGFace2, LFW, CASIA-WebFace, ORL.

VGGFace2 ships `train/` and `test/` (disjoint identities): pass `split`. ORL's grey PGMs decode to
three channels like every other image. Identities are sorted by name (so `label` is the index into
`source.identities`) and each identity's images in natural order (ORL's 2.pgm before 10.pgm):
the record order, hence every shuffle and split built on it, is stable across machines.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import numpy as np

from ipsr_jax.data import image_io
from ipsr_jax.data.sources import base

LAYOUT = '<root>[/<split>]/<identity>/<image>.{jpg,png,pgm,...} (one folder per identity)'
# Folders that LFW archives unpack to; `find_lfw_images` descends into the first one present.
LFW_IMAGE_DIRS = ('images_deepfunneled', 'lfw-deepfunneled', 'lfw_funneled', 'lfw')


def natural_key(name: str) -> tuple:
  return tuple(int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name))


def _list_images(folder: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    found.extend(os.path.join(dirpath, f) for f in filenames if image_io.is_image_file(f))
  return sorted(found, key=lambda p: natural_key(os.path.relpath(p, folder)))


class IdentityFolders(base.FileFaceSource):
  """One folder per identity; `label` is the identity's index among the kept identities."""

  def __init__(self, root: str | os.PathLike, *, split: str | None = None,
               min_images_per_identity: int = 1, identities: Iterable[str] | None = None,
               exclude_identities: Iterable[str] = (), max_images_per_identity: int | None = None, max_bad_fraction: float = 0.01, image_size: int | None = None,
               name: str | None = None):
    root = base.require_root(root, LAYOUT)
    folder = root if not split else os.path.join(root, split)
    if split and not os.path.isdir(folder):
      present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))[:10]
      raise FileNotFoundError(f'Split folder {folder!r} does not exist; expected {LAYOUT} '
                              f'(found {present} in {root!r})')
    self.root, self.split = root, split
    self.min_images_per_identity = int(min_images_per_identity)
    self.max_images_per_identity = max_images_per_identity
    self.name = name or os.path.basename(os.path.normpath(root)) or 'faces'

    names = sorted(d for d in os.listdir(folder)
                   if not d.startswith('.') and os.path.isdir(os.path.join(folder, d)))
    if identities is not None:
      wanted = list(dict.fromkeys(str(i) for i in identities))
      missing = sorted(set(wanted) - set(names))
      if missing:
        raise ValueError(
            f'{len(missing)} requested identities are not in {folder!r}: {missing[:10]}')
      names = sorted(wanted)
    self.excluded = frozenset(str(i) for i in exclude_identities)
    names = [n for n in names if n not in self.excluded]
    per_identity = {n: _list_images(os.path.join(folder, n)) for n in names}
    most = max_images_per_identity or float('inf')
    kept = [n for n in names if max(1, self.min_images_per_identity) <= len(per_identity[n]) <= most]
    if not kept:
      raise ValueError(
          f'No identity folder under {folder!r} holds >= {max(1, self.min_images_per_identity)} '
          f'images; expected {LAYOUT}')
    records = [base.Record(path=p, label=label, identity=n)
               for label, n in enumerate(kept) for p in per_identity[n]]
    super().__init__(records, max_bad_fraction=max_bad_fraction, image_size=image_size)

  def __repr__(self) -> str:
    # Grain compares this on restore: everything that changes the record list is in it.
    return (f'IdentityFolders(root={self.root!r}, split={self.split!r}, '
            f'identities={self.num_identities}, images={len(self)}, '
            f'min_images_per_identity={self.min_images_per_identity}, '
            f'max_images_per_identity={self.max_images_per_identity}, '
            f'excluded={len(self.excluded)}, image_size={self.image_size})')


def find_lfw_images(root: str | os.PathLike) -> str:
  """LFW's identity folders: `root` itself or its `images_deepfunneled/` (or similar) subfolder."""
  root = base.require_root(root, f'LFW as {LAYOUT}, or a folder holding one of {LFW_IMAGE_DIRS}')
  for sub in LFW_IMAGE_DIRS:
    if os.path.isdir(os.path.join(root, sub)):
      return os.path.join(root, sub)
  return root


def LFW(root: str | os.PathLike, *,  # pylint: disable=invalid-name
        min_images_per_identity: int = 1, **kwargs) -> IdentityFolders:
  """LFW (5,749 people); the paper's protocol keeps those with >= 4 images."""
  return IdentityFolders(find_lfw_images(root), min_images_per_identity=min_images_per_identity,
                         name='lfw', **kwargs)


# The dev people come from those with 2 or 3 images: enough for a gallery image and a probe, and
# outside the paper's protocol population (>= 4 images), so no reported test person is among them.
DEV_MIN_IMAGES, DEV_MAX_IMAGES = 2, 3


def lfw_dev_identities(root: str | os.PathLike, num: int, seed: int = 0) -> list[str]:
  """`num` LFW people with 2-3 images, a seeded draw (sorted names, numpy's PCG64: the same on
  every machine): the dev split, held out of training (`config.data.dev_identities`)."""
  folder = find_lfw_images(root)
  names = sorted(d for d in os.listdir(folder) if not d.startswith('.')
                 and os.path.isdir(os.path.join(folder, d)))
  eligible = [n for n in names
              if DEV_MIN_IMAGES <= len(_list_images(os.path.join(folder, n))) <= DEV_MAX_IMAGES]
  if num > len(eligible):
    raise ValueError(f'data.dev_identities={num}: only {len(eligible)} LFW people under {folder!r} '
                     f'have {DEV_MIN_IMAGES}-{DEV_MAX_IMAGES} images')
  picked = np.random.default_rng(seed).permutation(len(eligible))[:num]
  return sorted(eligible[i] for i in picked)


def ORL(root: str | os.PathLike, **kwargs) -> IdentityFolders:  # pylint: disable=invalid-name
  """ORL / AT&T: s1..s40, ten 92x112 grey PGMs each (decoded to RGB)."""
  return IdentityFolders(root, name='orl', **kwargs)

