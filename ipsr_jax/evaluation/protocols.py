"""The paper's identification protocols (AR, LFW, SCface P1/P2) as record splits + one runner.

Splits are pure functions of a source's `records` (and a seed): nothing is decoded, so they are
cheap to test and reproducible. `run_protocol` takes CALLABLES, not models: `embed_fn` (uint8 or
float [N, H, W, 3] in 0..255 -> [N, D] unit vectors), `sr_fns` ({'sr': fn, ...}: uint8 bicubic
[N, 128, 128, 3] -> [N, 128, 128, 3] in 0..255) and an optional independent `judge_fn`.

For each probe condition (a synthetic LR size, or an SCface distance) and method it reports
rank-1 (mean and std over trials), the CMC and, where an HR reference exists, PSNR/SSIM:
  hr         the HR probe (upper bound); LFW's is the face at 112x96, as in the paper
  native     (SCface) the natural probe resized straight to 128x128
  bicubic    LR probe bicubic-upsampled to 128x128 (synthetic: `degrade(hr, lr, 128x128)`;
             SCface: resize to 64x64, then 128x128, as the paper does)
  <name>     sr_fns[name](bicubic)
  <name>_concat  [unit(E(bicubic)), unit(E(sr))] / sqrt(2): the paper's SCface 'concat',
             against the gallery's [E(hr), E(hr)] / sqrt(2), so its cosine is the mean of the
             bicubic and the SR probe's cosines
The gallery is always embedded at HR (128x128).

Embeddings depend only on the image, not the split, so each image is embedded once per
condition and method and the seeded trials (LFW's 10) only re-index them. With `cache_dir` they
are also kept on disk (`EmbeddingCache`), one file per chunk of images, condition, method, model
and scorer, so a killed evaluation resumes where it stopped and a second scorer (the judge) or a
new generator reuses everything that did not change.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ipsr_jax import console
from ipsr_jax.data import degrade as degrade_lib
from ipsr_jax.data.sources import ar as ar_lib
from ipsr_jax.data.sources.base import Record
from ipsr_jax.evaluation import metrics
from ipsr_jax.evaluation import similarity

Size = tuple[int, int]
EmbedFn = Callable[[np.ndarray], np.ndarray]
SRFn = Callable[[np.ndarray], np.ndarray]

HR_SIZE: Size = (128, 128)  # the generator's input and output size (the paper's)
SCFACE_LR_SIZE: Size = (64, 64)  # the paper resizes SCface faces to 64x64, then 128x128
# SCface's distance codes: 1 far (4.2 m), 2 medium (2.6 m), 3 close (1.0 m). The paper's text
# and Table 3 say 4.7 m for the far one; the database's own documentation says 4.20 m.
SCFACE_DISTANCES = {1: '4.2m', 2: '2.6m', 3: '1.0m'}
SCFACE_VISIBLE_CAMERAS = (1, 2, 3, 4, 5)  # cam6/cam7 are the infrared ones
ALL = 'all'  # the probe group of protocols that do not group probes


@dataclasses.dataclass(frozen=True)
class Split:
  """One trial: HR gallery images, probe images grouped (SCface: by distance; else 'all')."""
  gallery: tuple[Record, ...]
  probes: Mapping[str, tuple[Record, ...]]

  def all_probes(self) -> tuple[Record, ...]:
    return tuple(r for group in self.probes.values() for r in group)


def res_key(hw: Sequence[int]) -> str:
  return f'{int(hw[0])}x{int(hw[1])}'


# ----------------------------------------------------------------------------- splits


def _by_identity(records: Iterable[Record]) -> dict[str, list[Record]]:
  groups = collections.defaultdict(list)
  for r in records:
    groups[r.identity].append(r)
  # Identities by name, images by path: independent of the order the source listed them in.
  return {k: sorted(groups[k], key=lambda r: r.path) for k in sorted(groups)}


def generic_identity_split(records: Sequence[Record], seed: int, min_images: int = 2) -> Split:
  """Identities with >= min_images images: one random gallery image each, the rest probes."""
  if min_images < 2:
    raise ValueError(f'min_images must be >= 2 (one gallery image + a probe), got {min_images}')
  rng = np.random.default_rng(seed)
  gallery, probes = [], []
  for images in _by_identity(records).values():
    if len(images) < min_images:
      continue
    pick = int(rng.integers(len(images)))
    gallery.append(images[pick])
    probes.extend(images[:pick] + images[pick + 1:])
  if not gallery:
    raise ValueError(f'no identity has >= {min_images} images among {len(records)} records')
  return Split(tuple(gallery), {ALL: tuple(probes)})


def lfw_split(records: Sequence[Record], seed: int, min_images: int = 4) -> Split:
  """The paper's LFW protocol (after [14]): identities with >= 4 images, one random gallery
  image each, the rest probes; the paper averages 10 trials (seeds 0..9)."""
  return generic_identity_split(records, seed, min_images)


def _first_shot(images: Sequence[Record], session: int) -> Record:
  return min((r for r in images if int(r.meta['session']) == session),
             key=lambda r: int(r.meta['shot']))


def ar_split(records: Sequence[Record], per_sex: int = 50) -> Split:
  """AR (after [26]): 50 men + 50 women (the first by name with both sessions); gallery the
  first shot of session 2 (day 14, YY=14), probe the first shot of session 1 (day 1, YY=01)."""
  subjects = set(ar_lib.paper_subjects(records, per_sex))
  gallery, probes = [], []
  for identity, images in _by_identity(records).items():
    if identity not in subjects:
      continue
    gallery.append(_first_shot(images, session=2))
    probes.append(_first_shot(images, session=1))
  return Split(tuple(gallery), {ALL: tuple(probes)})


def _by_identity_path(r: Record) -> tuple[str, str]:
  return r.identity, r.path


def scface_p1(records: Sequence[Record], cameras: Sequence[int] = SCFACE_VISIBLE_CAMERAS) -> Split:
  """SCface protocol 1: frontal mugshots as gallery; visible-camera images as probes, grouped by
  distance ('1.0m', '2.6m', '4.2m'). Only identities with a mugshot take part."""
  mugshots = [r for r in records if r.meta['kind'] == 'mugshot']
  gallery_ids = {r.identity for r in mugshots}
  groups = {name: [] for name in _scface_group_order()}
  for r in records:
    if (r.meta['kind'] == 'surveillance' and int(r.meta['camera']) in cameras
        and r.identity in gallery_ids):
      groups[SCFACE_DISTANCES[int(r.meta['distance'])]].append(r)
  if not mugshots or not any(groups.values()):
    raise ValueError('SCface protocol 1 needs mugshots and surveillance images of the same people')
  return Split(tuple(sorted(mugshots, key=_by_identity_path)),
               {k: tuple(sorted(v, key=_by_identity_path)) for k, v in groups.items() if v})


def scface_p2(records: Sequence[Record], cameras: Sequence[int] = SCFACE_VISIBLE_CAMERAS) -> Split:
  """SCface protocol 2: close (1.0 m, distance 3) images as gallery, medium (2.6 m, distance 2)
  images as probes, visible cameras only; an identity keeps all its gallery images."""
  surveillance = [r for r in records if r.meta['kind'] == 'surveillance'
                  and int(r.meta['camera']) in cameras]
  gallery = sorted((r for r in surveillance if int(r.meta['distance']) == 3), key=_by_identity_path)
  gallery_ids = {r.identity for r in gallery}
  probes = sorted((r for r in surveillance if int(r.meta['distance']) == 2
                   and r.identity in gallery_ids), key=_by_identity_path)
  if not gallery or not probes:
    raise ValueError('SCface protocol 2 needs 1.0 m and 2.6 m images of the same people')
  return Split(tuple(gallery), {SCFACE_DISTANCES[2]: tuple(probes)})


def _scface_group_order() -> tuple[str, ...]:
  return tuple(SCFACE_DISTANCES[d] for d in (3, 2, 1))  # the paper's column order: 1m, 2.6m, 4.7m


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  split: Callable[..., Split]          # split(records, seed, **kwargs)
  resolutions: tuple[Size, ...]        # synthetic probe LR sizes; () for natural LR protocols
  seeded: bool                         # False: one deterministic split, trials ignored
  default_trials: int = 1
  hr_probe_size: Size | None = None    # LFW: the 'hr' probe is the face at 112x96
  groups: tuple[str, ...] = (ALL,)     # natural protocols: the probe groups, in table order

  @property
  def natural(self) -> bool:
    return not self.resolutions


PROTOCOLS: dict[str, Protocol] = {
    'ar': Protocol('ar', lambda records, seed, **kw: ar_split(records, **kw),
                   ((11, 8), (16, 12), (16, 16), (21, 15), (32, 32)), seeded=False),
    'lfw': Protocol('lfw', lfw_split, ((7, 6), (14, 12), (16, 14), (18, 16)), seeded=True,
                    default_trials=10, hr_probe_size=(112, 96)),
    'generic': Protocol('generic', generic_identity_split,
                        ((7, 6), (14, 12), (16, 14), (18, 16), (32, 32)), seeded=True,
                        default_trials=1),
    'scface_p1': Protocol('scface_p1', lambda records, seed, **kw: scface_p1(records, **kw), (),
                          seeded=False, groups=_scface_group_order()),
    'scface_p2': Protocol('scface_p2', lambda records, seed, **kw: scface_p2(records, **kw), (),
                          seeded=False, groups=(SCFACE_DISTANCES[2],)),
}


def get_protocol(name: str) -> Protocol:
  if name not in PROTOCOLS:
    raise ValueError(f'unknown protocol {name!r}; known: {sorted(PROTOCOLS)}')
  return PROTOCOLS[name]


# ----------------------------------------------------------------------------- runner helpers


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype != np.uint8:
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image


def _resize_each(images: Sequence[np.ndarray], hw: Size) -> np.ndarray:
  """Images of any sizes -> uint8 [N, h, w, 3] (PIL-exact bicubic; no-op when already hw)."""
  return np.stack([im if im.shape[:2] == tuple(hw) else degrade_lib.bicubic_resize(im, hw)
                   for im in images])


def _as_uint8(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round(images.astype(np.float32)), 0, 255).astype(np.uint8)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _concat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return _unit(np.concatenate([_unit(a), _unit(b)], axis=-1))


def _batched(fn: Callable[[np.ndarray], Any], images: np.ndarray, batch: int) -> np.ndarray:
  """Calls fn on fixed-size slices so no callable ever sees more than `batch` images."""
  return np.concatenate([np.asarray(fn(images[i:i + batch]))
                         for i in range(0, len(images), batch)])


class _Store:
  """Per-image embeddings keyed by (condition, method), rows indexed by record index."""

  def __init__(self, indices: np.ndarray):
    self.indices = np.asarray(indices)
    self.rows = {int(i): n for n, i in enumerate(self.indices)}
    self.data: dict[tuple[str, str], np.ndarray] = {}

  def put(self, key: tuple[str, str], idx: Sequence[int], values: np.ndarray) -> None:
    if key not in self.data:
      self.data[key] = np.zeros((len(self.indices), values.shape[1]), np.float32)
    self.data[key][[self.rows[int(i)] for i in idx]] = values

  def get(self, key: tuple[str, str], idx: Sequence[int]) -> np.ndarray:
    return self.data[key][[self.rows[int(i)] for i in idx]]


class EmbeddingCache:
  """Per-chunk results on disk: `<root>/<scorer>/<condition>/<method>/<images>.npz`.

  Each key part is a fingerprint of what decides the values: the scorer's weights and input size,
  the generator's weights (for SR methods; bicubic and HR need none), the image list (each
  image's `FaceSource.image_key`), and `extra` (the protocol and the HR sizes). `tags` maps a
  scorer ('emb', 'judge') or an SR method name to its fingerprint; a scorer or method without one
  is never cached. Files are written whole (rename), so a killed run leaves none half-written.
  """

  def __init__(self, root: str | os.PathLike, tags: Mapping[str, str]):
    self.root = os.fspath(root)
    self.tags = dict(tags)
    self.hits = self.misses = 0

  def path(self, scorer: str, cond: str, method: str, names: Sequence[str], extra: str = '') -> str | None:
    if scorer not in self.tags:
      return None
    if method not in ('hr', 'native', 'bicubic'):
      if method not in self.tags:
        return None
      method = f'{method}-{self.tags[method]}'
    digest = hashlib.sha256('\n'.join([extra, *names]).encode()).hexdigest()[:20]
    return os.path.join(self.root, f'{scorer}-{self.tags[scorer]}', cond.replace('*', 'any'), method,
                        f'{digest}.npz')

  def load(self, path: str | None) -> dict[str, np.ndarray] | None:
    if path is None or not os.path.exists(path):
      self.misses += path is not None
      return None
    try:
      with np.load(path) as f:
        out = {k: f[k] for k in f.files}
    except Exception as e:  # pylint: disable=broad-except  (a damaged file is recomputed)
      logging.warning('embedding cache: ignoring unreadable %s (%s)', path, e)
      self.misses += 1
      return None
    self.hits += 1
    return out

  @staticmethod
  def save(path: str | None, **arrays: np.ndarray) -> None:
    if path is None:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f'{path}.partial.npz'
    np.savez(partial, **arrays)
    os.replace(partial, path)


class _Lazy:
  """A value computed on first use (SR images are only made when something needs them)."""

  def __init__(self, fn: Callable[[], np.ndarray]):
    self._fn, self._value = fn, None

  def __call__(self) -> np.ndarray:
    if self._value is None:
      self._value = self._fn()
    return self._value


# ----------------------------------------------------------------------------- runner


def run_protocol(name: str, records: Sequence[Record], load_image: Callable[[Record], np.ndarray],
                 *, embed_fn: EmbedFn, sr_fns: Mapping[str, SRFn] | None = None,
                 methods: Sequence[str] | None = None,
                 resolutions: Sequence[Size] | None = None,
                 trials: int | Sequence[int] | None = None,
                 judge_fn: EmbedFn | None = None, chunk: int = 256, max_rank: int = 100,
                 split_kwargs: Mapping[str, Any] | None = None, num_examples: int = 4,
                 gallery_block: int = 4096, probe_block: int = 1024,
                 image_quality: bool = True, hr_size: Size = HR_SIZE,
                 cache_dir: str | os.PathLike | None = None,
                 cache_tags: Mapping[str, str] | None = None,
                 image_key: Callable[[Record], str] | None = None,
                 label: str | None = None) -> dict[str, Any]:
  """Runs protocol `name` on a source's records; returns the results dict `report` writes.

  methods: subset of ('hr', 'bicubic', 'sr', 'concat') ('hr' means 'native' for SCface; 'sr'
  and 'concat' expand to every sr_fns entry); default all. resolutions: override the
  protocol's synthetic LR sizes (ignored by natural-LR protocols). trials: number of seeds
  (0..n-1) or the seeds themselves, for seeded protocols; default the protocol's (LFW 10).
  judge_fn: an independent embedder (uint8 images); adds 'judge_rank1', 'judge_rank1_std',
  'judge_rank1_trials' and 'judge_cmc'.
  image_quality: PSNR/SSIM of bicubic and SR vs HR (synthetic LR only; costs host time).
  hr_size: the size gallery and bicubic probes are brought to, the SR model's input size.
  label: what the progress lines call this evaluation (default the protocol's name).
  cache_dir, cache_tags: keep embeddings (and PSNR/SSIM) on disk, see `EmbeddingCache`; tags map
  'emb', 'judge' and sr_fns names to fingerprints (e.g. `inference.BatchedModel.fingerprint`).
  image_key: names each record's image in the cache (`FaceSource.image_key`); default its path.

  Returns {'protocol', 'conditions', 'methods', 'trials', 'rank1', 'rank1_std', 'rank1_trials',
  'cmc', 'psnr', 'ssim', 'num_gallery', 'num_identities', 'num_probes', 'examples', and with a
  judge 'judge_rank1', 'judge_rank1_std', 'judge_cmc'}; rank1 etc. map condition -> method ->
  value (fractions in [0, 1]; std over trials, ddof=0); examples hold uint8 images for figures.
  """
  spec = get_protocol(name)
  sr_fns = dict(sr_fns or {})
  wanted = set(methods or ('hr', 'bicubic', 'sr', 'concat'))
  unknown = wanted - {'hr', 'bicubic', 'sr', 'concat'}
  if unknown:
    raise ValueError(f'unknown methods {sorted(unknown)}; use hr, bicubic, sr, concat')
  first = 'native' if spec.natural else 'hr'
  method_names = ([first] if 'hr' in wanted else []) + (['bicubic'] if 'bicubic' in wanted else [])
  method_names += [k for k in sr_fns if 'sr' in wanted]
  method_names += [f'{k}_concat' for k in sr_fns if 'concat' in wanted]
  if not method_names:
    raise ValueError('no method to evaluate (concat/sr need sr_fns)')

  if spec.seeded:
    n = spec.default_trials if trials is None else trials
    seeds = list(range(n)) if isinstance(n, int) else [int(s) for s in n]
  else:
    seeds = [0]
  if not seeds:
    raise ValueError('no trials to run')
  splits = [spec.split(records, seed, **dict(split_kwargs or {})) for seed in seeds]

  if spec.natural:
    conditions = [g for g in spec.groups if any(g in s.probes for s in splits)]
    lr_sizes = {}
  else:
    sizes = tuple(tuple(int(v) for v in hw) for hw in (resolutions or spec.resolutions))
    conditions = [res_key(hw) for hw in sizes]
    lr_sizes = {res_key(hw): hw for hw in sizes}

  position = {id(r): i for i, r in enumerate(records)}

  def indices(rs: Iterable[Record]) -> list[int]:
    try:
      return [position[id(r)] for r in rs]
    except KeyError as e:
      raise ValueError('a split returned a record that is not in `records`') from e

  gallery_set = sorted({i for s in splits for i in indices(s.gallery)})
  group_of: dict[int, str] = {}
  for s in splits:
    for group, rs in s.probes.items():
      for i in indices(rs):
        group_of[i] = group
  probe_set = sorted(group_of)
  need_sr = [k for k in sr_fns if any(m in method_names for m in (k, f'{k}_concat'))]
  embedders = {'emb': embed_fn} | ({'judge': judge_fn} if judge_fn is not None else {})

  stores = {e: (_Store(gallery_set), _Store(probe_set)) for e in embedders}
  quality = collections.defaultdict(lambda: collections.defaultdict(list))  # cond -> method -> [..]
  examples: dict[str, dict[str, list[np.ndarray]]] = {}
  embedded = [0]  # faces embedded so far (every condition, method and embedder)

  cache = (EmbeddingCache(cache_dir, {'quality': 'psnr-ssim-v1', **dict(cache_tags or {})})
           if cache_dir is not None else None)
  # What changes every image of a condition: the protocol (LFW's HR probe is 112x96) and sizes.
  cache_extra = f'{name}|hr_size={tuple(hr_size)}|hr_probe={spec.hr_probe_size}'

  keys: list[str] = []
  if cache is not None:
    keys = [(image_key or (lambda r: r.path))(r) for r in records]
    if not all(keys) or len(set(keys)) != len(keys):  # two images under one key would share results
      raise ValueError('cache_dir needs a distinct non-empty key per record (paths, or image_key)')

  def cache_path(scorer: str, cond: str, method: str, idx: Sequence[int]) -> str | None:
    if cache is None:
      return None
    return cache.path(scorer, cond, method, [keys[i] for i in idx], cache_extra)

  def embed_all(idx: list[int], images: _Lazy, cond: str, method: str,
                gallery: bool = False) -> None:
    for e, fn in embedders.items():
      path = cache_path(e, cond, method, idx)
      hit = cache.load(path) if cache is not None else None
      if hit is not None and hit['emb'].shape[0] == len(idx):
        vecs = hit['emb']
      else:
        imgs = images() if e == 'emb' else _as_uint8(images())  # dlib-like judges take uint8 only
        vecs = _batched(fn, imgs, chunk)
        if vecs.ndim != 2 or len(vecs) != len(idx) or not np.isfinite(vecs).all():
          raise ValueError(f'{"judge_fn" if e == "judge" else "embed_fn"} returned '
                           f'{vecs.shape} {"non-finite " if vecs.ndim == 2 else ""}embeddings for '
                           f'{len(idx)} {method} images ({cond})')
        EmbeddingCache.save(path, emb=np.asarray(vecs, np.float32))
        embedded[0] += len(idx)
      stores[e][0 if gallery else 1].put((cond, method), idx, vecs)

  def measure_quality(idx: list[int], images: _Lazy, hr: _Lazy, cond: str, method: str) -> None:
    path = cache_path('quality', cond, method, idx)
    hit = cache.load(path) if cache is not None else None
    if hit is None:
      hit = {'psnr': metrics.psnr(images(), hr()), 'ssim': metrics.ssim(images(), hr())}
      EmbeddingCache.save(path, **hit)
    quality[cond][method].append((hit['psnr'], hit['ssim']))

  shown: dict[str, set[str]] = collections.defaultdict(set)  # cond -> identities in the figure

  def wants_examples(conds: Sequence[str]) -> bool:
    return any(len(examples.get(c, {}).get('lr', [])) < num_examples for c in conds)

  def keep_examples(cond: str, idx: list[int], panels: Mapping[str, np.ndarray]) -> None:
    ex = examples.setdefault(cond, {})
    take, room = [], num_examples - len(ex.get('lr', []))
    for n, i in enumerate(idx):  # one face per person, so the figure shows several people
      if len(take) < room and (not spec.natural or group_of[i] == cond) \
          and records[i].identity not in shown[cond]:
        shown[cond].add(records[i].identity)
        take.append(n)
    for k, v in panels.items():
      ex.setdefault(k, []).extend(_as_uint8(v[take]))

  def sr_of(k: str, bicubic: _Lazy) -> _Lazy:
    def run():
      sr = _batched(sr_fns[k], bicubic(), chunk)
      if sr.shape != bicubic().shape:
        raise ValueError(f'sr_fns[{k!r}] returned {sr.shape} for input {bicubic().shape}')
      return sr
    return _Lazy(run)

  todo = sorted(set(gallery_set) | set(probe_set))
  gallery_lookup, probe_lookup = set(gallery_set), set(probe_set)
  progress = console.Progress(len(todo), f'{label or name}: evaluating', unit='image')

  def progress_note() -> str:
    cached = f', {cache.hits} chunks from the cache' if cache is not None and cache.hits else ''
    return f'{embedded[0]} faces embedded{cached}'

  for start in range(0, len(todo), chunk):
    if start:
      progress.update(start, progress_note())
    idx = todo[start:start + chunk]
    # Decoding and resizing are lazy too: a chunk whose results are all cached reads nothing.
    raw = _Lazy(lambda idx=idx: [_rgb_uint8(load_image(records[i])) for i in idx])
    hr = _Lazy(lambda raw=raw: _resize_each(raw(), hr_size))
    g_pos = [n for n, i in enumerate(idx) if i in gallery_lookup]
    if g_pos:
      embed_all([idx[n] for n in g_pos], _Lazy(lambda g_pos=g_pos, hr=hr: hr()[g_pos]), 'hr', 'hr',
                gallery=True)
    p_pos = [n for n, i in enumerate(idx) if i in probe_lookup]
    if not p_pos:
      continue
    p_idx = [idx[n] for n in p_pos]
    p_hr = _Lazy(lambda p_pos=p_pos, hr=hr: hr()[p_pos])
    # chains: condition -> (lr, bicubic 128x128); SCface: one chain ('*') for every distance.
    if spec.natural:
      lr = _Lazy(lambda p_pos=p_pos, raw=raw: _resize_each([raw()[n] for n in p_pos], SCFACE_LR_SIZE))
      chains = {'*': (lr, _Lazy(lambda lr=lr: degrade_lib.bicubic_resize(lr(), hr_size)))}
      if 'native' in method_names:
        embed_all(p_idx, p_hr, '*', 'native')
    else:
      chains = {c: (_Lazy(lambda c=c, p_hr=p_hr: degrade_lib.bicubic_resize(p_hr(), lr_sizes[c])),
                    _Lazy(lambda c=c, p_hr=p_hr: degrade_lib.degrade(p_hr(), lr_sizes[c], hr_size)))
                for c in conditions}
      if 'hr' in method_names:
        hr_probe = (_Lazy(lambda p_hr=p_hr: degrade_lib.degrade(p_hr(), spec.hr_probe_size, hr_size))
                    if spec.hr_probe_size else p_hr)
        embed_all(p_idx, hr_probe, '*', 'hr')
    for c, (lr, bicubic) in chains.items():
      made = {'bicubic': bicubic, **{k: sr_of(k, bicubic) for k in need_sr}}
      if 'bicubic' in method_names or any(m.endswith('_concat') for m in method_names):
        embed_all(p_idx, bicubic, c, 'bicubic')
      for k in need_sr:
        embed_all(p_idx, made[k], c, k)
      if image_quality and not spec.natural:  # natural LR has no HR to compare with
        for k, images in made.items():
          measure_quality(p_idx, images, p_hr, c, k)
      targets = conditions if spec.natural else [c]
      if wants_examples(targets):
        panels = {'lr': lr(), **{k: v() for k, v in made.items()}, ('native' if spec.natural else 'hr'): p_hr()}
        for cond in targets:
          keep_examples(cond, p_idx, panels)
  progress.update(len(todo), progress_note())
  progress.close()
  if cache is not None:
    logging.info('%s: %d cached chunks reused, %d computed (%s)', name, cache.hits, cache.misses, cache.root)

  def probe_emb(e: str, cond: str, method: str, idx: list[int]) -> np.ndarray:
    store = stores[e][1]
    c = '*' if (spec.natural or method == 'hr') else cond
    if method in ('hr', 'native'):
      return store.get(('*', method), idx)
    if method.endswith('_concat'):
      return _concat(store.get((c, 'bicubic'), idx), store.get((c, method[:-len('_concat')]), idx))
    return store.get((c, method), idx)

  per_trial = {e: collections.defaultdict(lambda: collections.defaultdict(list)) for e in embedders}
  cmcs = {e: collections.defaultdict(lambda: collections.defaultdict(list)) for e in embedders}
  num_probes: dict[str, int] = {}
  for split in splits:
    g_idx = indices(split.gallery)
    g_labels = np.array([r.label for r in split.gallery])
    num_ids = len(np.unique(g_labels))
    k = min(max_rank, num_ids)
    for e in embedders:
      g_emb = stores[e][0].get(('hr', 'hr'), g_idx)
      blocks = similarity.make_gallery_blocks(g_emb, g_labels, gallery_block)
      if any(m.endswith('_concat') for m in method_names):
        concat_blocks = similarity.make_gallery_blocks(_concat(g_emb, g_emb), g_labels,
                                                       gallery_block)
      for cond in conditions:
        group = cond if spec.natural else ALL
        probes = split.probes.get(group, ())
        if not probes:
          continue
        p_idx = indices(probes)
        p_labels = np.array([r.label for r in probes])
        num_probes[cond] = len(p_idx)
        for m in method_names:
          ranks = similarity.rank_of_true_identity(
              probe_emb(e, cond, m, p_idx), p_labels,
              concat_blocks if m.endswith('_concat') else blocks, None, probe_block=probe_block)
          curve = metrics.cmc_from_ranks(ranks, k)
          per_trial[e][cond][m].append(float(curve[0]))
          cmcs[e][cond][m].append(curve)
    logging.info('%s trial done: %d gallery identities', name, num_ids)

  def summarize(e: str) -> tuple[dict, dict, dict, dict]:
    mean = {c: {m: float(np.mean(v)) for m, v in per_trial[e][c].items()} for c in conditions
            if c in per_trial[e]}
    std = {c: {m: float(np.std(v)) for m, v in per_trial[e][c].items()} for c in mean}
    raw = {c: {m: list(v) for m, v in per_trial[e][c].items()} for c in mean}
    curves = {c: {m: np.mean(np.stack(v), axis=0).tolist() for m, v in cmcs[e][c].items()}
              for c in mean}
    return mean, std, raw, curves

  rank1, rank1_std, rank1_trials, cmc = summarize('emb')
  psnr = {c: {m: float(np.mean(np.concatenate([p for p, _ in v]))) for m, v in quality[c].items()}
          for c in conditions if c in quality}
  ssim = {c: {m: float(np.mean(np.concatenate([s for _, s in v]))) for m, v in quality[c].items()}
          for c in conditions if c in quality}
  results = {
      'protocol': name,
      'conditions': list(rank1),
      'methods': method_names,
      'trials': seeds,
      'rank1': rank1, 'rank1_std': rank1_std, 'rank1_trials': rank1_trials, 'cmc': cmc,
      'psnr': psnr, 'ssim': ssim,
      'num_gallery': len(splits[0].gallery),
      'num_identities': len({r.identity for r in splits[0].gallery}),
      'num_probes': num_probes,
      'examples': {c: {k: np.stack(v) for k, v in ex.items()} for c, ex in examples.items()},
  }
  if judge_fn is not None:
    j_mean, j_std, j_trials, j_cmc = summarize('judge')
    results.update(judge_rank1=j_mean, judge_rank1_std=j_std, judge_rank1_trials=j_trials,
                   judge_cmc=j_cmc)
  return results
