"""Pretrain Inception-ResNet-v1 as a face recognizer (for users without FaceNet weights).

    python -m ipsr_jax.main --config=configs/embedder.py --workdir=runs/embedder \
        --config.data.root=/data/casia_aligned

writes `runs/embedder/embedder`, which `--config.embedder.checkpoint` of configs/base.py accepts.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.mode = 'pretrain_embedder'
  config.pretrain.head = 'arcface'
  config.data.degrade_on_device = True   # the recognizer trains on HR faces: skip host degradation
  config.data.random_flip = False        # flipped in the step
  config.train.batch_size = 128
  config.train.num_train_steps = 100_000
  config.train.learning_rate = 1e-3
  config.train.b1 = 0.9
  config.train.schedule = 'warmup_cosine'
  config.train.warmup_steps = 1000
  config.train.image_summary_every_steps = 0
  if arg == 'local':
    config.embedder.width = 0.25
    config.embedder.input_size = 96
    config.train.batch_size = 16
    config.train.num_train_steps = 200
    config.train.warmup_steps = 20
    config.train.log_every_steps = 10
  elif arg:
    raise ValueError(f'configs/embedder.py: unknown variant {arg!r} (known: local)')
  return config
