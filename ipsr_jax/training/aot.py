"""Ahead-of-time compilation of the real training step for TPU and GPU topologies this host lacks.

XLA compiles for a TPU slice (libtpu) or a GPU node (the CUDA PJRT plugin, deviceless) on a CPU
machine, the way MaxText's `train_compile.py` checks a configuration before it costs chip hours.
`compile_step` builds exactly the step `train.Trainer` jits (`train.StepParts`: same generator,
loss, embedder, optimiser, shardings), from abstract shapes only, over a mesh of the topology's
devices, and reports what the compiler knows: per-device memory against the chip's HBM, FLOPs and
bytes per step, every collective, and a roofline estimate of the step time.

The compilers come from `pip install ".[aot-tpu]"` / `".[aot-gpu]"` (pinned to the jax this
project is tested with), ideally in a venv of their own: with libtpu or the CUDA plugin in
site-packages, every `import jax` on a CPU machine prints their start-up warnings. Or put them
beside the project, where only this module looks (`PLUGINS_ENV`, default `DEFAULT_PLUGINS`):

    pip install --no-deps --target ~/.cache/ipsr_jax/aot libtpu==0.0.42.1 jax-cuda12-pjrt==0.10.2

Import this module (or run `ipsr_jax.tools.aot_compile`) before JAX starts a backend.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
import sys
import time
from typing import Any

PLUGINS_ENV = 'IPSR_AOT_PLUGINS'
DEFAULT_PLUGINS = os.path.join(os.path.expanduser('~'), '.cache', 'ipsr_jax', 'aot')
# The paper's training budget (Section 3.3): 2.7 M VGGFace2 faces, 50 epochs.
PAPER_IMAGES = 2.7e6 * 50


def _use_plugins() -> None:
  """Makes the compilers findable and quiet, before JAX looks for plugins."""
  path = os.environ.get(PLUGINS_ENV, DEFAULT_PLUGINS)
  if path and os.path.isdir(path) and path not in sys.path:
    sys.path.insert(0, path)  # `jax_plugins.xla_cuda12` and `libtpu` are found on sys.path
  # Compile-only: JAX's own backend stays the CPU; libtpu reads these instead of asking a TPU VM's
  # metadata server (the warnings "could not determine TPU accelerator type / worker hostnames").
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-8')
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # no CUDA runtime to check
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')        # tests compile in parallel
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # XLA's and TensorFlow's start-up INFO lines
  # The CUDA plugin's Python half (GPU kernels for running, not compiling) is not needed here.
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.ERROR)
  logging.getLogger('jax_plugins.xla_cuda12').setLevel(logging.ERROR)


_use_plugins()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from ipsr_jax.runtime import chips
from ipsr_jax import config as config_lib
from ipsr_jax.training import losses
from ipsr_jax.runtime import sharding
from ipsr_jax.training import train
from ipsr_jax.data import degrade
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1
# pylint: enable=g-import-not-at-top,wrong-import-position

# GpuTargetConfigProto device facts (XLA's gpu_specs format) for deviceless GPU compilation; the
# numbers are the cards' published specifications. XLA reads cost models and tiling limits
# from them, not just the name.
_GPU_DEVICE_INFO = {
    'h100': ('NVIDIA H100 80GB HBM3', dict(
        cc=(9, 0), core_count=132, fpus_per_core=128, shared_memory_per_core=233472,
        shared_memory_per_block_optin=232448, memory_bandwidth=3352320000000, l2_cache_size=52428800,
        clock_rate_ghz=1.98, device_memory_size=84978434048)),
    'h200': ('NVIDIA H200', dict(
        cc=(9, 0), core_count=132, fpus_per_core=128, shared_memory_per_core=233472,
        shared_memory_per_block_optin=232448, memory_bandwidth=4800000000000, l2_cache_size=52428800,
        clock_rate_ghz=1.98, device_memory_size=150754820096)),
    'a100': ('NVIDIA A100-SXM4-80GB', dict(
        cc=(8, 0), core_count=108, fpus_per_core=64, shared_memory_per_core=167936,
        shared_memory_per_block_optin=166912, memory_bandwidth=2039000000000, l2_cache_size=41943040,
        clock_rate_ghz=1.41, device_memory_size=85198045184)),
}
_TPU = {  # generation -> (topology prefix, chip config, dims, cores per chip counted in the name)
    'v4': ('v4', 'megacore', 3, 2),
    'v5p': ('v5', 'megacore', 3, 2),
    'v5e': ('v5e', 'default', 2, 1),
    'v6e': ('v6e', 'default', 2, 1),
}
TOPOLOGY_EXAMPLES = ('v5e-8', 'v5e-256', 'v4-32', 'v5p-128', 'v6e-64', 'h100-8', 'h200-8', 'a100-8')


class AotError(RuntimeError):
  """The step does not compile or does not fit; the message is the compiler's."""


def _gpu_target_config(chip: str) -> str:
  description, d = _GPU_DEVICE_INFO[chip]
  fields = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                threads_per_core_limit=2048, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
                block_dim_limit_z=65535, registers_per_core_limit=65536, registers_per_block_limit=65536,
                **{k: v for k, v in d.items() if k != 'cc'})
  body = ''.join(f'  {k}: {v}\n' for k, v in fields.items())
  major, minor = d['cc']
  return (f'gpu_device_info {{\n{body}  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n'
          f'platform_name: "CUDA"\ndevice_description_str: "{description}"\n')


def _grid(n: int, dims: int) -> tuple[int, ...]:
  """n chips (a power of two) as the most even `dims`-dimensional grid, smallest side first."""
  if n < 1 or n & (n - 1):
    raise ValueError(f'chip count {n} is not a power of two')
  sides = [1] * dims
  k = 0
  while n > 1:
    sides[k % dims] *= 2
    n //= 2
    k += 1
  return tuple(sorted(sides))


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # as given: 'v5e-8', 'h100-8'
  chip: chips.Chip
  devices: tuple[Any, ...]
  platform: str        # 'tpu' | 'cuda'


def topology(name: str) -> Topology:
  """'v5e-8' (chips; v4 / v5p count TensorCores, as Cloud TPU names them: v4-32 is 16 chips),
  'h100-8' (GPUs, 8 per host) -> the topology's compile-only devices."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e|h100|h200|a100)-(\d+)', name)
  if not m:
    raise ValueError(f'--topology={name!r}: expected <generation>-<count>, e.g. {", ".join(TOPOLOGY_EXAMPLES)}')
  gen, count = m.group(1), int(m.group(2))
  try:
    if gen in _TPU:
      prefix, chip_config, dims, cores = _TPU[gen]
      if count % cores:
        raise ValueError(f'--topology={name}: {gen} slices count {cores} TensorCores a chip')
      grid = _grid(count // cores, dims)
      desc = topologies.get_topology_desc(
          platform='tpu', topology_name=f'{prefix}:' + 'x'.join(map(str, grid)), chip_config_name=chip_config,
          chips_per_host_bounds=(2, 2, 1) if count // cores >= 4 else (1, 1, 1), num_slices=1,
          wrap=(False,) * 3)
      platform = 'tpu'
    else:
      per_host = min(count, 8)
      if count % per_host:
        raise ValueError(f'--topology={name}: GPU counts above 8 must be whole hosts of 8')
      desc = topologies.get_topology_desc(gen, platform='cuda', target_config=_gpu_target_config(gen),
                                          topology=f'1x{count // per_host}x{per_host}')
      platform = 'cuda'
  except (RuntimeError, NotImplementedError) as e:
    extra = 'aot-tpu' if gen in _TPU else 'aot-gpu'
    raise AotError(f'no compiler for {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. '
                   f'Install it: pip install ".[{extra}]" (or into {DEFAULT_PLUGINS}, see ipsr_jax/training/aot.py)') from e
  chip = chips.by_name(gen)
  return Topology(name, chip, tuple(desc.devices), platform)


def topology_mesh(topo: Topology, mesh_config) -> Mesh:
  """The run's (data, fsdp) mesh over the topology's devices (`sharding.make_mesh`'s rules)."""
  n = len(topo.devices)
  fsdp = int(mesh_config.fsdp)
  data = n // fsdp if int(mesh_config.data) == -1 else int(mesh_config.data)
  if fsdp < 1 or data * fsdp != n:
    raise ValueError(f'config.mesh data={mesh_config.data} x fsdp={fsdp} does not cover the {n} devices of {topo.name}')
  return Mesh(np.asarray(topo.devices).reshape(data, fsdp), sharding.BATCH_AXES)


def abstract_embedder(config) -> tuple[Any, Any]:
  """The frozen embedder as (module, abstract variables as the step takes them,
  `train.frozen_embedder_variables`): shapes only, no weights. The module is
  the one a converted checkpoint's embedder.json names, else `config.embedder`'s (FaceNet graphs
  convert to that full-width module)."""
  e = config.embedder
  module = embedder_store.saved_module(e.checkpoint) if e.checkpoint else None
  if module is None:
    module = inception_resnet_v1.InceptionResnetV1(embedding_size=e.embedding_size, width=e.width,
                                                   dropout_rate=e.dropout_rate, bn_epsilon=e.bn_epsilon)
  return module, jax.eval_shape(train.frozen_embedder_variables, inception_resnet_v1.abstract_variables(module))


# ----------------------------------------------------------------------------- reading the HLO

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([0-9,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(' + '|'.join(COLLECTIVES) +
                          r')(-start)?\(', re.M)


_FUSED_NAME = re.compile(r'(?:all-)?reduce-scatter')
_FUSED_COLLECTIVE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\sfusion\([^\n]*?calls=%((?:all-)?reduce-scatter[\w.\-]*)', re.M)


def _shape_bytes(text: str) -> list[tuple[str, int, int]]:
  """(dtype, bytes, rank) of each array shape in an HLO result type."""
  return [(d, _DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x), len([x for x in dims.split(',') if x]))
          for d, dims in _SHAPE.findall(text)]


_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$', re.M)
_CALLED = re.compile(r'(?:calls|to_apply|body|condition|branch_computations|called_computations)=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)')


def _reachable(hlo_text: str) -> str:
  """The text of the computations the entry computation can run. A TPU module also holds the
  scheduler's unused clones of fusions (`async_collective_fusion.N`): their collectives never run."""
  starts = list(_COMPUTATION.finditer(hlo_text))
  if not starts:
    return hlo_text
  bodies, entry = {}, None
  for i, m in enumerate(starts):
    end = starts[i + 1].start() if i + 1 < len(starts) else len(hlo_text)
    bodies[m.group(2)] = hlo_text[m.start():end]
    if m.group(1):
      entry = m.group(2)
  if entry is None:
    return hlo_text
  seen, todo = {entry}, [entry]
  while todo:
    for group in _CALLED.findall(bodies[todo.pop()]):
      for name in re.findall(r'[\w.\-]+', group):
        if name in bodies and name not in seen:
          seen.add(name)
          todo.append(name)
  # A TPU reduce-scatter fusion's computation spells the collective as an all-reduce and a slice
  # inside: it is counted once, as the fusion (`_FUSED_COLLECTIVE`), not again from within.
  return '\n'.join(bodies[n] for n in bodies if n in seen and not _FUSED_NAME.match(n))


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Every collective of an optimised HLO module: [{kind, dtype, count, bytes}], summed over the
  ops of that kind and dtype. An op's bytes are what it delivers to each device: all of its
  results (XLA combines many gradients into one tuple-shaped all-reduce), and for an async
  `-start` other than all-reduce's, whose result pairs operands with outputs, the outputs only. `-done` halves are not counted again, nor copies of one collective (same channel_id)."""
  table: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
  channels = set()
  text = _reachable(hlo_text)
  for m in _INSTRUCTION.finditer(text):
    kind, start = m.group(2), bool(m.group(3))
    line_end = text.find('\n', m.end())
    channel = re.search(r'channel_id=(\d+)', text[m.end():line_end if line_end >= 0 else len(text)])
    if channel:  # the TPU compiler keeps copies of one collective in cloned fusions: one channel, one transfer
      if channel.group(1) in channels:
        continue
      channels.add(channel.group(1))
    shapes = _shape_bytes(m.group(1))
    if start and kind != 'all-reduce':
      arrays = [x for x in shapes if x[2] > 0]  # drop the scalar sync contexts
      shapes = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
    if not shapes:
      continue
    dtype = max(shapes, key=lambda x: x[1])[0]
    row = table[(kind, dtype)]
    row[0] += 1
    row[1] += sum(x[1] for x in shapes)
  # TPU fuses a reduce-scatter with its inputs into one kCustom fusion of a computation named
  # after it (`calls=%all-reduce-scatter.N`): one collective delivering the fusion's outputs.
  called = set()
  for m in _FUSED_COLLECTIVE.finditer(text):
    if m.group(2) in called:
      continue
    called.add(m.group(2))
    shapes = _shape_bytes(m.group(1))
    row = table[('reduce-scatter', max(shapes, key=lambda x: x[1])[0])]
    row[0] += 1
    row[1] += sum(x[1] for x in shapes)
  return [dict(kind=k, dtype=d, count=c, bytes=b) for (k, d), (c, b) in sorted(table.items())]


def memory(compiled) -> dict[str, int]:
  """Per-device buffers of a compiled program (`memory_analysis`); donated inputs aliased to
  outputs are counted once in `peak`."""
  m = compiled.memory_analysis()
  get = lambda f: int(getattr(m, f, 0) or 0)
  out = dict(arguments=get('argument_size_in_bytes'), outputs=get('output_size_in_bytes'),
             aliased=get('alias_size_in_bytes'), temps=get('temp_size_in_bytes'),
             generated_code=get('generated_code_size_in_bytes'))
  peak = get('peak_memory_in_bytes')
  out['peak'] = peak or (out['arguments'] + out['outputs'] - out['aliased'] + out['temps'] + out['generated_code'])
  return out


def _cost(compiled, config, on_device: bool, devices: int) -> tuple[dict[str, float], str]:
  """(FLOPs and bytes accessed per device and step, where they came from)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and cost.get('flops'):
    return dict(flops=float(cost['flops']), bytes_accessed=float(cost.get('bytes accessed', 0.0))), 'compiled'
  # The CUDA compiler reports no cost: XLA's analysis of the same step, unpartitioned (one CPU
  # device, the global batch), per device.
  one = Mesh(np.asarray(jax.devices('cpu')[:1]).reshape(1, 1), sharding.BATCH_AXES)
  lowered = _lower(config, one, on_device)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (dict(flops=float(cost.get('flops', 0.0)) / devices,
               bytes_accessed=float(cost.get('bytes accessed', 0.0)) / devices), 'unpartitioned step / devices')


def roofline(flops: float, bytes_accessed: float, per_chip_batch: int, chip: chips.Chip, dtype: str,
             num_chips: int) -> dict[str, float]:
  """An estimate, not a measurement: the step can take no less than its FLOPs at the chip's peak
  nor its memory traffic at the chip's HBM bandwidth (data sheets, `ipsr_jax.runtime.chips`); real steps
  run slower (kernel efficiency, collectives, input)."""
  compute_s = flops / chip.peak_flops[dtype]
  memory_s = bytes_accessed / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  img_s = per_chip_batch / step_s if step_s else float('inf')
  return dict(step_seconds_bound=step_s, compute_seconds=compute_s, memory_seconds=memory_s,
              bound='compute' if compute_s >= memory_s else 'memory', images_per_second_per_chip=img_s,
              paper_budget_hours=PAPER_IMAGES / (img_s * num_chips) / 3600.0)


# ----------------------------------------------------------------------------- the compile


def _lower(config, mesh: Mesh, on_device: bool):
  uses = losses.uses_recognizer(config.loss)
  module, embedder_vars = abstract_embedder(config) if uses and losses.reads_embedder(config.loss) else (None, None)
  # The other recognizers of the loss: their graphs are read for the structure, weights as shapes.
  recognizers = train.loss_recognizers(config, abstract=True) if uses else {}
  recognizer_vars = {n: r.params for n, r in recognizers.items()} or None
  parts = train.StepParts(config, mesh, num_steps=max(config.train.num_train_steps, 1), embedder=module,
                          degrade_on_device=on_device, recognizers=recognizers)
  replicated = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)), tree)
  return parts.train_step.lower(parts.abstract_state, parts.batch_spec, replicated(embedder_vars),
                                replicated(recognizer_vars))


def lower_step(config, topo: Topology):
  """(lowered step, mesh) of `config` for `topo`, from abstract shapes only."""
  config_lib.validate(config, data_paths=False)  # no data is read
  mesh = topology_mesh(topo, config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh)
  on_device = degrade.resolve_on_device(config.data.degrade_on_device, topo.platform,
                                       degradation=config.data.get('degradation', 'bicubic'))
  return _lower(config, mesh, on_device), mesh


def compile_step(config, topo: Topology) -> tuple[dict[str, Any], str, Any]:
  """Compiles the step for `topo`: (report, optimised HLO text, compiled executable).

  Raises AotError with the compiler's message when it does not compile, or (after compiling)
  does not fit in the chip's memory.
  """
  t0 = time.perf_counter()
  lowered, mesh = lower_step(config, topo)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError: the compiler's own words)
    raise AotError(f'the step does not compile for {topo.name}: {e}') from e
  seconds = time.perf_counter() - t0
  hlo = compiled.as_text()
  devices = len(topo.devices)
  mem = memory(compiled)
  on_device = degrade.resolve_on_device(config.data.degrade_on_device, topo.platform,
                                       degradation=config.data.get('degradation', 'bicubic'))
  cost, cost_source = _cost(compiled, config, on_device, devices)
  dtype = config.train.compute_dtype
  per_chip_batch = config.train.batch_size // devices
  report = dict(
      topology=topo.name, platform=topo.platform, device_kind=topo.devices[0].device_kind, devices=devices,
      mesh=dict(mesh.shape), global_batch=config.train.batch_size, per_chip_batch=per_chip_batch,
      compute_dtype=dtype, compile_seconds=round(seconds, 1), memory=mem, hbm_bytes=topo.chip.hbm_bytes,
      fits=mem['peak'] <= topo.chip.hbm_bytes, flops_per_step=cost['flops'],
      bytes_accessed=cost['bytes_accessed'], cost_scope='per device', cost_source=cost_source,
      collectives=collectives(hlo),
      roofline=roofline(cost['flops'], cost['bytes_accessed'], per_chip_batch, topo.chip, dtype, devices),
      jax=jax.__version__)
  return report, hlo, compiled
