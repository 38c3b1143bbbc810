"""`config.evals` entries (big_vision's shape): each names its `type`; that type's evaluator checks
the entry's settings and scores generators on it.

    config.evals.lfw = dict(type='identification', protocol='lfw', source='lfw', trials=10,
                            root='/data/lfw_aligned', compare={'pixel_only': 'runs/pixel_only'},
                            judges=('dlib', 'sface'))
    config.evals.lfw_pairs = dict(type='verification', root='/data/lfw_aligned',
                                  pairs='/data/lfw/pairs.txt', flip=True)

Types (`TYPES`, one module each): 'identification' (the paper's rank-1 protocols on super-resolved
probes) and 'verification' (LFW pairs on HR faces: the generators play no part). `from_config`
builds an entry's evaluator; `evaluation.evaluator.score_runs` runs entries on trained generators.

Trained runs are named in one syntax, read by `parse_runs` alone: `label=dir`, or `label=dir+dir2`
for one method trained several times (e.g. other seeds), whose rows are label, label#2, ...
(`run_labels`) and whose report pairs them run by run (`report.gains`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import ml_collections

from ipsr_jax.evaluation import judge as judge_lib
from ipsr_jax.evaluation import report
from ipsr_jax.models import recognizers as recognizers_lib

# type -> the module whose `Evaluator` class runs entries of that type (imported when used).
TYPES = {'identification': 'ipsr_jax.evaluation.evaluators.identification',
         'verification': 'ipsr_jax.evaluation.evaluators.verification'}
# Report rows every identification has: no run may take their names.
RESERVED_LABELS = ('hr', 'native', 'bicubic')

T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class Scored:
  """What an evaluator's run returns: its results, and the report's description lines (`extra`)."""
  results: dict[str, Any]
  extra: dict[str, Any]


class Evaluator:
  """One `config.evals` entry of a type: its settings, checked, and how it scores generators.

  A type sets DEFAULTS (every optional setting), REQUIRED (settings without a default) and
  SCORES_GENERATORS (False: the generators do not change its results), and implements `run`.
  """
  TYPE: ClassVar[str] = ''
  DEFAULTS: ClassVar[Mapping[str, Any]] = {}
  REQUIRED: ClassVar[tuple[str, ...]] = ()
  SCORES_GENERATORS: ClassVar[bool] = True

  def __init__(self, name: str, entry: Mapping[str, Any], where: str,
               recognizers: Mapping[str, Mapping[str, Any]] | None = None):
    self.name, self.where = name, where
    # The config's recognizers by name: judges are names of these.
    self.recognizers = recognizers_lib.default_entries() if recognizers is None else dict(recognizers)
    self.settings = settings(entry, self.DEFAULTS, where, self.REQUIRED)
    self.settings.judges = judge_lib.check_names(self.settings.judges, f'{where}.judges', self.recognizers)
    self.check()

  def check(self) -> None:
    """Raises ValueError naming a setting whose value is wrong."""

  def runs(self) -> dict[str, tuple[str, ...]]:
    """Runs the entry itself names ({label: run dirs}), scored beside the given ones (--mode=eval)."""
    return {}

  def embedder_weights(self, config: ml_collections.ConfigDict) -> str:
    """The recognizer it scores with: its own `embedder`, else the run's (config.embedder)."""
    return self.settings.embedder or config.embedder.checkpoint

  def judge_names(self, judges: Sequence[str] | None) -> tuple[str, ...]:
    """The entry's judges, or `judges` instead (() for the embedder alone)."""
    if judges is None:
      return tuple(self.settings.judges)
    return judge_lib.check_names(judges, f'judges of {self.name}', self.recognizers)

  def run(self, config: ml_collections.ConfigDict, sr_fns: Mapping[str, Callable[..., Any]],
          embedder: Callable[..., Any] | None, *, judges: Sequence[str] | None = None,
          cache_dir: str | None = None, repeats: Mapping[str, Sequence[str]] | None = None) -> Scored:
    """Scores `sr_fns` ({label: SR callable}) with `embedder` (and the judges); writes nothing."""
    raise NotImplementedError

  def write(self, out_dir: str, scored: Scored, checkpoint_step: int | None) -> dict[str, str]:
    """report.json, report.md and the figures under `out_dir`; returns their paths."""
    return report.write_report(out_dir, scored.results['protocol'], scored.results, checkpoint_step,
                               extra=scored.extra)


def settings(entry: Mapping[str, Any], defaults: Mapping[str, Any], where: str,
             required: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`entry` (but its `type`) over `defaults`; an unknown or a missing required key is an error."""
  entry = {k: v for k, v in entry.items() if k != 'type'}
  if 'judge' in entry:  # one name where a tuple of names is meant: say which key takes them
    raise ValueError(f"{where}.judge: the key is judges, a tuple of names, e.g. "
                     f"judges=('dlib', 'sface') (known: {sorted(judge_lib.JUDGES)})")
  known = set(defaults) | set(required)
  unknown = set(entry) - known
  if unknown:
    raise ValueError(f'{where}: unknown keys {sorted(unknown)}; known: {sorted(known | {"type"})}')
  missing = [k for k in required if k not in entry]
  if missing:
    raise ValueError(f'{where}: needs {" and ".join(missing)}')
  return ml_collections.ConfigDict({**defaults, **entry})


def from_entry(name: str, entry: Mapping[str, Any], where: str | None = None,
               recognizers: Mapping[str, Mapping[str, Any]] | None = None) -> Evaluator:
  """The evaluator of one entry (a dict with its `type`); `where` names it in errors;
  `recognizers`: the config's (`config.recognizers`, whose names `judges` takes)."""
  where = where or f'config.evals.{name}'
  kind = entry.get('type')
  if kind not in TYPES:
    raise ValueError(f'{where}: ' + (f'unknown type {kind!r}' if kind is not None else 'no type') +
                     f'; known types: {sorted(TYPES)}{_type_hint(entry)}')
  return importlib.import_module(TYPES[kind]).Evaluator(name, entry, where, recognizers)


def _type_hint(entry: Mapping[str, Any]) -> str:
  """The type an entry without one means, when its protocol names it."""
  protocol = entry.get('protocol')
  if 'type' in entry or protocol is None:
    return ''
  if protocol == 'verification':
    return " (protocol='verification' is type='verification')"
  return f" (protocol={protocol!r} is type='identification')"


def from_config(config: ml_collections.ConfigDict, name: str) -> Evaluator:
  """The evaluator of `config.evals[name]`."""
  evals = config.get('evals') or {}
  if name not in evals:
    raise ValueError(f'config.evals has no entry {name!r} (has {sorted(evals)})')
  entry = evals[name]
  return from_entry(name, entry.to_dict() if hasattr(entry, 'to_dict') else dict(entry),
                    recognizers=recognizers_lib.entries(config))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the first `config.evals` entry whose type or settings are wrong."""
  for name in config.get('evals') or {}:
    from_config(config, name)


def parse_runs(spec: Sequence[str] | Mapping[str, Any], where: str) -> dict[str, tuple[Any, ...]]:
  """Names of trained runs -> {label: (run dir, ...)}, in order.

  spec: a flag's ['label=dir', 'label=dir+dir2', ...] or a config's {label: 'dir' | 'dir+dir2'}
  (a program may give a list, and SR callables in place of dirs: runs already restored). Several
  dirs are one method trained several times. A label is unique, has no '#' and is not a reference
  row ('hr', 'native', 'bicubic', '<x>_concat').
  """
  if hasattr(spec, 'items'):
    pairs = [(label, dirs, f'{label}={dirs}') for label, dirs in spec.items()]
  else:
    pairs = []
    for value in spec:
      label, _, dirs = str(value).partition('=')  # no '=': no dirs, an error below
      pairs.append((label, dirs, value))
  runs = {}
  for label, dirs, given in pairs:
    if isinstance(dirs, str):
      dirs = dirs.split('+')
    dirs = (dirs,) if callable(dirs) else tuple(dirs)
    if not label or not dirs or not all(callable(d) or (isinstance(d, str) and d) for d in dirs):
      raise ValueError(f'{where}: entries are label=dir or label=dir+dir2, got {given!r}')
    if label in runs or label in RESERVED_LABELS or label.endswith('_concat') or '#' in label:
      raise ValueError(f'{where}: the label {label!r} is taken or reserved')
    runs[label] = dirs
  return runs


def run_labels(runs: Mapping[str, Sequence[T]]) -> tuple[dict[str, T], dict[str, list[str]]]:
  """{method: [run, ...]} -> ({row label: run}, {method: [its labels]} for methods run twice or
  more): the rows are method, method#2, ..."""
  labels, repeats = {}, {}
  for method, items in runs.items():
    names = [method] + [f'{method}#{i}' for i in range(2, len(items) + 1)]
    labels.update(zip(names, items))
    if len(names) > 1:
      repeats[method] = names
  return labels, repeats
