"""Every face recognizer the project knows, by name: one `config.recognizers` entry each, built
into one pure function.

    config.recognizers.mine = dict(kind='onnx', path='arcface.onnx', input_size=112,
                                   layout='nchw', channels='rgb', mean=127.5, std=127.5)
    config.loss.recognizers = ('facenet', 'mine')        # the identity term
    config.evals.lfw.judges = ('dlib', 'sface', 'mine')  # judges

An entry's keys (`ENTRY_DEFAULTS` fills what it leaves out):
  kind        'facenet' (the run's `config.embedder`), 'sface' (SFace's built-in file, read by
              the general ONNX path), 'onnx' (any ONNX recognizer file, `models/onnx_graph.py`)
              or 'dlib' (dlib's ResNet, run by dlib: a judge only, it cannot be differentiated);
  path        the .onnx file ('onnx'; 'sface': '' means the built-in file);
  input_size  the network's square input; faces are resized to it (PIL-exact bicubic, unrounded);
  layout      'nchw' or 'nhwc', what the graph takes;
  channels    'rgb' or 'bgr', the order the network wants (the project's pixels are RGB);
  mean, std   its standardisation (x - mean) / std in 0..255 units, a scalar or an RGB triple;
  crop        (top, left, bottom, right) of the region of the project's 128x128 aligned face the
              recognizer takes, in that face's pixels (scaled to faces of other sizes); () is the
              whole face. The project aligns to the ArcFace 5-point template scaled to 128, so the
              whole face resized to 112 is ArcFace's own 112 crop.

`build(name, entry)` gives a `Recognizer`: `embed(params, pixels)` (float NHWC 0..255 of any size
-> unit embeddings; pure, jit-able, differentiable in pixels), its params (a frozen pytree, an
input of whatever program runs it), a fingerprint and a display name. `abstract=True` gives the
params as shapes only (the ahead-of-time compile), still reading the graph for its structure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.ops.normalize import unit_norm

KINDS = ('facenet', 'sface', 'onnx', 'dlib')
LAYOUTS = ('nchw', 'nhwc')
CHANNELS = ('rgb', 'bgr')
FACE_SIZE = 128  # crop coordinates are pixels of the project's aligned face at this size
ENTRY_DEFAULTS = dict(kind='onnx', path='', input_size=112, layout='nchw', channels='rgb', mean=127.5,
                      std=127.5, crop=())
# SFace's file standardises by itself ((x - 127.5) * 0.0078125, its first Sub and Mul) and takes RGB
# NCHW at 112 (models/sface.py says how the channel order was measured).
SFACE_SETTINGS = dict(input_size=112, layout='nchw', channels='rgb', mean=0.0, std=1.0)
# Kinds that run as a JAX function (in the loss, or as a judge on any chip).
DIFFERENTIABLE = ('facenet', 'sface', 'onnx')


def default_entries() -> dict[str, dict[str, Any]]:
  """The recognizers every config starts with (configs/base.py)."""
  return {'facenet': dict(kind='facenet'),
          'sface': dict(kind='sface', path='', **SFACE_SETTINGS, crop=()),
          'dlib': dict(kind='dlib')}


def entries(config: Any) -> dict[str, dict[str, Any]]:
  """{name: entry} of a config (`config.recognizers`; the defaults where it has none)."""
  found = config.get('recognizers') if config is not None else None
  if found is None:
    return default_entries()
  return {n: (e.to_dict() if hasattr(e, 'to_dict') else dict(e)) for n, e in found.items()}


def filled(entry: Mapping[str, Any]) -> dict[str, Any]:
  """An entry with every key: its kind's settings, then `ENTRY_DEFAULTS`."""
  entry = dict(entry)
  base = {**ENTRY_DEFAULTS, **(SFACE_SETTINGS if entry.get('kind') == 'sface' else {})}
  return {**base, **entry}


def _scalar_or_triple(value: Any) -> np.ndarray | None:
  try:
    array = np.asarray(value, np.float32)
  except (TypeError, ValueError):
    return None
  if array.shape not in ((), (3,)) or not np.all(np.isfinite(array)):
    return None
  return array


def check_entry(name: str, entry: Mapping[str, Any], where: str = 'config.recognizers') -> None:
  """Raises ValueError naming `<where>.<name>.<key>` for the first wrong setting of an entry."""
  at = f'{where}.{name}'
  if not isinstance(entry, Mapping):
    raise ValueError(f'{at}={entry!r}: an entry is a dict(kind=..., ...)')
  unknown = sorted(set(entry) - set(ENTRY_DEFAULTS))
  if unknown:
    raise ValueError(f'{at}: unknown keys {unknown}; known: {sorted(ENTRY_DEFAULTS)}')
  e = filled(entry)
  bad = lambda key, why: ValueError(f'{at}.{key}={e[key]!r}: {why}')
  if e['kind'] not in KINDS:
    raise bad('kind', f'must be one of {KINDS}')
  if e['kind'] in ('facenet', 'dlib'):
    return  # FaceNet is config.embedder; dlib has its own files
  if e['kind'] == 'onnx' and not e['path']:
    raise bad('path', "kind 'onnx' needs the path of the recognizer's .onnx file")
  if not isinstance(e['path'], str):
    raise bad('path', 'must be a file path (a string)')
  size = e['input_size']
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise bad('input_size', 'must be an integer >= 1 (the square input the network takes)')
  if e['layout'] not in LAYOUTS:
    raise bad('layout', f'must be one of {LAYOUTS}')
  if e['channels'] not in CHANNELS:
    raise bad('channels', f'must be one of {CHANNELS}')
  for key in ('mean', 'std'):
    if _scalar_or_triple(e[key]) is None:
      raise bad(key, 'must be a finite number or an RGB triple of them, in 0..255 units')
  if np.any(_scalar_or_triple(e['std']) == 0):
    raise bad('std', 'must be nonzero')
  crop = tuple(e['crop'] or ())
  if crop:
    ok = (len(crop) == 4 and all(isinstance(c, int) and not isinstance(c, bool) for c in crop)
          and 0 <= crop[0] < crop[2] <= FACE_SIZE and 0 <= crop[1] < crop[3] <= FACE_SIZE)
    if not ok:
      raise bad('crop', f'must be () (the whole face) or (top, left, bottom, right) integers with '
                        f'0 <= top < bottom <= {FACE_SIZE} and 0 <= left < right <= {FACE_SIZE}')


def check_names(names: Sequence[str], known: Mapping[str, Mapping[str, Any]], where: str, *,
                kinds: Sequence[str] = KINDS, role: str = 'recognizers') -> tuple[str, ...]:
  """`names` as a tuple, each an entry of `known` of one of `kinds`, none twice; else ValueError."""
  if isinstance(names, str):
    names = (names,)
  names = tuple(names)
  usable = sorted(n for n, e in known.items() if filled(e)['kind'] in kinds)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'{where}: unknown {role} {unknown}; known: {usable} (config.recognizers '
                     f'names them)')
  wrong = [n for n in names if filled(known[n])['kind'] not in kinds]
  if wrong:
    kind = filled(known[wrong[0]])['kind']
    raise ValueError(f'{where}: {wrong[0]!r} (kind {kind!r}) cannot be one of the {role}; those of '
                     f'kinds {tuple(kinds)} can: {usable}')
  if len(set(names)) != len(names):
    raise ValueError(f'{where}: {role} {list(names)} name one twice')
  return names


# ----------------------------------------------------------------------------- the function


def crop_pixels(pixels: jax.Array, crop: Sequence[int]) -> jax.Array:
  """The `crop` (top, left, bottom, right in 128-face pixels) of faces of any size, scaled to it
  and rounded to whole pixels; () is the whole face."""
  if not crop:
    return pixels
  h, w = pixels.shape[1:3]
  top, bottom = (int(round(c * h / FACE_SIZE)) for c in (crop[0], crop[2]))
  left, right = (int(round(c * w / FACE_SIZE)) for c in (crop[1], crop[3]))
  return pixels[:, top:max(bottom, top + 1), left:max(right, left + 1)]


def onnx_embed_fn(graph: Any, *, input_size: int, layout: str = 'nchw', channels: str = 'rgb',
                  mean: Any = 127.5, std: Any = 127.5, crop: Sequence[int] = ()
                  ) -> Callable[[Any, jax.Array], jax.Array]:
  """`embed(params, pixels)` of an `onnx_graph.OnnxGraph`: RGB NHWC 0..255 faces of any size ->
  cropped, resized to input_size, standardised (x - mean) / std (RGB order), flipped to BGR for
  channels='bgr', transposed for layout='nchw', run; the (first) output flattened, unit norm."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  size, crop = int(input_size), tuple(crop or ())

  def embed(params, pixels):
    x = crop_pixels(jnp.asarray(pixels).astype(jnp.float32), crop)
    if x.shape[1:3] != (size, size):
      x = resize_lib.resize(x, (size, size))
    x = (x - mean) / std
    if channels == 'bgr':
      x = x[..., ::-1]
    if layout == 'nchw':
      x = jnp.transpose(x, (0, 3, 1, 2))
    y = graph.apply(params, x)
    y = y[0] if isinstance(y, tuple) else y
    return unit_norm(jnp.reshape(y, (y.shape[0], -1)).astype(jnp.float32))

  return embed


@dataclasses.dataclass(frozen=True)
class Recognizer:
  """A built recognizer: `embed(params, pixels)` -> unit float32 [N, embedding_size]."""
  name: str
  kind: str
  embed: Callable[[Any, jax.Array], jax.Array]
  params: Any           # a pytree of arrays (abstract: of ShapeDtypeStructs)
  embedding_size: int
  fingerprint: str      # equal fingerprints give equal embeddings
  display: str          # e.g. "sface (face_recognition_sface_2021dec_int8bq.onnx)"
  settings: Mapping[str, Any]  # the filled entry


def onnx_path(entry: Mapping[str, Any]) -> str:
  """The file an 'sface' or 'onnx' entry reads: the built-in SFace file for an 'sface' entry
  without a path (FileNotFoundError, saying what to install, when it is absent)."""
  e = filled(entry)
  if e['path']:
    return os.path.expanduser(os.fspath(e['path']))
  if e['kind'] == 'sface':
    from ipsr_jax.models import sface  # pylint: disable=import-outside-toplevel
    return sface.resolve(None)
  raise ValueError("an 'onnx' recognizer needs a path")


def _file_digest(path: str) -> str:
  from ipsr_jax.models import convert  # pylint: disable=import-outside-toplevel
  return convert.file_sha256(path)


def build(name: str, entry: Mapping[str, Any], *, abstract: bool = False) -> Recognizer:
  """The recognizer of an 'sface' or 'onnx' entry (a 'facenet' one is the run's embedder,
  `config.embedder`; dlib is no JAX function). The graph is read and checked here; `abstract`
  replaces its weights by their shapes."""
  check_entry(name, entry)
  e = filled(entry)
  if e['kind'] not in ('sface', 'onnx'):
    raise ValueError(f'config.recognizers.{name}: kind {e["kind"]!r} is not built here '
                     "('facenet' is config.embedder; 'dlib' is a judge only)")
  from ipsr_jax.models import onnx_graph  # pylint: disable=import-outside-toplevel  (needs onnx)
  path = onnx_path(e)
  graph = onnx_graph.load_onnx(path)
  settings = {k: e[k] for k in ('input_size', 'layout', 'channels', 'mean', 'std', 'crop')}
  settings['crop'] = tuple(settings['crop'] or ())
  embed = onnx_embed_fn(graph, **settings)
  size = e['input_size']
  shape = (2, 3, size, size) if e['layout'] == 'nchw' else (2, size, size, 3)
  out = graph.output_shape(shape)
  out = out[0] if out and isinstance(out[0], tuple) else out
  params = graph.params
  if abstract:
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  sha256 = _file_digest(path)
  digest = hashlib.sha256(json.dumps({'kind': e['kind'], 'sha256': sha256, 'graph': graph.fingerprint(),
                                      **{k: np.asarray(v).tolist() for k, v in settings.items()}},
                                     sort_keys=True).encode())
  return Recognizer(name=name, kind=e['kind'], embed=embed, params=params,
                    embedding_size=int(np.prod(out[1:])), fingerprint=digest.hexdigest()[:16],
                    display=f'{name} ({os.path.basename(path)})',
                    settings={**e, 'path': path, 'sha256': sha256})
