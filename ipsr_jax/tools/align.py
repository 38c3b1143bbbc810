r"""Align a folder of face photos with MTCNN: `<input>/<identity>/<image>` -> same layout, size x size.

    python -m ipsr_jax.tools.align --input=/data/lfw/images_deepfunneled \
        --output=/data/lfw_aligned_128 --size=128
    python -m ipsr_jax.tools.align --input=/data/orl --output=/data/orl_aligned_128 --pad=0.25

Writes `<output>/report.json` (counts, failures with their reasons, seconds). Images where MTCNN
finds no face, and files that cannot be read (broken links included), are listed there, never
silently dropped. `--pad` adds a replicated border before detection (pixels, or a fraction of each
side when < 1) for tightly cropped faces such as ORL. Images are listed and decoded as in every
tool (`data.image_folder`); those larger than `--max_side` are reduced on decode, with one line
saying so.

The output folder is checked before the detector loads (`runtime.outputs`): an unwritable path fails
at once; align's own earlier output (its report.json, or only faces it writes) resumes, and any
other non-empty folder is refused unless `--overwrite`.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from ipsr_jax.runtime import console
from ipsr_jax.runtime import paths

_INPUT = paths.DEFINE_path('input', None, 'Root of <identity>/<image> folders to align.')
_OUTPUT = paths.DEFINE_path('output', None, 'Output root (created), mirrors the input layout.')
_SIZE = flags.DEFINE_integer('size', 128, 'Side of the aligned square faces, in pixels.')
_PAD = flags.DEFINE_float('pad', 0.0, 'Border added before detection: pixels (>= 1) or a fraction '
                          'of each side (< 1). Use for tight crops (ORL: 0.25).')
_WORKERS = flags.DEFINE_integer('workers', None, 'Threads decoding, detecting and writing '
                                '(default: the number of CPUs).')
_FORMAT = flags.DEFINE_enum('format', 'png', ['png', 'jpg'], 'Output image format (jpg: q=95).')
_MAX_SIDE = flags.DEFINE_integer('max_side', None, 'Reduce images whose larger side exceeds this '
                                 'on decode (default: image_folder.MAX_SIDE, 2048; 0: never).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Write into a non-empty --output folder that '
                               'align did not write.')
_MTCNN_WEIGHTS = paths.DEFINE_path('mtcnn_weights', None, 'Folder with pnet.pt, rnet.pt, onet.pt (default: the copies inside the '
    'installed facenet-pytorch wheel, found without importing it).')
flags.mark_flags_as_required(['input', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ipsr_jax.data import face_align  # pylint: disable=g-import-not-at-top  (after flag parsing: jax)
  from ipsr_jax.tools import super_resolve  # pylint: disable=g-import-not-at-top

  report = face_align.align_tree(_INPUT.value, _OUTPUT.value, size=_SIZE.value, workers=_WORKERS.value,
                            pad=_PAD.value, image_format=_FORMAT.value,
                            weights_dir=_MTCNN_WEIGHTS.value, progress=True,
                            overwrite=_OVERWRITE.value, max_side=_MAX_SIDE.value)
  super_resolve.report_reduced(report)
  print(f"aligned {report['aligned']}/{report['total']} images "
        f"({100 * report['success_rate']:.2f}%) in {report['seconds']:.1f} s "
        f"({report['images_per_second']:.1f} img/s, {report['workers']} workers); "
        f"no face: {report['no_face']}, unreadable: {report['unreadable']}")
  for failure in report['failures'][:10]:
    print(f"  {failure['path']}: {failure['reason']}")
  if report['failed'] > 10:
    print(f"  ... {report['failed'] - 10} more")
  print(f"report: {os.path.join(_OUTPUT.value, 'report.json')}")


if __name__ == '__main__':
  console.run_tool(main, 'align')
