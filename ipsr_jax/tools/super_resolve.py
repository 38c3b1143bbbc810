r"""Super-resolve a folder of low-resolution faces with a trained run.

    python -m ipsr_jax.tools.super_resolve --workdir=runs/ipsr --input=/data/probes \
        --output=/data/probes_sr [--step=50000] [--batch_size=64]

Reads `--input` recursively (or one image file) and writes each SR face as PNG under `--output`
at the same relative path (`a/b.jpg` -> `a/b.png`; when two inputs would share a name, the
original extension is kept: `a/b.jpg.png`). Inputs of any size are bicubic-resized on the host to
the model's size first (PIL-exact uint8, as the training data), so one compiled program serves a
folder of mixed sizes; images larger than `--max_side` are reduced on decode first, with one line
saying so (`data.image_folder`). Unreadable files (broken links included) are listed on stderr and
in `<output>/report.json`; they do not stop the run.

The output folder is checked before the model loads (`runtime.outputs`): an unwritable path fails
at once, and a non-empty folder that super_resolve did not write (no report.json of its own, files
it would not write) is refused unless `--overwrite`. Files are written under a temporary name and
renamed into place. This module also holds the terminal lines about a folder's inputs that every
folder tool prints (`report_unreadable`, `report_reduced`).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, TYPE_CHECKING

from absl import app
from absl import flags

from ipsr_jax.runtime import console
from ipsr_jax.runtime import paths
from ipsr_jax.runtime import outputs

TOOL = 'super_resolve'
REPORT_FILE = outputs.REPORT_FILE

if TYPE_CHECKING:  # imported when used: it loads JAX
  from ipsr_jax.data.image_folder import ImageFolder


def output_names(names: list[str]) -> dict[str, str]:
  """Relative input path -> relative PNG path, unique even when `a.jpg` and `a.png` both exist."""
  stems = collections.Counter(os.path.splitext(n)[0] for n in names)
  return {n: (os.path.splitext(n)[0] + '.png' if stems[os.path.splitext(n)[0]] == 1
              else n + '.png') for n in names}


def super_resolve_folder(sr: Any, input_path: str | ImageFolder, output_dir: str, *,
                         batch_size: int = 64, workers: int = 4, progress: bool = True,
                         overwrite: bool = False, max_side: int | None = None) -> dict[str, Any]:
  """Writes SR PNGs of every readable image under `input_path`; returns (and writes) the report.

  `input_path`: a folder or file, or an `ImageFolder` already listed (its own cap holds);
  `max_side`: the cap on decode, as `--max_side` (None: `image_folder.MAX_SIDE`, 0: none).
  `output_dir` is checked first (`prepare_output`).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from ipsr_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  from ipsr_jax.serving.inference import prefetch  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  folder = image_folder.as_image_folder(input_path, max_side)
  names = output_names(folder.names)
  prepare_output(output_dir, names, overwrite=overwrite)
  written = 0
  batches = folder.batches(batch_size, image_size=sr.image_size, workers=workers)
  with console.Progress(len(folder), 'super-resolve', unit='img', quiet=not progress) as bar:
    done = 0
    for batch in prefetch(batches):
      faces = sr(batch.images)
      for name, face in zip(batch.names, faces):
        path = os.path.join(output_dir, *names[name].split('/'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with outputs.atomic_path(path) as partial:
          Image.fromarray(face).save(partial, format='PNG')
        written += 1
      done += len(batch.names)
      bar.update(done, postfix=f'unreadable {len(folder.unreadable)}')
    bar.update(len(folder))
  report = dict(
      tool=TOOL, input=os.path.abspath(folder.input), output=os.path.abspath(output_dir),
      total=len(folder), written=written, image_size=sr.image_size, source=sr.info,
      unreadable=[dict(path=u.name, reason=u.reason) for u in folder.unreadable],
      outputs={n: names[n] for n in folder.names if n not in {u.name for u in folder.unreadable}},
      **folder.reduced_report(), seconds=round(time.perf_counter() - start, 3))
  outputs.write_json(os.path.join(output_dir, REPORT_FILE), report, sort_keys=True)
  report_unreadable(report['unreadable'])
  report_reduced(report)
  return report


def prepare_output(output_dir: str, names: dict[str, str], *, overwrite: bool = False) -> str:
  """`outputs.prepare_folder` for super_resolve's output: its own earlier output (a report.json
  of super_resolve, or only the PNGs `names` maps to) is written into again."""
  return outputs.prepare_folder(output_dir, tool=TOOL, overwrite=overwrite,
                                expected={*names.values(), REPORT_FILE})


def report_unreadable(unreadable: list[dict[str, str]]) -> None:
  if unreadable:
    print(f'{len(unreadable)} unreadable file(s) skipped:', file=console.terminal())
    for u in unreadable:
      print(f"  {u['path']}: {u['reason']}", file=console.terminal())


def report_reduced(report: dict[str, Any]) -> None:
  """One terminal line when images were reduced on decode (`image_folder.reduced_summary`)."""
  from ipsr_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  line = image_folder.reduced_summary(report)
  if line:
    print(line, file=console.terminal())


def define_flags() -> dict[str, flags.FlagHolder]:
  """The CLI's flags (defined only when run as a program: importing this module has no effect)."""
  return dict(
      workdir=paths.DEFINE_path('workdir', None, 'Training run (local or gs://): config.json '
                                  'and checkpoints/.'),
      step=flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).'),
      input=paths.DEFINE_path('input', None, 'Folder of LR faces (read recursively) or a file.'),
      output=paths.DEFINE_path('output', None, 'Output folder (created); mirrors the input.'),
      batch_size=flags.DEFINE_integer('batch_size', 64, 'Images per device call.'),
      workers=flags.DEFINE_integer('workers', 4, 'Threads decoding images.'),
      max_side=flags.DEFINE_integer('max_side', None, 'Reduce images whose larger side exceeds '
                                    'this on decode (default: image_folder.MAX_SIDE, 2048; 0: '
                                    'never).'),
      overwrite=flags.DEFINE_bool('overwrite', False, 'Write into a non-empty --output folder '
                                  'that super_resolve did not write.'),
      bfloat16=flags.DEFINE_bool('bfloat16', False, 'Compute in bfloat16 (faster on TPU/GPU).'),
      progress=flags.DEFINE_bool('progress', True, 'Show progress (a bar on a terminal, else plain lines).'),
  )


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ipsr_jax.data import image_folder  # pylint: disable=g-import-not-at-top

  v = {k: h.value for k, h in flag_values.items()}
  # The input listed and the output proved writable before the model loads or any image is read.
  folder = image_folder.as_image_folder(v['input'], v['max_side'])
  prepare_output(v['output'], output_names(folder.names), overwrite=v['overwrite'])

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (after flag parsing)

  from ipsr_jax.serving.inference import SuperResolver  # pylint: disable=g-import-not-at-top
  sr = SuperResolver.from_checkpoint(v['workdir'], v['step'],
                                     dtype=jnp.bfloat16 if v['bfloat16'] else jnp.float32)
  report = super_resolve_folder(sr, folder, v['output'], batch_size=v['batch_size'],
                                workers=v['workers'], progress=v['progress'],
                                overwrite=v['overwrite'])
  print(f"super-resolved {report['written']}/{report['total']} images to "
        f"{report['image_size']}x{report['image_size']} in {report['seconds']:.1f} s "
        f"(step {sr.info['step']}); unreadable: {len(report['unreadable'])}; "
        f"report: {os.path.join(v['output'], REPORT_FILE)}")


def run() -> None:
  """Console entry point."""
  holders = define_flags()
  flags.mark_flags_as_required(['workdir', 'input', 'output'])
  console.run_tool(lambda argv: main(argv, holders), 'super_resolve')


if __name__ == '__main__':
  run()
