"""Evaluation from checkpoints: `--mode=eval`, and the periodic evaluator training calls.

Each entry of `config.evals` (big_vision style) names a protocol and its data:

    config.evals.lfw = dict(protocol='lfw', source='lfw', root='/data/lfw_aligned', trials=10,
                            compare={'pixel_only': 'runs/pixel_only'}, judges=('dlib', 'sface'))

The generator is restored from the run's newest (or a named) Orbax checkpoint without building
the optimiser; the frozen embedder is the one the run trained against (config.embedder), unless
the entry names another.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections

from ipsr_jax import api
from ipsr_jax.runtime import console
from ipsr_jax.data import image_io
from ipsr_jax.data import sources
from ipsr_jax.evaluation import judge as judge_lib
from ipsr_jax.evaluation import protocols
from ipsr_jax.evaluation import report
from ipsr_jax.evaluation import protocol_steps

DEFAULTS = dict(protocol='generic', source='', root='', pairs='', split='test', trials=-1, resolutions=(),
                compare={}, judges=(), judge_workers=0, embedder='', max_rank=100, synthetic_identities=0,
                synthetic_images_per_identity=0,
                align=False, align_pad=0.0,  # align: MTCNN-align `root` first (the staged runs, ipsr_jax/experiments.py)
                grey=False)  # grey: every face (gallery and probes) in grey, as ORL's: an ORL-like dev set


def eval_settings(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config.evals[name]` over the defaults; unknown keys are an error naming them."""
  entry = config.evals[name].to_dict()
  if 'judge' in entry:  # the single dlib judge became a list of named judges
    raise ValueError(f"config.evals.{name}.judge is now judges: a tuple of names, e.g. "
                     f"judges=('dlib', 'sface') (known: {sorted(judge_lib.JUDGES)})")
  unknown = set(entry) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'config.evals.{name}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}')
  settings = ml_collections.ConfigDict({**DEFAULTS, **entry})
  settings.judges = judge_lib.check_names(settings.judges, f'config.evals.{name}.judges')
  return settings


def eval_source(config: ml_collections.ConfigDict, settings: ml_collections.ConfigDict):
  """The source an evaluation reads: the entry's data, else the run's data at split `settings.split`."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  if settings.source:
    data.source = settings.source
  if settings.root:
    data.root = settings.root
  if settings.synthetic_identities:
    data.synthetic_identities = settings.synthetic_identities
  if settings.synthetic_images_per_identity:
    data.synthetic_images_per_identity = settings.synthetic_images_per_identity
  return sources.make_source(data, split=settings.split)


def make_embedder(config, settings) -> api.Embedder:
  return api.load_embedder(settings.embedder or config.embedder.checkpoint, input_size=config.embedder.input_size)


def run_eval(config: ml_collections.ConfigDict, name: str, sr_fns: Mapping[str, Any], out_dir: str,
             step: int | None, embedder: api.Embedder | None = None, *,
             judges: Sequence[str] | None = None, cache_dir: str | None = None,
             repeats: Mapping[str, Sequence[str]] | None = None) -> dict:
  """Runs one `config.evals` entry with the given SR callables and writes its report.

  judges: overrides the entry's `judges` (() for the embedder alone). cache_dir: keep the
  embeddings there (keyed by the fingerprints of the embedder, each judge and each generator),
  so an interrupted evaluation resumes and a rerun with judges reuses the embedder's part.
  repeats: {method: [label, ...]}, the labels of `sr_fns` that are one method trained several
  times; the report pairs them run by run and averages (`report.gains`).
  """
  repeats = {k: list(v) for k, v in (repeats or {}).items()}
  unknown = sorted({m for group in repeats.values() for m in group} - set(sr_fns))
  if unknown:
    raise ValueError(f'repeats name runs that are not among the generators: {unknown}')
  settings = eval_settings(config, name)
  if judges is not None:
    settings.judges = judge_lib.check_names(judges, f'judges of {name}')
  if settings.protocol == 'verification':  # LFW pairs on HR faces: no source, no SR
    from ipsr_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
    embedder = embedder or make_embedder(config, settings)
    return verification.run_eval_entry(name, settings, out_dir, embedder)
  source = eval_source(config, settings)
  embedder = embedder or make_embedder(config, settings)
  judges = judge_lib.open_judges(settings.judges, num_workers=settings.judge_workers,  # 0: a process a core
                                 where=f'config.evals.{name}')
  spec = protocols.get_protocol(settings.protocol)
  trials = None if settings.trials < 0 else settings.trials
  load, image_key = source.load_image, source.image_key
  if settings.grey:  # the same faces in grey: their own cache keys, so colour rows are never reused
    load = lambda record: image_io.to_grey(source.load_image(record))
    image_key = lambda record: 'grey:' + source.image_key(record)
  records = source.records
  tags = {}
  if cache_dir:
    tags = {k: fn.fingerprint for k, fn in sr_fns.items() if hasattr(fn, 'fingerprint')}
    tags['emb'] = embedder.fingerprint
    tags.update({protocol_steps.judge_scorer(n): j.fingerprint for n, j in judges.items()})
  try:
    results = protocols.run_protocol(
        settings.protocol, records, load, embed_fn=embedder, sr_fns=dict(sr_fns),
        resolutions=tuple(tuple(r) for r in settings.resolutions) or None, trials=trials,
        judges={n: j.embed for n, j in judges.items()},
        max_rank=settings.max_rank, hr_size=(config.model.image_size,) * 2,
        cache_dir=cache_dir or None, cache_tags=tags, image_key=image_key, label=name)
  finally:
    judge_lib.close_judges(judges)
  if repeats:
    results['repeats'] = repeats
  extra = {'embedder': embedder.info.get('source', 'unknown'), 'source': repr(source), 'eval_name': name,
           'judge_models': {n: repr(j) for n, j in judges.items()},  # results['judges'] lists the names
           # A judge is independent only of generators that did not train against it.
           'trained_against': {k: fn.info['trained_against'] for k, fn in sr_fns.items()
                               if 'trained_against' in getattr(fn, 'info', {})}}
  if jax.process_index() == 0:
    report.write_report(out_dir, spec.name, results, step, extra=extra)
    logging.info('Wrote the %s report to %s', name, out_dir)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """--mode=eval: every `config.evals` entry on the newest (or `step`) checkpoint of `workdir`."""
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  if not config.evals:
    raise ValueError('config.evals is empty: name at least one evaluation, e.g. '
                     "--config.evals.lfw='{protocol: lfw, source: lfw, root: /data/lfw_aligned}' in the config file")
  sr = inference.SuperResolver.from_checkpoint(workdir, step=step)
  all_results = {}
  for name in config.evals:
    settings = eval_settings(config, name)
    sr_fns = {'sr': sr}
    for label, run in settings.compare.items():
      sr_fns[label] = inference.SuperResolver.from_checkpoint(run)
    out = os.path.join(workdir, 'eval', name)
    all_results[name] = run_eval(config, name, sr_fns, out, sr.info['step'],
                                 cache_dir=os.path.join(out, 'cache'))
    announce(all_results[name], out)
  return all_results


def announce(results: Mapping[str, Any], out_dir: str, *, judge_only: bool = False) -> None:
  """The rank-1 table and where the full report is, on the terminal."""
  if 'rank1' in results:
    console.say(report.summary(results['protocol'], results, judge_only=judge_only))
  console.say(f'Report: {os.path.join(out_dir, "report.md")}')


def make_periodic_evaluator(config: ml_collections.ConfigDict, workdir: str):
  """The evaluator training calls every `train.eval_every_steps`: all `config.evals` on the live
  generator variables; returns scalars such as `eval/lfw/16x14/sr` (rank-1) for the writers."""
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  from ipsr_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  generator = unet_lib.from_config(config.model)
  embedders = {}

  def evaluate(step: int, variables: dict) -> dict:
    sr = inference.SuperResolver(generator, variables, image_size=config.model.image_size,
                                 info={'trained_against': inference.trained_against(config)})
    scalars = {}
    for name in config.evals:
      settings = eval_settings(config, name)
      if settings.protocol == 'verification':  # HR pairs only: the generator does not change it
        continue
      if name not in embedders:
        embedders[name] = make_embedder(config, settings)
      results = run_eval(config, name, {'sr': sr}, os.path.join(workdir, 'eval', name, f'step_{step}'), step,
                         embedder=embedders[name])
      for cond, methods in results['rank1'].items():
        for method, value in methods.items():
          scalars[f'eval/{name}/{cond}/{method}'] = value
    return scalars

  return evaluate
