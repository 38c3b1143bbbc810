"""Face sources and `make_source`, which builds the one named by `config.data.source`."""

from __future__ import annotations

import os
from typing import Callable

import ml_collections

from ipsr_jax.data.sources.base import BadImageError, FaceSource, FileFaceSource, Record

__all__ = ['BadImageError', 'FaceSource', 'FileFaceSource', 'Record', 'SOURCES', 'make_source']


def _data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return config.data if 'data' in config else config


def _identity_folder(data, split: str) -> FaceSource:
  from ipsr_jax.data.sources import folders  # pylint: disable=g-import-not-at-top
  root = data.root
  # VGGFace2 keeps train/ and test/ under its root; single-split datasets (CASIA) are the root.
  if root and os.path.isdir(os.path.join(root, split)):
    return folders.IdentityFolders(root, split=split, max_bad_fraction=data.max_bad_fraction)
  if split != 'train':
    raise FileNotFoundError(f'Split folder {os.path.join(root, split)!r} does not exist; expected '
                            f'{folders.LAYOUT}')
  return folders.IdentityFolders(root, max_bad_fraction=data.max_bad_fraction)


def _lfw(data, split: str) -> FaceSource:
  """train: the people outside the paper's protocol population (fewer than 4 images) less the dev
  people; dev: the `data.dev_identities` people (2-3 images each); test (any other split): all of
  LFW, from which the protocol keeps the people with >= 4 images."""
  from ipsr_jax.data.sources import folders  # pylint: disable=g-import-not-at-top
  num_dev = int(data.get('dev_identities', 0))
  dev = folders.lfw_dev_identities(data.root, num_dev, data.get('dev_seed', 0)) if num_dev else []
  if split == 'train':
    return folders.LFW(data.root, max_images_per_identity=3, exclude_identities=dev,
                       max_bad_fraction=data.max_bad_fraction)
  if split == 'dev':
    if not dev:
      raise ValueError("split 'dev' of LFW needs config.data.dev_identities > 0 (e.g. 300)")
    return folders.LFW(data.root, identities=dev, max_bad_fraction=data.max_bad_fraction)
  return folders.LFW(data.root, max_bad_fraction=data.max_bad_fraction)


def _orl(data, split: str) -> FaceSource:
  del split
  from ipsr_jax.data.sources import folders  # pylint: disable=g-import-not-at-top
  return folders.ORL(data.root, max_bad_fraction=data.max_bad_fraction)


def _ar(data, split: str) -> FaceSource:
  del split
  from ipsr_jax.data.sources import ar  # pylint: disable=g-import-not-at-top
  return ar.ARFaces(data.root, max_bad_fraction=data.max_bad_fraction)


def _scface(data, split: str) -> FaceSource:
  del split
  from ipsr_jax.data.sources import scface  # pylint: disable=g-import-not-at-top
  return scface.SCface(data.root, max_bad_fraction=data.max_bad_fraction)


def _tfds(data, split: str) -> FaceSource:
  if not data.tfds_name:
    raise ValueError("config.data.tfds_name is empty; e.g. 'ipsr_identity_folder/vggface2'")
  from ipsr_jax.data.sources import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.TfdsSource(data.tfds_name, data.tfds_data_dir or None, split,
                                  max_bad_fraction=data.max_bad_fraction)


# Held-out synthetic people start here: no training split (< 1e6 identities) reaches them.
SYNTHETIC_HELD_OUT_OFFSET = 1_000_000


def _synthetic(data, split: str) -> FaceSource:
  from ipsr_jax.data.synthetic import SyntheticFaces  # pylint: disable=g-import-not-at-top
  if data.synthetic_identities >= SYNTHETIC_HELD_OUT_OFFSET:
    raise ValueError(f'config.data.synthetic_identities={data.synthetic_identities} must be below '
                     f'{SYNTHETIC_HELD_OUT_OFFSET} (the held-out identities start there)')
  offset = 0 if split == 'train' else SYNTHETIC_HELD_OUT_OFFSET
  return SyntheticFaces(data.synthetic_identities, data.synthetic_images_per_identity,
                        identity_offset=offset, image_size=data.image_size)


SOURCES: dict[str, Callable[..., FaceSource]] = {
    'identity_folder': _identity_folder,
    'lfw': _lfw,
    'orl': _orl,
    'ar': _ar,
    'scface': _scface,
    'tfds': _tfds,
    'synthetic': _synthetic,
}


def make_source(data_config: ml_collections.ConfigDict, split: str | None = None) -> FaceSource:
  """The FaceSource that `config.data` names (pass the config or its `data` part).

  `split` defaults to data.split. Sources with one split on disk (ORL, AR, SCface) ignore it; LFW
  has train / dev / test people (`_lfw`). Evaluation protocols pick galleries and probes from the
  records.
  """
  data = _data(data_config)
  split = split or data.get('split', 'train') or 'train'
  try:
    build = SOURCES[data.source]
  except KeyError:
    raise ValueError(
        f'Unknown config.data.source {data.source!r}; known: {sorted(SOURCES)}') from None
  return build(data, split)
