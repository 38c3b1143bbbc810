"""TFDS builders that pack the face datasets into ArrayRecord, and a FaceSource that reads them.

    prepare('vggface2', manual_dir='/data/vggface2_aligned', data_dir='/data/tfds')  # train/, test/
    source = TfdsSource('ipsr_identity_folder/vggface2', '/data/tfds', 'train')

One builder, one config per dataset: each config names the on-disk layout its manual_dir holds
(identity folders, AR or SCface naming) and reuses the matching FaceSource to list and decode it,
so a TFDS build holds exactly the pixels the folder source yields. ArrayRecord gives random
access (Grain-friendly) and needs TensorFlow neither to write images (they are passed as encoded
bytes) nor to read them (TfdsSource decodes with PIL).

Each split's `label` is dense within the split (VGGFace2 train and test hold disjoint people);
the split's identity names, in label order, and the images skipped as unreadable are kept in the
dataset's metadata.json.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import io
import logging
import os
from typing import Any, Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ipsr_jax.data import image_io
from ipsr_jax.data.sources import ar as ar_lib
from ipsr_jax.data.sources import base
from ipsr_jax.data.sources import folders
from ipsr_jax.data.sources import scface as scface_lib

# Integer metadata columns; -1 where a dataset has no such notion.
META_INT_FIELDS = ('sex', 'session', 'shot', 'kind', 'camera', 'distance')
_SEX = {'m': 0, 'w': 1}
_KIND = {'mugshot': 1, 'surveillance': 2}


def meta_to_ints(meta: dict[str, Any]) -> dict[str, int]:
  out = {k: -1 for k in META_INT_FIELDS}
  if 'sex' in meta:
    out['sex'] = _SEX[meta['sex']]
  if 'kind' in meta:
    out['kind'] = _KIND[meta['kind']]
  for k in ('session', 'shot', 'camera', 'distance'):
    if k in meta:
      out[k] = int(meta[k])
  return out


def ints_to_meta(ints: dict[str, Any]) -> dict[str, Any]:
  """Inverse of meta_to_ints: the Record.meta the folder sources produce."""
  ints = {k: int(v) for k, v in ints.items() if k in META_INT_FIELDS and int(v) >= 0}
  meta: dict[str, Any] = {}
  if 'sex' in ints:
    meta['sex'] = {v: k for k, v in _SEX.items()}[ints['sex']]
  if 'kind' in ints:
    meta['kind'] = {v: k for k, v in _KIND.items()}[ints['kind']]
  for k in ('session', 'shot', 'camera', 'distance'):
    if k in ints:
      meta[k] = ints[k]
  if 'distance' in meta:
    meta['metres'] = scface_lib.DISTANCE_METRES[meta['distance']]
  return meta


@dataclasses.dataclass(eq=False)
class IpsrIdentityFolderConfig(tfds.core.BuilderConfig):
  """layout: 'identity_folder' | 'lfw' | 'ar' | 'scface'; split_dirs: (split, subfolder) pairs."""
  layout: str = 'identity_folder'
  split_dirs: tuple[tuple[str, str], ...] = (('train', ''),)
  image_size: int | None = None     # None keeps images as stored (the aligned 128x128 faces)
  max_bad_fraction: float = 0.01


class IpsrIdentityFolder(tfds.core.GeneratorBasedBuilder):
  """Face identity datasets from a manual_dir, as ArrayRecord."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      IpsrIdentityFolderConfig(name='vggface2',
                               description='VGGFace2 aligned faces: train/ and test/.',
                               split_dirs=(('train', 'train'), ('test', 'test'))),
      IpsrIdentityFolderConfig(name='casia_webface', description='CASIA-WebFace identity folders.'),
      IpsrIdentityFolderConfig(name='lfw', layout='lfw', description='LFW identity folders.'),
      IpsrIdentityFolderConfig(name='orl', description='ORL s1..s40 grey PGMs, stored as RGB.'),
      IpsrIdentityFolderConfig(name='ar', layout='ar', description='AR faces {m,w}-XXX-YY.'),
      IpsrIdentityFolderConfig(name='scface', layout='scface',
                               description='SCface mugshots and surveillance images.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the dataset, as distributed or aligned, in manual_dir:
    vggface2: <manual_dir>/{train,test}/<identity>/<image>
    casia_webface, lfw, orl: <manual_dir>/<identity>/<image>
    ar: <manual_dir>/{m,w}-XXX-YY.<ext>
    scface: <manual_dir>/**/<id>_frontal.<ext> and <id>_cam<c>_<d>.<ext>
  """

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # ArrayRecord by default: random access for Grain, no TensorFlow needed to read it.
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default probes `importlib_resources`, a backport it only installs on
    # Python < 3.9, and fails without it; this module is a plain file.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        'label': tfds.features.Scalar(dtype=np.int64),
        'identity': tfds.features.Text(),
        'file_name': tfds.features.Text(),
    }
    features.update({k: tfds.features.Scalar(dtype=np.int32) for k in META_INT_FIELDS})
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
    )

  def _source(self, folder: str) -> base.FileFaceSource:
    cfg = self.builder_config
    kwargs = dict(max_bad_fraction=cfg.max_bad_fraction, image_size=cfg.image_size)
    if cfg.layout == 'identity_folder':
      return folders.IdentityFolders(folder, name=cfg.name, **kwargs)
    if cfg.layout == 'lfw':
      return folders.LFW(folder, **kwargs)
    if cfg.layout == 'ar':
      return ar_lib.ARFaces(folder, **kwargs)
    if cfg.layout == 'scface':
      return scface_lib.SCface(folder, **kwargs)
    raise ValueError(f'unknown layout {cfg.layout!r}')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    generators = {}
    for split, sub in self.builder_config.split_dirs:
      source = self._source(os.path.join(manual_dir, sub) if sub else manual_dir)
      self.info.metadata.setdefault('identities', {})[split] = list(source.identities)
      self.info.metadata.setdefault('bad_images', {})[split] = []
      generators[split] = self._generate_examples(source, split, manual_dir)
    return generators

  def _generate_examples(self, source: base.FileFaceSource, split: str, manual_dir: str
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    for record in source.records:
      try:
        encoded = _encode(record.path, source.image_size)
      except Exception as e:  # pylint: disable=broad-except
        source.note_bad(record, e)  # logs; raises BadImageError past max_bad_fraction
        self.info.metadata['bad_images'][split].append(os.path.relpath(record.path, manual_dir))
        continue
      file_name = os.path.relpath(record.path, manual_dir)
      yield file_name, {'image': encoded, 'label': record.label, 'identity': record.identity,
                        'file_name': file_name, **meta_to_ints(dict(record.meta))}
    if source.bad:
      logging.warning('%s/%s: skipped %d unreadable images', self.info.full_name, split,
                      len(source.bad))


def prepare(config_name: str, manual_dir: str, data_dir: str, *, compute_stats: bool = False,
            **builder_kwargs) -> IpsrIdentityFolder:
  """Builds `ipsr_identity_folder/<config_name>` from `manual_dir` into `data_dir`.

  TFDS's optional statistics pass runs through TensorFlow and dominates a build's time; off by
  default.
  """
  builder = IpsrIdentityFolder(config=config_name, data_dir=data_dir, **builder_kwargs)
  modes = tfds.download.ComputeStatsMode
  stats = modes.AUTO if compute_stats else modes.SKIP
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, compute_stats=stats))
  return builder


def _encode(path: str, image_size: int | None) -> bytes:
  """Bytes that decode (PIL) to exactly `image_io.decode_image(path, image_size)`.

  An RGB JPEG kept as stored passes through untouched (no second lossy encoding, several times
  smaller than PNG); anything converted (grey, palette) or resized is stored as PNG.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  array = image_io.decode_image(raw, image_size)  # raises on empty or truncated files
  with Image.open(io.BytesIO(raw)) as image:
    passthrough = image_size is None and image.format == 'JPEG' and image.mode == 'RGB'
  return raw if passthrough else image_io.encode_png(array)


class TfdsSource(base.FaceSource):
  """Random access to an IpsrIdentityFolder build through `tfds.data_source` (ArrayRecord).

  `len()` and `source[i]` touch only the requested example; `records` (label, identity, meta of
  every example, without decoding any image) is read on first use, for evaluation protocols.
  Images are decoded with PIL, as the folder sources do.
  """

  def __init__(self, name: str, data_dir: str | None = None, split: str = 'train',
               max_bad_fraction: float = 0.01):
    self.tfds_name, self.data_dir, self.split = name, data_dir or None, split
    self.max_bad_fraction = max_bad_fraction
    self.bad: list[str] = []
    self.name = name
    builder = self._builder()
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}; build it with '
          f'IpsrIdentityFolder(config=..., data_dir=...).download_and_prepare(download_config='
          f'tfds.download.DownloadConfig(manual_dir=<dataset folder>))')
    base_split = split.split('[')[0]
    identities = builder.info.metadata.get('identities', {}).get(base_split)
    if identities is None:
      raise ValueError(f'{name!r} has no split {base_split!r} (has {list(builder.info.splits)})')
    self.identities = list(identities)
    self._ds = None
    self._records: list[base.Record] | None = None
    self._length = len(self._data_source())

  def _builder(self) -> tfds.core.DatasetBuilder:
    return tfds.builder(self.tfds_name, data_dir=self.data_dir)

  def _data_source(self):
    if self._ds is None:
      self._ds = self._builder().as_data_source(
          split=self.split, decoders={'image': tfds.decode.SkipDecoding()})
    return self._ds

  def __getstate__(self):  # Grain workers re-open the files instead of pickling handles
    state = dict(self.__dict__)
    state['_ds'] = None
    return state

  def __len__(self) -> int:
    return self._length

  @property
  def records(self) -> list[base.Record]:
    if self._records is None:
      ds = self._data_source()
      records = []
      chunk = 1024
      for start in range(0, len(ds), chunk):
        for ex in ds.__getitems__(list(range(start, min(start + chunk, len(ds))))):
          records.append(_record(ex))
      self._records = records
    return self._records

  def load_image(self, record: base.Record) -> np.ndarray:
    raise NotImplementedError('TfdsSource decodes by index: use source[i]')

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    index = int(index)
    ex = self._data_source()[index]
    try:
      image = image_io.decode_image(bytes(ex['image']))
    except Exception as e:  # pylint: disable=broad-except
      self.note_bad(_record(ex), e, key=f'#{index} ({_text(ex["file_name"])})')
      return None
    return {'image': image, 'label': np.int32(ex['label']), 'index': np.int64(index)}

  def verify(self, num_threads: int = 8) -> list[str]:
    def check(index: int) -> str | None:
      ex = self._data_source()[index]
      try:
        image_io.decode_image(bytes(ex['image']))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Unreadable image #%d (%s): %s', index, _text(ex['file_name']), e)
        return f'#{index}'
      return None

    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      bad = [b for b in pool.map(check, range(len(self))) if b is not None]
    self.bad = bad
    if self._too_many_bad(len(bad)):
      raise self._bad_error(bad)
    return bad

  def __repr__(self) -> str:
    return f'TfdsSource(name={self.tfds_name!r}, data_dir={self.data_dir!r}, split={self.split!r})'


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _record(ex: dict[str, Any]) -> base.Record:
  return base.Record(path='', label=int(ex['label']), identity=_text(ex['identity']),
                     meta={'file_name': _text(ex['file_name']),
                           **ints_to_meta({k: ex[k] for k in META_INT_FIELDS})})
