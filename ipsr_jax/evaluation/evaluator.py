"""Trained generators scored on `config.evals` entries: the one way every entry point runs them.

`score_runs` serves `--mode=eval` (ipsr_jax/main.py), the demo's report stages
(ipsr_jax/experiments.py), `tools/compare` and, through `make_periodic_evaluator`, the evaluation
training runs every `train.eval_every_steps`. Entries, their types and the syntax naming runs are
in `evaluators/common.py`.

A run's generator is restored once per call, from its newest (or a named) Orbax checkpoint without
the optimiser (its parameter EMA when the run keeps one, as the periodic evaluator scores it); the
frozen embedder is the one the run trained against (config.embedder), unless the entry names
another, and is loaded once per call as well.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from ipsr_jax.serving import inference
from ipsr_jax.evaluation import report
from ipsr_jax.evaluation.evaluators import common
from ipsr_jax.runtime import console

NAME = '{name}'  # in `score_runs`' out: each entry's name


def load_embedder(config: ml_collections.ConfigDict, weights: str) -> inference.Embedder:
  """The recognizer an entry scores with, at the run's embedder input size."""
  return inference.load_embedder(weights, input_size=config.embedder.input_size)


def restore_runs(runs: Mapping[str, Sequence[Any]], steps: Mapping[str, int | None] | None = None, *,
                 restored: dict | None = None, say: bool = False) -> dict[str, list[Any]]:
  """{method: [run dir or SR callable, ...]} -> {method: [SR callable, ...]}.

  A run dir's generator is restored at steps[method] (default its newest checkpoint), once per
  (dir, step) in `restored` (a cache the caller may keep). say: one line per report row (method,
  method#2, ...) naming its run, step, weights (EMA or raw) and what it trained against.
  """
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  restored = {} if restored is None else restored
  steps = steps or {}
  out = {}
  for method, items in runs.items():
    out[method] = []
    for i, item in enumerate(items):
      if not callable(item):
        key = (item, steps.get(method))
        if key not in restored:
          restored[key] = inference.SuperResolver.from_checkpoint(item, step=key[1])
        if say:
          info = restored[key].info
          console.say(f'{method}{f"#{i + 1}" if i else ""}: {item} step {info["step"]} ({info["weights"]} weights), '
                      f'trained against {", ".join(info["trained_against"]) or "no recognizer"}')
        item = restored[key]
      out[method].append(item)
  return out


def score_runs(config: ml_collections.ConfigDict, runs: Mapping[str, Any], out: str, *,
               names: Sequence[str] | None = None, judges: Sequence[str] | None = None,
               steps: Mapping[str, int | None] | None = None, report_step: int | str | None = None,
               entry_runs: bool = False, embedders: dict[str, Any] | None = None, cache: bool = True,
               show: str | None = 'all') -> dict[str, dict[str, Any]]:
  """Runs `config.evals` entries on trained generators and writes each entry's report.

  runs: {label: 'dir' | 'dir+dir2' | [dir, ...]} (`common.parse_runs`: several dirs are one method
    trained several times, rows label, label#2, ...), or SR callables already built (the demo's,
    training's live generator) in place of dirs. Each dir is restored once, at steps[label] when
    given, else its newest checkpoint.
  out: each entry's report folder, '{name}' in it standing for the entry's name (a single entry
    may do without).
  names: the entries to run (default all, in the config's order); every one is checked first.
  judges: instead of each entry's own judges (() for the embedder alone).
  report_step: the checkpoint step the reports record: a number, or the label of a run whose
    restored step it is.
  entry_runs: also score each entry's own `compare` runs (--mode=eval).
  embedders: {weights: embedder} loaded before; filled with those this call loads, so a caller
    that keeps it loads each recognizer once over several calls.
  cache: keep the embeddings under <report folder>/cache: a rerun resumes, and adding a run or a
    judge embeds only what is new.
  show: 'all' prints each restored run, each rank-1 table and where its report is; 'judges' only
    the judges' tables and where; None nothing.

  Returns {name: results}.
  """
  names = list(config.evals) if names is None else list(names)
  if not names:
    raise ValueError("config.evals is empty: name at least one evaluation in the config file, e.g. "
                     "config.evals.lfw = dict(type='identification', protocol='lfw', source='lfw', "
                     "root='/data/lfw_aligned')")
  if len(names) > 1 and NAME not in out:
    raise ValueError(f'{len(names)} evaluations would write one folder: put {NAME} in {out!r}')
  evaluators = {name: common.from_config(config, name) for name in names}
  given = common.parse_runs(runs, 'runs')
  wanted = {name: _entry_runs(ev, given, entry_runs) for name, ev in evaluators.items()}
  embedders = {} if embedders is None else embedders
  restored, shown = {}, set()
  all_results = {}
  for name, ev in evaluators.items():
    first = {m: v for m, v in wanted[name].items() if m not in shown}  # said once, not once an entry
    restore_runs(first, steps, restored=restored, say=show == 'all')
    shown.update(first)
    sr_fns, repeats = common.run_labels(restore_runs(wanted[name], steps, restored=restored))
    weights = ev.embedder_weights(config)
    if weights not in embedders:
      embedders[weights] = load_embedder(config, weights)
    out_dir = out.replace(NAME, name)
    scored = ev.run(config, sr_fns, embedders[weights], judges=judges, repeats=repeats,
                    cache_dir=os.path.join(out_dir, 'cache') if cache else None)
    step = report_step
    if isinstance(report_step, str):
      step = sr_fns[report_step].info['step'] if sr_fns else None
    if jax.process_index() == 0:
      ev.write(out_dir, scored, step)
      logging.info('Wrote the %s report to %s', name, out_dir)
    if show:
      announce(scored.results, out_dir, judge_only=show == 'judges')
    all_results[name] = scored.results
  return all_results


def _entry_runs(ev: common.Evaluator, given: Mapping[str, tuple[Any, ...]],
                own: bool) -> dict[str, tuple[Any, ...]]:
  """The runs one entry scores: none when the generators do not change it, else the given ones
  and, when `own`, those its `compare` names."""
  if not ev.SCORES_GENERATORS:
    return {}
  runs = dict(given)
  if own:
    taken = sorted(set(ev.runs()) & set(runs))
    if taken:
      raise ValueError(f'{ev.where}.compare: the labels {taken} are taken by the runs scored')
    runs.update(ev.runs())
  return runs


def announce(results: Mapping[str, Any], out_dir: str, *, judge_only: bool = False) -> None:
  """The rank-1 table and where the full report is, on the terminal."""
  if 'rank1' in results:
    console.say(report.summary(results['protocol'], results, judge_only=judge_only))
  console.say(f'Report: {os.path.join(out_dir, "report.md")}')


def make_periodic_evaluator(config: ml_collections.ConfigDict,
                            workdir: str) -> Callable[[int, dict], dict[str, float]]:
  """The evaluator training calls every `train.eval_every_steps`: every entry the generator
  changes (not verification) on the live generator variables, reports under
  <workdir>/eval/<name>/step_<step>; returns scalars such as `eval/lfw/16x14/sr` (rank-1)."""
  from ipsr_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  generator = unet_lib.from_config(config.model)
  names = [n for n in config.evals if common.from_config(config, n).SCORES_GENERATORS]
  embedders = {}  # loaded at the first evaluation, kept for the next
  # Training passes train.generator_variables: the parameter EMA when the run keeps one.
  weights = 'ema' if config.train.get('ema_decay', 0.0) else 'raw'

  def evaluate(step: int, variables: dict) -> dict[str, float]:
    if not names:
      return {}
    sr = inference.SuperResolver(generator, variables, image_size=config.model.image_size,
                                 info={'trained_against': inference.trained_against(config),
                                       'weights': weights})
    results = score_runs(config, {'sr': sr}, os.path.join(workdir, 'eval', NAME, f'step_{step}'),
                         names=names, report_step=step, embedders=embedders, cache=False, show=None)
    scalars = {}
    for name, r in results.items():
      for cond, methods in r['rank1'].items():
        for method, value in methods.items():
          scalars[f'eval/{name}/{cond}/{method}'] = value
    return scalars

  return evaluate
