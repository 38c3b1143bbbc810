"""The steps of `protocols.run_protocol`, in the order it takes them.

  Plan          what a run computes, fixed before any image is read: conditions, methods, sizes
  Population    the images the trials' splits touch, as record indices (gallery, probes, groups)
  degrade_probes, hr_probe   HR probe faces -> the LR face and its bicubic upsampling per condition
  super_resolve an SR callable on a chunk's bicubic faces, checked
  Embeddings    every embedding a run scores, once per image, condition and method, through the cache
  QualityMeter  PSNR/SSIM of bicubic and SR against HR, through the cache
  ExampleFaces  a few faces per condition for the report's figure
  embed_population  walks the images in chunks and takes the four steps above on each
  GalleryRanker, rank_trials   cosine identification of each trial's probes: rank-1 and CMC
  summarise     means over the trials -> the results dict `report` writes

Nothing here knows a protocol by name: `protocols` turns a `Protocol` into a `Plan`. Everything
image-sized is `Lazy`, so a chunk whose results are all in the cache decodes and runs nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ipsr_jax.runtime import console
from ipsr_jax.data import degrade as degrade_lib
from ipsr_jax.data.sources.base import Record
from ipsr_jax.evaluation import metrics
from ipsr_jax.evaluation import similarity
from ipsr_jax.evaluation.embedding_cache import RecordCache
from ipsr_jax.ops import normalize

Size = tuple[int, int]
EmbedFn = Callable[[np.ndarray], np.ndarray]
SRFn = Callable[[np.ndarray], np.ndarray]

ANY = '*'  # the condition of probes that do not depend on it: HR/native, and natural LR's one chain
_REFERENCES = ('hr', 'native')  # methods scoring the probe's own face, embedded under ANY

JUDGE_PREFIX = 'judge_'


def judge_scorer(name: str) -> str:
  """The scorer key of judge `name` ('judge_dlib'): its cache folder and its results' prefix."""
  return f'{JUDGE_PREFIX}{name}'


# ----------------------------------------------------------------------------- pixels and batches


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype != np.uint8:
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image


def _resize_each(images: Sequence[np.ndarray], hw: Sequence[int]) -> np.ndarray:
  """Images of any sizes -> uint8 [N, h, w, 3] (PIL-exact bicubic; no-op when already hw)."""
  return np.stack([im if im.shape[:2] == tuple(hw) else degrade_lib.bicubic_resize(im, hw)
                   for im in images])


def _as_uint8(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round(images.astype(np.float32)), 0, 255).astype(np.uint8)


def concat_embeddings(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The paper's 'concat': [unit(a), unit(b)] / sqrt(2), whose cosine is the mean of the two."""
  a, b = (normalize.unit_norm(np.asarray(x, np.float32)) for x in (a, b))
  return normalize.unit_norm(np.concatenate([a, b], axis=-1))


def _batched(fn: Callable[[np.ndarray], Any], images: np.ndarray, batch: int) -> np.ndarray:
  """Calls fn on fixed-size slices so no callable ever sees more than `batch` images."""
  return np.concatenate([np.asarray(fn(images[i:i + batch]))
                         for i in range(0, len(images), batch)])


class Lazy:
  """A value computed on first use (SR images are only made when something needs them)."""

  def __init__(self, fn: Callable[[], np.ndarray]):
    self._fn, self._value = fn, None

  def __call__(self) -> np.ndarray:
    if self._value is None:
      self._value = self._fn()
    return self._value


# ----------------------------------------------------------------------------- plan and split


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one run computes, fixed before any image is read (`protocols.run_protocol` builds it)."""
  name: str                          # the protocol's
  natural: bool                      # natural LR (SCface): no synthetic sizes, no HR to compare with
  conditions: tuple[str, ...]        # the table's columns, in order
  lr_sizes: Mapping[str, Size]       # synthetic LR: condition -> LR size
  probe_group: Mapping[str, str]     # condition -> the splits' probe group it scores
  methods: tuple[str, ...]           # e.g. ('hr', 'bicubic', 'sr', 'sr_concat')
  sr_names: tuple[str, ...]          # the sr_fns entries some method needs
  hr_size: Sequence[int]             # gallery and bicubic probes come at this size (the SR input)
  hr_probe_size: Size | None         # LFW: the 'hr' probe goes through 112x96
  natural_lr_size: Size              # natural LR faces are brought to this size first
  # Synthetic LR probes through this camera model (`camera.CameraModel`) instead of bicubic
  # down-sampling; None: bicubic. The 'hr' reference probe and natural LR never go through it.
  probe_camera: Any = None

  def chain(self, cond: str) -> str:
    """The condition a method's probes were embedded under: natural LR has one chain for all."""
    return ANY if self.natural else cond

  @property
  def reference(self) -> str:
    """The method scoring the probe's own face: 'native' for natural LR, else 'hr'."""
    return 'native' if self.natural else 'hr'

  @property
  def has_concat(self) -> bool:
    return any(m.endswith('_concat') for m in self.methods)


class Population:
  """The images the trials' splits touch, as indices into `records` (each image is embedded once
  per condition and method; the trials only re-index them).

  gallery: every image some trial uses as gallery; probes: every image some trial probes with,
  `group_of` naming its probe group; todo: both, in record order, the order the chunks walk.
  An image may be gallery in one LFW trial and a probe in another: the two sets may overlap.
  """

  def __init__(self, records: Sequence[Record], splits: Sequence[Any]):
    self.records = records
    self._position = {id(r): i for i, r in enumerate(records)}  # records need not be hashable
    self.gallery = sorted({i for s in splits for i in self.indices(s.gallery)})
    self.group_of: dict[int, str] = {}
    for s in splits:
      for group, rs in s.probes.items():
        for i in self.indices(rs):
          self.group_of[i] = group
    self.probes = sorted(self.group_of)
    self.todo = sorted(set(self.gallery) | set(self.probes))
    self.in_gallery, self.in_probes = frozenset(self.gallery), frozenset(self.probes)

  def indices(self, rs: Iterable[Record]) -> list[int]:
    try:
      return [self._position[id(r)] for r in rs]
    except KeyError as e:
      raise ValueError('a split returned a record that is not in `records`') from e


# ----------------------------------------------------------------------------- degrade, super-resolve


def probe_key(record_index: int, lr_hw: Sequence[int]) -> tuple[int, int, int]:
  """The camera model's key of one probe: its record index and its condition's LR size, so each
  probe and size has its own fixed camera, the same in every run and for every method."""
  return (int(record_index), int(lr_hw[0]), int(lr_hw[1]))


def _camera_probes(plan: Plan, hr: Lazy, idx: Sequence[int], cond: str) -> tuple[Lazy, Lazy]:
  """(LR faces, their bicubic upsampling) of a chunk's probes through `plan.probe_camera`."""
  def both():
    lr_hw = plan.lr_sizes[cond]
    with degrade_lib.one_blas_thread():  # small matmuls: BLAS threads would only spin
      pairs = [plan.probe_camera.degrade_lr(face, lr_hw, plan.hr_size, probe_key(i, lr_hw))
               for face, i in zip(hr(), idx)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  made = Lazy(both)
  return Lazy(lambda: made()[0]), Lazy(lambda: made()[1])


def degrade_probes(plan: Plan, hr: Lazy, raw: Lazy, idx: Sequence[int] | None = None
                   ) -> dict[str, tuple[Lazy, Lazy]]:
  """A chunk's probes -> {condition: (LR face, its bicubic upsampling to hr_size)}.

  hr: the probes at hr_size; raw: as decoded; idx: their record indices (needed with a
  probe camera). Synthetic LR degrades the HR face to each condition's size (`degrade` rounds to
  uint8 between the two resizes, as a saved LR file would), or with `plan.probe_camera` through
  that camera, keyed per probe and size (`probe_key`). Natural LR (SCface) has one chain, `ANY`,
  for every distance: the face as captured, resized to natural_lr_size, then to hr_size, as the
  paper does.
  """
  if plan.natural:
    lr = Lazy(lambda: _resize_each(raw(), plan.natural_lr_size))
    return {ANY: (lr, Lazy(lambda: degrade_lib.bicubic_resize(lr(), plan.hr_size)))}
  if plan.probe_camera is not None:
    if idx is None:
      raise ValueError('a probe camera needs the probes\' record indices')
    return {c: _camera_probes(plan, hr, idx, c) for c in plan.conditions}
  return {c: (Lazy(lambda c=c: degrade_lib.bicubic_resize(hr(), plan.lr_sizes[c])),
              Lazy(lambda c=c: degrade_lib.degrade(hr(), plan.lr_sizes[c], plan.hr_size)))
          for c in plan.conditions}


def hr_probe(plan: Plan, hr: Lazy) -> Lazy:
  """The synthetic protocols' 'hr' probe: the HR face, or (LFW) the face through hr_probe_size."""
  if not plan.hr_probe_size:
    return hr
  return Lazy(lambda: degrade_lib.degrade(hr(), plan.hr_probe_size, plan.hr_size))


def super_resolve(fn: SRFn, name: str, bicubic: Lazy, chunk: int) -> Lazy:
  """sr_fns[name] on the bicubic faces, at most `chunk` at a time; it must keep their shape."""
  def run():
    sr = _batched(fn, bicubic(), chunk)
    if sr.shape != bicubic().shape:
      raise ValueError(f'sr_fns[{name!r}] returned {sr.shape} for input {bicubic().shape}')
    return sr
  return Lazy(run)


# ----------------------------------------------------------------------------- embed, measure, keep


class _Store:
  """Per-image embeddings keyed by (condition, method), rows indexed by record index."""

  def __init__(self, indices: Sequence[int]):
    self.indices = np.asarray(indices)
    self.rows = {int(i): n for n, i in enumerate(self.indices)}
    self.data: dict[tuple[str, str], np.ndarray] = {}

  def put(self, key: tuple[str, str], idx: Sequence[int], values: np.ndarray) -> None:
    if key not in self.data:
      self.data[key] = np.zeros((len(self.indices), values.shape[1]), np.float32)
    self.data[key][[self.rows[int(i)] for i in idx]] = values

  def get(self, key: tuple[str, str], idx: Sequence[int]) -> np.ndarray:
    return self.data[key][[self.rows[int(i)] for i in idx]]


class Embeddings:
  """Every embedding a run scores, computed once per image, chain and method, through the cache.

  scorers: {'emb': embed_fn} and optionally judges, 'judge_<name>' (given uint8 faces: dlib takes
  nothing else).
  Gallery faces are embedded at HR under ('hr', 'hr'); probes under (chain, method), see
  `Plan.chain`; the reference methods ('hr', 'native') under `ANY`.
  """

  def __init__(self, scorers: Mapping[str, EmbedFn], population: Population, cache: RecordCache,
               chunk: int):
    self.scorers = dict(scorers)
    self.cache, self.chunk = cache, chunk
    self._stores = {e: (_Store(population.gallery), _Store(population.probes)) for e in self.scorers}
    self.embedded = 0  # faces embedded so far (every condition, method and scorer)

  def compute(self, idx: list[int], images: Lazy, chain: str, method: str, gallery: bool = False) -> None:
    """Embeds records `idx` (their faces: `images`) with every scorer, or reads them back."""
    for e, fn in self.scorers.items():
      path = self.cache.path(e, chain, method, idx, degraded=not gallery and chain != ANY)
      hit = self.cache.load(path)
      if hit is not None and hit['emb'].shape[0] == len(idx):
        vecs = hit['emb']
      else:
        imgs = images() if e == 'emb' else _as_uint8(images())
        vecs = _batched(fn, imgs, self.chunk)
        if vecs.ndim != 2 or len(vecs) != len(idx) or not np.isfinite(vecs).all():
          raise ValueError(f'{"embed_fn" if e == "emb" else e.replace("_", " ", 1)} returned '
                           f'{vecs.shape} {"non-finite " if vecs.ndim == 2 else ""}embeddings for '
                           f'{len(idx)} {method} images ({chain})')
        self.cache.save(path, emb=np.asarray(vecs, np.float32))
        self.embedded += len(idx)
      self._stores[e][0 if gallery else 1].put((chain, method), idx, vecs)

  def gallery(self, scorer: str, idx: Sequence[int]) -> np.ndarray:
    return self._stores[scorer][0].get(('hr', 'hr'), idx)

  def probe(self, scorer: str, chain: str, method: str, idx: Sequence[int]) -> np.ndarray:
    """Probe embeddings of `method`; '<sr>_concat' joins the bicubic and the SR ones."""
    store = self._stores[scorer][1]
    if method in _REFERENCES:
      return store.get((ANY, method), idx)
    if method.endswith('_concat'):
      return concat_embeddings(store.get((chain, 'bicubic'), idx),
                               store.get((chain, method[:-len('_concat')]), idx))
    return store.get((chain, method), idx)

  def progress_note(self) -> str:
    cached = f', {self.cache.hits} chunks from the cache' if self.cache.hits else ''
    return f'{self.embedded} faces embedded{cached}'


class QualityMeter:
  """PSNR/SSIM of each chunk's bicubic and SR faces against HR, kept (and cached) per image."""

  def __init__(self, cache: RecordCache):
    self.cache = cache
    self._values = collections.defaultdict(lambda: collections.defaultdict(list))  # cond -> method -> []

  def measure(self, idx: list[int], images: Lazy, hr: Lazy, cond: str, method: str) -> None:
    path = self.cache.path('quality', cond, method, idx, degraded=True)
    hit = self.cache.load(path)
    if hit is None:
      hit = {'psnr': metrics.psnr(images(), hr()), 'ssim': metrics.ssim(images(), hr())}
      self.cache.save(path, **hit)
    self._values[cond][method].append((hit['psnr'], hit['ssim']))

  def summary(self, conditions: Sequence[str]) -> tuple[dict, dict]:
    """({cond: {method: mean PSNR}}, the same for SSIM), means over every probe image."""
    def mean(which):
      return {c: {m: float(np.mean(np.concatenate([v[which] for v in per]))) for m, per in self._values[c].items()}
              for c in conditions if c in self._values}
    return mean(0), mean(1)


class ExampleFaces:
  """Up to `num_examples` faces per condition for the report's figure, one per person."""

  def __init__(self, population: Population, num_examples: int, natural: bool):
    self.population, self.num_examples, self.natural = population, num_examples, natural
    self._faces: dict[str, dict[str, list[np.ndarray]]] = {}  # cond -> panel -> faces
    self._shown: dict[str, set[str]] = collections.defaultdict(set)  # cond -> identities shown

  def wanted(self, conds: Sequence[str]) -> bool:
    return any(len(self._faces.get(c, {}).get('lr', [])) < self.num_examples for c in conds)

  def keep(self, cond: str, idx: list[int], panels: Mapping[str, np.ndarray]) -> None:
    """panels: {'lr', 'bicubic', <sr>..., 'hr' or 'native'} -> [len(idx), h, w, 3] faces."""
    ex = self._faces.setdefault(cond, {})
    take, room = [], self.num_examples - len(ex.get('lr', []))
    for n, i in enumerate(idx):  # one face per person, so the figure shows several people
      # Natural LR's one chain serves every distance: a face goes to its own distance's figure.
      if len(take) < room and (not self.natural or self.population.group_of[i] == cond) \
          and self.population.records[i].identity not in self._shown[cond]:
        self._shown[cond].add(self.population.records[i].identity)
        take.append(n)
    for k, v in panels.items():
      ex.setdefault(k, []).extend(_as_uint8(v[take]))

  def stacked(self) -> dict[str, dict[str, np.ndarray]]:
    return {c: {k: np.stack(v) for k, v in ex.items()} for c, ex in self._faces.items()}


def _evaluate_chunk(plan: Plan, idx: list[int], load_image: Callable[[Record], np.ndarray],
                    population: Population, sr_fns: Mapping[str, SRFn], embeddings: Embeddings,
                    quality: QualityMeter | None, examples: ExampleFaces, chunk: int) -> None:
  """Decode, degrade, super-resolve, embed, measure and keep examples for records `idx`."""
  records = population.records
  raw = Lazy(lambda: [_rgb_uint8(load_image(records[i])) for i in idx])
  hr = Lazy(lambda: _resize_each(raw(), plan.hr_size))
  g_pos = [n for n, i in enumerate(idx) if i in population.in_gallery]
  if g_pos:
    embeddings.compute([idx[n] for n in g_pos], Lazy(lambda: hr()[g_pos]), 'hr', 'hr', gallery=True)
  p_pos = [n for n, i in enumerate(idx) if i in population.in_probes]
  if not p_pos:
    return
  p_idx = [idx[n] for n in p_pos]
  p_hr = Lazy(lambda: hr()[p_pos])
  chains = degrade_probes(plan, p_hr, Lazy(lambda: [raw()[n] for n in p_pos]), p_idx)
  if plan.reference in plan.methods:
    embeddings.compute(p_idx, p_hr if plan.natural else hr_probe(plan, p_hr), ANY, plan.reference)
  for c, (lr, bicubic) in chains.items():
    made = {'bicubic': bicubic, **{k: super_resolve(sr_fns[k], k, bicubic, chunk) for k in plan.sr_names}}
    if 'bicubic' in plan.methods or plan.has_concat:
      embeddings.compute(p_idx, bicubic, c, 'bicubic')
    for k in plan.sr_names:
      embeddings.compute(p_idx, made[k], c, k)
    if quality is not None:
      for k, images in made.items():
        quality.measure(p_idx, images, p_hr, c, k)
    targets = plan.conditions if plan.natural else [c]
    if examples.wanted(targets):
      panels = {'lr': lr(), **{k: v() for k, v in made.items()}, plan.reference: p_hr()}
      for cond in targets:
        examples.keep(cond, p_idx, panels)


def embed_population(plan: Plan, load_image: Callable[[Record], np.ndarray], population: Population,
                     sr_fns: Mapping[str, SRFn], embeddings: Embeddings, quality: QualityMeter | None,
                     examples: ExampleFaces, *, chunk: int, label: str) -> None:
  """Every image the splits touch, `chunk` records at a time, with a progress line."""
  todo = population.todo
  progress = console.Progress(len(todo), f'{label}: evaluating', unit='image')
  for start in range(0, len(todo), chunk):
    if start:
      progress.update(start, embeddings.progress_note())
    _evaluate_chunk(plan, todo[start:start + chunk], load_image, population, sr_fns, embeddings,
                    quality, examples, chunk)
  progress.update(len(todo), embeddings.progress_note())
  progress.close()
  embeddings.cache.log_summary(plan.name)


# ----------------------------------------------------------------------------- rank


class GalleryRanker:
  """One trial's gallery for one scorer: ranks probes among its identities by cosine similarity.

  An identity scores by its best image; ties rank the true identity last (`similarity`). CMCs
  run to k = min(max_rank, identities). The 'concat' gallery is [E(hr), E(hr)] / sqrt(2),
  made on first use.
  """

  def __init__(self, emb: np.ndarray, labels: np.ndarray, max_rank: int, gallery_block: int = 4096,
               probe_block: int = 1024):
    self.emb, self.labels = emb, np.asarray(labels)
    self.num_identities = len(np.unique(self.labels))
    self.k = min(max_rank, self.num_identities)
    self.gallery_block, self.probe_block = gallery_block, probe_block
    self._blocks = {False: similarity.make_gallery_blocks(emb, self.labels, gallery_block)}

  def cmc(self, probe_emb: np.ndarray, probe_labels: np.ndarray, concat: bool = False) -> np.ndarray:
    """CMC float64 [k]; cmc[0] is rank-1."""
    if concat not in self._blocks:
      self._blocks[concat] = similarity.make_gallery_blocks(
          concat_embeddings(self.emb, self.emb), self.labels, self.gallery_block)
    ranks = similarity.rank_of_true_identity(probe_emb, probe_labels, self._blocks[concat], None,
                                             probe_block=self.probe_block)
    return metrics.cmc_from_ranks(ranks, self.k)


@dataclasses.dataclass
class TrialScores:
  """Per scorer, condition and method, one rank-1 and one CMC per trial, in trial order."""
  rank1: dict[str, dict[str, dict[str, list[float]]]]
  cmc: dict[str, dict[str, dict[str, list[np.ndarray]]]]
  num_probes: dict[str, int]  # condition -> probes (of the last trial; equal across trials)


def rank_trials(plan: Plan, splits: Sequence[Any], population: Population, embeddings: Embeddings, *,
                max_rank: int, gallery_block: int, probe_block: int) -> TrialScores:
  """Scores every trial's probes against its gallery, for every scorer, condition and method."""
  def nested():
    return {e: collections.defaultdict(lambda: collections.defaultdict(list)) for e in embeddings.scorers}
  scores = TrialScores(nested(), nested(), {})
  for split in splits:
    g_labels = np.array([r.label for r in split.gallery])
    g_idx = population.indices(split.gallery)
    for e in embeddings.scorers:
      ranker = GalleryRanker(embeddings.gallery(e, g_idx), g_labels, max_rank, gallery_block, probe_block)
      for cond in plan.conditions:
        probes = split.probes.get(plan.probe_group[cond], ())
        if not probes:
          continue
        p_idx = population.indices(probes)
        p_labels = np.array([r.label for r in probes])
        scores.num_probes[cond] = len(p_idx)
        for m in plan.methods:
          curve = ranker.cmc(embeddings.probe(e, plan.chain(cond), m, p_idx), p_labels,
                             concat=m.endswith('_concat'))
          scores.rank1[e][cond][m].append(float(curve[0]))
          scores.cmc[e][cond][m].append(curve)
    logging.info('%s trial done: %d gallery identities', plan.name, len(np.unique(g_labels)))
  return scores


# ----------------------------------------------------------------------------- summarise


def _over_trials(plan: Plan, scores: TrialScores, scorer: str) -> tuple[dict, dict, dict, dict]:
  """(mean, std (ddof=0), per-trial list) of rank-1 and the mean CMC, per condition and method."""
  per_trial, cmcs = scores.rank1[scorer], scores.cmc[scorer]
  mean = {c: {m: float(np.mean(v)) for m, v in per_trial[c].items()} for c in plan.conditions
          if c in per_trial}
  std = {c: {m: float(np.std(v)) for m, v in per_trial[c].items()} for c in mean}
  raw = {c: {m: list(v) for m, v in per_trial[c].items()} for c in mean}
  curves = {c: {m: np.mean(np.stack(v), axis=0).tolist() for m, v in cmcs[c].items()} for c in mean}
  return mean, std, raw, curves


def summarise(plan: Plan, seeds: Sequence[int], splits: Sequence[Any], scores: TrialScores,
              quality: QualityMeter | None, examples: ExampleFaces) -> dict[str, Any]:
  """The results dict (see `protocols.run_protocol`); judge keys when judges scored."""
  rank1, rank1_std, rank1_trials, cmc = _over_trials(plan, scores, 'emb')
  psnr, ssim = quality.summary(plan.conditions) if quality is not None else ({}, {})
  results = {
      'protocol': plan.name,
      'conditions': list(rank1),
      'methods': list(plan.methods),
      'trials': list(seeds),
      'rank1': rank1, 'rank1_std': rank1_std, 'rank1_trials': rank1_trials, 'cmc': cmc,
      'psnr': psnr, 'ssim': ssim,
      'num_gallery': len(splits[0].gallery),
      'num_identities': len({r.identity for r in splits[0].gallery}),
      'num_probes': scores.num_probes,
      'examples': examples.stacked(),
  }
  judges = [e[len(JUDGE_PREFIX):] for e in scores.rank1 if e.startswith(JUDGE_PREFIX)]
  if judges:
    results['judges'] = judges
  for name in judges:
    e = judge_scorer(name)
    j_mean, j_std, j_trials, j_cmc = _over_trials(plan, scores, e)
    results.update({f'{e}_rank1': j_mean, f'{e}_rank1_std': j_std, f'{e}_rank1_trials': j_trials,
                    f'{e}_cmc': j_cmc})
  return results

