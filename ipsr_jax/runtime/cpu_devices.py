"""How many XLA CPU devices this process runs: by default one per core it may use.

XLA:CPU runs one device's program on a pool of threads, but much of a face embedder (hundreds of
small convolutions, BatchNorm and ReLU fusions) does not keep them all busy: FaceNet at 160 keeps
~1.35 of 2 cores busy. The project already shards every batch over a mesh of all local devices
(api models, training, evaluation), so giving the CPU one device per core fills the idle ones
without touching a kernel (benchmarks/NOTES.md, "CPU devices and the UNet's strided
convolutions"). Results do not depend on it beyond float summation order (tests/test_cpu_devices.py,
tests/test_train.py).

In a multi-process job (jax.distributed) 'auto' is one device per process: several processes may
share a machine's cores. The count is decided once, before JAX starts its backends, by the entry
points: `ipsr_jax.main` applies `config.mesh.cpu_devices` (recorded in the run's config.json and
log), the command-line tools and the `api` loaders apply the default; importing `ipsr_jax` applies
nothing. A choice the user already made wins over the default: `IPSR_CPU_DEVICES=<n|auto>`,
`JAX_NUM_CPU_DEVICES`, or `--xla_force_host_platform_device_count` in XLA_FLAGS.

The FaceNet `Embedder`'s programs (the API, the evaluation's embedder, tools/embed) also ask
XLA:CPU to hand elementwise fusions to YNNPACK, the library that already runs its convolutions:
FaceNet at 160 embeds ~12% faster, the same values to 6e-8 (benchmarks/NOTES.md). Nothing else
does. That fusion type is experimental in XLA, and under it `arctanh(clip(x))` is off by up to 3.8
(jax 0.10.2), which puts the residual generator's SR faces up to 209 grey levels off; the
training step also runs ~5% slower with it. `config.mesh.cpu_embedder_fusion` /
`IPSR_CPU_FUSION=0|1` turn it off or on; XLA_FLAGS that name the fusion types themselves win.
"""

from __future__ import annotations

import os
from typing import Any

import jax

ENV = 'IPSR_CPU_DEVICES'
AUTO = 'auto'
_XLA_FLAG = '--xla_force_host_platform_device_count'

FUSION_ENV = 'IPSR_CPU_FUSION'
_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
# XLA's default list (individual convolutions and dots) plus elementwise fusions: the program that
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+eltwise compiles (a compiler option replaces the
# list instead of adding to it; tests/test_cpu_devices.py checks the two programs are the same).
EMBEDDER_FUSION = {_FUSION_OPTION: ','.join(
    f'LIBRARY_FUSION_TYPE_{t}' for t in ('INDIVIDUAL_CONVOLUTION', 'INDIVIDUAL_DOT', 'ELTWISE'))}
_embedder_fusion = True  # configure(fusion=...) sets it; FUSION_ENV wins


def cores() -> int:
  """The cores this process may run on (its CPU affinity: taskset, cgroups cpusets, SLURM)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def one_of_several_processes() -> bool:
  """Whether the environment says this is one process of a multi-process job (what
  `sharding.initialize_distributed` reads): its processes may share the machine's cores."""
  env = os.environ
  return bool(env.get('JAX_COORDINATOR_ADDRESS') or env.get('SLURM_NTASKS', '1') != '1'
              or env.get('TPU_WORKER_HOSTNAMES', '').count(','))


def resolve(setting: str | int) -> int:
  """'auto' -> `cores()` (1 in a multi-process job, whose processes may share the cores); a
  positive int (or its string) -> itself."""
  if str(setting).strip().lower() == AUTO:
    return 1 if one_of_several_processes() else cores()
  try:
    count = int(setting)
  except (TypeError, ValueError):
    count = 0
  if count < 1:
    raise ValueError(f'CPU device count {setting!r}: must be {AUTO!r} or a number >= 1')
  return count


def users_choice() -> str | None:
  """Where the user already set the count (an env variable or XLA flag), or None."""
  if os.environ.get('JAX_NUM_CPU_DEVICES'):
    return 'JAX_NUM_CPU_DEVICES'
  if _XLA_FLAG in os.environ.get('XLA_FLAGS', ''):
    return f'XLA_FLAGS {_XLA_FLAG}'
  return None


def _started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def _flag(value: str) -> bool:
  value = str(value).strip().lower()
  if value in ('1', 'true', 'on', 'yes'):
    return True
  if value in ('0', 'false', 'off', 'no'):
    return False
  raise ValueError(f'{FUSION_ENV}={value!r}: must be 0 or 1')


def embedder_fusion() -> bool:
  """Whether the embedder's programs on CPU compile with `EMBEDDER_FUSION`: `IPSR_CPU_FUSION` if
  set, else what `configure` was given (default on); off when the user's XLA_FLAGS name the option."""
  if _FUSION_OPTION in os.environ.get('XLA_FLAGS', ''):
    return False
  if os.environ.get(FUSION_ENV):
    return _flag(os.environ[FUSION_ENV])
  return _embedder_fusion


def embedder_compiler_options(platform: str) -> dict[str, str]:
  """The compiler options of an embedder program for devices of `platform` ('cpu', 'gpu', ...)."""
  return dict(EMBEDDER_FUSION) if platform == 'cpu' and embedder_fusion() else {}


def configure_from(mesh_config: Any) -> int | None:
  """`configure` with `config.mesh`'s cpu_devices and cpu_embedder_fusion (both optional)."""
  return configure(mesh_config.get('cpu_devices', AUTO),
                   fusion=mesh_config.get('cpu_embedder_fusion', True))


def configure(setting: str | int | None = None, *, fusion: bool | None = None) -> int | None:
  """Sets the CPU device count before JAX starts; returns it (None: left to the user's choice).

  `setting` None or 'auto' is the default: one device per core, unless the user set the count
  through JAX or XLA. A number (a config value) applies unless `IPSR_CPU_DEVICES` is set, which
  wins over both. Once JAX has started, the count cannot change: a different explicit setting is
  an error. `fusion` (None: unchanged) turns `EMBEDDER_FUSION` on or off.
  """
  global _embedder_fusion
  if fusion is not None:
    _embedder_fusion = bool(fusion)
  if os.environ.get(ENV):
    setting = os.environ[ENV]
  elif setting is None or str(setting).strip().lower() == AUTO:
    if users_choice():
      return None
    setting = AUTO
  count = resolve(setting)
  if _started():
    current = jax.config.jax_num_cpu_devices
    if current not in (-1, count) and str(setting).lower() != AUTO:
      raise RuntimeError(f'CPU device count {setting!r}: JAX already started with {current} CPU devices; '
                         f'set it before any JAX computation (or with {ENV}).')
    return current if current != -1 else None
  jax.config.update('jax_num_cpu_devices', count)
  return count
