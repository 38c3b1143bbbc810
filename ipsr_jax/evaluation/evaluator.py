"""Trained generators scored on `config.evals` entries: the one way every entry point runs them.

`score_runs` serves `--mode=eval` (ipsr_jax/main.py), the demo's report stages
(ipsr_jax/experiments.py), `tools/compare` and, through `make_periodic_evaluator`, the evaluation
training runs every `train.eval_every_steps`. Entries, their types and the syntax naming runs are
in `evaluators/common.py`.

A run's generator is restored once per call, from its newest (or a named) Orbax checkpoint without
the optimiser (its parameter EMA when the run keeps one, as the periodic evaluator scores it); the
frozen embedder is the one the run trained against (config.embedder), unless the entry names
another, and is loaded once per call as well.

An entry's `steps` (--mode=eval's --checkpoint_steps sets it) walks one run's checkpoints instead:
a report per step under <report folder>/step_<N>/, each kept until what made it changes, and the
curve of rank-1 over training beside them (`score_steps`).
"""

from __future__ import annotations

import json
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
               show: str | None = 'all', steps_of: str | None = None) -> dict[str, dict[str, Any]]:
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
  steps_of: the label of a run (one dir) whose checkpoints an entry's `steps` setting names
    (--mode=eval: 'sr'). Such an entry scores each of them into <report folder>/step_<N>/, skips a
    step already scored alike (`_stamp`), then writes curve.json/.md/.png there (`score_steps`).
    Without it `steps` plays no part. Every step is checked to be on disk before any scoring.

  Returns {name: results}, or an entry's curve (`report.write_curve`) when it walked steps.
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
  walks = {name: checkpoint_steps(ev, given, steps_of) for name, ev in evaluators.items()}
  walks = {name: w for name, w in walks.items() if w}  # every listed step checked before any scoring
  embedders = {} if embedders is None else embedders
  restored, shown = {}, set()
  all_results = {}
  for name, ev in evaluators.items():
    first = {m: v for m, v in wanted[name].items() if m not in shown  # said once, not once an entry
             and not (name in walks and m == steps_of)}  # a walked run: a line a step instead
    restore_runs(first, steps, restored=restored, say=show == 'all')
    shown.update(first)
    weights = ev.embedder_weights(config)
    if weights not in embedders:
      embedders[weights] = load_embedder(config, weights)
    out_dir = out.replace(NAME, name)
    if name in walks:
      all_results[name] = score_steps(config, ev, wanted[name], steps_of, walks[name], out_dir,
                                      embedder=embedders[weights], judges=judges, steps=steps,
                                      restored=restored, cache=cache, show=show)
      continue
    sr_fns, repeats = common.run_labels(restore_runs(wanted[name], steps, restored=restored))
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


def set_steps(config: ml_collections.ConfigDict, steps: str) -> None:
  """--checkpoint_steps: `steps` ('100,200,400' or 'all') as the `steps` setting of every entry
  that has one, so that the flag and the setting are one way of walking checkpoints."""
  with config.unlocked():
    for name, entry in config.evals.items():
      if 'steps' in common.from_config(config, name).DEFAULTS:
        if 'steps' in entry:
          del entry['steps']  # its type may differ (a tuple): a new field, not an override
        entry.steps = steps


STAMP = 'scored_with.json'  # in each step folder, written after its report: what the report was made with


def checkpoint_steps(ev: common.Evaluator, given: Mapping[str, tuple[Any, ...]],
                     label: str | None) -> list[int]:
  """The checkpoint steps of run `label` that entry `ev` walks ([]: none, it scores one checkpoint).
  Raises ValueError, in one line naming the steps that exist, when a listed one is not on disk."""
  wanted = getattr(ev, 'steps', ())
  if not wanted or label is None or not ev.SCORES_GENERATORS:
    return []
  dirs = given.get(label, ())
  if len(dirs) != 1 or not isinstance(dirs[0], str):
    raise ValueError(f'{ev.where}.steps: checkpoint steps need one run dir as {label!r}, got {len(dirs)}')
  from ipsr_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  kept = checkpointing.Checkpointer(dirs[0], read_only=True).all_steps()
  if not kept:
    raise ValueError(f'{ev.where}.steps: no checkpoint in {checkpointing.checkpoint_dir(dirs[0])}')
  if wanted == 'all':
    return kept
  missing = [s for s in wanted if s not in kept]
  if missing:
    raise ValueError(f'{ev.where}.steps: checkpoint step{"s" * (len(missing) > 1)} '
                     f'{", ".join(map(str, missing))} of {dirs[0]} {"are" if len(missing) > 1 else "is"} not on '
                     f'disk (train.keep_checkpoints deletes older ones); it has steps {", ".join(map(str, kept))}')
  return list(wanted)


def score_steps(config: ml_collections.ConfigDict, ev: common.Evaluator, runs: Mapping[str, Any], label: str,
                steps_to_walk: Sequence[int], out_dir: str, *, embedder: Any, judges: Sequence[str] | None,
                steps: Mapping[str, int | None] | None, restored: dict, cache: bool,
                show: str | None) -> dict[str, Any]:
  """Entry `ev` on run `label` at each step: reports under out_dir/step_<N>/, then the curve.

  One embedding cache (out_dir/cache) serves every step: HR and bicubic are embedded once, and each
  step's generator is keyed by its own weights' fingerprint, so two steps never share SR rows. A
  step whose report was made with the same settings, checkpoint and scorers (`STAMP`) is read
  back, not scored: a killed walk resumes at the first unfinished step.
  """
  run_dir = runs[label][0]
  cache_dir = os.path.join(out_dir, 'cache') if cache else None
  rows = []
  for step in steps_to_walk:
    step_dir = os.path.join(out_dir, f'step_{step}')
    sr_fns, repeats = common.run_labels(restore_runs(runs, {**(steps or {}), label: step}, restored=restored))
    stamp = _stamp(config, ev, sr_fns, embedder, judges, step)
    if stamp is not None and _stamped(step_dir, stamp):
      if show:
        console.say(f'{ev.name} step {step}: already scored with these settings, checkpoint and scorers '
                    f'({step_dir}), not scored again')
    else:
      if show == 'all':
        console.say(f'{ev.name} step {step}: scoring {run_dir}')
      scored = ev.run(config, sr_fns, embedder, judges=judges, repeats=repeats, cache_dir=cache_dir)
      if jax.process_index() == 0:
        ev.write(step_dir, scored, step)
        if stamp is not None:  # last: a report without its stamp is scored again
          report.write_json(os.path.join(step_dir, STAMP), stamp)
      if show:
        announce(scored.results, step_dir, judge_only=show == 'judges')
    restored.pop((run_dir, step), None)  # a step's generator is not needed again
    rows.append(step_dir)
  return _write_curve(config, ev, run_dir, label, rows, out_dir, show)


def _stamp(config: ml_collections.ConfigDict, ev: common.Evaluator, sr_fns: Mapping[str, Any], embedder: Any,
           judges: Sequence[str] | None, step: int) -> dict[str, Any] | None:
  """What decides a step's report: the entry's settings (but `steps`), the faces a settings-less
  entry reads from config.data, the HR size, every generator's and the embedder's weights
  (fingerprints), the judges' recognizer entries. None when a scorer or generator has no fingerprint."""
  prints = {k: getattr(fn, 'fingerprint', None) for k, fn in sr_fns.items()}
  emb = getattr(embedder, 'fingerprint', None)
  if emb is None or None in prints.values():
    return None
  from ipsr_jax.models import recognizers as recognizers_lib  # pylint: disable=g-import-not-at-top
  settings = {k: v for k, v in ev.settings.to_dict().items() if k != 'steps'}
  data = {k: v for k, v in config.data.to_dict().items() if k in DATA_KEYS}
  return report.as_json({
      'checkpoint_step': step, 'settings': settings, 'data': data, 'hr_size': config.model.image_size,
      'generators': prints, 'embedder': emb,
      'judges': {n: recognizers_lib.filled(ev.recognizers[n]) for n in ev.judge_names(judges)}})


# config.data's fields that decide an entry's faces when the entry does not name its own.
DATA_KEYS = ('source', 'root', 'split', 'dev_identities', 'dev_seed', 'synthetic_identities',
             'synthetic_images_per_identity')


def _stamped(step_dir: str, stamp: Mapping[str, Any]) -> bool:
  """Whether step_dir holds a report made with `stamp`."""
  path = os.path.join(step_dir, STAMP)
  if not (os.path.exists(path) and os.path.exists(os.path.join(step_dir, 'report.json'))):
    return False
  try:
    with open(path) as f:
      return json.load(f) == stamp
  except (OSError, ValueError):  # unreadable: scored again
    return False


def _write_curve(config: ml_collections.ConfigDict, ev: common.Evaluator, run_dir: str, label: str,
                 step_dirs: Sequence[str], out_dir: str, show: str | None) -> dict[str, Any]:
  """The curve of the walked steps, read back from their report.json (on process 0, which wrote
  them; the others return {})."""
  if jax.process_index() != 0:
    return {}
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top
  batch = int(inference.load_run_config(run_dir).train.batch_size)  # the global batch it trained with
  rows = []
  for step_dir in step_dirs:
    with open(os.path.join(step_dir, 'report.json')) as f:
      doc = json.load(f)
    step = int(doc['checkpoint_step'])
    rows.append({'step': step, 'faces_seen': step * batch, 'report': os.path.relpath(step_dir, out_dir),
                 'rank1': report.rank1_by_scorer(doc)})
  curve = {'eval_name': ev.name, 'protocol': doc['protocol'], 'run': run_dir, 'method': label,
           'global_batch': batch, 'rows': rows}
  report.write_curve(out_dir, curve)
  if show:
    console.say(f'Curve: {os.path.join(out_dir, "curve.md")}')
  return curve


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
