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
"""

import os
import time

import ml_collections

from ipsr_jax import checkpointing
from ipsr_jax import console
from ipsr_jax import embedder_train
from ipsr_jax import train
from ipsr_jax.evaluation import evaluator


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The demo config with the nested overrides of `config.demo.<stage>` merged in."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.update_from_flattened_dict(dict(_flatten(config.demo[stage].to_dict())))
  return out


def _flatten(tree: dict, prefix: str = ''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _complete(workdir: str, num_steps: int) -> bool:
  if not os.path.isdir(checkpointing.checkpoint_dir(workdir)):
    return False
  return checkpointing.Checkpointer(workdir, read_only=True).latest_step() == num_steps


def _aligned(config: ml_collections.ConfigDict, out: str) -> ml_collections.ConfigDict:
  """Stage 0 for real photos: MTCNN-align `data.root` into `out` once; the config then reads `out`."""
  from ipsr_jax.data import align  # pylint: disable=g-import-not-at-top
  from ipsr_jax.data.sources import folders  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(out, 'report.json')):
    console.header(f'Demo stage 0/4: aligning {config.data.root} into {out} with MTCNN')
    summary = align.align_tree(folders.find_lfw_images(config.data.root) if config.data.source == 'lfw'
                               else config.data.root, out, size=config.data.image_size, progress=True)
    console.say(f"Aligned {summary['aligned']}/{summary['total']} images; failures listed in {out}/report.json")
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.root = out
  return config


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from ipsr_jax import inference  # pylint: disable=g-import-not-at-top
  started = time.time()
  stages = ('embedder', 'ipsr', 'pixel_only')
  dirs = {s: os.path.join(workdir, s) for s in stages}

  def banner(i, text):
    console.header(f'Demo stage {i}/4: {text} ({console.duration(time.time() - started)} so far)')

  if config.demo.align:
    config = _aligned(config, os.path.join(workdir, 'aligned'))
  embedder_dir = config.embedder.checkpoint
  if embedder_dir:  # e.g. converted FaceNet weights: no stage 1; the reports name this embedder
    console.header(f'Demo stage 1/4: skipped, the embedder is config.embedder.checkpoint={embedder_dir}')
  else:
    banner(1, f'pretraining the embedder on the training identities of {config.data.source}')
    embedder_dir = embedder_train.train_embedder(stage_config(config, 'embedder'), dirs['embedder'])
  for i, stage in enumerate(stages[1:], start=2):
    cfg = stage_config(config, stage)
    cfg.embedder.checkpoint = embedder_dir
    if _complete(dirs[stage], cfg.train.num_train_steps):
      console.say(f'Demo stage {i}/4: {stage} already complete in {dirs[stage]}')
      continue
    banner(i, 'training identity-preserving SR' if stage == 'ipsr' else 'training the pixel-only ablation')
    train.train_and_evaluate(cfg, dirs[stage])
  banner(4, 'evaluating on held-out identities')
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.embedder.checkpoint = embedder_dir
  sr = inference.SuperResolver.from_checkpoint(dirs['ipsr'])
  sr_fns = {'sr': sr, 'pixel_only': inference.SuperResolver.from_checkpoint(dirs['pixel_only'])}
  results = {}
  for name in cfg.evals:
    out = os.path.join(workdir, 'report', name)
    results[name] = evaluator.run_eval(cfg, name, sr_fns, out, sr.info['step'])
    evaluator.announce(results[name], out)
  console.say(f'Demo finished in {console.duration(time.time() - started)}.')
  return results
