"""type='verification': LFW's pairs protocol (view 2 `pairs.txt`) on HR faces.

    config.evals.lfw_pairs = dict(type='verification', root='/data/lfw_aligned',
                                  pairs='/data/lfw/pairs.txt', judges=('dlib',))

The recognizer (and each judge) embeds the aligned faces under `root`; `evaluation.verification`
has the protocol. The generators play no part. FaceNet's `validate_on_lfw.py` options are settings
here, as they are flags of `tools/verify.py` (which runs this evaluator):

  standardization  () scores the embedder as it is (row 'embedder'); ('fixed', 'per_image') one
                   row per input standardization of the same weights ('embedder (fixed)', ...)
  frame            (top, bottom, left, right) fractions each side grows (> 0) or trims (< 0) by,
                   or 'facenet': FaceNet's own crop geometry (`verification.FACENET_FRAME`)
  frame_mode       how grown borders are filled: 'reflect', 'edge' or 'constant' (np.pad)
  flip             each embedding joined with its mirror image's
  subtract_mean    the training folds' mean embedding subtracted before the cosine
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import ml_collections

from ipsr_jax.evaluation import judge as judge_lib
from ipsr_jax.evaluation import verification
from ipsr_jax.evaluation.evaluators import common
from ipsr_jax.models import inception_resnet_v1

FRAME_MODES = ('reflect', 'edge', 'constant')
NO_FRAME = (0.0, 0.0, 0.0, 0.0)

DEFAULTS = dict(
    root='', pairs='',            # aligned faces <root>/<name>/<name>_NNNN.<ext>, LFW's pairs.txt
    embedder='',                  # '' -> config.embedder.checkpoint
    judges=(), judge_workers=0,   # judge_workers: dlib processes, 0 a process a core
    standardization=(), frame=NO_FRAME, frame_mode='reflect', flip=False, subtract_mean=False,
    chunk=256)                    # images decoded and embedded at a time


def parse_frame(value: str | Sequence[Any]) -> tuple[float, ...]:
  """'facenet' (or ['facenet']) or four numbers (top, bottom, left, right) -> the four fractions."""
  values = [value] if isinstance(value, str) else list(value)
  if values == ['facenet']:
    return verification.FACENET_FRAME
  if len(values) != 4:
    raise ValueError(f"needs 'facenet' or four numbers top,bottom,left,right; got {value}")
  return tuple(float(v) for v in values)


def with_standardization(embedder, mode: str):
  """The same weights behind another input standardization ('fixed' | 'per_image')."""
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  if embedder.module.standardization == mode:
    return embedder
  return inference.Embedder(embedder.module.clone(standardization=mode), embedder.variables,
                            input_size=embedder.input_size, info={**embedder.info, 'standardization': mode})


class Evaluator(common.Evaluator):
  """10-fold accuracy, TAR@FAR, EER, AUC and ROC of the embedder (and judges) on LFW's pairs."""
  TYPE = 'verification'
  DEFAULTS = DEFAULTS
  SCORES_GENERATORS = False

  def check(self) -> None:
    s = self.settings
    if not s.root or not s.pairs:
      raise ValueError(f'{self.where}: type=verification needs root (aligned LFW faces) and pairs '
                       '(LFW pairs.txt)')
    try:
      self.frame = parse_frame(s.frame)
    except ValueError as e:
      raise ValueError(f'{self.where}.frame: {e}') from None
    if s.frame_mode not in FRAME_MODES:
      raise ValueError(f'{self.where}.frame_mode: {s.frame_mode!r} is not one of {FRAME_MODES}')
    self.transform = verification.reframe(self.frame, s.frame_mode)  # a frame trimming all is an error
    modes = s.standardization
    self.standardization = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in self.standardization if m not in inception_resnet_v1.STANDARDIZATIONS]
    if bad:
      raise ValueError(f'{self.where}.standardization: unknown {bad}; known: '
                       f'{list(inception_resnet_v1.STANDARDIZATIONS)}')

  def embedder_rows(self, embedder) -> dict[str, Callable[..., Any]]:
    """{row name: embed_fn}: 'embedder', or 'embedder (<mode>)' per standardization asked for."""
    if embedder is None:
      return {}
    if not self.standardization:
      return {'embedder': embedder}
    return {f'embedder ({m})': with_standardization(embedder, m) for m in self.standardization}

  def run(self, config: ml_collections.ConfigDict | None, sr_fns: Mapping[str, Callable[..., Any]],
          embedder: Callable[..., Any] | None, *, judges: Sequence[str] | None = None,
          cache_dir: str | None = None, repeats: Mapping[str, Sequence[str]] | None = None) -> common.Scored:
    """The embedder's rows (None: the judges alone) and each judge that is installed, on the same
    crops. config, sr_fns, cache_dir and repeats play no part."""
    del config, sr_fns, cache_dir, repeats
    s = self.settings
    methods = self.embedder_rows(embedder)
    opened = judge_lib.open_judges(self.judge_names(judges), num_workers=s.judge_workers, where=self.where,
                                  recognizers=self.recognizers)
    methods.update({f'judge ({n})': j.embed for n, j in opened.items()})
    try:
      if not methods:
        raise ValueError(f'{self.where}: nothing to evaluate (no embedder and no judge installed)')
      results = verification.run(s.pairs, s.root, methods, transform=self.transform, chunk=s.chunk,
                                 flip=s.flip, subtract_mean=s.subtract_mean)
    finally:
      judge_lib.close_judges(opened)
    extra = {'embedder': getattr(embedder, 'info', {}).get('source', 'unknown'), 'eval_name': self.name,
             'judges': {n: repr(j) for n, j in opened.items()}}
    if self.transform is not None:  # the crops are not the aligned faces as they are
      extra.update(frame=self.frame, frame_mode=s.frame_mode)
    return common.Scored(results, extra)
