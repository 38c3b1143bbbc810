r"""Several trained generators scored side by side on one evaluation: how variants are chosen.

    python -m ipsr_jax.tools.compare --config=configs/lfw.py:dev --eval=lfw_dev \
        --runs=pixel_only=runs/dev/pixel,ipsr=runs/dev/ipsr,views=runs/dev/views \
        --config.data.root=runs/lfw/aligned --out=runs/dev/compare

Every generator (the newest checkpoint of each run) goes through the same protocol in one run:
the same trials, galleries and probes, so the report's paired gains (each variant against bicubic
and against `pixel_only` when one is named so) hold the split's noise out. The entry's embedder
and judges score all of them; HR and bicubic are embedded once. The report says which
recognizers each generator trained against. Embeddings are cached under `--out`/cache, so adding
a run later embeds only its own rows.

One training run per method leaves the training noise out of the trials' std. Name several runs
of a method (`--runs=pixel_only=runs/dev/pixel+runs/dev/pixel_s1,ipsr=runs/dev/ipsr+runs/dev/ipsr_s1`,
e.g. trained with `--config.seed=1`): the report adds each run's gain over pixel_only's run of the
same index, how far the second run moved each method, and the gain averaged over the runs. The
same syntax names runs in a config entry's `compare` (`--mode=eval`): {'ipsr': 'runs/a+runs/b'}.

Choose on the dev protocol (`configs/lfw.py:dev`, `lfw_dev`); run the test protocol (`lfw`, `orl`)
for the finalists only.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from ipsr_jax.runtime import console


def define_flags() -> dict[str, flags.FlagHolder]:
  # Defined only when run as a program: importing this module must not claim global flag names.
  return dict(
      config=config_flags.DEFINE_config_file('config', 'configs/lfw.py:dev', 'The configuration '
                                             'naming the evaluation (overrides as --config.a.b=v).'),
      eval=flags.DEFINE_string('eval', None, 'The config.evals entry to run, e.g. lfw_dev.'),
      runs=flags.DEFINE_list('runs', None, 'name=workdir pairs, one per generator; a name is a '
                             "report row ('pixel_only' is the ablation the others are paired with); "
                             'name=dir+dir2: one method trained twice (e.g. two seeds), paired run '
                             'by run and averaged.'),
      judges=flags.DEFINE_list('judges', None, "Override the entry's judges (e.g. dlib,sface); "
                               "'none' for the embedder alone."),
      out=flags.DEFINE_string('out', None, 'Report directory (report.md, report.json, cache/).'),
  )


def parse_runs(values: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """--runs: ['name=dir', 'name=dir+dir2', ...] -> {name: (dir, ...)}, in order (the syntax of
  `config.evals.<name>.compare` too: `evaluators.common.parse_runs`). Several workdirs joined by
  '+' are one method trained several times (other seeds): the rows name, name#2, ..., paired run
  by run with pixel_only's runs and averaged over them (`report.gains`)."""
  from ipsr_jax.evaluation.evaluators import common  # pylint: disable=g-import-not-at-top
  try:
    runs = common.parse_runs(values, '--runs')
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not runs:
    raise app.UsageError('--runs needs at least one name=workdir')
  return runs


def main(argv, holders: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ipsr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import paths  # pylint: disable=g-import-not-at-top
  config = holders['config'].value
  name, out = holders['eval'].value, holders['out'].value
  if name not in config.get('evals', {}):
    raise app.UsageError(f'--eval={name}: not in config.evals (has {sorted(config.get("evals", {}))})')
  runs = parse_runs(holders['runs'].value)
  judges = holders['judges'].value
  if judges is not None:
    judges = () if judges == ['none'] else tuple(judges)
  config_lib.validate(config)
  paths.resolve_config(config)
  cpu_devices.configure_from(config.mesh)  # before JAX starts its backends
  from ipsr_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  evaluator.score_runs(config, runs, out, names=[name], judges=judges)


def run() -> None:
  holders = define_flags()
  flags.mark_flags_as_required(['eval', 'runs', 'out'])
  console.run_tool(lambda argv: main(argv, holders), 'compare')


if __name__ == '__main__':
  run()
