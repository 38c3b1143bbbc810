"""Checks a config before anything is built or compiled; each error names the offending field."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from ipsr_jax.data import camera
from ipsr_jax.runtime import cpu_devices
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.models import recognizers as recognizers_lib
from ipsr_jax.ops import views

MODES = ('train', 'eval', 'pretrain_embedder', 'demo')
SOURCES = ('identity_folder', 'lfw', 'orl', 'ar', 'scface', 'tfds', 'synthetic')
DTYPES = ('float32', 'bfloat16')
WORKER_HANDOFFS = ('pipe', 'shared_memory')
IDENTITY_DISTANCES = ('mse', 'cosine', 'contrastive')  # training.losses implements each


class ConfigError(ValueError):
  pass


def _need(ok: bool, field: str, value: Any, why: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {why}')


def _positive(config, field: str, allow_zero: bool = False) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
  _need(ok, field, value, 'must be a number ' + ('>= 0' if allow_zero else '> 0'))


def validate_lr_sizes(sizes, field: str, image_size: int) -> None:
  _need(len(sizes) > 0, field, sizes, 'needs at least one (height, width)')
  for hw in sizes:
    ok = len(hw) == 2 and all(isinstance(s, int) and 1 <= s <= image_size for s in hw)
    _need(ok, field, sizes, f'each entry must be (height, width) integers in 1..{image_size}; bad entry {hw!r}')


def validate_degradation(data: ml_collections.ConfigDict) -> None:
  """data.degradation: a name or a camera's operator settings, on host, with 8-bit LR images."""
  degradation = data.get('degradation', camera.BICUBIC)
  try:
    camera.resolve(degradation, 'data.degradation')
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  if camera.is_bicubic(degradation):
    return
  _need(data.degrade_on_device is not True, 'data.degrade_on_device', data.degrade_on_device,
        f'data.degradation={degradation!r} runs on host only (the device path is bicubic); '
        "use False or 'auto'")
  _need(bool(data.round_lr), 'data.round_lr', data.round_lr,
        f'data.degradation={degradation!r} always makes 8-bit LR images (JPEG); use True')


def validate_recognizers(config: ml_collections.ConfigDict) -> None:
  """config.recognizers' entries, and the names and weights of the identity term's recognizers."""
  loss = config.loss
  if 'extra_recognizers' in loss:
    extra = tuple(loss.extra_recognizers)
    raise ConfigError(f'config.loss.extra_recognizers={extra!r}: the key is gone; the identity term '
                      f'takes names of config.recognizers: loss.recognizers='
                      f'{("facenet",) + tuple(n for n in extra if n != "facenet")!r}')
  known = recognizers_lib.entries(config)
  for name, entry in known.items():
    try:
      recognizers_lib.check_entry(name, entry)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  names = loss.get('recognizers', ('facenet',))
  _need(isinstance(names, (tuple, list)) and len(names) > 0, 'loss.recognizers', names,
        'must be a non-empty tuple of names of config.recognizers')
  try:
    recognizers_lib.check_names(names, known, 'config.loss.recognizers',
                                kinds=recognizers_lib.DIFFERENTIABLE, role='recognizers of the loss')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  weights = tuple(loss.get('recognizer_weights', ()) or ())
  ok = (len(weights) in (0, len(names))
        and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
        and (not weights or sum(weights) > 0))
  _need(ok, 'loss.recognizer_weights', weights,
        f'must be () (equal weights) or one number >= 0 per name of loss.recognizers {tuple(names)}, '
        'not all 0')


def validate(config: ml_collections.ConfigDict, *, data_paths: bool = True) -> None:
  """Raises ConfigError for the first wrong value; a no-op on a good config.

  `data_paths=False` skips the checks that a dataset was named (the ahead-of-time compiler
  builds the step from shapes alone)."""
  m, e, loss, d, t = config.model, config.embedder, config.loss, config.data, config.train
  _need(config.get('mode', 'train') in MODES, 'mode', config.get('mode'), f'must be one of {MODES}')
  for f in ('model.ngf', 'model.num_downs', 'model.image_size', 'model.bn_epsilon', 'model.init_stddev',
            'embedder.input_size', 'embedder.embedding_size', 'embedder.width', 'train.batch_size',
            'train.learning_rate', 'train.log_every_steps', 'train.checkpoint_every_steps',
            'train.keep_checkpoints', 'data.image_size', 'data.worker_buffer_size'):
    _positive(config, f)
  for f in ('loss.beta', 'loss.identity_weight', 'loss.pixel_weight', 'train.warmup_steps',
            'train.grad_clip_norm', 'train.weight_decay', 'train.eval_every_steps', 'train.profile_steps',
            'train.image_summary_every_steps', 'data.num_workers', 'data.read_threads',
            'data.random_crop_padding', 'data.dev_identities',
            'model.num_dropout_blocks'):
    _positive(config, f, allow_zero=True)
  _need(m.image_size % (2**m.num_downs) == 0, 'model.num_downs', m.num_downs,
        f'model.image_size={m.image_size} must be divisible by 2**num_downs')
  _need(d.image_size == m.image_size, 'data.image_size', d.image_size,
        f'must equal model.image_size={m.image_size}')
  _need(m.num_dropout_blocks <= m.num_downs - 1, 'model.num_dropout_blocks', m.num_dropout_blocks,
        f'at most the {m.num_downs - 1} decoder blocks')
  _need(0.0 <= m.dropout_rate < 1.0, 'model.dropout_rate', m.dropout_rate, 'must be in [0, 1)')
  _need(0.0 <= m.leaky_relu_slope < 1.0, 'model.leaky_relu_slope', m.leaky_relu_slope, 'must be in [0, 1)')
  _need(0.0 < m.bn_momentum < 1.0, 'model.bn_momentum', m.bn_momentum, 'must be in (0, 1)')
  _need(loss.identity_distance in IDENTITY_DISTANCES, 'loss.identity_distance', loss.identity_distance,
        f'must be one of {IDENTITY_DISTANCES}')
  _need(loss.get('temperature', 0.1) > 0, 'loss.temperature', loss.get('temperature'), 'must be > 0')
  validate_recognizers(config)
  if loss.get('views') is not None:
    views.validate(loss.views)
  _need(loss.identity_weight > 0 or loss.pixel_weight > 0 or loss.get('feature_weight', 0.0) > 0,
        'loss.identity_weight', loss.identity_weight, 'loss.pixel_weight and loss.feature_weight are all 0: nothing to train')
  feature_weight = loss.get('feature_weight', 0.0)
  _need(isinstance(feature_weight, (int, float)) and not isinstance(feature_weight, bool) and feature_weight >= 0,
        'loss.feature_weight', feature_weight, 'must be a number >= 0')
  if feature_weight:
    layers = tuple(loss.get('feature_layers', ()))
    _need(layers and set(layers) <= set(inception_resnet_v1.FEATURE_LAYERS) and len(set(layers)) == len(layers),
          'loss.feature_layers', layers, f'must be distinct names from {inception_resnet_v1.FEATURE_LAYERS}')
  _need(d.source in SOURCES, 'data.source', d.source, f'must be one of {SOURCES}')
  _need(d.lr_per in ('example', 'batch'), 'data.lr_per', d.lr_per, "must be 'example' or 'batch'")
  _need(d.worker_handoff in WORKER_HANDOFFS, 'data.worker_handoff', d.worker_handoff,
        f'must be one of {WORKER_HANDOFFS}')
  on_device = d.degrade_on_device
  _need(on_device is None or isinstance(on_device, bool) or on_device == 'auto', 'data.degrade_on_device',
        on_device, "must be True, False, None or 'auto' (auto: on for GPU/TPU, off on CPU)")
  validate_lr_sizes(d.lr_sizes, 'data.lr_sizes', d.image_size)
  validate_degradation(d)
  validate_lr_sizes(t.image_summary_lr_sizes, 'train.image_summary_lr_sizes', d.image_size)
  random_grey = d.get('random_grey', 0.0)
  _need(isinstance(random_grey, (int, float)) and not isinstance(random_grey, bool)
        and 0.0 <= random_grey <= 1.0, 'data.random_grey', random_grey, 'must be a probability in [0, 1]')
  _need(0.0 <= d.max_bad_fraction < 1.0, 'data.max_bad_fraction', d.max_bad_fraction, 'must be in [0, 1)')
  _need(t.optimizer in ('adam', 'adamw', 'sgd'), 'train.optimizer', t.optimizer, "must be 'adam', 'adamw' or 'sgd'")
  _need(t.schedule in ('constant', 'cosine', 'warmup_cosine'), 'train.schedule', t.schedule,
        "must be 'constant', 'cosine' or 'warmup_cosine'")
  _need(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, 'train.b1', (t.b1, t.b2), 'b1 and b2 must be in [0, 1)')
  ema = t.get('ema_decay', 0.0)
  _need(isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0.0 <= ema < 1.0, 'train.ema_decay', ema,
        'must be a number in [0, 1): 0 is off, e.g. 0.999 keeps an EMA of the generator')
  _need(t.compute_dtype in DTYPES, 'train.compute_dtype', t.compute_dtype, f'must be one of {DTYPES}')
  _need(t.num_train_steps == -1 or t.num_train_steps > 0, 'train.num_train_steps', t.num_train_steps,
        'must be -1 (from num_epochs) or > 0')
  _need(t.num_train_steps > 0 or t.num_epochs > 0, 'train.num_epochs', t.num_epochs,
        'must be > 0 when num_train_steps is -1')
  needs_root = d.source in ('identity_folder', 'lfw', 'orl', 'ar', 'scface')
  _need(not (data_paths and needs_root) or bool(d.root), 'data.root', d.root,
        f'is required for data.source={d.source!r}: the folder of aligned 128x128 faces')
  _need(not data_paths or d.source != 'tfds' or bool(d.tfds_name), 'data.tfds_name', d.tfds_name,
        "is required for data.source='tfds'")
  _need(config.mesh.fsdp >= 1 and (config.mesh.data == -1 or config.mesh.data >= 1), 'mesh', config.mesh.to_dict(),
        'data must be -1 or >= 1 and fsdp >= 1')
  try:
    cpu_devices.resolve(config.mesh.get('cpu_devices', cpu_devices.AUTO))
    cpu_ok = True
  except ValueError:
    cpu_ok = False
  _need(cpu_ok, 'mesh.cpu_devices', config.mesh.get('cpu_devices'), "must be 'auto' or a number >= 1")
  _need(isinstance(config.mesh.get('cpu_embedder_fusion', True), bool), 'mesh.cpu_embedder_fusion',
        config.mesh.get('cpu_embedder_fusion'), 'must be True or False')
  _need(config.pretrain.head in ('arcface', 'softmax'), 'pretrain.head', config.pretrain.head,
        "must be 'arcface' or 'softmax'")
  _need(0.0 <= config.pretrain.blur_probability <= 1.0, 'pretrain.blur_probability',
        config.pretrain.blur_probability, 'must be in [0, 1]')
  if config.pretrain.blur_probability:
    validate_lr_sizes(config.pretrain.blur_sizes, 'pretrain.blur_sizes', d.image_size)
  # Each entry's type and settings (evaluation/evaluators): the error names the entry and the key.
  from ipsr_jax.evaluation.evaluators import common as evaluators  # pylint: disable=g-import-not-at-top
  try:
    evaluators.check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# What a workdir's checkpoints mean: the state's shapes (model), what it was trained against and
# how (embedder, loss, optimiser, the parameter EMA's decay and whether the state holds one), and
# the data stream the saved iterator position refers to.
# A resume must keep these; everything else (steps, logging, checkpoint and eval cadence, data
# paths, the mesh, workers) may change and is recorded.
_OPTIMISER = tuple(f'train.{k}' for k in ('batch_size', 'optimizer', 'learning_rate', 'b1', 'b2', 'eps',
                                          'weight_decay', 'schedule', 'warmup_steps', 'grad_clip_norm'))
_DATA_STREAM = tuple(f'data.{k}' for k in ('source', 'split', 'image_size', 'lr_sizes', 'lr_per', 'round_lr',
                                           'degradation', 'shuffle', 'random_flip', 'random_crop_padding', 'random_grey',
                                           'tfds_name', 'synthetic_identities', 'synthetic_images_per_identity'))
_EMBEDDER_SHAPE = tuple(f'embedder.{k}' for k in ('width', 'embedding_size', 'input_size', 'bn_epsilon',
                                                  'dropout_rate'))
RESUME_LOCKED = {
    'train': ('model', 'loss', 'seed', 'train.ema_decay') + _EMBEDDER_SHAPE + _OPTIMISER + _DATA_STREAM,
    'pretrain_embedder': ('pretrain', 'seed') + _EMBEDDER_SHAPE + _OPTIMISER + _DATA_STREAM,
}


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} for a nested dict (what `ConfigDict.update_from_flattened_dict` takes)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _locked(key: str, mode: str) -> bool:
  return any(key == f or key.startswith(f + '.') for f in RESUME_LOCKED.get(mode, ()))


def resume_changes(saved: dict, config: ml_collections.ConfigDict, mode: str,
                   workdir: str) -> list[tuple[str, Any, Any]]:
  """Compares a workdir's config.json with the config resuming it.

  Raises ConfigError, listing each differing field that `RESUME_LOCKED[mode]` covers with both
  values; returns the other differences (field, saved, now) for the caller to record. A field
  one side lacks (a config written by another version) counts as allowed.
  """
  before, now = flatten(saved), flatten(json.loads(to_json(config)))
  missing = object()
  locked, allowed = [], []
  for key in sorted(set(before) | set(now)):
    a, b = before.get(key, missing), now.get(key, missing)
    if a == b:
      continue
    if a is not missing and b is not missing and _locked(key, mode):
      locked.append((key, a, b))
    else:
      allowed.append((key, None if a is missing else a, None if b is missing else b))
  if locked:
    fields = '; '.join(f'{k}={a!r} there, {b!r} now' for k, a, b in locked)
    back = ' '.join(f'--config.{k}={json.dumps(a)}' for k, a, _ in locked)
    raise ConfigError(f'{workdir} holds a run with other settings: {fields}. Nothing was changed: use a '
                      f'new --workdir for these settings, or set them back ({back}) to resume the run.')
  return allowed
