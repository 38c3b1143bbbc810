"""Device mesh over every device of every host, and how arrays are laid out on it.

The batch is split over both mesh axes ('data', 'fsdp'); parameters and optimiser state are
replicated, or with `mesh.fsdp > 1` split along their largest divisible dimension over 'fsdp'
(ZeRO-3 style: XLA gathers them for the forward pass and reduce-scatters the gradients).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipsr_jax.runtime import cpu_devices

BATCH_AXES = ('data', 'fsdp')


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when this looks like one process of several; a no-op otherwise.

  Cloud TPU pods and SLURM are detected by JAX itself; an explicit coordinator comes from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (the launchers set them).
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  elif cpu_devices.one_of_several_processes():  # SLURM or a TPU pod: JAX auto-detects the cluster
    jax.distributed.initialize()
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(mesh_config, batch_size: int | None = None) -> Mesh:
  """Mesh of shape (data, fsdp) over all global devices; -1 takes the remaining devices.

  One exception, for CPU devices (one per core by default, `cpu_devices`): with data=-1 on one
  process, a `batch_size` that does not split over all of them (batch 16 on 3 cores) uses the
  most devices it splits over, instead of failing on a machine whose core count nobody chose.
  """
  n = jax.device_count()
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if fsdp < 1 or (data < 1 and data != -1):
    raise ValueError(f'config.mesh: data must be -1 or >= 1 and fsdp >= 1, got data={data}, fsdp={fsdp}')
  if data == -1:
    if n % fsdp:
      raise ValueError(f'config.mesh.fsdp={fsdp} does not divide the {n} devices')
    data = n // fsdp
    if batch_size and jax.process_count() == 1 and jax.devices()[0].platform == 'cpu':
      fits = [d for d in range(data, 0, -1) if batch_size % (d * fsdp) == 0]
      if fits and fits[0] != data:
        logging.info('batch %d does not split over %d CPU devices: using %d', batch_size, n, fits[0] * fsdp)
        data, n = fits[0], fits[0] * fsdp
  if data * fsdp != n:
    raise ValueError(f'config.mesh data={data} x fsdp={fsdp} != {n} devices')
  devices = np.asarray(jax.devices()[:n]).reshape(data, fsdp)
  return Mesh(devices, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Per-device batch; the global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(f'config.train.batch_size={global_batch} must be a multiple of the device count ({n}) '
                     f'and of the process count ({jax.process_count()})')
  return global_batch // n


FSDP_MIN_SIZE = 2**14  # leaves smaller than this stay replicated: gathering them costs more than it saves


def fsdp_spec(shape, fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """A parameter's split over the 'fsdp' axis: its largest dimension that `fsdp` divides, or
  replicated (small leaves, no divisible dimension, fsdp = 1)."""
  shape = tuple(shape)
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp == 0:
      axes = [None] * len(shape)
      axes[dim] = 'fsdp'
      return P(*axes)
  return P()


def param_sharding(tree, mesh: Mesh, fsdp_min_size: int = FSDP_MIN_SIZE):
  """Replicated leaves, or with an 'fsdp' axis > 1, large leaves split on their largest divisible dim."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(getattr(leaf, 'shape', ()), fsdp, fsdp_min_size)),
                      tree)


def put_global(tree, shardings):
  """Host values (the same on every process) -> global arrays laid out by `shardings`."""
  host = jax.tree.map(np.asarray, jax.device_get(tree))
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), host, shardings)


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
