"""type='identification': one of the paper's rank-1 protocols on super-resolved probes.

    config.evals.lfw = dict(type='identification', protocol='lfw', source='lfw', split='test',
                            trials=10, judges=('dlib', 'sface'))

`protocol` is one of `protocols.PROTOCOLS` (ar, lfw, lfw_dev, generic, scface_p1, scface_p2). The
faces are the entry's data (source, root, synthetic sizes) or else the run's (config.data) at
`split`; every generator, bicubic and HR are scored on the same trials (`protocols.run_protocol`).
`probe_degradation` makes the synthetic LR probes with a camera model ('camera_mild',
'camera_hard') instead of bicubic down-sampling; the report then names it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import ml_collections

from ipsr_jax.data import camera
from ipsr_jax.data import image_io
from ipsr_jax.data import sources
from ipsr_jax.evaluation import judge as judge_lib
from ipsr_jax.evaluation import protocol_steps
from ipsr_jax.evaluation import protocols
from ipsr_jax.evaluation.evaluators import common

DEFAULTS = dict(
    source='', root='', split='test',  # the faces: empty source/root -> config.data's
    trials=-1,                         # -1: the protocol's own number (LFW 10)
    resolutions=(),                    # () -> the protocol's LR sizes
    compare={},                        # --mode=eval: {label: 'dir' or 'dir+dir2'} scored beside the run
    judges=(), judge_workers=0,        # judge_workers: dlib processes, 0 a process a core
    embedder='',                       # '' -> config.embedder.checkpoint
    max_rank=100, synthetic_identities=0, synthetic_images_per_identity=0,
    align=False, align_pad=0.0,        # align: MTCNN-align `root` first (the staged runs, ipsr_jax/experiments.py)
    grey=False,                        # grey: every face (gallery and probes) in grey, as ORL's: an ORL-like dev set
    probe_degradation='bicubic',       # synthetic LR probes: 'bicubic' or a camera ('camera_mild', 'camera_hard')
    steps=())                          # --mode=eval: () the one checkpoint; (100, 200) or 'all': each of
                                       # these checkpoints of the run, a report each and a curve (evaluator.py)


def check_steps(steps: Any, where: str) -> tuple[int, ...] | str:
  """The checkpoint steps an entry walks: () none (one checkpoint), 'all', or distinct steps >= 0
  (a tuple, or '100,200' as a flag gives them), in ascending order."""
  original = steps
  if isinstance(steps, str) and steps != 'all':
    steps = [s for s in steps.split(',') if s.strip()]
  if steps == 'all':
    return steps
  given = [str(s).strip() for s in steps] if isinstance(steps, (tuple, list)) else None
  if given is None or not all(g.isdigit() for g in given) or len({int(g) for g in given}) != len(given):
    raise ValueError(f"{where}: checkpoint steps are 'all' or distinct steps >= 0, e.g. (100, 200, 400); "
                     f'got {original!r}')
  return tuple(sorted(int(g) for g in given))


class Evaluator(common.Evaluator):
  """Rank-1, CMC and PSNR/SSIM of HR, bicubic, each generator and its concat, per LR size."""
  TYPE = 'identification'
  DEFAULTS = DEFAULTS
  REQUIRED = ('protocol',)

  def check(self) -> None:
    if self.settings.protocol not in protocols.PROTOCOLS:
      raise ValueError(f'{self.where}.protocol: unknown protocol {self.settings.protocol!r}; '
                       f'known: {sorted(protocols.PROTOCOLS)}')
    self._runs = common.parse_runs(self.settings.compare, f'{self.where}.compare')
    degradation = self.settings.probe_degradation
    if not isinstance(degradation, str) or degradation not in camera.NAMES:
      given = degradation.to_dict() if hasattr(degradation, 'to_dict') else degradation
      raise ValueError(f'{self.where}.probe_degradation: {given!r} is not a probe degradation; '
                       f'known: {list(camera.NAMES)}')
    if degradation != camera.BICUBIC and protocols.PROTOCOLS[self.settings.protocol].natural:
      raise ValueError(f'{self.where}.probe_degradation: protocol {self.settings.protocol!r} has natural '
                       "LR probes (captured, not made); only 'bicubic' applies")

    self.steps = check_steps(self.settings.steps, f'{self.where}.steps')

  def runs(self) -> dict[str, tuple[str, ...]]:
    return dict(self._runs)

  def source(self, config: ml_collections.ConfigDict):
    """The faces it reads: the entry's data, else the run's data at split `settings.split`."""
    s = self.settings
    data = ml_collections.ConfigDict(config.data.to_dict())
    if s.source:
      data.source = s.source
    if s.root:
      data.root = s.root
    if s.synthetic_identities:
      data.synthetic_identities = s.synthetic_identities
    if s.synthetic_images_per_identity:
      data.synthetic_images_per_identity = s.synthetic_images_per_identity
    return sources.make_source(data, split=s.split)

  def run(self, config: ml_collections.ConfigDict, sr_fns: Mapping[str, Callable[..., Any]],
          embedder: Callable[..., Any] | None, *, judges: Sequence[str] | None = None,
          cache_dir: str | None = None, repeats: Mapping[str, Sequence[str]] | None = None) -> common.Scored:
    """The protocol on every generator of `sr_fns`. cache_dir: keep the embeddings there (keyed by
    the fingerprints of the embedder, each judge and each generator), so an interrupted evaluation
    resumes and a rerun with judges reuses the embedder's part. repeats: {method: [label, ...]},
    the labels of `sr_fns` that are one method trained several times (`report.gains`)."""
    s = self.settings
    repeats = {k: list(v) for k, v in (repeats or {}).items()}
    unknown = sorted({m for group in repeats.values() for m in group} - set(sr_fns))
    if unknown:
      raise ValueError(f'repeats name runs that are not among the generators: {unknown}')
    source = self.source(config)
    opened = judge_lib.open_judges(self.judge_names(judges), num_workers=s.judge_workers, where=self.where,
                                  recognizers=self.recognizers)
    load, image_key = source.load_image, source.image_key
    if s.grey:  # the same faces in grey: their own cache keys, so colour rows are never reused
      load = lambda record: image_io.to_grey(source.load_image(record))
      image_key = lambda record: 'grey:' + source.image_key(record)
    tags = {}
    if cache_dir:
      tags = {k: fn.fingerprint for k, fn in sr_fns.items() if hasattr(fn, 'fingerprint')}
      tags['emb'] = embedder.fingerprint
      tags.update({protocol_steps.judge_scorer(n): j.fingerprint for n, j in opened.items()})
    try:
      results = protocols.run_protocol(
          s.protocol, source.records, load, embed_fn=embedder, sr_fns=dict(sr_fns),
          resolutions=tuple(tuple(r) for r in s.resolutions) or None,
          trials=None if s.trials < 0 else s.trials, judges={n: j.embed for n, j in opened.items()},
          max_rank=s.max_rank, hr_size=(config.model.image_size,) * 2,
          cache_dir=cache_dir or None, cache_tags=tags, image_key=image_key, label=self.name,
          probe_degradation=s.probe_degradation)
    finally:
      judge_lib.close_judges(opened)
    if repeats:
      results['repeats'] = repeats
    probes = {} if s.probe_degradation == camera.BICUBIC else {'probe_degradation': s.probe_degradation}
    # Which parameters each generator ran with, 'ema' (its parameter EMA) or 'raw': recorded when
    # an EMA is in play (raw parameters are the default, and their reports stay as they were).
    weights = {k: fn.info['weights'] for k, fn in sr_fns.items() if 'weights' in getattr(fn, 'info', {})}
    ema = {'weights': weights} if 'ema' in weights.values() else {}
    extra = {'embedder': embedder.info.get('source', 'unknown'), 'source': repr(source), 'eval_name': self.name,
             'judge_models': {n: repr(j) for n, j in opened.items()},  # results['judges'] lists the names
             # A judge is independent only of generators that did not train against it.
             'trained_against': {k: fn.info['trained_against'] for k, fn in sr_fns.items()
                                 if 'trained_against' in getattr(fn, 'info', {})},
             **probes, **ema}
    return common.Scored(results, extra)
