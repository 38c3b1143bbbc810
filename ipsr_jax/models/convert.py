"""facenet-pytorch `InceptionResnetV1` state dict -> Flax variables of our port.

The expected variable tree comes from the Flax module itself (`jax.eval_shape` of its init), and
every Flax leaf names exactly one torch key: module names map back by turning a trailing `_<i>`
into `.<i>` (`repeat_1_0/branch1_1/conv` <-> `repeat_1.0.branch1.1.conv`). Conv kernels go
OIHW -> HWIO, Linear (out, in) -> (in, out), BatchNorm weight/bias/running_mean/running_var ->
scale/bias/mean/var. Every problem is collected and raised at once, so one run diagnoses a bad file.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from ipsr_jax.models import pt_reader
from ipsr_jax.models.inception_resnet_v1 import InceptionResnetV1, abstract_variables

_IGNORED_SUFFIXES = ('num_batches_tracked',)


class ConversionError(ValueError):
  """The state dict does not fit the model; the message lists every mismatch."""


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch itself is never imported here
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _torch_module_name(flax_name: str) -> str:
  return re.sub(r'_(\d+)$', r'.\1', flax_name)


def _torch_key(collection: str, path: tuple[str, ...], ndim: int) -> str:
  """The torch state-dict key of one Flax leaf."""
  *modules, leaf = path
  prefix = '.'.join(_torch_module_name(m) for m in modules)
  if collection == 'batch_stats':
    return f'{prefix}.' + {'mean': 'running_mean', 'var': 'running_var'}[leaf]
  return f'{prefix}.' + {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]


def _to_flax_layout(array: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
  if leaf == 'kernel' and ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == 'kernel' and ndim == 2:
    return array.T  # Linear (out, in) -> Dense (in, out)
  return array


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == 'kernel' and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if leaf == 'kernel' and len(shape) == 2:
    return tuple(reversed(shape))
  return tuple(shape)


def logits_num_classes(state_dict: Mapping[str, Any]) -> int | None:
  """The class count of the file's `logits` head (8631 for VGGFace2), or None when absent."""
  weight = state_dict.get('logits.weight')
  return None if weight is None else int(weight.shape[0])


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  if state_dict and all(k.startswith('module.') for k in state_dict):
    return {k[len('module.'):]: v for k, v in state_dict.items()}
  return state_dict


def module_for_state_dict(state_dict: Mapping[str, Any], *,
                          num_classes: int | None = None) -> InceptionResnetV1:
  """The full-width port whose embedding size matches the file's `last_linear`."""
  weight = state_dict.get('last_linear.weight')
  embedding_size = 512 if weight is None else int(weight.shape[0])
  return InceptionResnetV1(num_classes=num_classes, embedding_size=embedding_size)


def torch_state_to_flax(state_dict: Mapping[str, Any], *,
                        num_classes: int | None = None) -> dict[str, dict]:
  """facenet-pytorch InceptionResnetV1 state dict -> {'params': ..., 'batch_stats': ...}.

  Values may be torch tensors or numpy arrays. With `num_classes=None` a `logits.*` head in the
  file is left out (logged); with `num_classes` set the head is converted and must have that size.
  Raises one ConversionError listing every missing, unexpected and mis-shaped key.
  """
  state_dict = _strip_data_parallel(dict(state_dict))
  module = module_for_state_dict(state_dict, num_classes=num_classes)
  abstract = abstract_variables(module)

  used: set[str] = set()
  missing, wrong_shape = [], []
  converted: dict[str, Any] = {}
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(abstract[collection])[0]
    for key_path, spec in flat:
      path = tuple(k.key for k in key_path)
      key = _torch_key(collection, path, len(spec.shape))
      used.add(key)
      if key not in state_dict:
        missing.append(key)
        continue
      value = _to_numpy(state_dict[key])
      expected = _torch_shape(spec.shape, path[-1])
      if tuple(value.shape) != expected:
        wrong_shape.append(f'{key}: file {tuple(value.shape)}, model expects {expected}')
        continue
      array = _to_flax_layout(value, path[-1], len(spec.shape)).astype(spec.dtype)
      node = converted.setdefault(collection, {})
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = np.ascontiguousarray(array)

  dropped_logits = []
  unexpected = []
  for key in state_dict:
    if key in used or key.endswith(_IGNORED_SUFFIXES):
      continue
    if num_classes is None and key.startswith('logits.'):
      dropped_logits.append(key)
    else:
      unexpected.append(key)
  if missing or unexpected or wrong_shape:
    lines = ['facenet-pytorch state dict does not match InceptionResnetV1'
             f'(num_classes={num_classes}):']
    lines += [f'  missing key: {k}' for k in missing]
    lines += [f'  unexpected key: {k}' for k in unexpected]
    lines += [f'  wrong shape: {s}' for s in wrong_shape]
    raise ConversionError('\n'.join(lines))
  if dropped_logits:
    logging.info('Left out the %d-class logits head (%s); pass num_classes to keep it.',
                 logits_num_classes(state_dict), ', '.join(dropped_logits))
  return converted


def load_facenet_pytorch(path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
                         keep_logits: bool = False) -> tuple[InceptionResnetV1, dict[str, dict]]:
  """(module, variables) from a facenet-pytorch `.pt` file (read without torch) or a state dict.

  `keep_logits=True` keeps the file's classification head (`module(x, classify=True)`).
  """
  if isinstance(path_or_state_dict, Mapping):
    state_dict = _strip_data_parallel(dict(path_or_state_dict))
  else:
    state_dict = _strip_data_parallel(pt_reader.read_state_dict(path_or_state_dict))
  num_classes = logits_num_classes(state_dict) if keep_logits else None
  if keep_logits and num_classes is None:
    raise ConversionError('keep_logits=True but the state dict has no logits.weight')
  variables = torch_state_to_flax(state_dict, num_classes=num_classes)
  return module_for_state_dict(state_dict, num_classes=num_classes), variables
