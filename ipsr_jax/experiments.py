"""The embedded default: the whole method, end to end, with nothing to download.

`python -m ipsr_jax.main --config=configs/demo.py --workdir=runs/demo` runs four stages, each in
its own sub-directory and each resumed (or skipped when complete) if the command runs again:

  1. embedder/    pretrain a small Inception-ResNet-v1 on the training identities (the frozen
                  recognizer of the identity loss); skipped when config.embedder.checkpoint names
                  one (e.g. FaceNet weights converted with ipsr_jax.tools.convert_facenet)
  2. ipsr/        identity-preserving SR: L = MSE(E(SR), E(HR)) + beta * MSE(SR, HR)
  3. pixel_only/  the ablation without the identity term
  4. report/      identification on held-out identities (never seen in training): HR, bicubic,
                  SR, pixel-only and the concatenated embeddings, per LR size
  5. (configs/lfw.py) the same reports scored again by the independent judges (dlib, SFace)

Real photos (configs/lfw.py) get a stage 0: MTCNN alignment into <workdir>/aligned (and
<workdir>/aligned_<eval> for evaluation sets with `align=True`), resumed and reused. The
evaluation keeps its embeddings in report/<eval>/cache, so stages 4 and 5 resume mid-way.
"""

import os
import time

import ml_collections

from ipsr_jax import config as config_lib
from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import console
from ipsr_jax.training import embedder_train
from ipsr_jax.training import train
from ipsr_jax.evaluation import evaluator
from ipsr_jax.evaluation.evaluators import common as evaluators


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The demo config with the nested overrides of `config.demo.<stage>` merged in."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.update_from_flattened_dict(config_lib.flatten(config.demo[stage].to_dict()))
  return out


def _complete(workdir: str, num_steps: int) -> bool:
  if not os.path.isdir(checkpointing.checkpoint_dir(workdir)):
    return False
  return checkpointing.Checkpointer(workdir, read_only=True).latest_step() == num_steps


def _align_folder(source: str, root: str, out: str, size: int, pad: float) -> None:
  """MTCNN-align `root` into `out` unless done (report.json); a killed run resumes."""
  from ipsr_jax.data import face_align  # pylint: disable=g-import-not-at-top
  from ipsr_jax.data.sources import folders  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(out, 'report.json')):
    return
  console.header(f'Demo stage 0: aligning {root} into {out} with MTCNN')
  summary = face_align.align_tree(folders.find_lfw_images(root) if source == 'lfw' else root, out,
                             size=size, pad=pad, progress=True)
  console.say(f"Aligned {summary['aligned']}/{summary['total']} images; failures listed in {out}/report.json")


def _aligned(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Stage 0 for real photos: the config reading faces aligned under the workdir.

  `data.root` -> <workdir>/aligned; each `config.evals` entry with `align=True` and a root ->
  <workdir>/aligned_<name> (with its `align_pad`). An entry of another source whose root is empty
  is dropped with a note (e.g. ORL when --config.evals.orl.root is not given).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  out = os.path.join(workdir, 'aligned')
  _align_folder(config.data.source, config.data.root, out, config.data.image_size, 0.0)
  config.data.root = out
  for name in list(config.evals):
    entry = config.evals[name]
    if not entry.get('align') or entry.get('source', config.data.source) == config.data.source:
      continue
    if not entry.get('root'):
      console.say(f'config.evals.{name}.root is empty: the {name} evaluation is skipped.')
      del config.evals[name]
      continue
    out = os.path.join(workdir, f'aligned_{name}')
    _align_folder(entry.source, entry.root, out, config.data.image_size, entry.get('align_pad', 0.0))
    entry.root = out
  return config


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
  started = time.time()
  stages = ('embedder', 'ipsr', 'pixel_only')
  dirs = {s: os.path.join(workdir, s) for s in stages}
  if config.demo.align:
    config = _aligned(config, workdir)
  judged = [n for n in config.evals if evaluators.from_config(config, n).settings.judges]
  total = 5 if judged else 4

  def banner(i, text):
    console.header(f'Demo stage {i}/{total}: {text} ({console.duration(time.time() - started)} so far)')

  embedder_dir = config.embedder.checkpoint
  if embedder_dir:  # e.g. converted FaceNet weights: no stage 1; the reports name this embedder
    console.header(f'Demo stage 1/{total}: skipped, the embedder is config.embedder.checkpoint={embedder_dir}')
  else:
    banner(1, f'pretraining the embedder on the training identities of {config.data.source}')
    embedder_dir = embedder_train.train_embedder(stage_config(config, 'embedder'), dirs['embedder'])
  for i, stage in enumerate(stages[1:], start=2):
    cfg = stage_config(config, stage)
    cfg.embedder.checkpoint = embedder_dir
    if _complete(dirs[stage], cfg.train.num_train_steps):
      console.say(f'Demo stage {i}/{total}: {stage} already complete in {dirs[stage]}')
      continue
    banner(i, 'training identity-preserving SR' if stage == 'ipsr' else 'training the pixel-only ablation')
    train.train_and_evaluate(cfg, dirs[stage])
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.embedder.checkpoint = embedder_dir
  # Restored once for both stages: the reports' rows 'sr' (IPSR) and 'pixel_only'.
  runs = evaluator.restore_runs({'sr': [dirs['ipsr']], 'pixel_only': [dirs['pixel_only']]})
  embedders = {}
  results = {}
  # Stage 4 scores with the embedder only, so its tables come before the (slow) judges; stage 5
  # rescores with the entry's judges beside it, the embedder's part read back from the cache.
  for i, judge in ((4, False), (5, True)):
    names = judged if judge else list(cfg.evals)
    if not names:
      continue
    banner(i, 'scoring with the independent judges' if judge else 'evaluating on held-out identities')
    results.update(evaluator.score_runs(
        cfg, runs, os.path.join(workdir, 'report', evaluator.NAME), names=names, judges=None if judge else (),
        report_step='sr', embedders=embedders, show='judges' if judge else 'all'))
  console.say(f'Demo finished in {console.duration(time.time() - started)}.')
  return results
