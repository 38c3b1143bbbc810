"""The Grain training pipeline: batch contents, sharding, determinism and exact resumption."""

import itertools

import grain
import jax
import numpy as np
from PIL import Image
import pytest

from configs import base as base_config
from ipsr_jax import config as config_lib
from ipsr_jax.data import degrade
from ipsr_jax.data import image_io
from ipsr_jax.data import pipeline
from ipsr_jax.data.sources import folders

LR_SIZES = ((4, 4), (8, 6), (16, 16))


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
  """24 identities of one 40x36 JPEG each (label == image), plus one unreadable file."""
  root = tmp_path_factory.mktemp('faces')
  rng = np.random.default_rng(0)
  for k in range(24):
    (root / f'id{k:02d}').mkdir()
    small = rng.uniform(0, 255, (5, 4, 3)).astype(np.float32)
    image = np.clip(np.round(degrade.bicubic_resize(small, (40, 36))), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / f'id{k:02d}' / '1.jpg', quality=95)
  (root / 'id07' / '2.jpg').write_bytes(b'')  # id07 keeps one good image
  return folders.IdentityFolders(root, max_bad_fraction=0.5)


def _config(**data):
  config = base_config.get_config()
  config.train.batch_size = 4
  config.data.update(dict(image_size=32, lr_sizes=LR_SIZES, read_threads=2), **data)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _source_image(source, label, size=32):
  index = next(i for i, r in enumerate(source.records)
               if r.label == label and source[i] is not None)
  return image_io.resize_to(source[index]['image'], size)


def test_batches_hold_hr_and_its_degraded_lr(faces):
  it = pipeline.make_train_iterator(_config(), faces)
  for batch in _take(it, 3):
    assert set(batch) == {'hr', 'lr', 'lr_index', 'label'}
    assert batch['hr'].dtype == np.uint8 and batch['hr'].shape == (4, 32, 32, 3)
    assert batch['lr'].dtype == np.uint8 and batch['lr'].shape == (4, 32, 32, 3)
    assert batch['lr_index'].dtype == np.int32 and batch['label'].dtype == np.int32
    for hr, lr, k, label in zip(batch['hr'], batch['lr'], batch['lr_index'], batch['label']):
      np.testing.assert_array_equal(hr, _source_image(faces, label))
      np.testing.assert_array_equal(lr, degrade.degrade(hr, LR_SIZES[k], out_hw=(32, 32)))
      assert not np.array_equal(lr, hr)


def test_degrade_on_device_leaves_lr_out_and_per_batch_sizes(faces):
  it = pipeline.make_train_iterator(_config(degrade_on_device=True, lr_per='batch'), faces)
  batches = _take(it, 12)
  assert set(batches[0]) == {'hr', 'lr_index', 'label'}
  assert all((b['lr_index'] == b['lr_index'][0]).all() for b in batches)
  assert len({int(b['lr_index'][0]) for b in batches}) > 1
  per_example = _take(pipeline.make_train_iterator(_config(), faces), 12)
  assert any(len(set(b['lr_index'].tolist())) > 1 for b in per_example)


def test_degrade_on_device_auto_is_the_host_path_on_cpu(faces):
  # The default (None) and 'auto' resolve from the backend: on CPU the host path is 4x cheaper.
  assert jax.default_backend() == 'cpu'
  assert base_config.get_config().data.degrade_on_device is None
  for setting, has_lr in ((None, True), ('auto', True), (False, True), (True, False)):
    config = _config(degrade_on_device=setting)
    config_lib.validate(_with_root(config, faces))
    assert degrade.resolve_on_device(setting) is (not has_lr)
    batch = next(pipeline.make_train_iterator(config, faces))
    assert ('lr' in batch) is has_lr, setting
  for bad in ('yes', 'True', 1):
    with pytest.raises(config_lib.ConfigError, match=r'config\.data\.degrade_on_device'):
      config_lib.validate(_with_root(_config(degrade_on_device=bad), faces))
    with pytest.raises(ValueError, match='degrade_on_device'):
      degrade.resolve_on_device(bad)


def _with_root(config, faces):
  """The pipeline test config, made whole for `config.validate` (32 px model, data root)."""
  config.data.root = str(faces.root)
  config.model.update(image_size=32, num_downs=5)
  return config


def test_unreadable_images_never_reach_a_batch(faces):
  bad = [r.path for r in faces.records if r.path.endswith('2.jpg')]
  assert len(bad) == 1
  labels = np.concatenate([b['label'] for b in _take(pipeline.make_train_iterator(_config(), faces),
                                                     30)])
  # 120 draws from 24 good images (5 epochs): every good image comes up, each epoch in full.
  assert np.bincount(labels, minlength=24).min() >= 4


def test_shuffle_is_seeded_and_differs_per_epoch(faces):
  config = _config(lr_per='example')
  def labels(seed=None):
    it = pipeline.make_train_iterator(config, faces, seed=seed)
    return np.concatenate([b['label'] for b in _take(it, 13)])

  first, again, other = labels(), labels(), labels(seed=1)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # 25 records an epoch, one unreadable (replaced by the next readable record): each epoch yields
  # all 24 good images, one of them twice, reshuffled.
  epoch1, epoch2 = first[:25], first[25:50]
  assert set(epoch1) == set(range(24)) and set(epoch2) == set(range(24))
  assert not np.array_equal(epoch1, epoch2)


def test_sharding_by_process_is_disjoint_and_covers(faces):
  # 22 clean images (id07 holds the unreadable file), one per process per step, 2 processes.
  clean = folders.IdentityFolders(faces.root, identities=[f'id{k:02d}' for k in range(22) if k != 7]
                                  + ['id22'])
  assert len(clean) == 22
  config = _config()
  config.train.batch_size = 2
  epoch = []
  for shard_index in range(2):
    options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=2)
    it = pipeline.make_train_iterator(config, clean, shard_options=options)
    batches = _take(it, 11)
    assert all(b['hr'].shape == (1, 32, 32, 3) for b in batches)
    epoch.append({int(b['label'][0]) for b in batches})
  assert len(epoch[0]) == len(epoch[1]) == 11
  assert not epoch[0] & epoch[1] and epoch[0] | epoch[1] == set(range(22))
  with pytest.raises(ValueError, match='divide'):
    config.train.batch_size = 9
    pipeline.make_train_iterator(config, clean, shard_options=grain.sharding.ShardOptions(0, 2))


def test_global_batches_do_not_depend_on_the_process_count(faces):
  config = _config(random_flip=True)
  config.train.batch_size = 4
  one = _take(pipeline.make_train_iterator(config, faces, shard_options=grain.sharding.NoSharding()), 5)
  shards = [_take(pipeline.make_train_iterator(config, faces,
                                               shard_options=grain.sharding.ShardOptions(i, 2)), 5)
            for i in range(2)]
  for step in range(5):
    for key in one[step]:
      joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
      np.testing.assert_array_equal(one[step][key], joined)


@pytest.mark.parametrize('num_workers, read_threads, handoff',
                         [(0, 0, 'pipe'), (2, 4, 'pipe'), (2, 0, 'shared_memory')])
def test_batches_do_not_depend_on_the_worker_or_thread_count(faces, num_workers, read_threads,
                                                             handoff):
  # Workers take whole batches (and share data.read_threads; 0 reads in the consuming thread,
  # or in each worker's own); what each batch holds, down to the degraded pixels, is the
  # one-process stream read by 4 threads, whichever way the workers hand it over.
  config = _config(random_flip=True, read_threads=4)
  plain = _take(pipeline.make_train_iterator(config, faces), 6)
  config.data.update(num_workers=num_workers, read_threads=read_threads, worker_handoff=handoff)
  it = pipeline.make_train_iterator(config, faces)
  batches = _take(it, 6)
  _assert_same(batches, plain)
  # Grain's shared-memory hand-off yields arrays mapped on its segments; the pipe, plain ones.
  in_shared_memory = isinstance(batches[0]['hr'], grain.multiprocessing.SharedMemoryArray)
  assert in_shared_memory == (num_workers > 0 and handoff == 'shared_memory')
  it.close()


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('num_workers, saved_by, restored_by',
                         [(0, 'pipe', 'pipe'), (2, 'pipe', 'shared_memory'),
                          (2, 'shared_memory', 'pipe')])
def test_state_round_trip_resumes_exactly(faces, num_workers, saved_by, restored_by):
  # Flip, crop and the LR sizes are all random: a resumed run must redo them identically. The
  # hand-off is not part of the state: a checkpoint resumes under either.
  config = _config(num_workers=num_workers, random_flip=True, random_crop_padding=2,
                   worker_handoff=saved_by)
  it = pipeline.make_train_iterator(config, faces)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  it.close()
  config.data.worker_handoff = restored_by
  restored = pipeline.make_train_iterator(config, faces)
  restored.set_state(state)
  _assert_same(_take(restored, 4), expected)
  restored.close()


def test_grain_checkpoint_handler_round_trip(faces, tmp_path):
  # What the Orbax Composite item (grain.checkpoint.CheckpointSave/Restore) calls.
  config = _config()
  it = pipeline.make_train_iterator(config, faces)
  _take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, item=it)
  expected = _take(it, 3)
  fresh = pipeline.make_train_iterator(config, faces)
  handler.restore(tmp_path, item=fresh)
  _assert_same(_take(fresh, 3), expected)
  other_source = folders.IdentityFolders(faces.root, identities=['id00', 'id01'])
  with pytest.raises(ValueError):  # a different dataset must not silently resume
    pipeline.make_train_iterator(config, other_source).set_state(it.get_state())


def test_flip_and_crop_are_keyed_on_the_sample(faces):
  flips = _take(pipeline.make_train_iterator(_config(random_flip=True), faces), 6)
  kinds = []
  for b in flips:
    for hr, label in zip(b['hr'], b['label']):
      plain = _source_image(faces, label)
      kinds.append('same' if np.array_equal(hr, plain) else
                   'flip' if np.array_equal(hr, plain[:, ::-1]) else 'other')
  assert 'other' not in kinds and 4 <= kinds.count('flip') <= 20  # 24 fair coins

  p = 3
  crops = _take(pipeline.make_train_iterator(_config(random_crop_padding=p), faces), 6)
  offsets = set()
  for b in crops:
    for hr, label in zip(b['hr'], b['label']):
      padded = np.pad(_source_image(faces, label), ((p, p), (p, p), (0, 0)), mode='reflect')
      match = [(t, l) for t in range(2 * p + 1) for l in range(2 * p + 1)
               if np.array_equal(padded[t:t + 32, l:l + 32], hr)]
      assert match, 'not a crop of the padded image'
      offsets.add(match[0])
  assert len(offsets) >= 8
  _assert_same(crops, _take(pipeline.make_train_iterator(_config(random_crop_padding=p), faces), 6))


def test_to_grey_is_pils_luma():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
  image[0, :3] = [[255, 255, 255], [0, 0, 0], [1, 254, 128]]  # the fixed point's ends and a rounding case
  grey = image_io.to_grey(image)
  assert grey.shape == image.shape and grey.dtype == np.uint8
  np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.fromarray(image).convert('L')))
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  np.testing.assert_array_equal(image_io.to_grey(grey), grey)  # grey stays as it is


def test_grey_is_keyed_on_the_sample_and_greys_hr_and_lr(faces):
  batches = _take(pipeline.make_train_iterator(_config(random_grey=0.5), faces), 6)
  kinds = []
  for b in batches:
    for hr, lr, label in zip(b['hr'], b['lr'], b['label']):
      plain = _source_image(faces, label)
      kinds.append('same' if np.array_equal(hr, plain) else
                   'grey' if np.array_equal(hr, image_io.to_grey(plain)) else 'other')
      if kinds[-1] == 'grey':  # the LR input is made from the grey face: grey too
        assert np.array_equal(lr[..., 0], lr[..., 1]) and np.array_equal(lr[..., 1], lr[..., 2])
  assert 'other' not in kinds and 4 <= kinds.count('grey') <= 20  # 24 fair coins
  _assert_same(batches, _take(pipeline.make_train_iterator(_config(random_grey=0.5), faces), 6))
  every = _take(pipeline.make_train_iterator(_config(random_grey=1.0), faces), 2)
  assert all(np.array_equal(hr[..., 0], hr[..., 2]) for b in every for hr in b['hr'])
  # Off draws nothing: the stream is the one without the option.
  _assert_same(_take(pipeline.make_train_iterator(_config(random_grey=0.0), faces), 3),
               _take(pipeline.make_train_iterator(_config(), faces), 3))


def test_make_eval_batches(faces):
  batches = list(pipeline.make_eval_batches(faces, batch_size=10, image_size=32))
  assert [len(b['index']) for b in batches] == [10, 10, 4]  # 25 records, 1 unreadable
  indices = np.concatenate([b['index'] for b in batches])
  assert indices.tolist() == [i for i in range(len(faces)) if faces[i] is not None]
  np.testing.assert_array_equal(batches[0]['image'][3], image_io.resize_to(faces[3]['image'], 32))
  some = list(itertools.islice(
      pipeline.make_eval_batches(faces, [5, 2], batch_size=4, image_size=32), 3))
  assert len(some) == 1 and some[0]['index'].tolist() == [5, 2]
