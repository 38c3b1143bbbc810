"""Face sources on small generated trees in their real on-disk layouts, and on ORL / LFW."""

import io
import os
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import base as base_config
from ipsr_jax.data import image_io
from ipsr_jax.data.sources import BadImageError, make_source
from ipsr_jax.data.sources import ar as ar_lib
from ipsr_jax.data.sources import folders
from ipsr_jax.data.sources import scface as scface_lib

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'


def _image(seed: int, hw=(24, 20)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, hw + (3,), dtype=np.uint8)


def _write(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)
  return path


def _truncated_jpeg(path: Path, seed: int = 99) -> Path:
  buffer = io.BytesIO()
  Image.fromarray(_image(seed, (64, 64))).save(buffer, format='JPEG')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  return path


def _identity_tree(root: Path, counts: dict[str, int], ext: str = '.png') -> dict[str, np.ndarray]:
  written = {}
  for k, (name, count) in enumerate(counts.items()):
    for i in range(1, count + 1):
      array = _image(100 * k + i)
      written[str(_write(root / name / f'{i}{ext}', array))] = array
  return written


def test_identity_folders_layout_labels_and_order(tmp_path):
  written = _identity_tree(tmp_path, {'bob': 3, 'alice': 11, 'carol': 1})
  (tmp_path / 'alice' / 'notes.txt').write_text('not an image')
  (tmp_path / 'alice' / '.DS_Store').write_bytes(b'\0')
  source = folders.IdentityFolders(tmp_path)
  assert len(source) == 15 and source.identities == ['alice', 'bob', 'carol']
  alice = [r for r in source.records if r.identity == 'alice']
  assert [Path(r.path).name for r in alice][:3] == ['1.png', '2.png', '3.png']  # natural order
  assert Path(alice[-1].path).name == '11.png'
  assert {r.identity: r.label for r in source.records} == {'alice': 0, 'bob': 1, 'carol': 2}
  for i in (0, 5, 14):
    element = source[i]
    assert element['image'].dtype == np.uint8 and element['image'].shape == (24, 20, 3)
    np.testing.assert_array_equal(element['image'], written[source.records[i].path])
    assert element['label'] == source.records[i].label and element['index'] == i
  assert repr(source) == repr(folders.IdentityFolders(tmp_path))
  assert 'identities=3' in repr(source) and 'images=15' in repr(source)

  kept = folders.IdentityFolders(tmp_path, min_images_per_identity=3)
  assert kept.identities == ['alice', 'bob'] and len(kept) == 14
  chosen = folders.IdentityFolders(tmp_path, identities=['carol', 'bob'])
  assert chosen.identities == ['bob', 'carol'] and [r.label for r in chosen.records] == [0, 0, 0, 1]
  with pytest.raises(ValueError, match='dave'):
    folders.IdentityFolders(tmp_path, identities=['dave'])
  resized = folders.IdentityFolders(tmp_path, image_size=32)
  assert resized[0]['image'].shape == (32, 32, 3)
  np.testing.assert_array_equal(resized[0]['image'],
                                image_io.resize_to(written[resized.records[0].path], 32))


def test_identity_folders_splits_and_grey_pgm(tmp_path):
  # VGGFace2: train/ and test/ with disjoint people; ORL: grey PGM decodes to 3 equal channels.
  _identity_tree(tmp_path / 'train', {'n000002': 2, 'n000001': 3}, ext='.jpg')
  grey = np.random.default_rng(0).integers(0, 256, (112, 92), dtype=np.uint8)
  _write(tmp_path / 'test' / 'n000009' / '0001_01.pgm', grey)
  train = folders.IdentityFolders(tmp_path, split='train')
  test = folders.IdentityFolders(tmp_path, split='test')
  assert train.identities == ['n000001', 'n000002'] and len(train) == 5
  assert test.identities == ['n000009'] and test.records[0].label == 0
  image = test[0]['image']
  assert image.shape == (112, 92, 3)
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], grey)
  with pytest.raises(FileNotFoundError, match='val'):
    folders.IdentityFolders(tmp_path, split='val')


def test_missing_root_is_a_clear_error(tmp_path):
  missing = tmp_path / 'nowhere'
  for build in (folders.IdentityFolders, ar_lib.ARFaces, scface_lib.SCface):
    with pytest.raises(FileNotFoundError) as err:
      build(missing)
    assert str(missing) in str(err.value) and 'expected' in str(err.value)
  with pytest.raises(FileNotFoundError, match='<identity>'):
    folders.IdentityFolders(missing)
  with pytest.raises(FileNotFoundError, match='empty'):
    folders.IdentityFolders('')


def test_bad_images_are_skipped_counted_and_bounded(tmp_path):
  _identity_tree(tmp_path, {f'id{k}': 5 for k in range(4)})
  truncated = _truncated_jpeg(tmp_path / 'id1' / '6.jpg')
  empty = tmp_path / 'id2' / '6.jpg'
  empty.write_bytes(b'')
  source = folders.IdentityFolders(tmp_path, max_bad_fraction=0.1)  # 2 of 22 allowed
  assert len(source) == 22
  elements = [source[i] for i in range(len(source))]
  missing = [source.records[i].path for i, e in enumerate(elements) if e is None]
  assert sorted(missing) == sorted([str(truncated), str(empty)])
  assert sorted(source.bad) == sorted(missing)
  assert sorted(folders.IdentityFolders(tmp_path, max_bad_fraction=0.1).verify(num_threads=3)) == \
      sorted(missing)

  strict = folders.IdentityFolders(tmp_path, max_bad_fraction=0.05)  # 1.1 of 22 allowed
  with pytest.raises(BadImageError, match='2 of 22'):
    strict.verify()
  strict = folders.IdentityFolders(tmp_path, max_bad_fraction=0.05)
  with pytest.raises(BadImageError):
    [strict[i] for i in range(len(strict))]  # the second bad one in the stream is one too many


def test_ar_faces(tmp_path):
  written = {}
  for sex in 'mw':
    for person in (1, 2, 3):
      shots = (1, 2, 14, 26) if person < 3 else (1, 2)  # person 3: session 1 only
      for shot in shots:
        name = f'{sex}-{person:03d}-{shot:02d}.bmp'
        if (sex, person, shot) == ('w', 2, 14):
          name = name.upper()  # some distributions: W-002-14.BMP
        sub = tmp_path / ('session2' if shot > 13 else '')
        written[name.lower()] = _write(sub / name, _image(hash((sex, person, shot)) % 1000), 'BMP')
  (tmp_path / 'readme.txt').write_text('AR')
  _write(tmp_path / 'thumbnail.png', _image(0))
  source = ar_lib.ARFaces(tmp_path)
  assert len(source) == 20
  assert source.identities == ['m-001', 'm-002', 'm-003', 'w-001', 'w-002', 'w-003']
  by_name = {Path(r.path).name.lower(): r for r in source.records}
  assert by_name['m-002-14.bmp'].meta == {'sex': 'm', 'session': 2, 'shot': 14}
  assert by_name['w-001-02.bmp'].meta == {'sex': 'w', 'session': 1, 'shot': 2}
  assert by_name['w-002-14.bmp'].identity == 'w-002'
  assert by_name['m-003-01.bmp'].label == 2
  assert source[0]['image'].shape == (24, 20, 3)
  assert ar_lib.paper_subjects(source.records, per_sex=2) == ('m-001', 'm-002', 'w-001', 'w-002')
  with pytest.raises(ValueError, match='only 2'):
    ar_lib.paper_subjects(source.records, per_sex=3)
  subset = ar_lib.ARFaces(tmp_path, subjects=('w-001', 'm-002'))
  assert subset.identities == ['m-002', 'w-001'] and len(subset) == 8
  assert repr(subset) == repr(ar_lib.ARFaces(tmp_path, subjects=['m-002', 'w-001']))


def test_scface(tmp_path):
  for sid in ('001', '002'):
    mugshot = tmp_path / 'mugshot_frontal_cropped_all' / f'{sid}_frontal.JPG'
    _write(mugshot, _image(int(sid)), 'JPEG')
    _write(tmp_path / 'mugshot_rotation' / f'{sid}_L1.jpg', _image(7), 'JPEG')  # ignored
    for d in (1, 2, 3):
      for c in (1, 5):
        path = tmp_path / f'surveillance_cameras_distance_{d}' / f'cam{c}' / f'{sid}_cam{c}_{d}.jpg'
        _write(path, _image(int(sid) * 100 + 10 * d + c), 'JPEG')
  # The distribution also copies every surveillance shot into one folder: keep each shot once.
  dup = tmp_path / 'surveillance_cameras_all' / '001_cam1_1.jpg'
  _write(dup, _image(0), 'JPEG')
  source = scface_lib.SCface(tmp_path)
  assert len(source) == 2 * (1 + 6) and source.identities == ['001', '002']
  mugshots = [r for r in source.records if r.meta['kind'] == 'mugshot']
  assert [(r.identity, r.label) for r in mugshots] == [('001', 0), ('002', 1)]
  far = [r for r in source.records if r.meta.get('distance') == 1]
  assert len(far) == 4 and {r.meta['metres'] for r in far} == {4.2}
  close = [r for r in source.records if r.meta.get('distance') == 3]
  assert {r.meta['metres'] for r in close} == {1.0}
  cam5 = [r for r in source.records if r.meta.get('camera') == 5]
  assert len(cam5) == 6 and all(r.meta['kind'] == 'surveillance' for r in cam5)
  assert sum(Path(r.path).name == '001_cam1_1.jpg' for r in source.records) == 1
  assert source[0]['image'].shape == (24, 20, 3)


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = base_config.get_config()
  config.data.update(overrides)
  return config


def test_make_source_dispatch(tmp_path):
  _identity_tree(tmp_path / 'vgg' / 'train', {'a': 2, 'b': 2})
  _identity_tree(tmp_path / 'vgg' / 'test', {'c': 1})
  _identity_tree(tmp_path / 'casia' / '0000045', {'x': 1})
  _identity_tree(tmp_path / 'lfw' / 'images_deepfunneled', {'Ann_Lee': 1, 'Bo_Li': 4})
  _write(tmp_path / 'ar' / 'm-001-01.bmp', _image(1), 'BMP')
  _write(tmp_path / 'sc' / '001_frontal.jpg', _image(1), 'JPEG')

  train = make_source(_data_config(root=str(tmp_path / 'vgg')))
  assert isinstance(train, folders.IdentityFolders) and train.identities == ['a', 'b']
  test = make_source(_data_config(root=str(tmp_path / 'vgg')).data, split='test')
  assert test.identities == ['c']
  casia = make_source(_data_config(root=str(tmp_path / 'casia')))
  assert casia.identities == ['0000045']
  lfw = make_source(_data_config(source='lfw', root=str(tmp_path / 'lfw')), split='test')
  assert lfw.identities == ['Ann_Lee', 'Bo_Li'] and len(lfw) == 5
  # LFW's training split: only people outside the protocol population (< 4 images).
  assert make_source(_data_config(source='lfw', root=str(tmp_path / 'lfw'))).identities == ['Ann_Lee']
  assert len(make_source(_data_config(source='orl', root=str(tmp_path / 'vgg' / 'train')))) == 4
  assert make_source(_data_config(source='ar', root=str(tmp_path / 'ar'))).identities == ['m-001']
  assert len(make_source(_data_config(source='scface', root=str(tmp_path / 'sc')))) == 1
  with pytest.raises(ValueError, match="known: .*'identity_folder'.*'synthetic'"):
    make_source(_data_config(source='imagenet'))
  with pytest.raises(ValueError, match='tfds_name'):
    make_source(_data_config(source='tfds'))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nope')):
    make_source(_data_config(root=str(tmp_path / 'nope')))


def test_lfw_dev_split_is_held_out_of_training_and_the_protocol(tmp_path):
  # 1-image people (training only), 2-3 image people (training or dev), >= 4 (the test protocol).
  counts = {f'P{i:02d}': n for i, n in enumerate([1, 2, 3, 2, 3, 2, 3, 2, 4, 5, 1, 3])}
  _identity_tree(tmp_path / 'lfw' / 'images_deepfunneled', counts, ext='.jpg')
  cfg = _data_config(source='lfw', root=str(tmp_path / 'lfw'), dev_identities=3, dev_seed=0)
  dev = make_source(cfg, split='dev')
  train = make_source(cfg, split='train')
  assert dev.num_identities == 3 and all(2 <= counts[i] <= 3 for i in dev.identities)
  assert not set(dev.identities) & set(train.identities)
  assert set(dev.identities) | set(train.identities) == {i for i, n in counts.items() if n <= 3}
  assert len(dev) == sum(counts[i] for i in dev.identities)
  assert 'excluded=3' in repr(train)  # Grain's restore check sees the held-out people
  # The same draw on every call (and machine: sorted names, a seeded PCG64); another seed, another.
  assert make_source(cfg, split='dev').identities == dev.identities
  assert dev.identities == sorted(dev.identities)
  other = {tuple(make_source(_data_config(source='lfw', root=str(tmp_path / 'lfw'), dev_identities=3,
                                         dev_seed=s), split='dev').identities) for s in range(6)}
  assert len(other) > 1
  # The test split is all of LFW (its protocol keeps the >= 4-image people), dev or not.
  assert make_source(cfg, split='test').num_identities == len(counts)
  cfg.data.dev_identities = 0
  with pytest.raises(ValueError, match='dev_identities > 0'):
    make_source(cfg, split='dev')
  assert make_source(cfg, split='train').num_identities == 10
  cfg.data.dev_identities = 9
  with pytest.raises(ValueError, match='only 8 LFW people'):
    make_source(cfg, split='dev')


def test_make_source_synthetic():
  pytest.importorskip('ipsr_jax.data.synthetic')
  config = _data_config(source='synthetic', synthetic_identities=3, synthetic_images_per_identity=2)
  train, test = make_source(config), make_source(config, split='test')
  assert len(train) == 6 and train.num_identities == 3
  assert train[0]['image'].shape == (128, 128, 3) and train[0]['image'].dtype == np.uint8
  assert not np.array_equal(train[0]['image'], test[0]['image'])  # unseen people
  assert {r.identity for r in train.records}.isdisjoint(r.identity for r in test.records)
  assert test.identity_offset == 1_000_000


def test_orl_real_faces():
  root = SHARED / 'orl'
  if not root.is_dir():
    pytest.skip(f'ORL not found at {root}')
  source = folders.ORL(root)
  assert len(source) == 400 and source.num_identities == 40
  assert [Path(r.path).name for r in source.records[:3]] == ['1.pgm', '2.pgm', '3.pgm']
  image = source[0]['image']
  assert image.shape == (112, 92, 3) and image.dtype == np.uint8
  assert (image[..., 0] == image[..., 2]).all() and image.std() > 10
  assert source.verify() == []


@pytest.mark.slow  # the full LFW listing
def test_lfw_real_population():
  root = SHARED / 'lfw'
  if not root.is_dir():
    pytest.skip(f'LFW not found at {root}')
  assert folders.LFW(root).num_identities == 5749
  protocol = folders.LFW(root, min_images_per_identity=4)
  assert protocol.num_identities == 610
  assert folders.LFW(root, max_images_per_identity=3).num_identities == 5749 - 610
  assert protocol[0]['image'].shape == (250, 250, 3)


def test_tfds_builder_round_trip(tmp_path):
  tfds_builders = pytest.importorskip('ipsr_jax.data.sources.tfds_builders')
  manual = tmp_path / 'manual'
  _identity_tree(manual / 'train', {'n2': 3, 'n1': 2}, ext='.jpg')           # RGB JPEG: passthrough
  _write(manual / 'train' / 'n1' / 'grey.pgm', _image(5, (20, 16))[..., 0])  # ORL-like grey
  _write(manual / 'train' / 'n2' / 'rgba.png',
         np.concatenate([_image(6), np.full((24, 20, 1), 128, np.uint8)], -1))
  _truncated_jpeg(manual / 'train' / 'n2' / 'broken.jpg')
  _identity_tree(manual / 'test', {'n9': 2}, ext='.png')
  data_dir = str(tmp_path / 'tfds')
  builder = tfds_builders.prepare('vggface2', manual_dir=str(manual), data_dir=data_dir)
  assert builder.info.metadata['identities'] == {'train': ['n1', 'n2'], 'test': ['n9']}
  assert builder.info.metadata['bad_images'] == {'train': ['train/n2/broken.jpg'], 'test': []}

  for split in ('train', 'test'):
    folder = folders.IdentityFolders(manual, split=split, max_bad_fraction=0.5)
    packed = tfds_builders.TfdsSource('ipsr_identity_folder/vggface2', data_dir, split)
    assert len(packed) == len(folder) - (1 if split == 'train' else 0)
    assert packed.identities == folder.identities
    by_name = {r.meta['file_name']: i for i, r in enumerate(packed.records)}
    for i, record in enumerate(folder.records):
      name = os.path.relpath(record.path, manual)
      element = folder[i]
      if element is None:
        assert name not in by_name
        continue
      got = packed[by_name[name]]
      np.testing.assert_array_equal(got['image'], element['image'])  # pixel-exact
      assert got['label'] == element['label'] and got['image'].shape[-1] == 3
      assert packed.records[by_name[name]].identity == record.identity
  assert repr(packed) == repr(tfds_builders.TfdsSource('ipsr_identity_folder/vggface2', data_dir,
                                                        'test'))
  config = _data_config(source='tfds', tfds_name='ipsr_identity_folder/vggface2',
                        tfds_data_dir=data_dir)
  assert len(make_source(config)) == 7
  # Random access is what the Grain pipeline needs: a batch straight from the ArrayRecord files.
  from ipsr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config.train.batch_size, config.data.image_size = 4, 32
  batch = next(pipeline.make_train_iterator(config, make_source(config)))
  assert batch['hr'].shape == (4, 32, 32, 3) and set(batch['label'].tolist()) <= {0, 1}
  with pytest.raises(FileNotFoundError, match='not prepared'):
    tfds_builders.TfdsSource('ipsr_identity_folder/orl', data_dir, 'train')


def test_tfds_builder_keeps_ar_and_scface_metadata(tmp_path):
  tfds_builders = pytest.importorskip('ipsr_jax.data.sources.tfds_builders')
  ar_dir, sc_dir = tmp_path / 'ar', tmp_path / 'sc'
  for name in ('m-001-01', 'm-001-14', 'w-002-26'):
    _write(ar_dir / f'{name}.bmp', _image(len(name)), 'BMP')
  for name in ('001_frontal', '001_cam3_1', '002_cam7_3'):
    _write(sc_dir / 'x' / f'{name}.jpg', _image(3), 'JPEG')
  data_dir = str(tmp_path / 'tfds')
  for config_name, root, source_cls in (('ar', ar_dir, ar_lib.ARFaces),
                                        ('scface', sc_dir, scface_lib.SCface)):
    tfds_builders.prepare(config_name, manual_dir=str(root), data_dir=data_dir)
    packed = tfds_builders.TfdsSource(f'ipsr_identity_folder/{config_name}', data_dir, 'train')
    expected = {os.path.relpath(r.path, root): (r.label, r.identity, dict(r.meta))
                for r in source_cls(root).records}
    got = {r.meta['file_name']: (r.label, r.identity,
                                 {k: v for k, v in r.meta.items() if k != 'file_name'})
           for r in packed.records}
    assert got == expected
