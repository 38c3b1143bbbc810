"""A frozen TensorFlow GraphDef reader: the protobuf wire format, without TensorFlow.

A frozen graph (`.pb`) is a serialised `tensorflow.GraphDef`: nodes with a name, an op, inputs
and attributes; weights are `Const` nodes whose `value` attribute holds a `TensorProto`. This
module decodes exactly those messages from the bytes, checking every length against the buffer,
and never runs anything from the file (a GraphDef is data; nothing here evaluates its ops).

    graph = read_graph('graph_final.pb')
    graph['InceptionResnetV1/Conv2d_1a_3x3/Conv2D'].attrs['padding']   # b'VALID'
    graph.const('InceptionResnetV1/Conv2d_1a_3x3/weights').shape       # (3, 3, 3, 32)

Field numbers are those of tensorflow/core/framework/{graph,node_def,attr_value,tensor,
tensor_shape,types}.proto. Unknown fields are skipped, as protobuf does.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Iterator

import ml_dtypes
import numpy as np

# A GraphDef is one protobuf message: protobuf itself refuses more than 2 GiB.
MAX_GRAPH_BYTES = 2**31 - 1
# A few stored values may stand for a large constant (the last is repeated); cap what that may
# allocate, so a tiny file cannot ask for terabytes.
MAX_FILLED_ELEMENTS = 1 << 28

# tensorflow DataType enum -> numpy dtype (the `_REF` variants are +100).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.float64), 3: np.dtype(np.int32),
    4: np.dtype(np.uint8), 5: np.dtype(np.int16), 6: np.dtype(np.int8),
    9: np.dtype(np.int64), 10: np.dtype(np.bool_), 14: np.dtype(ml_dtypes.bfloat16),
    17: np.dtype(np.uint16), 19: np.dtype(np.float16), 22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}
DT_STRING = 7
DTYPE_NAMES = {1: 'DT_FLOAT', 2: 'DT_DOUBLE', 3: 'DT_INT32', 4: 'DT_UINT8', 5: 'DT_INT16',
               6: 'DT_INT8', 7: 'DT_STRING', 9: 'DT_INT64', 10: 'DT_BOOL', 14: 'DT_BFLOAT16',
               17: 'DT_UINT16', 19: 'DT_HALF', 22: 'DT_UINT32', 23: 'DT_UINT64'}

# TensorProto field holding the typed values of each dtype (when tensor_content is empty).
_FLOAT_VAL, _DOUBLE_VAL, _INT_VAL, _STRING_VAL, _INT64_VAL, _BOOL_VAL = 5, 6, 7, 8, 10, 11
_HALF_VAL, _UINT32_VAL, _UINT64_VAL = 13, 16, 17
_VALUE_FIELD = {1: _FLOAT_VAL, 2: _DOUBLE_VAL, 3: _INT_VAL, 4: _INT_VAL, 5: _INT_VAL,
                6: _INT_VAL, 17: _INT_VAL, 9: _INT64_VAL, 10: _BOOL_VAL, 14: _HALF_VAL,
                19: _HALF_VAL, 22: _UINT32_VAL, 23: _UINT64_VAL, DT_STRING: _STRING_VAL}

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class GraphDefError(ValueError):
  """The bytes are not a well-formed GraphDef (truncated, corrupt or not a graph)."""


# ---------------------------------------------------------------------------------- wire format

def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= end:
      raise GraphDefError(f'truncated varint at byte {pos}')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise GraphDefError(f'varint longer than 10 bytes at byte {pos}')


def _signed64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


@dataclasses.dataclass(frozen=True)
class _Field:
  number: int
  wire: int
  value: int | None = None    # varint value
  start: int = 0              # byte range of a length-delimited or fixed-size payload
  end: int = 0


def _fields(buf: memoryview, start: int, end: int) -> Iterator[_Field]:
  """The fields of one message occupying buf[start:end], in file order."""
  pos = start
  while pos < end:
    key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
      raise GraphDefError(f'field number 0 at byte {pos}')
    if wire == _VARINT:
      value, pos = _varint(buf, pos, end)
      yield _Field(number, wire, value=value)
      continue
    if wire == _BYTES:
      size, pos = _varint(buf, pos, end)
      stop = pos + size
    elif wire == _FIXED64:
      stop = pos + 8
    elif wire == _FIXED32:
      stop = pos + 4
    else:  # 3/4: protobuf groups, which no TensorFlow message uses
      raise GraphDefError(f'unsupported wire type {wire} (field {number}) at byte {pos}')
    if stop > end:
      raise GraphDefError(f'field {number} at byte {pos} runs past its message '
                          f'({stop} > {end}): truncated or not a GraphDef')
    yield _Field(number, wire, start=pos, end=stop)
    pos = stop


def _string(buf: memoryview, f: _Field) -> str:
  return bytes(buf[f.start:f.end]).decode('utf-8')


def _scalars(buf: memoryview, f: _Field, kind: str) -> list[int] | np.ndarray:
  """A repeated scalar field, packed or not. kind: 'varint', 'f4' or 'f8'."""
  if kind == 'varint':
    if f.wire == _VARINT:
      return [f.value]
    out, pos = [], f.start
    while pos < f.end:
      v, pos = _varint(buf, pos, f.end)
      out.append(v)
    return out
  width = 4 if kind == 'f4' else 8
  if (f.end - f.start) % width:
    raise GraphDefError(f'packed field {f.number} of {f.end - f.start} bytes is not a '
                        f'multiple of {width}')
  return np.frombuffer(buf[f.start:f.end], '<' + kind).copy()


# ------------------------------------------------------------------------------------- messages

def _shape(buf: memoryview, start: int, end: int) -> tuple[int, ...] | None:
  """TensorShapeProto -> dims (-1 unknown), or None for an unknown rank."""
  dims, unknown_rank = [], False
  for f in _fields(buf, start, end):
    if f.number == 2 and f.wire == _BYTES:  # Dim {int64 size = 1; string name = 2}
      size = 0
      for d in _fields(buf, f.start, f.end):
        if d.number == 1 and d.wire == _VARINT:
          size = _signed64(d.value)
      dims.append(size)
    elif f.number == 3 and f.wire == _VARINT:
      unknown_rank = bool(f.value)
  return None if unknown_rank else tuple(dims)


def _tensor(buf: memoryview, start: int, end: int) -> np.ndarray:
  """TensorProto -> numpy array (DT_STRING -> object array of bytes)."""
  dtype_enum, shape, content = 0, (), None
  values: dict[int, list] = {}
  for f in _fields(buf, start, end):
    if f.number == 1 and f.wire == _VARINT:
      dtype_enum = f.value
    elif f.number == 2 and f.wire == _BYTES:
      shape = _shape(buf, f.start, f.end)
    elif f.number == 4 and f.wire == _BYTES:
      content = buf[f.start:f.end]
    elif f.number in (_FLOAT_VAL, _DOUBLE_VAL):
      kind = 'f4' if f.number == _FLOAT_VAL else 'f8'
      if f.wire in (_FIXED32, _FIXED64):
        values.setdefault(f.number, []).extend(
            np.frombuffer(buf[f.start:f.end], '<' + kind).tolist())
      else:
        values.setdefault(f.number, []).extend(_scalars(buf, f, kind).tolist())
    elif f.number == _STRING_VAL and f.wire == _BYTES:
      values.setdefault(f.number, []).append(bytes(buf[f.start:f.end]))
    elif f.number in (_INT_VAL, _INT64_VAL, _BOOL_VAL, _HALF_VAL, _UINT32_VAL, _UINT64_VAL):
      values.setdefault(f.number, []).extend(_scalars(buf, f, 'varint'))
  dtype_enum %= 100  # DT_FLOAT_REF -> DT_FLOAT
  if shape is None or any(d < 0 for d in shape):
    raise GraphDefError(f'constant tensor with an unknown shape {shape}')
  count = int(np.prod(shape, dtype=np.int64))
  if dtype_enum == DT_STRING:
    strings = np.empty(len(values.get(_STRING_VAL, [])), object)
    strings[:] = values.get(_STRING_VAL, [])
    if not len(strings):
      strings = np.array([b''], object)[:0 if count == 0 else 1]
    return _fill(strings, count, object).reshape(shape)
  if dtype_enum not in DTYPES:
    raise GraphDefError(f'unsupported tensor dtype {DTYPE_NAMES.get(dtype_enum, dtype_enum)}')
  dtype = DTYPES[dtype_enum]
  if content is not None and len(content):
    if len(content) != count * dtype.itemsize:
      raise GraphDefError(f'tensor_content holds {len(content)} bytes, shape {shape} of '
                          f'{dtype} needs {count * dtype.itemsize}')
    array = np.frombuffer(content, dtype).copy()  # the wire is little-endian
    return (array.byteswap() if sys.byteorder == 'big' else array).reshape(shape)
  field = _VALUE_FIELD[dtype_enum]
  raw = values.get(field, [])
  if field == _HALF_VAL:  # 16-bit patterns stored in int32s
    array = np.asarray(raw, np.uint16).view(dtype)
  elif field in (_INT_VAL, _INT64_VAL):  # int32 varints are sign-extended to 64 bits
    array = np.asarray([_signed64(v) for v in raw], np.int64).astype(dtype)
  elif field in (_UINT32_VAL, _UINT64_VAL):
    array = np.asarray(raw, np.uint64).astype(dtype)
  else:  # float, double, bool
    array = np.asarray(raw, dtype)
  return _fill(array, count, dtype).reshape(shape)


def _fill(values, count: int, dtype) -> np.ndarray:
  """TensorFlow's rule: fewer values than elements repeats the last one (none: all zeros)."""
  if len(values) > count:
    raise GraphDefError(f'{len(values)} values for a tensor of {count} elements')
  if len(values) < count and count > MAX_FILLED_ELEMENTS:
    raise GraphDefError(f'a constant of {count} elements filled from {len(values)} values: '
                        f'more than {MAX_FILLED_ELEMENTS}')
  values = np.asarray(values, dtype)
  if len(values) == count:
    return values
  fill = values[-1] if len(values) else np.zeros((), dtype)[()]
  return np.concatenate([values, np.full(count - len(values), fill, dtype)])


def _attr_list(buf: memoryview, start: int, end: int) -> list:
  """AttrValue.ListValue -> a list of whichever field it holds (empty when none)."""
  out: dict[int, list] = {}
  for f in _fields(buf, start, end):
    if f.number == 2 and f.wire == _BYTES:
      out.setdefault(2, []).append(bytes(buf[f.start:f.end]))
    elif f.number in (3, 5, 6):  # int64 / bool / DataType
      vals = _scalars(buf, f, 'varint')
      vals = ([_signed64(v) for v in vals] if f.number == 3 else
              [bool(v) for v in vals] if f.number == 5 else vals)
      out.setdefault(f.number, []).extend(vals)
    elif f.number == 4:
      vals = (np.frombuffer(buf[f.start:f.end], '<f4').tolist() if f.wire == _FIXED32 else
              _scalars(buf, f, 'f4').tolist())
      out.setdefault(4, []).extend(vals)
    elif f.number == 7 and f.wire == _BYTES:
      out.setdefault(7, []).append(_shape(buf, f.start, f.end))
    elif f.number == 8 and f.wire == _BYTES:
      out.setdefault(8, []).append(_tensor(buf, f.start, f.end))
  for number in sorted(out):
    return out[number]
  return []


def _attr_value(buf: memoryview, start: int, end: int) -> Any:
  """AttrValue -> bytes (s), int (i, type), float (f), bool (b), shape tuple, ndarray, list."""
  value: Any = None
  for f in _fields(buf, start, end):
    if f.number == 1 and f.wire == _BYTES:
      value = _attr_list(buf, f.start, f.end)
    elif f.number == 2 and f.wire == _BYTES:
      value = bytes(buf[f.start:f.end])
    elif f.number == 3 and f.wire == _VARINT:
      value = _signed64(f.value)
    elif f.number == 4 and f.wire == _FIXED32:
      value = float(np.frombuffer(buf[f.start:f.end], '<f4')[0])
    elif f.number == 5 and f.wire == _VARINT:
      value = bool(f.value)
    elif f.number == 6 and f.wire == _VARINT:
      value = int(f.value)
    elif f.number == 7 and f.wire == _BYTES:
      value = _shape(buf, f.start, f.end)
    elif f.number == 8 and f.wire == _BYTES:
      value = _tensor(buf, f.start, f.end)
    elif f.number == 9 and f.wire == _BYTES:  # a function placeholder name
      value = _string(buf, f)
  return value


@dataclasses.dataclass(frozen=True)
class Node:
  """One NodeDef. `inputs` keep TensorFlow's spelling (`name:1`, control inputs `^name`)."""
  name: str
  op: str
  inputs: tuple[str, ...]
  attrs: dict[str, Any]
  device: str = ''

  @property
  def value(self) -> np.ndarray:
    """A Const node's tensor."""
    if self.op != 'Const' or not isinstance(self.attrs.get('value'), np.ndarray):
      raise GraphDefError(f'node {self.name!r} ({self.op}) is not a constant')
    return self.attrs['value']

  @property
  def data_inputs(self) -> tuple[str, ...]:
    """The input node names, without control inputs or output indices."""
    return tuple(i.split(':')[0] for i in self.inputs if not i.startswith('^'))


def _node(buf: memoryview, start: int, end: int) -> Node:
  name, op, device, inputs, attrs = '', '', '', [], {}
  for f in _fields(buf, start, end):
    if f.wire != _BYTES:
      continue
    if f.number == 1:
      name = _string(buf, f)
    elif f.number == 2:
      op = _string(buf, f)
    elif f.number == 3:
      inputs.append(_string(buf, f))
    elif f.number == 4:
      device = _string(buf, f)
    elif f.number == 5:  # map<string, AttrValue> entry {key = 1; value = 2}
      key, value = '', None
      for e in _fields(buf, f.start, f.end):
        if e.number == 1 and e.wire == _BYTES:
          key = _string(buf, e)
        elif e.number == 2 and e.wire == _BYTES:
          value = _attr_value(buf, e.start, e.end)
      attrs[key] = value
  if not name or not op:
    raise GraphDefError(f'node without a name or op at byte {start}: not a GraphDef?')
  return Node(name, op, tuple(inputs), attrs, device)


class Graph:
  """The nodes of a GraphDef, in file order and by name."""

  def __init__(self, nodes: list[Node], producer: int | None = None):
    self.nodes = list(nodes)
    self.producer = producer
    self.by_name: dict[str, Node] = {}
    for n in self.nodes:
      if n.name in self.by_name:
        raise GraphDefError(f'two nodes named {n.name!r}')
      self.by_name[n.name] = n

  def __len__(self) -> int:
    return len(self.nodes)

  def __contains__(self, name: str) -> bool:
    return name in self.by_name

  def __getitem__(self, name: str) -> Node:
    return self.by_name[name]

  def get(self, name: str) -> Node | None:
    return self.by_name.get(name)

  def const(self, name: str) -> np.ndarray:
    """The value of Const `name`, following Identity nodes (`weights/read` in frozen graphs)."""
    node = self.by_name[name]
    for _ in range(len(self.nodes)):
      if node.op != 'Identity':
        return node.value
      node = self.by_name[node.data_inputs[0]]
    raise GraphDefError(f'Identity cycle at {name!r}')

  def is_const(self, name: str) -> bool:
    node = self.by_name.get(name)
    return node is not None and node.op == 'Const'

  def consumers(self, name: str) -> list[Node]:
    return [n for n in self.nodes if name in n.data_inputs]

  def op_counts(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in self.nodes:
      counts[n.op] = counts.get(n.op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def parse_graph(data: bytes | bytearray | memoryview) -> Graph:
  """A Graph from the bytes of a serialised GraphDef."""
  buf = memoryview(data).cast('B')
  if len(buf) > MAX_GRAPH_BYTES:
    raise GraphDefError(f'{len(buf)} bytes: larger than any GraphDef protobuf can hold')
  nodes, producer = [], None
  for f in _fields(buf, 0, len(buf)):
    if f.number == 1 and f.wire == _BYTES:
      nodes.append(_node(buf, f.start, f.end))
    elif f.number == 4 and f.wire == _BYTES:  # VersionDef {int32 producer = 1; ...}
      for v in _fields(buf, f.start, f.end):
        if v.number == 1 and v.wire == _VARINT:
          producer = _signed64(v.value)
  if not nodes:
    raise GraphDefError('no nodes: not a GraphDef')
  return Graph(nodes, producer)


def read_graph(path: str | os.PathLike) -> Graph:
  """A Graph from a frozen `.pb` file (binary GraphDef)."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  if size > MAX_GRAPH_BYTES:
    raise GraphDefError(f'{path}: {size} bytes, larger than any GraphDef protobuf can hold')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return parse_graph(data)
  except GraphDefError as e:
    raise GraphDefError(f'{path}: {e}') from None
