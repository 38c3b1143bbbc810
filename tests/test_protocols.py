"""Protocol splits on generated datasets in their real on-disk naming, and the runner end to end."""

import ast
import collections
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipsr_jax.data.sources import ar as ar_source
from ipsr_jax.data.sources import folders
from ipsr_jax.data.sources import scface as scface_source
from ipsr_jax.data import degrade
from ipsr_jax.data.sources.base import Record
from ipsr_jax.evaluation import embedding_cache
from ipsr_jax.evaluation import protocols
from ipsr_jax.evaluation import protocol_steps

REAL_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'


def _write(path, size=(8, 8), value=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


def _paths(split):
  return [r.path for r in split.gallery], [r.path for r in split.all_probes()]


# ----------------------------------------------------------------------------- AR


@pytest.fixture(scope='module')
def ar_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('ar')
  # 55 men, 52 women; shots 1, 2, 14, 15 (all a split needs); m-003 and w-010 lack session 2,
  # so they must be skipped and m-001..m-051 minus m-003 give the 50 men.
  for sex, n in (('m', 55), ('w', 52)):
    for person in range(1, n + 1):
      for shot in (2, 1, 15, 14):
        if shot >= 14 and (sex, person) in (('m', 3), ('w', 10)):
          continue
        _write(str(root / f'{sex}-{person:03d}-{shot:02d}.bmp'))
  return root


def test_ar_split(ar_root):
  source = ar_source.ARFaces(ar_root)
  split = protocols.ar_split(source.records)
  gallery, probes = _paths(split)
  assert len(gallery) == len(probes) == 100
  assert not set(gallery) & set(probes)
  assert all(p.endswith('-14.bmp') for p in gallery)
  assert all(p.endswith('-01.bmp') for p in probes)
  ids = [r.identity for r in split.gallery]
  assert ids == [r.identity for r in split.probes[protocols.ALL]]
  assert collections.Counter(i[0] for i in ids) == {'m': 50, 'w': 50}
  assert 'm-003' not in ids and 'w-010' not in ids
  assert ids[:3] == ['m-001', 'm-002', 'm-004'] and ids[49] == 'm-051' and ids[-1] == 'w-051'
  assert protocols.ar_split(list(reversed(source.records))) == split  # order-independent
  with pytest.raises(ValueError):
    protocols.ar_split(source.records, per_sex=60)


# ----------------------------------------------------------------------------- LFW / generic


def _identity_records(counts):
  return [Record(path=f'/lfw/p{i:03d}/p{i:03d}_{j:04d}.jpg', label=i, identity=f'p{i:03d}')
          for i, n in enumerate(counts) for j in range(1, n + 1)]


def test_lfw_split():
  counts = np.random.default_rng(0).integers(1, 12, 80)
  records = _identity_records(counts)
  split = protocols.lfw_split(records, seed=0)
  kept = {f'p{i:03d}' for i, n in enumerate(counts) if n >= 4}
  gallery, probes = _paths(split)
  assert len(gallery) == len(kept)
  assert [r.identity for r in split.gallery] == sorted(kept)  # one each
  assert len(probes) == sum(n - 1 for n in counts if n >= 4)
  assert {r.identity for r in split.all_probes()} == kept
  assert not set(gallery) & set(probes)
  assert len(set(gallery) | set(probes)) == sum(n for n in counts if n >= 4)
  assert protocols.lfw_split(records, seed=0) == split
  others = [_paths(protocols.lfw_split(records, seed=s))[0] for s in range(1, 10)]
  assert all(o != gallery for o in others)
  # The random gallery pick is spread over the images, not always the first.
  assert len({p[-8:] for p in gallery}) > 3


def test_lfw_dev_protocol_scores_the_dev_people_like_the_test_protocol():
  dev, test = protocols.get_protocol('lfw_dev'), protocols.get_protocol('lfw')
  assert dev.resolutions == test.resolutions and dev.hr_probe_size == test.hr_probe_size == (112, 96)
  assert dev.seeded and dev.default_trials == 10
  records = _identity_records([2, 3, 2, 3])  # dev people have 2-3 images: all of them take part
  split = protocols.lfw_dev_split(records, seed=0)
  assert len(split.gallery) == 4 and len(split.all_probes()) == 1 + 2 + 1 + 2
  with pytest.raises(ValueError):
    protocols.lfw_split(records, seed=0)  # the test protocol's >= 4 would keep none


def test_generic_split_min_images():
  records = _identity_records([1, 2, 3, 5])
  split = protocols.generic_identity_split(records, seed=3)
  assert [r.identity for r in split.gallery] == ['p001', 'p002', 'p003']
  assert len(split.all_probes()) == 1 + 2 + 4
  with pytest.raises(ValueError):
    protocols.generic_identity_split(records, seed=0, min_images=6)


def test_lfw_split_on_identity_folders(tmp_path):
  for i, n in enumerate((4, 6, 3, 5)):
    for j in range(1, n + 1):
      _write(str(tmp_path / 'lfw' / f'Person_{i}' / f'Person_{i}_{j:04d}.jpg'))
  source = folders.LFW(tmp_path / 'lfw')
  split = protocols.lfw_split(source.records, seed=1)
  assert [r.identity for r in split.gallery] == ['Person_0', 'Person_1', 'Person_3']
  assert len(split.all_probes()) == 3 + 5 + 4


def test_lfw_split_on_real_lfw():
  root = REAL_DATA / 'lfw'
  if not root.is_dir():
    pytest.skip(f'LFW not found at {root}')
  source = folders.LFW(root)
  split = protocols.lfw_split(source.records, seed=0)
  # The paper's population: 610 people with >= 4 of LFW's 13,233 images.
  assert len(source.records) == 13233
  assert len(split.gallery) == 610 and len(split.all_probes()) == 6123
  assert split == protocols.lfw_split(source.records, seed=0)


# ----------------------------------------------------------------------------- SCface


@pytest.fixture(scope='module')
def scface_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('scface')
  for person in range(1, 11):
    pid = f'{person:03d}'
    if person != 10:  # 010 has no mugshot: not a P1 identity
      _write(str(root / 'mugshot_frontal_cropped_all' / f'{pid}_frontal.JPG'), (12, 10))
    _write(str(root / 'mugshot_rotation_all' / f'{pid}_L1.jpg'))  # ignored by the source
    for d in (1, 2, 3):
      for cam in range(1, 8):  # cam6/cam7 are infrared
        if person == 9 and d == 3:  # 009 has no close images: not a P2 identity
          continue
        _write(str(root / f'surveillance_cameras_distance_{d}' / f'cam{cam}' /
                   f'{pid}_cam{cam}_{d}.jpg'), (6 + 2 * d, 5 + 2 * d))
  return root


def test_scface_p1(scface_root):
  source = scface_source.SCface(scface_root)
  split = protocols.scface_p1(source.records)
  assert len(split.gallery) == 9
  assert all(r.meta['kind'] == 'mugshot' for r in split.gallery)
  assert list(split.probes) == ['1.0m', '2.6m', '4.2m']
  expected_d = {'1.0m': 3, '2.6m': 2, '4.2m': 1}
  for group, probes in split.probes.items():
    assert all(r.meta['distance'] == expected_d[group] for r in probes)
    assert {r.meta['camera'] for r in probes} == {1, 2, 3, 4, 5}
    assert {r.identity for r in probes} <= {r.identity for r in split.gallery}
  assert len(split.probes['1.0m']) == 8 * 5 and len(split.probes['4.2m']) == 9 * 5
  gallery, probes = _paths(split)
  assert not set(gallery) & set(probes)
  assert protocols.scface_p1(list(reversed(source.records))) == split


def test_scface_p2(scface_root):
  source = scface_source.SCface(scface_root)
  split = protocols.scface_p2(source.records)
  assert len(split.gallery) == 9 * 5  # 001..008 + 010, five visible cameras at 1.0 m
  assert all(r.meta['distance'] == 3 and r.meta['kind'] == 'surveillance' for r in split.gallery)
  assert list(split.probes) == ['2.6m']
  probes = split.probes['2.6m']
  assert len(probes) == 9 * 5 and all(r.meta['distance'] == 2 for r in probes)
  assert '009' not in {r.identity for r in probes}
  gallery, probe_paths = _paths(split)
  assert not set(gallery) & set(probe_paths)


# ----------------------------------------------------------------------------- runner


def _face(rng, size=128):
  """A smooth random face-like pattern: 4x4 colours upsampled, so it survives 7x6."""
  small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def _toy_embed(calls):
  def embed(images):
    images = np.asarray(images, np.float32)
    calls.append(len(images))
    n, h, w, c = images.shape
    pooled = images.reshape(n, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4)).reshape(n, -1)
    pooled -= pooled.mean(axis=1, keepdims=True)
    with np.errstate(invalid='ignore'):  # a flat image -> NaN, which the runner must reject
      return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  return embed


def _toy_dataset(num_ids=12, per_id=3, seed=0, noise=0.0):
  rng = np.random.default_rng(seed)
  records, images = [], {}
  for i in range(num_ids):
    base = _face(rng)
    for j in range(per_id):
      path = f'/toy/id{i:02d}/{j}.png'
      img = base if noise == 0 else np.clip(base + rng.normal(0, noise, base.shape), 0, 255)
      images[path] = img.astype(np.uint8)
      records.append(Record(path=path, label=i, identity=f'id{i:02d}'))
  return records, lambda r: images[r.path]


def test_run_protocol_generic_every_resolution_and_method():
  records, load = _toy_dataset()
  calls = []
  fixed = _face(np.random.default_rng(99))
  sr_fns = {'sr': lambda x: np.asarray(x, np.float32),  # identity SR: must equal bicubic
            'pixel_only': lambda x: np.broadcast_to(fixed, x.shape)}  # one face for everyone
  res = protocols.run_protocol('generic', records, load, embed_fn=_toy_embed(calls),
                               sr_fns=sr_fns, trials=2, chunk=8, resolutions=((7, 6), (16, 16)),
                               judges={'toy': _toy_embed([])}, num_examples=2)
  assert max(calls) <= 8  # callables see fixed-size chunks
  methods = ['hr', 'bicubic', 'sr', 'pixel_only', 'sr_concat', 'pixel_only_concat']
  assert res['methods'] == methods
  assert res['conditions'] == ['7x6', '16x16']
  assert res['trials'] == [0, 1]
  assert res['judges'] == ['toy']
  for key in ('rank1', 'rank1_std', 'cmc', 'judge_toy_rank1', 'judge_toy_cmc'):
    assert set(res[key]) == {'7x6', '16x16'}
    for c in res[key]:
      assert list(res[key][c]) == methods
  for c in ('7x6', '16x16'):
    assert res['rank1'][c]['hr'] == 1.0  # probes are exact copies of the gallery images
    assert res['rank1'][c]['sr'] == res['rank1'][c]['bicubic']
    # One embedding for every probe: only the identity nearest to it is found, 1 in 12.
    assert res['rank1'][c]['pixel_only'] == pytest.approx(1 / 12)
    assert len(res['rank1_trials'][c]['hr']) == 2
    assert len(res['cmc'][c]['bicubic']) == 12 and res['cmc'][c]['bicubic'][-1] == 1.0
    assert set(res['psnr'][c]) == {'bicubic', 'sr', 'pixel_only'}
    assert res['psnr'][c]['sr'] == pytest.approx(res['psnr'][c]['bicubic'])
    assert res['ssim'][c]['sr'] == pytest.approx(res['ssim'][c]['bicubic'])
    assert res['psnr'][c]['pixel_only'] < res['psnr'][c]['bicubic']
  assert res['rank1']['16x16']['bicubic'] >= res['rank1']['7x6']['bicubic']
  assert res['psnr']['16x16']['bicubic'] > res['psnr']['7x6']['bicubic'] > 10
  assert res['num_gallery'] == 12 and res['num_probes'] == {'7x6': 24, '16x16': 24}
  ex = res['examples']['7x6']
  assert ex['lr'].shape == (2, 7, 6, 3) and ex['hr'].shape == (2, 128, 128, 3)
  assert ex['sr'].dtype == np.uint8 and set(ex) == {'lr', 'bicubic', 'sr', 'pixel_only', 'hr'}


def test_run_protocol_lfw_trials_and_hr_at_112x96():
  records, load = _toy_dataset(num_ids=6, per_id=4, noise=30.0)
  seen = []

  def embed(images):
    seen.append(np.asarray(images).copy())
    return _toy_embed([])(images)

  res = protocols.run_protocol('lfw', records, load, embed_fn=embed, trials=3, methods=['hr'],
                               image_quality=False)
  assert res['methods'] == ['hr'] and res['psnr'] == {} and res['ssim'] == {}
  assert res['conditions'] == ['7x6', '14x12', '16x14', '18x16']
  assert len(res['rank1_trials']['7x6']['hr']) == 3
  assert 0.5 < res['rank1']['7x6']['hr'] <= 1.0
  # The 'hr' probes went through 112x96: not identical to any 128x128 original.
  from ipsr_jax.data import degrade  # pylint: disable=import-outside-toplevel
  originals = np.stack([load(r) for r in records])
  hr_probes = degrade.degrade(originals, (112, 96), (128, 128))
  batches = np.concatenate(seen)
  assert any(np.array_equal(b, hr_probes[0]) for b in batches)
  assert res['rank1_std']['7x6']['hr'] >= 0.0


def test_run_protocol_scface_natural_lr(scface_root):
  source = scface_source.SCface(scface_root)
  rng = np.random.default_rng(1)
  faces = {i: _face(rng) for i in range(1, 11)}

  def load(record):  # natural LR: each identity's face at the record's own small size
    h, w = source.load_image(record).shape[:2]
    return np.asarray(Image.fromarray(faces[int(record.identity)]).resize((w, h), Image.BICUBIC))

  res = protocols.run_protocol('scface_p1', source.records, load, embed_fn=_toy_embed([]),
                               sr_fns={'sr': lambda x: x})
  assert res['conditions'] == ['1.0m', '2.6m', '4.2m']
  assert res['methods'] == ['native', 'bicubic', 'sr', 'sr_concat']
  assert res['psnr'] == {} and res['ssim'] == {}
  assert res['num_probes'] == {'1.0m': 40, '2.6m': 45, '4.2m': 45}
  for c in res['conditions']:
    assert res['rank1'][c]['sr_concat'] == res['rank1'][c]['bicubic']
    assert res['examples'][c]['lr'].shape[1:] == (64, 64, 3)
  assert res['rank1']['1.0m']['native'] > 0.5  # 10x12 faces of 4x4 patterns still match
  p2 = protocols.run_protocol('scface_p2', source.records, load, embed_fn=_toy_embed([]),
                              sr_fns={'sr': lambda x: x}, methods=['bicubic', 'sr'])
  assert p2['conditions'] == ['2.6m'] and p2['methods'] == ['bicubic', 'sr']


def test_run_protocol_rejects_bad_arguments():
  records, load = _toy_dataset(num_ids=3, per_id=2)
  with pytest.raises(ValueError, match='unknown protocol'):
    protocols.run_protocol('nope', records, load, embed_fn=_toy_embed([]))
  with pytest.raises(ValueError, match='unknown methods'):
    protocols.run_protocol('generic', records, load, embed_fn=_toy_embed([]), methods=['x'])
  with pytest.raises(ValueError, match='returned'):
    protocols.run_protocol('generic', records, load, embed_fn=_toy_embed([]),
                           sr_fns={'sr': lambda x: x[:, :64]}, resolutions=((8, 8),))
  with pytest.raises(ValueError, match='non-finite'):  # a constant SR face has no direction
    protocols.run_protocol('generic', records, load, embed_fn=_toy_embed([]),
                           sr_fns={'sr': lambda x: np.full_like(x, 7)}, resolutions=((8, 8),))


# ----------------------------------------------------------------------------- on-disk cache


def _same_results(a, b):
  for key in ('rank1', 'rank1_std', 'cmc', 'psnr', 'ssim', 'judge_toy_rank1', 'judge_toy_rank1_trials'):
    assert a.get(key) == b.get(key), key
  for cond, panels in a['examples'].items():
    for k, v in panels.items():
      np.testing.assert_array_equal(v, b['examples'][cond][k])


def test_run_protocol_cache_resumes_and_reuses(tmp_path):
  records, load = _toy_dataset(num_ids=10, per_id=3, noise=20.0)
  sr_calls, emb_calls, judge_calls = [], [], []

  def sr(x):
    sr_calls.append(len(x))
    return np.clip(np.asarray(x, np.float32) * 0.9 + 10, 0, 255)

  def run(embed_calls, judge=None, sr_tag='a', fail_after=None):
    embed = _toy_embed(embed_calls)

    def embed_fn(images):  # a run killed half-way: the embedder dies on call `fail_after`
      if fail_after is not None and len(embed_calls) >= fail_after:
        raise KeyboardInterrupt
      return embed(images)
    return protocols.run_protocol(
        'generic', records, load, embed_fn=embed_fn, sr_fns={'sr': sr}, trials=3, chunk=8,
        resolutions=((7, 6), (16, 16)), judges={'toy': judge} if judge else None, num_examples=2,
        cache_dir=tmp_path, cache_tags={'emb': 'toy', 'judge_toy': 'toyjudge', 'sr': sr_tag})

  reference = protocols.run_protocol(
      'generic', records, load, embed_fn=_toy_embed([]), sr_fns={'sr': sr}, trials=3, chunk=8,
      resolutions=((7, 6), (16, 16)), num_examples=2)
  killed_calls = []
  with pytest.raises(KeyboardInterrupt):
    run(killed_calls, fail_after=5)
  assert len(killed_calls) == 5
  partial = sorted(tmp_path.rglob('*.npz'))
  assert partial and not list(tmp_path.rglob('*.partial*'))
  resumed_calls = []
  resumed = run(resumed_calls)
  full_calls = []
  protocols.run_protocol('generic', records, load, embed_fn=_toy_embed(full_calls),
                         sr_fns={'sr': sr}, trials=3, chunk=8, resolutions=((7, 6), (16, 16)))
  # What the killed run embedded is reused: the resumed run embeds only the rest.
  assert sum(resumed_calls) == sum(full_calls) - sum(killed_calls)
  _same_results(resumed, reference)

  # Everything cached: nothing embedded, no SR run (the figure's faces come from the first chunks).
  again_calls, sr_calls[:] = [], []
  again = run(again_calls)
  assert again_calls == [] and sum(sr_calls) <= 2 * 8
  _same_results(again, resumed)

  # A judge next to the cached embedder: only the judge embeds.
  judged_calls = []
  judged = run(again_calls, judge=_toy_embed(judge_calls))
  assert again_calls == [] and sum(judge_calls) == sum(full_calls)
  assert judged['rank1'] == resumed['rank1'] and judged['judge_toy_rank1'] == judged['rank1']
  assert any(p.parts[-4].startswith('judge_toy-toyjudge') for p in tmp_path.rglob('*.npz'))
  del judged_calls

  # A new generator (another tag): only its SR rows are embedded again.
  new_calls = []
  run(new_calls, sr_tag='b')
  probes = {r.path for seed in range(3) for r in protocols.generic_identity_split(records, seed).all_probes()}
  assert sum(new_calls) == 2 * len(probes)  # two LR sizes x every image that is a probe in a trial

  # A damaged file is recomputed, not trusted.
  victim = sorted(tmp_path.rglob('*.npz'))[0]
  victim.write_bytes(b'not an npz')
  fixed_calls = []
  fixed = run(fixed_calls)
  assert 0 < sum(fixed_calls) <= 8
  assert fixed['rank1'] == resumed['rank1']


def test_embedding_cache_keys():
  cache = protocols.EmbeddingCache('/c', {'emb': 'E1', 'sr': 'G1'})
  a = cache.path('emb', '7x6', 'sr', ['x.png', 'y.png'])
  assert a.startswith('/c/emb-E1/7x6/sr-G1/')
  assert cache.path('emb', '7x6', 'sr', ['y.png', 'x.png']) != a  # another image list
  assert cache.path('emb', '*', 'hr', ['x.png']).startswith('/c/emb-E1/any/hr/')
  assert cache.path('judge_dlib', '7x6', 'bicubic', ['x.png']) is None  # no tag: never cached
  assert cache.path('emb', '7x6', 'pixel_only', ['x.png']) is None
  assert cache.path('emb', '7x6', 'bicubic', ['x.png'], 'lfw') != cache.path('emb', '7x6', 'bicubic', ['x.png'], 'generic')


def test_cache_tells_apart_images_without_paths(tmp_path):
  # Generated sources have no file paths: their records must still key distinct cache entries
  # (equal-sized chunks of path-less records once shared one file), and another seed is another set.
  from ipsr_jax.data import synthetic
  kwargs = dict(embed_fn=_toy_embed([]), trials=2, chunk=8, resolutions=((7, 6),), methods=('hr', 'bicubic'),
                image_quality=False, hr_size=(32, 32))

  def run(seed, cache_dir):
    source = synthetic.SyntheticFaces(8, 4, seed=seed, image_size=32)
    return protocols.run_protocol('generic', source.records, source.load_image, cache_dir=cache_dir,
                                  cache_tags={'emb': 'toy'}, image_key=source.image_key, **kwargs)

  for seed in (0, 1):
    reference = run(seed, None)
    cached = run(seed, tmp_path)
    assert cached['rank1'] == reference['rank1'] and cached['cmc'] == reference['cmc'], seed
  assert run(0, None)['cmc'] != run(1, None)['cmc']  # the two seeds are different face sets


def test_image_keys_name_what_is_loaded(tmp_path):
  from ipsr_jax.data import synthetic
  from ipsr_jax.data.sources import base
  for person in ('a', 'b'):
    _write(str(tmp_path / person / '1.png'))
  plain, resized = folders.IdentityFolders(tmp_path), folders.IdentityFolders(tmp_path, image_size=4)
  assert [plain.image_key(r) for r in plain.records] == [r.path for r in plain.records]
  assert resized.image_key(resized.records[0]) == resized.records[0].path + '@4'  # other pixels
  with pytest.raises(ValueError, match='image_key'):
    base.FaceSource([Record(path='', label=0, identity='x')]).image_key(Record('', 0, 'x'))
  faces = synthetic.SyntheticFaces(2, 2, seed=3, image_size=16)
  keys = {faces.image_key(r) for r in faces.records}
  assert len(keys) == 4 and keys.isdisjoint(
      synthetic.SyntheticFaces(2, 2, seed=4, image_size=16).image_key(r) for r in faces.records)
  records, load = _toy_dataset(num_ids=2, per_id=2)
  with pytest.raises(ValueError, match='distinct'):  # two images under one key
    protocols.run_protocol('generic', records, load, embed_fn=_toy_embed([]), cache_dir=tmp_path / 'c',
                           cache_tags={'emb': 'toy'}, image_key=lambda r: r.identity)


# ----------------------------------------------------------------------------- the runner's steps


def _plan(**overrides):
  kwargs = dict(name='generic', natural=False, conditions=('7x6',), lr_sizes={'7x6': (7, 6)},
                probe_group={'7x6': protocols.ALL}, methods=('hr', 'bicubic', 'sr', 'sr_concat'),
                sr_names=('sr',), hr_size=(128, 128), hr_probe_size=None, natural_lr_size=(64, 64))
  return protocol_steps.Plan(**{**kwargs, **overrides})


def test_step_population_keeps_each_trial_split_apart():
  records, _ = _toy_dataset(num_ids=5, per_id=3)
  splits = [protocols.generic_identity_split(records, seed) for seed in (0, 1, 2)]
  population = protocol_steps.Population(records, splits)
  galleries, probes = set(), set()
  for split in splits:
    g, p = set(population.indices(split.gallery)), set(population.indices(split.all_probes()))
    assert len(g) == 5 and len(p) == 10 and not g & p  # one gallery image per person, disjoint
    assert {records[i].identity for i in g} == {records[i].identity for i in p}
    galleries |= g
    probes |= p
  assert population.gallery == sorted(galleries) and population.probes == sorted(probes)
  assert population.todo == list(range(15))  # the trials' gallery picks differ: every image is in one
  assert set(population.group_of.values()) == {protocols.ALL}
  with pytest.raises(ValueError, match='not in `records`'):  # an equal record, not the same one
    population.indices([Record(records[0].path, records[0].label, records[0].identity)])


def test_step_degrade_and_super_resolve():
  rng = np.random.default_rng(0)
  hr = np.stack([_face(rng) for _ in range(3)])
  chains = protocol_steps.degrade_probes(_plan(conditions=('7x6', '16x16'), lr_sizes={'7x6': (7, 6), '16x16': (16, 16)}),
                                protocol_steps.Lazy(lambda: hr), protocol_steps.Lazy(lambda: pytest.fail('synthetic LR reads no raw face')))
  assert list(chains) == ['7x6', '16x16']
  lr, bicubic = chains['7x6']
  np.testing.assert_array_equal(lr(), degrade.bicubic_resize(hr, (7, 6)))
  np.testing.assert_array_equal(bicubic(), degrade.degrade(hr, (7, 6), (128, 128)))
  assert chains['16x16'][1]().shape == (3, 128, 128, 3) and bicubic().dtype == np.uint8
  # Natural LR: the face as captured, to 64x64, then 128x128; one chain for every distance.
  raw = [_face(rng, 20), _face(rng, 30)]
  natural = protocol_steps.degrade_probes(_plan(natural=True), protocol_steps.Lazy(lambda: pytest.fail('no HR')), protocol_steps.Lazy(lambda: raw))
  (key, (lr, bicubic)), = natural.items()
  assert key == protocol_steps.ANY and lr().shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(bicubic(), degrade.bicubic_resize(lr(), (128, 128)))
  # LFW's 'hr' probe goes through 112x96; elsewhere it is the HR face itself.
  np.testing.assert_array_equal(protocol_steps.hr_probe(_plan(hr_probe_size=(112, 96)), protocol_steps.Lazy(lambda: hr))(),
                                degrade.degrade(hr, (112, 96), (128, 128)))
  assert protocol_steps.hr_probe(_plan(), protocol_steps.Lazy(lambda: hr))() is hr
  # Super-resolution: lazy, in slices of at most `chunk`, shape-checked.
  calls = []
  sr = protocol_steps.super_resolve(lambda x: calls.append(len(x)) or 255 - x, 'sr', protocol_steps.Lazy(lambda: hr), chunk=2)
  assert calls == []
  np.testing.assert_array_equal(sr(), 255 - hr)
  assert calls == [2, 1] and sr() is sr()  # computed once
  with pytest.raises(ValueError, match=r"sr_fns\['bad'\] returned"):
    protocol_steps.super_resolve(lambda x: x[:, ::2], 'bad', protocol_steps.Lazy(lambda: hr), chunk=2)()


def test_step_embeddings_through_the_cache(tmp_path):
  records, load = _toy_dataset(num_ids=4, per_id=2)
  splits = [protocols.generic_identity_split(records, 0)]
  population = protocol_steps.Population(records, splits)
  idx = population.probes
  faces = protocol_steps.Lazy(lambda: np.stack([load(records[i]) for i in idx]))
  calls = []

  def embeddings(embed):
    cache = embedding_cache.RecordCache.open(tmp_path, {'emb': 'toy', 'sr': 'g1'}, records, None, extra='x')
    return protocol_steps.Embeddings({'emb': embed}, population, cache, chunk=3), cache

  first, cache = embeddings(_toy_embed(calls))
  first.compute(idx, faces, '7x6', 'sr')
  first.compute(idx, faces, '7x6', 'bicubic')
  want = _toy_embed([])(faces())
  assert calls == [3, 1] * 2 and first.embedded == 8 and first.progress_note() == '8 faces embedded'
  np.testing.assert_allclose(first.probe('emb', '7x6', 'sr', idx), want, rtol=1e-6)
  # The file is where EmbeddingCache keys it, named by the records' paths.
  path = protocols.EmbeddingCache(tmp_path, {'emb': 'toy', 'sr': 'g1'}).path(
      'emb', '7x6', 'sr', [records[i].path for i in idx], 'x')
  assert cache.path('emb', '7x6', 'sr', idx) == path and os.path.exists(path)
  # A second run reads both back and embeds nothing; 'sr_concat' joins them without a file.
  second, _ = embeddings(lambda x: pytest.fail('everything is cached'))
  second.compute(idx, protocol_steps.Lazy(lambda: pytest.fail('a cached chunk decodes nothing')), '7x6', 'sr')
  second.compute(idx, faces, '7x6', 'bicubic')
  assert second.embedded == 0 and second.progress_note() == '0 faces embedded, 2 chunks from the cache'
  np.testing.assert_array_equal(second.probe('emb', '7x6', 'sr', idx), first.probe('emb', '7x6', 'sr', idx))
  concat = second.probe('emb', '7x6', 'sr_concat', idx)
  np.testing.assert_allclose(concat, np.concatenate([want, want], axis=1) / np.sqrt(2), rtol=1e-6)


def _brute_force_ranks(probe_emb, probe_labels, gallery_emb, gallery_labels):
  """Per probe: other identities whose best cosine >= the true identity's best (ties pessimistic)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = unit(probe_emb) @ unit(gallery_emb).T
  ranks = []
  for p, label in enumerate(probe_labels):
    best = {g: sim[p, gallery_labels == g].max() for g in np.unique(gallery_labels)}
    ranks.append(sum(score >= best[label] for g, score in best.items() if g != label))
  return np.array(ranks)


def test_step_ranker_against_brute_force():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(7, 16))
  g_labels = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6])  # identities straddle 3-image blocks
  gallery = centres[g_labels] + 0.8 * rng.normal(size=(len(g_labels), 16))
  p_labels = rng.integers(0, 7, 29)
  probes = centres[p_labels] + 1.2 * rng.normal(size=(29, 16))
  ranker = protocol_steps.GalleryRanker(gallery, g_labels, max_rank=5, gallery_block=3, probe_block=4)
  ranks = _brute_force_ranks(probes, p_labels, gallery, g_labels)
  assert 0 < (ranks == 0).mean() < 1  # neither trivial nor hopeless
  curve = ranker.cmc(probes, p_labels)
  assert ranker.k == 5 and curve.shape == (5,)
  np.testing.assert_allclose(curve, [(ranks < k).mean() for k in range(1, 6)])
  assert curve[0] == (ranks == 0).mean()  # rank-1
  # 'concat': the mean of the bicubic and the SR probe's cosines against the HR gallery.
  other = probes + rng.normal(size=probes.shape)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  mean_sim = (unit(probes) @ unit(gallery).T + unit(other) @ unit(gallery).T) / 2
  want = [sum(mean_sim[p, g_labels == g].max() >= mean_sim[p, g_labels == l].max() for g in set(g_labels) - {l})
          for p, l in enumerate(p_labels)]
  concat = ranker.cmc(protocol_steps.concat_embeddings(probes, other), p_labels, concat=True)
  np.testing.assert_allclose(concat, [(np.array(want) < k).mean() for k in range(1, 6)])


def test_step_summarise_averages_the_trials():
  plan = _plan(conditions=('7x6', '16x16'), methods=('hr', 'sr'))
  scores = protocol_steps.TrialScores(
      rank1={'emb': {'7x6': {'hr': [1.0, 0.5], 'sr': [0.25, 0.75]}}},  # 16x16: no probes in any trial
      cmc={'emb': {'7x6': {'hr': [np.array([1.0, 1.0]), np.array([0.5, 1.0])],
                           'sr': [np.array([0.25, 0.5]), np.array([0.75, 1.0])]}}},
      num_probes={'7x6': 4})
  records, _ = _toy_dataset(num_ids=3, per_id=2)
  splits = [protocols.generic_identity_split(records, s) for s in (0, 1)]
  examples = protocol_steps.ExampleFaces(protocol_steps.Population(records, splits), 0, natural=False)
  res = protocol_steps.summarise(plan, [0, 1], splits, scores, None, examples)
  assert res['conditions'] == ['7x6'] and res['methods'] == ['hr', 'sr'] and res['trials'] == [0, 1]
  assert res['rank1'] == {'7x6': {'hr': 0.75, 'sr': 0.5}}
  assert res['rank1_std'] == {'7x6': {'hr': 0.25, 'sr': 0.25}}  # ddof=0
  assert res['rank1_trials'] == {'7x6': {'hr': [1.0, 0.5], 'sr': [0.25, 0.75]}}
  assert res['cmc'] == {'7x6': {'hr': [0.75, 1.0], 'sr': [0.5, 0.75]}}
  assert res['psnr'] == res['ssim'] == {} and res['examples'] == {} and 'judges' not in res
  assert res['num_gallery'] == res['num_identities'] == 3 and res['num_probes'] == {'7x6': 4}


def test_evaluation_never_imports_the_loss():
  # Scoring must not depend on training code: inference and evaluation reach pixel ranges
  # through ipsr_jax/ops/pixels.py, never through ipsr_jax.training.losses.
  package = Path(protocols.__file__).resolve().parents[1]
  files = [package / 'serving' / 'inference.py', *sorted((package / 'evaluation').rglob('*.py'))]
  assert len(files) > 8
  for path in files:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, f'{path.name}: relative import'  # absolute only, so this check sees all
        imported |= {f'{node.module}.{a.name}' for a in node.names} | {node.module}
    assert not {m for m in imported if m == 'ipsr_jax.training.losses' or m.startswith('ipsr_jax.training.losses.')}, path.name


def test_evaluator_grey_entry_scores_grey_faces_under_their_own_keys(tmp_path):
  """`config.evals.<name>.grey`: every face the scorers see is grey, and cached apart from colour."""
  from configs import base  # pylint: disable=import-outside-toplevel
  from ipsr_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  for i in range(6):
    for j in range(2):
      os.makedirs(tmp_path / 'faces' / 'test' / f'id{i}', exist_ok=True)
      Image.fromarray(_face(rng, size=48)).save(tmp_path / 'faces' / 'test' / f'id{i}' / f'{j}.png')

  class Recording:
    info, fingerprint = {'source': 'toy'}, 'toy'

    def __init__(self):
      self.seen = []

    def __call__(self, images):
      self.seen.append(np.asarray(images, np.float32))
      return _toy_embed([])(images)

  config = base.get_config('tiny')
  config.data.update(source='identity_folder', root=str(tmp_path / 'faces'))
  seen = {}
  for grey in (False, True):
    config.evals = {'dev': dict(type='identification', protocol='generic', split='test', trials=1,
                                resolutions=((16, 16),), grey=grey)}
    embedder = Recording()
    # One report folder, so one embedding cache (out/cache) for both.
    result = evaluator.score_runs(config, {'sr': lambda x: np.asarray(x, np.float32)}, str(tmp_path / 'out'),
                                  embedders={config.embedder.checkpoint: embedder}, show=None)['dev']
    seen[grey] = np.concatenate(embedder.seen)
    assert result['rank1']['16x16']['hr'] > 0
  assert len(seen[True]) == len(seen[False])  # the colour rows in the shared cache were not reused
  assert np.abs(seen[False][..., 0] - seen[False][..., 1]).max() > 10
  np.testing.assert_array_equal(seen[True][..., 0], seen[True][..., 1])
  np.testing.assert_array_equal(seen[True][..., 1], seen[True][..., 2])
