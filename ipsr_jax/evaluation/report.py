"""Writes every evaluation's report: report.json, report.md and its figures.

Identification (`protocols.run_protocol`): report.md laid out like the paper's table, with the
paper's numbers beside ours, cmc_<condition>.png and faces.png. Verification
(`verification.evaluate`, protocol 'verification'): accuracy, TAR@FAR, EER and AUC per method,
and roc.png. `write_report` and `markdown` take either.

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global
backend switch, safe inside a training process or on a headless host.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ipsr_jax.evaluation import paper_tables
from ipsr_jax.evaluation import verification

VERIFICATION = verification.PROTOCOL

# Keys of report.json that come from the results and may not be overridden by `extra`.
CORE_KEYS = ('protocol', 'rank1', 'cmc', 'psnr', 'ssim', 'checkpoint_step', 'gains', 'judges')


def judge_prefixes(results: Mapping[str, Any]) -> dict[str, str]:
  """{judge name: its results' key prefix} ('dlib' -> 'judge_dlib_'), in the results' order."""
  return {n: f'judge_{n}_' for n in results.get('judges') or ()}
# Result keys that are not JSON (images) or repeat the core ones.
_SKIP = ('examples',)
PANEL_ORDER = ('lr', 'bicubic', 'native', 'hr')


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # JSON has no inf/nan: PSNR of identical images, a threshold that accepts none
  return x


def _columns(protocol: str, results: Mapping[str, Any]) -> list[str]:
  ours = list(results.get('conditions') or results['rank1'])
  table = paper_tables.PAPER_TABLES.get(protocol)
  if table is None:
    return ours
  return [c for c in table.columns if c in ours] + [c for c in ours if c not in table.columns]


def _methods(results: Mapping[str, Any], key: str = 'rank1') -> list[str]:
  seen = list(results.get('methods') or [])
  for per_method in results.get(key, {}).values():
    seen += [m for m in per_method if m not in seen]
  return seen


def _pct(v: float | None) -> str:
  return '-' if v is None else f'{100.0 * v:.2f}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
  return out + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _rank1_rows(protocol: str, results: Mapping[str, Any], columns: list[str], prefix: str) -> list:
  mean = results.get(f'{prefix}rank1', {})
  std = results.get(f'{prefix}rank1_std', {})
  paper_of = {m: row for row, m in paper_tables.PAPER_METHOD.get(protocol, {}).items()}
  multi = len(results.get('trials') or []) > 1
  rows = []
  for m in _methods(results, f'{prefix}rank1'):
    cells = []
    for c in columns:
      v = mean.get(c, {}).get(m)
      cell = _pct(v)
      if v is not None and multi and m in std.get(c, {}):
        cell += f' ± {100.0 * std[c][m]:.2f}'
      ref = paper_tables.paper_value(protocol, paper_of[m], c) if m in paper_of else None
      if v is not None and ref is not None and not prefix:
        cell += f' (paper {ref:.2f})'
      cells.append(cell)
    rows.append([f'ours: {m}'] + cells)
  return rows


def _points_apart(values: Mapping[str, Sequence[float]], a: str, b: str) -> np.ndarray | None:
  """Per-trial rank-1 of `a` minus `b`, in points; None when either is missing or unpaired."""
  if a in values and b in values and len(values[a]) == len(values[b]):
    return 100.0 * (np.asarray(values[a]) - np.asarray(values[b]))
  return None


def gains(results: Mapping[str, Any], prefix: str = '') -> dict[str, dict[str, dict[str, float]]]:
  """Paired differences of rank-1 over the trials, in points: {cond: {'sr - bicubic': {'mean',
  'std'}}} for every SR method against bicubic, the first SR method ('sr') against the others
  (e.g. 'sr - pixel_only': the identity term's own effect), and, when a 'pixel_only' row is
  there, every other SR method against it (the variants of `tools/compare`). Each trial's difference is
  taken on the same gallery and probes, so its std is the spread of the effect, not of the split.

  results['repeats'] ({name: [name, name#2, ...]}: one method trained several times, e.g. with
  other seeds) adds, per repeat i >= 2: 'name#i - bicubic', 'name#i - name' (how far a second
  training run moves the method: the training noise the trials' std leaves out) and, when
  pixel_only has as many runs, 'name#i - pixel_only#i' and 'name - pixel_only (mean of k runs)':
  each trial's difference averaged over the k pairs of runs. That row also carries 'runs' (each
  pair's mean over the trials) and 'runs_std' (their sample std, ddof=1): the trials' std holds the
  split's noise, 'runs_std' the training noise, which is what decides whether a gain of a few
  points is the method's or the seed's."""
  per_trial = results.get(f'{prefix}rank1_trials') or {}
  repeats = {k: list(v) for k, v in (results.get('repeats') or {}).items() if len(v) > 1}
  again = {m for group in repeats.values() for m in group[1:]}  # paired only as below
  sr_methods = [m for m in results.get('methods') or [] if m not in ('hr', 'native', 'bicubic')
                and not m.endswith('_concat')]
  pairs = [(m, 'bicubic') for m in sr_methods]
  firsts = [m for m in sr_methods if m not in again]
  if 'sr' in firsts:
    pairs += [('sr', m) for m in firsts if m != 'sr']
  if 'pixel_only' in firsts:
    pairs += [(m, 'pixel_only') for m in firsts if m not in ('sr', 'pixel_only')]
  means = {}  # label: the pairs of runs whose per-trial differences it averages
  base = repeats.get('pixel_only')
  for name, group in repeats.items():
    pairs += [(m, name) for m in group[1:]]
    if name != 'pixel_only' and base and len(base) == len(group):
      pairs += list(zip(group[1:], base[1:]))
      means[f'{name} - pixel_only (mean of {len(group)} runs)'] = list(zip(group, base))
  out = {}
  for cond, values in per_trial.items():
    rows = [(f'{a} - {b}', _points_apart(values, a, b)) for a, b in pairs]
    for label, d in rows:
      if d is not None:
        out.setdefault(cond, {})[label] = {'mean': float(d.mean()), 'std': float(d.std())}
    for label, runs in means.items():
      diffs = [_points_apart(values, a, b) for a, b in runs]
      if all(d is not None for d in diffs):
        d = np.mean(diffs, axis=0)
        per_run = [float(x.mean()) for x in diffs]
        out.setdefault(cond, {})[label] = {'mean': float(d.mean()), 'std': float(d.std()),
                                           'runs': per_run, 'runs_std': float(np.std(per_run, ddof=1))}
  return out


def _gain_lines(results: Mapping[str, Any], columns: list[str], prefix: str, title: str) -> list[str]:
  table = gains(results, prefix)
  names = []
  for per in table.values():
    names += [k for k in per if k not in names]
  if not names:
    return []
  rows = [[n] + ['-' if n not in table.get(c, {}) else _gain_cell(table[c][n]) for c in columns]
          for n in names]
  lines = ['', f'## {title}', ''] + _table(['Difference (points)'] + columns, rows)
  if any('runs' in g for per in table.values() for g in per.values()):
    lines += ['', 'Mean of k runs: ± is over the trials; in brackets each run\'s own mean, then '
              'their std over the runs (ddof=1): the training noise.']
  return lines


def _gain_cell(g: Mapping[str, Any]) -> str:
  signed = lambda x: f'{round(x, 2) + 0.0:+.2f}'  # + 0.0: no '-0.00' for a difference of 0
  cell = f"{signed(g['mean'])} ± {g['std']:.2f}"
  if 'runs' in g:
    cell += f" (runs {' / '.join(signed(r) for r in g['runs'])}; ± {g['runs_std']:.2f})"
  return cell


def markdown(protocol: str, results: Mapping[str, Any], checkpoint_step: int | None,
             extra: Mapping[str, Any] | None = None) -> str:
  """The report as Markdown; `extra` ({name: value}) adds one line each below the heading."""
  if protocol == VERIFICATION:
    return _verification_markdown(results, extra)
  return _identification_markdown(protocol, results, checkpoint_step, extra)


def _identification_markdown(protocol: str, results: Mapping[str, Any], checkpoint_step: int | None,
                             extra: Mapping[str, Any] | None) -> str:
  """Rank-1 (%) rows = methods, columns = conditions, then the paper's; gains, judges, quality."""
  extra = dict(extra or {})
  columns = _columns(protocol, results)
  table = paper_tables.PAPER_TABLES.get(protocol)
  title = f'Table {table.number}: {table.caption}' if table else 'Rank-1 identification rate (%)'
  lines = [f'# {protocol}: rank-1 identification (%)', '',
           f'Checkpoint step: {checkpoint_step}.  Trials: {results.get("trials")}.  '
           f'Gallery: {results.get("num_gallery")} images of {results.get("num_identities")} '
           f'identities; probes per condition: {results.get("num_probes")}.']
  for k, v in extra.items():
    lines.append(f'{k}: {v}')
  lines += ['', f'## {title}', '']
  labels = ([table.column_labels[table.columns.index(c)] if c in table.columns else c
             for c in columns] if table else columns)
  rows = _rank1_rows(protocol, results, columns, '')
  if table:
    rows.append([f'**paper (Table {table.number})**'] + [''] * len(columns))
    for name, values in table.rows.items():
      by_col = dict(zip(table.columns, values))
      rows.append([f'paper: {name}'] + ['-' if by_col.get(c) is None else f'{by_col[c]:.2f}'
                                        for c in columns])
  lines += _table(['Method'] + labels, rows)
  if len(results.get('trials') or []) > 1:
    lines += ['', f'Ours: mean ± std over {len(results["trials"])} trials (std with ddof=0).']
  if table and table.notes:
    lines += [''] + [f'Note: {n}' for n in table.notes]
  if len(results.get('trials') or []) > 1:
    lines += _gain_lines(results, columns, '', 'Gains, paired per trial (mean ± std, rank-1 points)')
  trained = extra.get('trained_against') or {}
  for judge, prefix in judge_prefixes(results).items():
    lines += ['', f'## Judge: {judge} (rank-1 %)', '']
    lines += [f'Judge: {extra["judge_models"][judge]}', ''] if judge in (extra.get('judge_models') or {}) else []
    in_loss = [m for m, names in trained.items() if judge in names]
    if in_loss:  # a recognizer in a generator's loss is no independent judge of it
      lines += [f'Not independent of {", ".join(in_loss)}: {judge} is in {"its" if len(in_loss) == 1 else "their"} '
                'training loss.', '']
    lines += _table(['Method'] + labels, _rank1_rows(protocol, results, columns, prefix))
    if len(results.get('trials') or []) > 1:
      lines += _gain_lines(results, columns, prefix, f'{judge} gains, paired per trial (mean ± std, rank-1 points)')
  if trained:
    lines += ['', 'Recognizers each generator trained against: ' + '; '.join(
        f'{m}: {", ".join(v) or "none (pixel loss only)"}' for m, v in trained.items()) + '.']
  weights = extra.get('weights') or {}
  if 'ema' in weights.values():  # said only when an EMA is in play: raw parameters are the default
    lines += ['', 'Generator weights: ' + '; '.join(
        f'{m}: {"parameter EMA" if w == "ema" else "raw parameters"}' for m, w in weights.items()) + '.']
  for metric, fmt in (('psnr', '{:.2f}'), ('ssim', '{:.4f}')):
    values = results.get(metric) or {}
    if not values:
      continue
    cols = [c for c in columns if c in values]
    methods = [m for m in _methods(results, metric) if any(m in values[c] for c in cols)]
    lines += ['', f'## {metric.upper()} vs HR', '']
    lines += _table(['Method'] + cols, [[m] + [fmt.format(values[c][m]) if m in values[c] else '-'
                                              for c in cols] for m in methods])
  lines += ['', '## CMC', ''] + [f'![CMC {c}](cmc_{c}.png)' for c in columns if c in
                                 results.get('cmc', {})]
  for prefix in judge_prefixes(results).values():
    lines += [f'![{prefix[:-1]} CMC {c}](cmc_{prefix}{c}.png)' for c in columns if c in results.get(f'{prefix}cmc', {})]
  if results.get('examples'):
    lines += ['', '## Faces', '', '![faces](faces.png)']
  return '\n'.join(lines) + '\n'


def _verification_markdown(results: Mapping[str, Any], extra: Mapping[str, Any] | None) -> str:
  """Accuracy, TAR@FAR, EER, AUC and threshold per method, the published figure, per-fold accuracy."""
  fars = list(next(iter(results['methods'].values()))['tar_at_far'])
  header = (['Method', 'Accuracy (%)'] + [f'TAR@FAR={f} (%)' for f in fars] +
            ['EER (%)', 'AUC', 'Threshold (cos)'])
  rows = []
  for name, r in results['methods'].items():
    rows.append([name, f'{100 * r["accuracy"]:.2f} ± {100 * r["accuracy_std"]:.2f}'] +
                [f'{100 * r["tar_at_far"][f]:.2f}' for f in fars] +
                [f'{100 * r["eer"]:.2f}', f'{r["auc"]:.4f}', f'{r["threshold_mean"]:.3f}'])
  for name, acc in verification.REFERENCE.items():
    rows.append([name, f'{100 * acc:.2f}'] + ['-'] * (len(header) - 2))
  lines = ['# LFW verification (view 2, pairs.txt)', '',
           f'{results["num_folds"]}-fold accuracy, threshold chosen on the other folds; mean ± std '
           f'over folds (ddof=0). ROC, TAR@FAR, EER and AUC over all pairs; cosine scores'
           + ('; embeddings of the face and its mirror image concatenated (FaceNet\'s --use_flipped_images)'
              if results.get('flip') else '')
           + ('; the mean embedding of the training folds subtracted (FaceNet\'s --subtract_mean; '
              'of all pairs for the ROC)' if results.get('subtract_mean') else '') + '.', '',
           f'Pairs used: {results["num_pairs_used"]} of {results["num_pairs"]} '
           f'({results["num_same_used"]} same, {results["num_different_used"]} different); '
           f'dropped {results["num_pairs_dropped"]} with a missing image '
           f'({len(results["missing_images"])} missing: {", ".join(results["missing_images"][:10]) or "none"}). '
           f'Distinct images embedded: {results["num_images"]}.']
  for k, v in dict(extra or {}).items():
    lines.append(f'{k}: {v}')
  lines += [''] + _table(header, rows)
  lines += ['', 'Per-fold accuracy (%):', '']
  for name, r in results['methods'].items():
    lines.append(f'- {name}: ' + ', '.join(f'{100 * a:.2f}' for a in r['fold_accuracy']))
  lines += ['', '![ROC](roc.png)']
  return '\n'.join(lines) + '\n'


def summary(protocol: str, results: Mapping[str, Any], *, judge_only: bool = False) -> str:
  """The rank-1 table(s) and paired gains alone, for the terminal (report.md has everything).
  judge_only: just the judges' part (the embedder's part was printed before)."""
  columns = _columns(protocol, results)
  multi = len(results.get('trials') or []) > 1
  lines = []
  parts = [('', 'Rank-1 identification (%)')] * (not judge_only)
  parts += [(p, f'Judge {n}: rank-1 (%)') for n, p in judge_prefixes(results).items()]
  for prefix, title in parts:
    lines += ([''] if lines else []) + [title]
    lines += _table(['Method'] + columns, _rank1_rows(protocol, results, columns, prefix))
    if multi:
      lines += ['Paired gains over the trials (points, mean ± std):']
      lines += _gain_lines(results, columns, prefix, '')[3:]
  return '\n'.join(lines)


def _save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100)


def plot_cmc(path: str, condition: str, curves: Mapping[str, Sequence[float]],
             protocol: str = '') -> None:
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  for method, curve in curves.items():
    ranks = np.arange(1, len(curve) + 1)
    ax.plot(ranks, 100.0 * np.asarray(curve), label=method, marker='.' if len(curve) < 30 else None)
  ax.set_xlabel('rank')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel('identification rate (%)')
  ax.set_ylim(0, 101)
  ax.set_title(f'CMC {protocol} {condition}'.strip())
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right')
  fig.tight_layout()
  _save(fig, path)


def plot_roc(path: str, curves: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Verification ROC: true accept rate against false accept rate (log axis), one curve a method."""
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  floor = 1e-4
  for name, c in curves.items():
    far, tar = np.asarray(c['far']), np.asarray(c['tar'])
    ax.step(np.maximum(far, floor), 100 * tar, where='post', label=name)
  ax.set_xscale('log')
  ax.set_xlim(floor, 1)
  ax.set_xlabel('false accept rate (FPR)')
  ax.set_ylabel('true accept rate (%)')
  ax.set_title('LFW verification ROC')
  ax.grid(alpha=0.3, which='both')
  ax.legend(loc='lower right')
  fig.tight_layout()
  _save(fig, path)


def nearest_upscale(image: np.ndarray, out_hw: tuple[int, int] = (128, 128)) -> np.ndarray:
  """Nearest-neighbour upscale for display: every LR pixel stays a visible block."""
  h, w = image.shape[:2]
  rows = np.arange(out_hw[0]) * h // out_hw[0]
  cols = np.arange(out_hw[1]) * w // out_hw[1]
  return image[rows][:, cols]


def plot_faces(path: str, examples: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Grid: one row per (condition, example); columns LR (nearest-upscaled), bicubic, SR..., HR."""
  panels: list[str] = []
  for ex in examples.values():
    panels += [k for k in ex if k not in panels]
  order = [p for p in ('lr', 'bicubic') if p in panels]
  order += [p for p in panels if p not in PANEL_ORDER]
  order += [p for p in ('native', 'hr') if p in panels]
  rows = [(c, i) for c, ex in examples.items() for i in range(len(next(iter(ex.values()))))]
  if not rows:
    raise ValueError('no example faces to plot')
  fig = Figure(figsize=(1.6 * len(order), 1.6 * len(rows)))
  for r, (cond, i) in enumerate(rows):
    for col, p in enumerate(order):
      ax = fig.add_subplot(len(rows), len(order), r * len(order) + col + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      if p in examples[cond]:
        img = np.asarray(examples[cond][p][i])
        if p == 'lr':
          img = nearest_upscale(img)
        ax.imshow(img.astype(np.uint8), interpolation='nearest')
      if r == 0:
        ax.set_title(p, fontsize=9)
      if col == 0:
        ax.set_ylabel(cond, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def write_report(out_dir: str | os.PathLike, protocol: str, results: Mapping[str, Any],
                 checkpoint_step: int | None, extra: Mapping[str, Any] | None = None,
                 examples: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, str]:
  """Writes report.json, report.md and the figures of one evaluation; returns their paths.

  Identification: report.json = {"protocol", "rank1": {cond: {method: r}}, "cmc", "psnr", "ssim",
  "checkpoint_step", every other JSON-able result (rank1_std, trials, judges, judge_<name>_rank1,
  ...), "gains" and "judge_<name>_gains", then `extra` (embedder description, ...)}; figures
  cmc_<condition>.png and faces.png. `examples` defaults to results['examples'] ({cond: {'lr' |
  'bicubic' | <sr> | 'hr' | 'native': uint8 [n, h, w, 3]}}); no faces.png without any.

  Verification (protocol 'verification'): report.json = the results but the per-pair arrays
  (`verification.PER_PAIR_KEYS`), "reference_accuracy", then `extra`; the figure roc.png.
  `checkpoint_step` and `examples` play no part.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if protocol == VERIFICATION:
    return _write_verification(out_dir, results, extra)
  return _write_identification(out_dir, protocol, results, checkpoint_step, extra, examples)


def write_json(path: str, doc: Mapping[str, Any]) -> str:
  """`doc`, JSON-safe, at `path` in report.json's format; returns the path."""
  with open(path, 'w') as f:
    json.dump(_jsonable(doc), f, indent=1)
  return path


def as_json(doc: Any) -> Any:
  """`doc` as `write_json` then json.load give it back: for comparing with a file written before."""
  return json.loads(json.dumps(_jsonable(doc)))


def _write_documents(out_dir: str, doc: Mapping[str, Any], md: str) -> dict[str, str]:
  """report.json (`doc`, JSON-safe) and report.md; their paths as {'json', 'md'}."""
  paths = {'json': write_json(os.path.join(out_dir, 'report.json'), doc), 'md': os.path.join(out_dir, 'report.md')}
  with open(paths['md'], 'w') as f:
    f.write(md)
  return paths


def _write_identification(out_dir: str, protocol: str, results: Mapping[str, Any],
                          checkpoint_step: int | None, extra: Mapping[str, Any] | None,
                          examples: Mapping[str, Mapping[str, np.ndarray]] | None) -> dict[str, str]:
  extra = dict(extra or {})
  clash = set(extra) & set(CORE_KEYS)
  if clash:
    raise ValueError(f'extra may not override report keys {sorted(clash)}')
  doc = {'protocol': protocol, 'rank1': results['rank1'], 'cmc': results.get('cmc', {}),
         'psnr': results.get('psnr', {}), 'ssim': results.get('ssim', {}),
         'checkpoint_step': None if checkpoint_step is None else int(checkpoint_step)}
  for k, v in results.items():
    if k not in doc and k not in _SKIP:
      doc[k] = v
  doc['gains'] = gains(results)
  for prefix in judge_prefixes(results).values():
    if results.get(f'{prefix}rank1_trials'):
      doc[f'{prefix}gains'] = gains(results, prefix)
  doc.update(extra)
  paths = _write_documents(out_dir, doc, markdown(protocol, results, checkpoint_step, extra))
  for prefix in ['', *judge_prefixes(results).values()]:
    for cond, curves in results.get(f'{prefix}cmc', {}).items():
      key = f'cmc_{prefix}{cond}'
      paths[key] = os.path.join(out_dir, f'{key}.png')
      plot_cmc(paths[key], cond, curves, f'{protocol} ({prefix[:-1]})' if prefix else protocol)
  examples = results.get('examples') if examples is None else examples
  if examples:
    paths['faces'] = os.path.join(out_dir, 'faces.png')
    plot_faces(paths['faces'], examples)
  return paths


def _write_verification(out_dir: str, results: Mapping[str, Any],
                        extra: Mapping[str, Any] | None) -> dict[str, str]:
  doc = {k: v for k, v in results.items() if k not in verification.PER_PAIR_KEYS}
  doc['reference_accuracy'] = verification.REFERENCE
  doc.update(dict(extra or {}))
  paths = _write_documents(out_dir, doc, markdown(VERIFICATION, results, None, extra))
  paths['roc'] = os.path.join(out_dir, 'roc.png')
  plot_roc(paths['roc'], results['roc'])
  return paths


# A run's checkpoints scored one by one (`evaluator.score_runs` with an entry's `steps`): the curve.

EMBEDDER = 'embedder'  # the scorer name of an entry's own recognizer in a curve (judges keep theirs)


def rank1_by_scorer(doc: Mapping[str, Any]) -> dict[str, Any]:
  """{scorer: {cond: {method: rank-1}}} of one identification report: the embedder's and each judge's."""
  keys = {EMBEDDER: 'rank1', **{n: f'{p}rank1' for n, p in judge_prefixes(doc).items()}}
  return {scorer: doc[key] for scorer, key in keys.items() if key in doc}


def write_curve(out_dir: str, curve: Mapping[str, Any]) -> dict[str, str]:
  """curve.json (`curve`), curve.md and curve.png under `out_dir`; returns their paths.

  curve: {'eval_name', 'protocol', 'run', 'method' (the row whose checkpoints were walked),
  'global_batch', 'rows': [{'step', 'faces_seen', 'report', 'rank1': {scorer: {cond: {method: r}}}}]},
  rows in step order, each row's rank1 that of the step's report.json (`rank1_by_scorer`).
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {'json': write_json(os.path.join(out_dir, 'curve.json'), curve),
           'md': os.path.join(out_dir, 'curve.md'), 'png': os.path.join(out_dir, 'curve.png')}
  with open(paths['md'], 'w') as f:
    f.write(curve_markdown(curve))
  plot_curve(paths['png'], curve)
  return paths


def _curve_columns(curve: Mapping[str, Any], scorer: str) -> list[str]:
  last = curve['rows'][-1]['rank1'].get(scorer, {})
  return _columns(curve['protocol'], {'rank1': last})


def curve_markdown(curve: Mapping[str, Any]) -> str:
  """One table a scorer: the walked method's rank-1 (%) per condition, a row a step, then the
  reference rows (bicubic, HR: the same at every step) from the last step."""
  method, rows = curve['method'], curve['rows']
  lines = [f'# {curve["eval_name"]}: rank-1 identification (%) over training', '',
           f'Run: {curve["run"]}, row {method!r}; faces seen = step x global batch {curve["global_batch"]}. '
           f'Each step\'s full report: step_<N>/report.md.']
  for scorer in rows[-1]['rank1']:
    columns = _curve_columns(curve, scorer)
    table = [[str(r['step']), str(r['faces_seen'])] +
             [_pct(r['rank1'].get(scorer, {}).get(c, {}).get(method)) for c in columns] for r in rows]
    last = rows[-1]['rank1'][scorer]
    table += [[ref, ''] + [_pct(last.get(c, {}).get(ref)) for c in columns]
              for ref in ('bicubic', 'hr') if any(ref in last.get(c, {}) for c in columns)]
    title = 'Embedder' if scorer == EMBEDDER else f'Judge: {scorer}'
    lines += ['', f'## {title} (rank-1 %)', ''] + _table(['Step', 'Faces seen'] + columns, table)
  lines += ['', '![rank-1 against faces seen](curve.png)']
  return '\n'.join(lines) + '\n'


def plot_curve(path: str, curve: Mapping[str, Any]) -> None:
  """Rank-1 of the walked method against faces seen (log axis): a colour per condition, a line
  style per scorer. Steps that saw no faces (step 0) have no place on a log axis."""
  fig = Figure(figsize=(7, 5))
  ax = fig.add_subplot()
  rows = [r for r in curve['rows'] if r['faces_seen'] > 0]
  styles = ('-', '--', ':', '-.')
  colours = {}
  for i, scorer in enumerate(curve['rows'][-1]['rank1']):
    for cond in _curve_columns(curve, scorer):
      points = [(r['faces_seen'], r['rank1'].get(scorer, {}).get(cond, {}).get(curve['method'])) for r in rows]
      points = [(x, 100.0 * y) for x, y in points if y is not None]
      if not points:
        continue
      colour = colours.setdefault(cond, f'C{len(colours) % 10}')
      ax.plot(*zip(*points), linestyle=styles[i % len(styles)], marker='o', color=colour, label=f'{cond} {scorer}')
  ax.set_xscale('log')
  ax.set_xlabel(f'faces seen (step x {curve["global_batch"]})')
  ax.set_ylabel(f'rank-1 of {curve["method"]} (%)')
  ax.set_title(f'{curve["eval_name"]}: rank-1 over training')
  ax.grid(alpha=0.3, which='both')
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc='best', fontsize=8)
  fig.tight_layout()
  _save(fig, path)
