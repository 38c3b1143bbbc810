"""The paper's identification protocols (AR, LFW, SCface P1/P2) as record splits + one runner.

Splits are pure functions of a source's `records` (and a seed): nothing is decoded, so they are
cheap to test and reproducible. `run_protocol` takes CALLABLES, not models: `embed_fn` (uint8 or
float [N, H, W, 3] in 0..255 -> [N, D] unit vectors), `sr_fns` ({'sr': fn, ...}: uint8 bicubic
[N, 128, 128, 3] -> [N, 128, 128, 3] in 0..255) and optional independent `judges`.

For each probe condition (a synthetic LR size, or an SCface distance) and method it reports
rank-1 (mean and std over trials), the CMC and, where an HR reference exists, PSNR/SSIM:
  hr         the HR probe (upper bound); LFW's is the face at 112x96, as in the paper
  native     (SCface) the natural probe resized straight to 128x128
  bicubic    LR probe bicubic-upsampled to 128x128 (synthetic: `degrade(hr, lr, 128x128)`, or
             with `probe_degradation` a camera's LR face (`camera.CameraModel`, fixed per probe
             and size) bicubic-upsampled; SCface: resize to 64x64, then 128x128, as the paper does)
  <name>     sr_fns[name](bicubic)
  <name>_concat  [unit(E(bicubic)), unit(E(sr))] / sqrt(2): the paper's SCface 'concat',
             against the gallery's [E(hr), E(hr)] / sqrt(2), so its cosine is the mean of the
             bicubic and the SR probe's cosines
The gallery is always embedded at HR (128x128).

Embeddings depend only on the image, not the split, so each image is embedded once per
condition and method and the seeded trials (LFW's 10) only re-index them. With `cache_dir` they
are also kept on disk (`embedding_cache.EmbeddingCache`), one file per chunk of images, condition,
method, model and scorer, so a killed evaluation resumes where it stopped and a second scorer (the
judge) or a new generator reuses everything that did not change.

`run_protocol` is the sequence; its steps (split into a population of images, degrade,
super-resolve, embed through the cache, rank, summarise) are in `protocol_steps`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ipsr_jax.data import camera as camera_lib
from ipsr_jax.data.sources import ar as ar_lib
from ipsr_jax.data.sources.base import Record
from ipsr_jax.evaluation import embedding_cache
from ipsr_jax.evaluation import protocol_steps
from ipsr_jax.evaluation.embedding_cache import EmbeddingCache  # pylint: disable=unused-import  (re-exported)

Size = protocol_steps.Size
EmbedFn = protocol_steps.EmbedFn
SRFn = protocol_steps.SRFn

HR_SIZE: Size = (128, 128)  # the generator's input and output size (the paper's)
SCFACE_LR_SIZE: Size = (64, 64)  # the paper resizes SCface faces to 64x64, then 128x128
PROBE_CAMERA_SEED = 0  # the probe cameras' seed: fixed, so every evaluation sees the same probes
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


def lfw_dev_split(records: Sequence[Record], seed: int, min_images: int = 2) -> Split:
  """The dev protocol on LFW's dev people (2-3 images each, `config.data.dev_identities`): one
  random gallery image each, the rest probes, at the test protocol's probe sizes."""
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
    # Choices are made here, never on 'lfw': the same sizes and HR probe, on people disjoint
    # from the test population and from training.
    'lfw_dev': Protocol('lfw_dev', lfw_dev_split, ((7, 6), (14, 12), (16, 14), (18, 16)),
                        seeded=True, default_trials=10, hr_probe_size=(112, 96)),
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


# ----------------------------------------------------------------------------- runner


def _method_names(spec: Protocol, sr_fns: Mapping[str, SRFn], methods: Sequence[str] | None) -> list[str]:
  """The results' methods, in table order: reference, bicubic, each SR, each SR's concat."""
  wanted = set(methods or ('hr', 'bicubic', 'sr', 'concat'))
  unknown = wanted - {'hr', 'bicubic', 'sr', 'concat'}
  if unknown:
    raise ValueError(f'unknown methods {sorted(unknown)}; use hr, bicubic, sr, concat')
  first = 'native' if spec.natural else 'hr'
  names = ([first] if 'hr' in wanted else []) + (['bicubic'] if 'bicubic' in wanted else [])
  names += [k for k in sr_fns if 'sr' in wanted]
  names += [f'{k}_concat' for k in sr_fns if 'concat' in wanted]
  if not names:
    raise ValueError('no method to evaluate (concat/sr need sr_fns)')
  return names


def _seeds(spec: Protocol, trials: int | Sequence[int] | None) -> list[int]:
  """The trials' seeds: 0..n-1 or the given ones for seeded protocols; one split otherwise."""
  if spec.seeded:
    n = spec.default_trials if trials is None else trials
    seeds = list(range(n)) if isinstance(n, int) else [int(s) for s in n]
  else:
    seeds = [0]
  if not seeds:
    raise ValueError('no trials to run')
  return seeds


def probe_camera(probe_degradation: Any, natural: bool = False) -> camera_lib.CameraModel | None:
  """The camera model of a `probe_degradation` name (None for 'bicubic'); natural LR has none."""
  camera = camera_lib.CameraModel.from_config(probe_degradation, seed=PROBE_CAMERA_SEED,
                                              where='probe_degradation')
  if camera is not None and natural:
    raise ValueError(f'probe_degradation={probe_degradation!r}: a natural-LR protocol\'s probes are '
                     'captured, not made; use bicubic')
  return camera


def probe_tag(camera: camera_lib.CameraModel | None) -> str:
  """The cache's name of a probe camera: its name, seed and a digest of its settings ('' for none)."""
  if camera is None:
    return ''
  settings = json.dumps(camera.settings, sort_keys=True, default=list)
  return f'{camera.name}-{camera.seed}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}'


def _plan(name: str, spec: Protocol, splits: Sequence[Split], method_names: Sequence[str],
          sr_fns: Mapping[str, SRFn], resolutions: Sequence[Size] | None, hr_size: Size,
          camera: camera_lib.CameraModel | None = None) -> protocol_steps.Plan:
  """What the steps compute: natural LR scores each probe group present in some split, synthetic
  LR every LR size (the protocol's unless `resolutions`), all of them on the one probe group."""
  if spec.natural:
    conditions = [g for g in spec.groups if any(g in s.probes for s in splits)]
    lr_sizes = {}
  else:
    sizes = tuple(tuple(int(v) for v in hw) for hw in (resolutions or spec.resolutions))
    conditions = [res_key(hw) for hw in sizes]
    lr_sizes = {res_key(hw): hw for hw in sizes}
  return protocol_steps.Plan(
      name=name, natural=spec.natural, conditions=tuple(conditions), lr_sizes=lr_sizes,
      probe_group={c: c if spec.natural else ALL for c in conditions}, methods=tuple(method_names),
      sr_names=tuple(k for k in sr_fns if any(m in method_names for m in (k, f'{k}_concat'))),
      hr_size=hr_size, hr_probe_size=spec.hr_probe_size, natural_lr_size=SCFACE_LR_SIZE,
      probe_camera=camera)


def run_protocol(name: str, records: Sequence[Record], load_image: Callable[[Record], np.ndarray],
                 *, embed_fn: EmbedFn, sr_fns: Mapping[str, SRFn] | None = None,
                 methods: Sequence[str] | None = None,
                 resolutions: Sequence[Size] | None = None,
                 trials: int | Sequence[int] | None = None,
                 judges: Mapping[str, EmbedFn] | None = None, chunk: int = 256, max_rank: int = 100,
                 split_kwargs: Mapping[str, Any] | None = None, num_examples: int = 4,
                 gallery_block: int = 4096, probe_block: int = 1024,
                 image_quality: bool = True, hr_size: Size = HR_SIZE,
                 cache_dir: str | os.PathLike | None = None,
                 cache_tags: Mapping[str, str] | None = None,
                 image_key: Callable[[Record], str] | None = None,
                 label: str | None = None, probe_degradation: Any = 'bicubic') -> dict[str, Any]:
  """Runs protocol `name` on a source's records; returns the results dict `report` writes.

  methods: subset of ('hr', 'bicubic', 'sr', 'concat') ('hr' means 'native' for SCface; 'sr'
  and 'concat' expand to every sr_fns entry); default all. resolutions: override the
  protocol's synthetic LR sizes (ignored by natural-LR protocols). trials: number of seeds
  (0..n-1) or the seeds themselves, for seeded protocols; default the protocol's (LFW 10).
  judges: {name: embed_fn} of independent recognizers (given uint8 faces); each adds
  'judge_<name>_rank1', '..._rank1_std', '..._rank1_trials' and '..._cmc', and 'judges' lists them.
  image_quality: PSNR/SSIM of bicubic and SR vs HR (synthetic LR only; costs host time).
  hr_size: the size gallery and bicubic probes are brought to, the SR model's input size.
  label: what the progress lines call this evaluation (default the protocol's name).
  probe_degradation: how synthetic LR probes are made: 'bicubic' (the paper's) or a camera preset
  ('camera_mild', 'camera_hard'), fixed per probe and size; bicubic and SR see the same probe.
  cache_dir, cache_tags: keep embeddings (and PSNR/SSIM) on disk, see `EmbeddingCache`; tags map
  'emb', 'judge_<name>' and sr_fns names to fingerprints (e.g. `inference.BatchedModel.fingerprint`).
  image_key: names each record's image in the cache (`FaceSource.image_key`); default its path.

  Returns {'protocol', 'conditions', 'methods', 'trials', 'rank1', 'rank1_std', 'rank1_trials',
  'cmc', 'psnr', 'ssim', 'num_gallery', 'num_identities', 'num_probes', 'examples', and with
  judges 'judges' and the judge keys above}; rank1 etc. map condition -> method ->
  value (fractions in [0, 1]; std over trials, ddof=0); examples hold uint8 images for figures.
  """
  spec = get_protocol(name)
  camera = probe_camera(probe_degradation, spec.natural)
  sr_fns = dict(sr_fns or {})
  method_names = _method_names(spec, sr_fns, methods)
  seeds = _seeds(spec, trials)
  # Split: one per trial, then every image any of them touches, each to be embedded only once.
  splits = [spec.split(records, seed, **dict(split_kwargs or {})) for seed in seeds]
  plan = _plan(name, spec, splits, method_names, sr_fns, resolutions, hr_size, camera)
  population = protocol_steps.Population(records, splits)
  # What changes every image of a condition: the protocol (LFW's HR probe is 112x96) and sizes.
  cache = embedding_cache.RecordCache.open(
      cache_dir, cache_tags or {}, records, image_key,
      extra=f'{name}|hr_size={tuple(hr_size)}|hr_probe={spec.hr_probe_size}', probe_tag=probe_tag(camera))
  scorers = {'emb': embed_fn} | {protocol_steps.judge_scorer(n): fn for n, fn in (judges or {}).items()}
  embeddings = protocol_steps.Embeddings(scorers, population, cache, chunk)
  quality = protocol_steps.QualityMeter(cache) if image_quality and not spec.natural else None  # natural LR: no HR
  examples = protocol_steps.ExampleFaces(population, num_examples, spec.natural)
  # Degrade, super-resolve, embed through the cache (and measure, keep examples), chunk by chunk.
  protocol_steps.embed_population(plan, load_image, population, sr_fns, embeddings, quality, examples,
                         chunk=chunk, label=label or name)
  # Rank each trial's probes against its gallery, then summarise over the trials.
  scores = protocol_steps.rank_trials(plan, splits, population, embeddings, max_rank=max_rank,
                             gallery_block=gallery_block, probe_block=probe_block)
  return protocol_steps.summarise(plan, seeds, splits, scores, quality, examples)
