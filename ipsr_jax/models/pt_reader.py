"""Read PyTorch `.pt` state dicts into numpy without torch and without running pickled code.

`torch.save` writes a pickle whose only executable references are a few rebuild helpers and
storage classes. A restricted `Unpickler` maps exactly those globals to numpy builders and refuses
everything else (`UnsafePickleError`), so a hostile file cannot run code. Both layouts torch has
written are read:

- zip (torch >= 1.6): `<archive>/data.pkl` plus one raw little-endian file per storage at
  `<archive>/data/<key>` (`<archive>/byteorder` says if the writer was big-endian);
- legacy (torch < 1.6, e.g. facenet-pytorch's MTCNN weights): a magic-number pickle, a protocol
  pickle, a sys-info pickle, the object pickle, the list of storage keys, then each storage as an
  int64 element count followed by its raw bytes.

`read_state_dict(path)` returns `{name: np.ndarray}`; `load(path)` returns the unpickled object
with every tensor as an np.ndarray.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element dtype (little-endian; byte-swapped later when the file says so).
_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype('<f8'),
    'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
    'UntypedStorage': np.dtype('u1'),
}


class UnsafePickleError(pickle.UnpicklingError):
  """The file references a global that a plain state dict never needs."""


class PtFormatError(ValueError):
  """The file is not a torch.save file this reader understands."""


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A storage whose bytes arrive now (zip) or after the pickle (legacy)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = int(numel)
    self.array: np.ndarray | None = None


class _LazyTensor:
  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise PtFormatError('a tensor refers to a storage that the file never wrote')
    if len(self.size) != len(self.stride):
      raise PtFormatError(f'tensor size {self.size} and stride {self.stride} disagree')
    if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
      raise PtFormatError(f'negative size/stride/offset in tensor {self.size} {self.stride}')
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:  # as_strided would read past the buffer: refuse, never trust the file
      raise PtFormatError(f'tensor view {self.size}/{self.stride}+{self.offset} exceeds its '
                          f'storage of {flat.size} elements')
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    raise UnsafePickleError('tensor rebuilt from something that is not a storage')
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'): _ordered_dict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch', 'Size'): tuple,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, load_storage=None):
    super().__init__(file)
    self._load_storage = load_storage
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module in ('torch', 'torch.storage') and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f'refusing to load global {module}.{name}: a state dict only needs tensors, storages and '
        'OrderedDict. Load the file with torch.load(weights_only=True) and re-save '
        'model.state_dict() with torch.save if it is trusted.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise UnsafePickleError(f'unexpected persistent id {pid!r}')
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise UnsafePickleError(f'malformed storage reference {pid!r}')
    if len(pid) > 5 and pid[5] is not None:
      raise PtFormatError('storage views (torch < 0.4 files) are not supported: re-save with '
                          'a newer torch.save')
    if key not in self.storages:
      storage = _Storage(storage_type.dtype, numel)
      if self._load_storage is not None:
        storage.array = self._load_storage(key, storage.dtype, storage.numel)
      self.storages[key] = storage
    return self.storages[key]


def _resolve(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _resolve(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  if isinstance(obj, (_Storage, _StorageType)):
    raise PtFormatError('the file pickles a bare storage; only tensors are supported')
  return obj


def _native(array: np.ndarray, big_endian: bool) -> np.ndarray:
  if big_endian and array.dtype.itemsize > 1:
    array = array.byteswap()
  return array


def _load_zip(zf: zipfile.ZipFile) -> Any:
  pickles = [n for n in zf.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
  if len(pickles) != 1:
    raise PtFormatError(f'expected one data.pkl in the torch zip file, found {pickles}')
  prefix = pickles[0][:-len('data.pkl')]
  names = set(zf.namelist())
  big_endian = False
  if prefix + 'byteorder' in names:
    order = zf.read(prefix + 'byteorder').decode().strip()
    if order not in ('little', 'big'):
      raise PtFormatError(f'unknown byteorder {order!r}')
    big_endian = order == 'big'

  def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f'{prefix}data/{key}'
    if name not in names:
      raise PtFormatError(f'storage {name} missing from the zip file')
    raw = zf.read(name)
    if len(raw) < numel * dtype.itemsize:
      raise PtFormatError(f'storage {name} holds {len(raw)} bytes, needs {numel * dtype.itemsize}')
    return _native(np.frombuffer(raw, dtype, count=numel), big_endian)

  unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), load_storage)
  return _resolve(unpickler.load())


def _load_legacy(f: BinaryIO) -> Any:
  header = _RestrictedUnpickler(f)
  try:
    magic = header.load()
  except UnsafePickleError:
    raise
  except Exception as e:  # any garbage: the C unpickler raises many kinds
    raise PtFormatError(f'not a torch.save file ({type(e).__name__}: {e})') from e
  if magic != _LEGACY_MAGIC:
    raise PtFormatError('not a torch.save file (bad magic number)')
  protocol = _RestrictedUnpickler(f).load()
  if protocol != _LEGACY_PROTOCOL:
    raise PtFormatError(f'unsupported legacy torch protocol {protocol!r}')
  sys_info = _RestrictedUnpickler(f).load()
  big_endian = not sys_info.get('little_endian', True)
  unpickler = _RestrictedUnpickler(f)
  result = unpickler.load()
  keys = _RestrictedUnpickler(f).load()
  if not isinstance(keys, list):
    raise PtFormatError('legacy file: storage key list missing')
  count_format = '>q' if big_endian else '<q'
  for key in keys:
    storage = unpickler.storages.get(str(key))
    if storage is None:
      raise PtFormatError(f'legacy file writes storage {key!r} that no tensor uses')
    (numel,) = struct.unpack(count_format, f.read(8))
    nbytes = numel * storage.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes or numel < storage.numel:
      raise PtFormatError(f'legacy file truncated in storage {key!r}')
    storage.array = _native(np.frombuffer(raw, storage.dtype, count=numel), big_endian)
  return _resolve(result)


def load(path: str | os.PathLike) -> Any:
  """The object `torch.save` wrote at `path`, tensors as numpy arrays. Never imports torch."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      return _load_zip(zf)
  if tarfile.is_tarfile(path):
    raise PtFormatError(f'{path}: the tar layout of torch < 0.4 is not supported; load it with '
                        'that torch and re-save with torch.save(model.state_dict(), path)')
  with open(path, 'rb') as f:
    try:
      return _load_legacy(f)
    except PtFormatError as e:
      raise PtFormatError(
          f'{path}: {e}. Re-save it with torch.save(model.state_dict(), path).') from e


def _flatten(obj: Mapping, prefix: str, out: dict[str, np.ndarray]) -> None:
  for k, v in obj.items():
    name = f'{prefix}{k}'
    if isinstance(v, np.ndarray):
      out[name] = v
    elif isinstance(v, Mapping):
      _flatten(v, name + '.', out)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{name: array}` from a `torch.save(state_dict)` file.

  Checkpoints that nest the state dict (e.g. `{'model': sd, 'epoch': 3}`) are flattened with
  dotted names ('model.conv.weight'); non-tensor leaves are dropped.
  """
  obj = load(path)
  if not isinstance(obj, Mapping):
    raise PtFormatError(f'{path}: expected a state dict (a mapping), got {type(obj).__name__}')
  out: dict[str, np.ndarray] = {}
  _flatten(obj, '', out)
  if not out:
    raise PtFormatError(f'{path}: the file holds no tensors')
  return out
