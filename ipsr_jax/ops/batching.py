"""Run a per-batch function over any number of rows with a few fixed, padded batch sizes.

Inference over N images (evaluation galleries, the public API) would recompile for every new N.
`PaddedBatcher` cuts the rows into chunks of the largest bucket and pads the last chunk up to the
smallest bucket that fits, so a function compiles at most once per (bucket, per-row shape). With
more than one local device the batch is sharded over the mesh's data axis (buckets are rounded up
to a multiple of that axis' size) and the extra arguments (e.g. model variables) are replicated.

    batcher = PaddedBatcher(lambda images, variables: model.apply(variables, images))
    out = batcher(images, variables)     # numpy, exactly len(images) rows
    batcher.compiled_sizes               # {8, 64}: the bucket sizes compiled so far
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from ipsr_jax.runtime import cpu_devices


class PaddedBatcher:
  """Applies `fn(batch, *broadcast_args)` to arbitrarily many rows, compiling per bucket only.

  `batch` is an array or a pytree (e.g. a dict) of arrays sharing the leading dimension;
  `broadcast_args` are passed whole to every call (replicated across devices). `fn` must map each
  row independently (inference-mode models do), since padded rows are computed and dropped.
  """

  def __init__(self, fn: Callable[..., Any], buckets: Sequence[int] = (8, 64, 256),
               mesh: Mesh | None = None, data_axis: str | Sequence[str] = 'data',
               cpu_fusion: bool = False):
    """cpu_fusion: compile with `cpu_devices.EMBEDDER_FUSION` on CPU (FaceNet only: that fusion
    computes some elementwise ops wrongly, see cpu_devices)."""
    if not buckets or any(int(b) < 1 for b in buckets):
      raise ValueError(f'buckets must be positive sizes, got {buckets}')
    self._fn = fn
    self._cpu_fusion = cpu_fusion
    if mesh is None and jax.local_device_count() > 1:
      mesh = Mesh(np.array(jax.local_devices()), ('data',))
      data_axis = 'data'
    if mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat):
      raise ValueError('PaddedBatcher runs on this process\' devices only: pass a mesh of '
                       'jax.local_devices()')
    self._mesh = mesh
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
    self.buckets = tuple(sorted({-(-int(b) // shards) * shards for b in buckets}))
    if mesh is None:
      self._batch_sharding = self._replicated = None
    else:
      self._batch_sharding = NamedSharding(mesh, P(axes))
      self._replicated = NamedSharding(mesh, P())
    self._executables: dict[Any, Any] = {}
    self.compiled_sizes: set[int] = set()  # bucket sizes compiled so far
    self.compile_count = 0  # programs compiled so far (one per bucket and per-row shape)

  @property
  def mesh(self) -> Mesh | None:
    """The mesh the batch is sharded over (built from the local devices when there are
    several and none was given); None on one device."""
    return self._mesh

  def bucket_for(self, n: int) -> int:
    """The padded size of a chunk of n rows (n <= the largest bucket)."""
    for b in self.buckets:
      if b >= n:
        return b
    return self.buckets[-1]

  def chunk_sizes(self, n: int) -> list[tuple[int, int]]:
    """[(rows, bucket)] for n rows: full largest buckets, then one padded remainder."""
    largest = self.buckets[-1]
    full, rest = divmod(n, largest)
    chunks = [(largest, largest)] * full
    if rest:
      chunks.append((rest, self.bucket_for(rest)))
    return chunks

  def _executable(self, batch, args):
    specs = jax.tree.map(lambda x: (x.shape, str(x.dtype)), (batch, args))
    key = (jax.tree.structure((batch, args)), tuple(jax.tree.leaves(specs)))
    if key not in self._executables:
      platform = next(iter(jax.tree.leaves(batch)[0].sharding.device_set)).platform
      options = cpu_devices.embedder_compiler_options(platform) if self._cpu_fusion else {}
      self._executables[key] = jax.jit(self._fn).lower(batch, *args).compile(compiler_options=options or None)
      self.compiled_sizes.add(int(jax.tree.leaves(batch)[0].shape[0]))
      self.compile_count += 1
    return self._executables[key]

  def replicate(self, tree: Any) -> Any:
    """`tree` as device arrays laid out as broadcast args: put weights there once, reuse them."""
    return self._put(tree, self._replicated)

  def _put(self, tree, sharding):
    if sharding is None:
      return jax.tree.map(jax.numpy.asarray, tree)
    return jax.device_put(tree, sharding)

  def __call__(self, batch: Any, *broadcast_args: Any) -> Any:
    leaves = [np.asarray(x) for x in jax.tree.leaves(batch)]
    if not leaves:
      raise ValueError('PaddedBatcher needs at least one batched array')
    n = leaves[0].shape[0]
    if any(x.ndim == 0 or x.shape[0] != n for x in leaves):
      raise ValueError('every batched array needs the same leading dimension, got '
                       f'{[x.shape for x in leaves]}')
    treedef = jax.tree.structure(batch)
    args = self.replicate(broadcast_args)
    if n == 0:  # shapes only: the output structure at the smallest bucket, with zero rows
      b = self.buckets[0]
      padded = treedef.unflatten([np.zeros((b,) + x.shape[1:], x.dtype) for x in leaves])
      out = jax.eval_shape(self._fn, padded, *args)
      return jax.tree.map(lambda s: np.zeros((0,) + s.shape[1:], s.dtype), out)

    pending = []  # dispatch every chunk before reading any back: device work overlaps the host
    start = 0
    for rows, size in self.chunk_sizes(n):
      chunk = [x[start:start + rows] for x in leaves]
      if size > rows:  # repeat the last row: padding always holds valid data
        chunk = [np.concatenate([c, np.repeat(c[-1:], size - rows, axis=0)]) for c in chunk]
      device_batch = self._put(treedef.unflatten(chunk), self._batch_sharding)
      pending.append((rows, self._executable(device_batch, args)(device_batch, *args)))
      start += rows
    outs = [jax.tree.map(lambda o, r=rows: np.asarray(o)[:r], out) for rows, out in pending]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
