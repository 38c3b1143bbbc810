r"""Portable SR and SR+embedder functions: `jax.export` (StableHLO) + weights in one file.

    python -m ipsr_jax.tools.export --workdir=runs/ipsr --embedder=/ckpt/facenet \
        --out=ipsr.jaxexport

    from ipsr_jax.serving import jax_export
    fn = jax_export.load('ipsr.jaxexport')         # needs jax and numpy only: no model code, no flax
    out = fn(images)                            # {'sr': [N, S, S, 3], 'embedding': [N, D]}
    jax_export.load('ipsr.jaxexport', 'sr')(images) # SR only: float32 [N, S, S, 3] in 0..255

The functions are lowered with a symbolic batch dimension (any N, one serialised program) for
several platforms at once (default cpu, cuda, tpu). Height and width are fixed when exporting:
either the model's S (callers bicubic-upsample first, as the evaluation protocols do) or one LR
size (`lr_size`) whose bicubic resize is then part of the function.

File layout: the 8-byte magic `IPSRJAX1`, a little-endian uint64 header length, the UTF-8 JSON
header (what each function computes, its input/output shapes and dtypes, where its blobs lie, and
'input_contract': the API's input contract, `ipsr_jax.data.contract.INPUT_CONTRACT`),
then the blobs: each function's `Exported.serialize()` and one `.npz` of the weights. The weights
are arguments of the programs, not constants, so the StableHLO stays small and loads fast.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import struct
from typing import Any, Mapping, Sequence

import jax
from jax import export as jax_export
import numpy as np

from ipsr_jax.data import contract
from ipsr_jax.ops.batching import PaddedBatcher

MAGIC = b'IPSRJAX1'
FORMAT = 'ipsr_jax.serving.jax_export'
FORMAT_VERSION = 1
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
DEFAULT_BUCKETS = (8, 64, 256)
INPUT_DTYPES = ('float32', 'uint8')


def _spec(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _input_spec(lr_size: Sequence[int] | None, image_size: int, input_dtype: str):
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f'input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}')
  h, w = (image_size, image_size) if lr_size is None else (int(lr_size[0]), int(lr_size[1]))
  batch, = jax_export.symbolic_shape('batch')
  return jax.ShapeDtypeStruct((batch, h, w, 3), np.dtype(input_dtype)), [None, h, w, 3]


def _range(dtype: str) -> str:
  return '0..255 (rounded)' if dtype == 'uint8' else '0..255'


def export_super_resolver(sr: Any, *, lr_size: Sequence[int] | None = None,
                          input_dtype: str = 'float32',
                          platforms: Sequence[str] = DEFAULT_PLATFORMS) -> tuple[Any, dict, dict]:
  """(Exported, weights {'generator': [arrays]}, function header) of `sr`'s inference function.

  The function is `SuperResolver.__call__` for one input shape: uint8 input gives uint8 output
  rounded, float32 input float32 output in 0..255.
  """
  size = sr.image_size
  leaves, treedef = jax.tree.flatten(sr.variables)

  def fn(weights, images):
    return sr.apply_fn(images, jax.tree.unflatten(treedef, weights['generator']))

  weights = {'generator': [np.asarray(x) for x in leaves]}
  spec, shape = _input_spec(lr_size, size, input_dtype)
  exported = jax_export.export(jax.jit(fn), platforms=tuple(platforms))(
      jax.tree.map(_spec, weights), spec)
  header = dict(
      computes=('bicubic resize to the model size (PIL weights; rounded between passes for uint8 '
                'input), then the UNet generator in inference mode, output in pixels'),
      input=dict(shape=shape, dtype=input_dtype, range='0..255'),
      output=dict(shape=[None, size, size, 3], dtype=input_dtype, range=_range(input_dtype)),
      weights=['generator'])
  return exported, weights, header


def export_pipeline(pipeline: Any, *, lr_size: Sequence[int] | None = None,
                    input_dtype: str = 'float32',
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> tuple[Any, dict, dict]:
  """(Exported, weights {'generator', 'embedder'}, function header) of LR -> {'sr', 'embedding'}.

  'embedding' is what `pipeline(images)` returns (mode 'sr', 'bicubic' or 'concat'); 'sr' is the
  unrounded float32 SR face the embedder saw.
  """
  size = pipeline.image_size
  outputs = pipeline.outputs_fn()
  g_leaves, g_tree = jax.tree.flatten(pipeline.variables['generator'])
  e_leaves, e_tree = jax.tree.flatten(pipeline.variables['embedder'])

  def fn(weights, images):
    return outputs(images, {'generator': jax.tree.unflatten(g_tree, weights['generator']),
                            'embedder': jax.tree.unflatten(e_tree, weights['embedder'])})

  weights = {'generator': [np.asarray(x) for x in g_leaves],
             'embedder': [np.asarray(x) for x in e_leaves]}
  spec, shape = _input_spec(lr_size, size, input_dtype)
  exported = jax_export.export(jax.jit(fn), platforms=tuple(platforms))(
      jax.tree.map(_spec, weights), spec)
  header = dict(
      computes=(f'bicubic resize to the model size, UNet generator (inference mode), then the '
                f'face embedder at {pipeline.embedder.input_size}px; embedding mode '
                f'{pipeline.mode!r}' + (' = [E(bicubic), E(SR)] / sqrt(2)'
                                        if pipeline.mode == 'concat' else '')),
      input=dict(shape=shape, dtype=input_dtype, range='0..255'),
      output=dict(sr=dict(shape=[None, size, size, 3], dtype='float32', range='0..255'),
                  embedding=dict(shape=[None, pipeline.embedding_size], dtype='float32',
                                 norm=1.0)),
      mode=pipeline.mode, weights=['generator', 'embedder'])
  return exported, weights, header


def save(path: str | os.PathLike, functions: Mapping[str, tuple[Any, dict, dict]], *,
         default: str | None = None, metadata: Mapping[str, Any] | None = None,
         buckets: Sequence[int] = DEFAULT_BUCKETS) -> dict:
  """Writes the exported `functions` ({name: export_*(...)}) and their weights to one file.

  Weight groups of the same name must be identical across functions (they are stored once).
  Returns the header.
  """
  if not functions:
    raise ValueError('nothing to save')
  default = default or next(iter(functions))
  if default not in functions:
    raise ValueError(f'default {default!r} is not one of {sorted(functions)}')
  weights: dict[str, list[np.ndarray]] = {}
  for name, (_, w, _) in functions.items():
    for group, arrays in w.items():
      if group in weights:
        same = len(weights[group]) == len(arrays) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights[group], arrays))
        if not same:
          raise ValueError(f'function {name!r} has different {group!r} weights than another')
      else:
        weights[group] = arrays
  buffer = io.BytesIO()
  np.savez(buffer, **{f'{g}/{i:05d}': a for g, arrays in weights.items()
                      for i, a in enumerate(arrays)})
  blobs = []
  offset = 0
  header_functions = {}
  for name, (exported, _, info) in functions.items():
    blob = bytes(exported.serialize())
    header_functions[name] = dict(info, offset=offset, length=len(blob),
                                  platforms=list(exported.platforms))
    blobs.append(blob)
    offset += len(blob)
  weights_blob = buffer.getvalue()
  header = dict(
      format=FORMAT, version=FORMAT_VERSION, jax_version=jax.__version__,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      default=default, buckets=[int(b) for b in buckets], functions=header_functions,
      input_contract=contract.INPUT_CONTRACT,
      weights=dict(offset=offset, length=len(weights_blob),
                   groups={g: dict(arrays=len(a), parameters=int(sum(x.size for x in a)))
                           for g, a in weights.items()}),
      metadata=dict(metadata or {}))
  encoded = json.dumps(header, indent=1, sort_keys=True).encode()
  with open(path, 'wb') as f:
    f.write(MAGIC)
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)
    f.write(weights_blob)
  return header


def _read_header(f) -> tuple[dict, int]:
  magic = f.read(len(MAGIC))
  if magic != MAGIC:
    raise ValueError(f'{getattr(f, "name", "file")} is not an ipsr_jax export (magic {magic!r})')
  (length,) = struct.unpack('<Q', f.read(8))
  header = json.loads(f.read(length).decode())
  if header.get('format') != FORMAT or header.get('version') != FORMAT_VERSION:
    raise ValueError(f'unsupported export format {header.get("format")} '
                     f'v{header.get("version")} (this reader: {FORMAT} v{FORMAT_VERSION})')
  return header, len(MAGIC) + 8 + length


def read_header(path: str | os.PathLike) -> dict:
  """The JSON header of an exported file (cheap: no blob is read)."""
  with open(path, 'rb') as f:
    return _read_header(f)[0]


class ExportedFunction:
  """A loaded exported function: `fn(images)` -> numpy outputs, any batch size.

  Inputs are cast to the exported dtype (uint8 inputs for a float32 function are exact; float
  inputs for a uint8 function are rounded and clipped). Calls are padded to the header's fixed
  batch sizes, so a new N does not recompile, and sharded over the local devices.
  """

  def __init__(self, exported: Any, weights: Mapping[str, list[np.ndarray]], name: str,
               header: Mapping[str, Any], buckets: Sequence[int] | None = None):
    self.exported, self.name, self.header = exported, name, dict(header)
    self.info = dict(header['functions'][name])
    self.input_shape = tuple(self.info['input']['shape'])
    self.input_dtype = np.dtype(self.info['input']['dtype'])
    self._batcher = PaddedBatcher(lambda images, w: exported.call(w, images),
                                  buckets=buckets or header.get('buckets') or DEFAULT_BUCKETS)
    self.weights = self._batcher.replicate({g: list(weights[g]) for g in self.info['weights']})

  @property
  def compiled_sizes(self) -> set[int]:
    return set(self._batcher.compiled_sizes)

  def __call__(self, images: Any, *, input_range: Sequence[float] | None = None) -> Any:
    """[N, H, W, 3] (or one [H, W, 3]) images of the exported size, under `contract.as_image_batch`'s
    contract (its dtypes, 0..255, finite)."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or tuple(images.shape[-3:]) != self.input_shape[1:]:
      raise ValueError(
          f'{self.name!r} takes [N, {", ".join(map(str, self.input_shape[1:]))}] images '
          f'({self.info["input"]["range"]}), got {images.shape}; bicubic-resize them first '
          'or export with --lr_size matching your inputs')
    images, single = contract.as_image_batch(images, input_range=input_range)
    if self.input_dtype == np.uint8 and images.dtype != np.uint8:
      images = np.clip(np.round(images), 0, 255)
    images = images.astype(self.input_dtype, copy=False)
    out = self._batcher(images, self.weights)
    return jax.tree.map(lambda x: x[0], out) if single else out


def load(path: str | os.PathLike, function: str | None = None, *,
         buckets: Sequence[int] | None = None) -> ExportedFunction:
  """The exported `function` (default: the file's default, SR+embedder when present)."""
  with open(path, 'rb') as f:
    header, start = _read_header(f)
    name = function or header['default']
    if name not in header['functions']:
      raise KeyError(f'{path} holds {sorted(header["functions"])}, not {name!r}')
    info = header['functions'][name]
    f.seek(start + info['offset'])
    exported = jax_export.deserialize(bytearray(f.read(info['length'])))
    f.seek(start + header['weights']['offset'])
    npz = np.load(io.BytesIO(f.read(header['weights']['length'])), allow_pickle=False)
    weights = {g: [npz[f'{g}/{i:05d}'] for i in range(header['weights']['groups'][g]['arrays'])]
               for g in info['weights']}
  platform = jax.default_backend()
  lowered_for = set(exported.platforms)
  if lowered_for & {'cuda', 'rocm'}:  # jax calls both backends 'gpu'
    lowered_for.add('gpu')
  if platform not in lowered_for:
    raise ValueError(f'{path}: {name!r} was exported for {exported.platforms}, not this '
                     f'{platform} backend; re-export it with --platforms including '
                     f'{"cuda" if platform == "gpu" else platform}')
  return ExportedFunction(exported, weights, name, header, buckets)
