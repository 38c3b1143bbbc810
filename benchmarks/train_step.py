"""Training-step throughput of the real jitted step (`ipsr_jax.training.train.Trainer.train_step`).

For each precision (fp32, bf16 = `train.compute_dtype`) and global batch size it builds the
Trainer of `configs/base.py` (the paper: 128x128, ngf=64, embedder at 160, Adam) with a random
embedder, compiles the step once, then reports the median step time over many steps, each ended
by `jax.block_until_ready` (what the PyTorch peer measures, with `cuda.synchronize`), plus:

  img_s             batch / median synchronised step time
  img_s_pipelined   steps dispatched back to back, one sync at the end (how training runs)
  img_s_host_fed    as pipelined, but every batch comes from host memory through the training
                    loop's own prefetch (`loop.prefetch`): shows whether transfers are hidden
  flops_per_image   'jaxpr': conv + matmul FLOPs in the step's jaxpr (model FLOPs, the MFU basis);
                    'xla': the compiled step's `cost_analysis()`; 'reference': 17.5e9, the count
                    for the paper's config in docs/design.md (torch FlopCounter in the peer); 'unet_fwd' and
                    'embedder_fwd' per image
  tflops, mfu       model FLOP/s, and their share of the chip's dense peak (GPU/TPU table below;
                    CPU: TFLOP/s only); `--measure_peak` adds a timed bf16 matmul as a second basis
  memory            the compiled step's buffers (`memory_analysis`) and the device's peak
                    bytes in use (`memory_stats`, a high-water mark for the whole process)
  compile_s         trace + lower + compile of the step
  profile           with --profile_dir: the top kernels of 5 traced steps and the share of
                    kernel time in conv/GEMM kernels (the trace stays in that directory)

    python benchmarks/train_step.py --batch_sizes=64,256 --precisions=bf16,fp32 --out=/tmp/step.json
    python benchmarks/train_step.py --config=configs/base.py:tiny --batch_sizes=8 --steps=3
    python benchmarks/train_step.py --peer=.whl/torch_peer.py     # + the PyTorch peer, and ratios
    python benchmarks/train_step.py --report=a.json,peer.jsonl    # table from saved results

Config fields are overridden as in training (`--config.model.ngf=32`). The peer runs first, in a
subprocess, before JAX touches the accelerator (JAX pre-allocates most of its memory).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
from pathlib import Path
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Sequence
import warnings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from ipsr_jax.runtime import chips
from ipsr_jax.runtime import sharding
from ipsr_jax.training import loop
from ipsr_jax.training import train
from ipsr_jax.data import degrade
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1
# pylint: enable=g-import-not-at-top,wrong-import-position

PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16'}
# docs/design.md, "The cost of a training step": the paper's config, per image (UNet fwd 3.0 GFLOP,
# embedder fwd at 160x160 2.8 GFLOP; fwd+bwd of the UNet, 2 embedder fwd + its input gradient).
PAPER_FLOPS_PER_IMAGE = 17.5e9
PEER_BEST_MODE = 'bf16_cl_compile_ro'
PROFILE_STEPS = 5

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'base.py'),
                                'Training configuration (the real one; overrides as --config.a.b=v).',
                                lock_config=True)
flags.DEFINE_list('batch_sizes', ['64', '256'], 'Global batch sizes to time.')
flags.DEFINE_list('precisions', ['bf16', 'fp32'], 'Compute precisions: bf16 and/or fp32.')
flags.DEFINE_integer('steps', 50, 'Timed steps per configuration (median reported).')
flags.DEFINE_integer('warmup', 5, 'Untimed steps after compilation.')
flags.DEFINE_bool('degrade_on_device', None, 'Override config.data.degrade_on_device (the HR -> LR '
                  'resize inside the step; the batch then carries no LR images).')
flags.DEFINE_bool('host_fed', True, 'Also time steps fed from host memory through loop.prefetch.')
flags.DEFINE_bool('measure_peak', False, 'Time a bf16 matmul as a measured peak (GPU/TPU).')
flags.DEFINE_string('profile_dir', '', 'Capture a jax.profiler trace of a few steps per '
                    'configuration under this directory, and report its top kernels.')
flags.DEFINE_string('out', '', 'Write the results as JSON here.')
flags.DEFINE_string('peer', '', 'Path to the PyTorch peer (torch_peer.py): run it first, in a '
                    'subprocess, at the same batch sizes (needs torch and facenet-pytorch).')
flags.DEFINE_list('peer_modes', [PEER_BEST_MODE], 'Peer execution modes (its --modes).')
flags.DEFINE_integer('peer_steps', 20, 'Peer timed steps.')
flags.DEFINE_integer('peer_warmup', 5, 'Peer warm-up steps (torch.compile happens here).')
flags.DEFINE_integer('peer_timeout', 900, 'Seconds before the peer is stopped; rows so far are kept.')
flags.DEFINE_bool('skip_jax', False, 'Only run the peer (with --peer).')
flags.DEFINE_list('report', [], 'Print the table of saved results (this script\'s JSON and/or the '
                  'peer\'s JSON lines) instead of benchmarking; --out writes the merged summary.')


# ----------------------------------------------------------------------------- FLOP counting


def _prod(xs: Iterable[int]) -> int:
  return int(math.prod(int(x) for x in xs))


def _conv_flops(eqn) -> float:
  """2 x multiply-adds of one conv_general_dilated, skipping the zeros that lhs (input) dilation
  inserts: transposed convolutions and the input gradients of strided ones are lhs-dilated, and
  only 1 / prod(dilation) of their taps meet real inputs (exact when the kernel size is a multiple
  of the stride, as in the UNet's 4x4 stride-2 layers)."""
  rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  out_features = rhs.shape[dn.rhs_spec[0]]
  macs_per_output = _prod(rhs.shape) / out_features
  dilation = _prod(eqn.params.get('lhs_dilation') or (1,))
  return 2.0 * _prod(out.shape) * macs_per_output / dilation


def _dot_flops(eqn) -> float:
  lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  return 2.0 * _prod(out.shape) * _prod(lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(value) -> list:
  if hasattr(value, 'eqns'):
    return [value]
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr) -> dict[str, float]:
  """{'conv': ..., 'dot': ...}: FLOPs of the convolutions and matmuls of a (closed) jaxpr, through
  nested calls (jit, custom_vjp, remat); scan bodies count `length` times, `cond` its costliest
  branch. Elementwise work is left out, as torch's FlopCounterMode does."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = {'conv': 0.0, 'dot': 0.0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total['conv'] += _conv_flops(eqn)
    elif name == 'dot_general':
      total['dot'] += _dot_flops(eqn)
    subs = [(k, j) for k, v in eqn.params.items() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    counts = [jaxpr_flops(j) for _, j in subs]
    if name == 'cond':
      counts = [max(counts, key=lambda c: c['conv'] + c['dot'])]
    times = int(eqn.params.get('length', 1)) if name == 'scan' else 1
    for c in counts:
      for k in total:
        total[k] += times * c[k]
  return total


def _total(counts: dict[str, float]) -> float:
  return counts['conv'] + counts['dot']


def forward_flops(trainer: train.Trainer, config) -> dict[str, float]:
  """Per-image forward FLOPs of the generator and of the embedder at its input size (batch 1)."""
  size = config.model.image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: trainer.generator.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  unet = _total(jaxpr_flops(jax.make_jaxpr(
      lambda v, lr: trainer.generator.apply(v, lr, train=False))(variables, x)))
  out = {'unet_fwd': unet}
  if trainer.embedder is not None:
    # The embedder alone at its input size: the 128 -> 160 resize is a matmul, counted in the step.
    e = config.embedder.input_size
    pixels = jax.ShapeDtypeStruct((1, e, e, 3), jnp.float32)
    out['embedder_fwd'] = _total(jaxpr_flops(jax.make_jaxpr(
        lambda v, p: trainer.embedder.apply(v, p, train=False))(trainer.embedder_vars, pixels)))
  return out


def is_paper_model(config) -> bool:
  m, e = config.model, config.embedder
  return (m.image_size == 128 and m.ngf == 64 and m.num_downs == 7 and m.max_width_multiplier == 8
          and e.input_size == 160 and e.width == 1.0 and e.embedding_size == 512
          and bool(config.loss.identity_weight))


def xla_flops(cost: Any) -> float | None:
  """The 'flops' entry of a cost analysis (a dict, or a list of one dict in older jax)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  value = float(cost['flops'])
  return value if value > 0 else None


# ----------------------------------------------------------------------------- device facts


def peak_flops(device_kind: str, compute_dtype: str) -> float | None:
  """Dense peak FLOP/s of one chip for the compute dtype, or None (CPU, unknown chips)."""
  chip = chips.for_device_kind(device_kind)  # the vendors' data sheets, ipsr_jax/runtime/chips.py
  return chip.peak_flops[compute_dtype] if chip else None


def measure_matmul_peak(n: int = 8192, reps: int = 10) -> float:
  """bf16 FLOP/s of an n x n x n matmul on device 0 (the machine's attainable matrix rate)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(3):
    jax.block_until_ready(f(a, b))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, b)
  jax.block_until_ready(out)
  return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {'platform': d.platform, 'device_kind': d.device_kind, 'device_count': jax.device_count(),
          'process_count': jax.process_count(), 'jax': jax.__version__,
          'jaxlib': getattr(jax.lib, '__version__', None) or _version('jaxlib'),
          'flax': _version('flax'), 'python': platform.python_version(),
          'host_cpus': os.cpu_count()}


def _version(package: str) -> str | None:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(package)
  except Exception:  # pylint: disable=broad-except
    return None


def memory_stats() -> dict[str, int] | None:
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: int(stats[k]) for k in ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit') if k in stats}


def compiled_memory(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  out = {f.replace('_size_in_bytes', '_bytes'): int(getattr(m, f, 0) or 0) for f in fields}
  # Donated state is aliased to the output: it is counted once.
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                        + out['temp_bytes'])
  return out


# ----------------------------------------------------------------------------- profile


MATMUL_KERNEL_MARKS = ('conv', 'gemm', 'xmma', 'cutlass', 'cudnn', 'dot', 'wgmma', 'matmul')


def profile_summary(trace_dir: str, steps: int, top: int = 12) -> dict[str, Any] | None:
  """Top kernels by time from the Chrome trace `jax.profiler.trace` wrote under trace_dir.

  Device lanes ('/device:...') when there are any (GPU, TPU); on CPU the XLA compute threads.
  'matmul_share' is the time share of kernels named like convolutions/GEMMs: the part of the
  step that runs on the matrix units; the rest is elementwise, reductions, copies.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
  if not paths:
    return None
  with gzip.open(paths[-1], 'rt') as f:
    events = json.load(f)['traceEvents']
  processes = {e['pid']: e['args']['name'] for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  devices = {pid for pid, name in processes.items() if name.startswith('/device:')}
  # Device lanes overlap (GPU: 'Stream #n' kernels plus derived 'XLA Ops'/'XLA Modules' lines;
  # TPU: 'XLA Ops' plus 'Steps', 'XLA Modules'): count one kind only.
  lanes = {key: name for key, name in threads.items() if key[0] in devices}
  for prefix in ('Stream', 'XLA Ops'):
    chosen = {key for key, name in lanes.items() if name.startswith(prefix)}
    if chosen:
      break
  else:
    chosen = set(lanes)

  def wanted(e):
    if devices:
      return (e['pid'], e.get('tid')) in chosen if chosen else e['pid'] in devices
    # CPU: the XLA compute threads, without the runtime's wrapper events around the kernels.
    return ('Eigen' in threads.get((e['pid'], e.get('tid')), '') and not e['name'].startswith('$')
            and '::' not in e['name'])

  total: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.defaultdict(int)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and wanted(e):
      total[e['name']] += e['dur']
      count[e['name']] += 1
  busy = sum(total.values())
  if not busy:
    return None
  matmul = sum(t for name, t in total.items() if any(m in name.lower() for m in MATMUL_KERNEL_MARKS))
  ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
  return {'lanes': 'device' if devices else 'host XLA threads', 'steps': steps,
          'busy_ms_per_step': busy / 1e3 / steps, 'matmul_share': matmul / busy,
          'kernels': len(total),
          'top': [{'name': n[:120], 'ms_per_step': t / 1e3 / steps, 'share': t / busy,
                   'calls_per_step': count[n] / steps} for n, t in ranked]}


def format_profile(summary: dict[str, Any]) -> str:
  lines = [f"profile ({summary['lanes']}): {summary['busy_ms_per_step']:.2f} ms busy/step over "
           f"{summary['kernels']} kernels, {100 * summary['matmul_share']:.0f}% in conv/GEMM kernels"]
  lines += [f"  {100 * k['share']:5.1f}%  {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<4.0f} {k['name']}"
            for k in summary['top']]
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- the benchmark


def make_random_embedder(directory: str | os.PathLike, embedder_config, seed: int = 0) -> str:
  """A random-init InceptionResnetV1 shaped as the config asks, saved as an embedder directory
  (the weights do not change the cost)."""
  kwargs = dict(width=float(embedder_config.width), embedding_size=int(embedder_config.embedding_size),
                dropout_rate=float(embedder_config.dropout_rate),
                bn_epsilon=float(embedder_config.bn_epsilon))
  module = inception_resnet_v1.InceptionResnetV1(**kwargs)
  variables = inception_resnet_v1.init_variables(module, seed)
  embedder_store.save_embedder(directory, variables, module_kwargs=kwargs, source='random (benchmark)')
  return str(directory)


def step_config(base, batch_size: int, precision: str, embedder_dir: str | None,
                degrade_on_device: bool | None):
  config = base.copy_and_resolve_references()
  config.data.source = 'synthetic'   # the Trainer builds a source; no dataset is read
  config.train.batch_size = int(batch_size)
  config.train.compute_dtype = PRECISIONS[precision]
  if embedder_dir:
    config.embedder.checkpoint = embedder_dir
  if degrade_on_device is not None:
    config.data.degrade_on_device = bool(degrade_on_device)
  return config


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A host batch as the pipeline yields it: uint8 hr (and lr unless degraded on device)."""
  b, s = config.train.batch_size // jax.process_count(), config.data.image_size
  batch = {'hr': rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           'lr_index': rng.integers(0, len(config.data.lr_sizes), (b,), dtype=np.int32),
           'label': rng.integers(0, 1000, (b,), dtype=np.int32)}
  if not degrade.resolve_on_device(config.data.degrade_on_device):
    batch['lr'] = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  return batch


class _HostBatches:
  """The iterator shape `loop.prefetch` expects (next + get_state), over fixed host batches."""

  def __init__(self, batches: Sequence[dict]):
    self._cycle = itertools.cycle(batches)

  def __next__(self) -> dict:
    return next(self._cycle)

  def get_state(self) -> None:
    return None


def _percentile(xs: Sequence[float], q: float) -> float:
  return float(np.percentile(np.asarray(xs), q))


def time_step(config, workdir: str, steps: int, warmup: int, host_fed: bool = True,
              profile_dir: str = '') -> dict[str, Any]:
  """Compiles and times `Trainer(config).train_step`; returns one result row."""
  trainer = train.Trainer(config, workdir)
  batch_size = config.train.batch_size
  rng = np.random.default_rng(0)
  host = [random_batch(config, rng) for _ in range(2)]
  device = [sharding.to_global(b, trainer.mesh) for b in host]
  state = trainer.initial_state()
  jax.block_until_ready(state)

  t0 = time.perf_counter()
  traced = trainer.train_step.trace(state, device[0], *trainer.step_inputs())
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  model = jaxpr_flops(traced.jaxpr)
  xla = xla_flops(compiled.cost_analysis())
  flops = {'jaxpr': _total(model) / batch_size, 'jaxpr_conv': model['conv'] / batch_size,
           # cost_analysis() is one device's share of the partitioned program.
           'jaxpr_matmul': model['dot'] / batch_size,
           'xla': xla * trainer.mesh.devices.size / batch_size if xla else None,
           'reference': PAPER_FLOPS_PER_IMAGE if is_paper_model(config) else None}
  flops.update(forward_flops(trainer, config))

  def run(state, batch):
    return compiled(state, batch, *trainer.step_inputs())

  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
    for i in range(warmup):
      state, metrics = run(state, device[i % 2])
    jax.block_until_ready((state, metrics))
    times = []
    for i in range(steps):
      t = time.perf_counter()
      state, metrics = run(state, device[i % 2])
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(steps):
      state, metrics = run(state, device[i % 2])
    jax.block_until_ready((state, metrics))
    pipelined_s = (time.perf_counter() - t) / steps
    host_fed_s = None
    if host_fed:
      batches = loop.prefetch(_HostBatches(host), trainer.mesh)
      state, metrics = run(state, next(batches)[0])
      jax.block_until_ready((state, metrics))
      t = time.perf_counter()
      for _ in range(steps):
        state, metrics = run(state, next(batches)[0])
      jax.block_until_ready((state, metrics))
      host_fed_s = (time.perf_counter() - t) / steps
    profile = None
    if profile_dir:
      path = os.path.join(profile_dir, f'b{batch_size}_{config.train.compute_dtype}')
      with jax.profiler.trace(path):
        for i in range(PROFILE_STEPS):
          state, metrics = run(state, device[i % 2])
        jax.block_until_ready((state, metrics))
      profile = profile_summary(path, PROFILE_STEPS)
  loss = float(jax.device_get(metrics.compute()['loss']))

  step_s = statistics.median(times)
  img_s = batch_size / step_s
  info = device_info()
  peak = peak_flops(info['device_kind'], config.train.compute_dtype)
  n_chips = jax.device_count()
  model_flops_s = flops['jaxpr'] * img_s
  row = {
      'batch_size': batch_size, 'precision': config.train.compute_dtype,
      'degrade_on_device': degrade.resolve_on_device(config.data.degrade_on_device),
      'compile_s': compile_s, 'steps': steps,
      'step_s': step_s, 'step_s_p10': _percentile(times, 10), 'step_s_p90': _percentile(times, 90),
      'img_s': img_s, 'img_s_pipelined': batch_size / pipelined_s,
      'img_s_host_fed': batch_size / host_fed_s if host_fed_s else None,
      'flops_per_image': flops,
      'tflops': model_flops_s / 1e12,
      'tflops_xla': flops['xla'] * img_s / 1e12 if flops['xla'] else None,
      'peak_flops_per_chip': peak,
      'mfu': model_flops_s / (peak * n_chips) if peak else None,
      'mfu_xla': flops['xla'] * img_s / (peak * n_chips) if peak and flops['xla'] else None,
      'memory': {'compiled': compiled_memory(compiled), 'device': memory_stats()},
      'final_loss': loss,
      'profile': profile,
  }
  del state, metrics, device, compiled, lowered, traced, trainer
  return row


# ----------------------------------------------------------------------------- the PyTorch peer


def torch_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec('torch') is not None


def run_peer(peer: str, batch_sizes: Sequence[int], modes: Sequence[str], steps: int, warmup: int,
             timeout: float, python: str = sys.executable) -> dict[str, Any]:
  """Runs the peer script, echoing its JSON lines; {'info', 'rows', 'returncode', 'timed_out'}.

  Rows printed before a timeout or crash are kept: each (batch, mode) is one line.
  """
  cmd = [python, '-u', peer, '--batch', *map(str, batch_sizes), '--modes', *modes,
         '--steps', str(steps), '--warmup', str(warmup)]
  print('peer:', ' '.join(cmd), flush=True)
  result = {'command': cmd, 'info': None, 'rows': [], 'returncode': None, 'timed_out': False}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)

  def stop(sig, frame):
    # SIGALRM: the watchdog (reading blocks while the peer compiles). SIGTERM: we are being
    # stopped; the peer runs in its own session, so take it (and its compile workers) along.
    del frame
    result['timed_out'] = sig == signal.SIGALRM
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    if sig == signal.SIGTERM:
      raise SystemExit(128 + signal.SIGTERM)

  previous = {s: signal.signal(s, stop) for s in (signal.SIGALRM, signal.SIGTERM)}
  signal.alarm(max(1, int(timeout)))
  try:
    for line in proc.stdout:
      line = line.rstrip()
      print('  peer|', line, flush=True)
      add_peer_line(result, line)
    proc.wait()
  finally:
    signal.alarm(0)
    for s, handler in previous.items():
      signal.signal(s, handler)
  result['returncode'] = proc.returncode
  return result


def add_peer_line(result: dict, line: str) -> None:
  """Files one line of peer output: its info line, a result row, or nothing (other output)."""
  if not line.startswith('{'):
    return
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return
  if 'train_flop_per_img' in record:
    result['info'] = record
  elif 'mode' in record and 'batch' in record:
    result['rows'].append(record)


def read_peer_lines(path: str) -> dict[str, Any]:
  result = {'info': None, 'rows': []}
  for line in Path(path).read_text().splitlines():
    add_peer_line(result, line.strip().removeprefix('peer|').strip())
  return result


def compare(results: Sequence[dict], peer: dict | None, mode: str = PEER_BEST_MODE) -> list[dict]:
  """JAX img/s over the peer's img/s at the same batch size (peer rows in `mode`; bf16 JAX rows
  against bf16 peer modes, float32 against 'fp32'). Only rows of the paper's model compare: the
  peer always builds it."""
  if not peer:
    return []
  out = []
  for r in results:
    if not r['flops_per_image'].get('reference'):
      continue
    want = mode if r['precision'] == 'bfloat16' else 'fp32'
    match = [p for p in peer['rows'] if p.get('mode') == want and p.get('batch') == r['batch_size']
             and p.get('img_s')]
    if match:
      out.append({'batch_size': r['batch_size'], 'precision': r['precision'], 'peer_mode': want,
                  'jax_img_s': r['img_s'], 'peer_img_s': match[0]['img_s'],
                  'ratio': r['img_s'] / match[0]['img_s']})
  return out


# ----------------------------------------------------------------------------- report


def _num(x: float | None, missing: str = '-') -> str:
  """Numbers of any size in a few characters: 9188, 52.41, 0.0312."""
  if x is None:
    return missing
  return f'{x:.0f}' if abs(x) >= 100 else f'{x:.2f}' if abs(x) >= 1 else f'{x:.3g}'


def table(results: Sequence[dict], peer: dict | None, device: str = '') -> str:
  """The human-readable comparison: one line per JAX row, with the peer's img/s and the ratio
  (the ratio only for the paper's model, which is what the peer runs)."""
  peer_rows = {(p.get('batch'), p.get('mode')): p for p in (peer or {}).get('rows', [])}
  ratios = {(c['batch_size'], c['precision']): c['ratio'] for c in compare(results, peer)}
  lines = [f'device: {device}' if device else '',
           f"{'batch':>5} {'prec':>8} {'img/s':>8} {'pipel.':>8} {'hostfed':>8} {'step ms':>8} "
           f"{'TFLOP/s':>8} {'MFU %':>6} {'GF/img jaxpr/xla':>17} {'compile s':>9} {'mem GB':>7} "
           f"{'peer img/s':>10} {'ratio':>6}"]
  for r in results:
    f = r['flops_per_image']
    mode = PEER_BEST_MODE if r['precision'] == 'bfloat16' else 'fp32'
    p = peer_rows.get((r['batch_size'], mode), {})
    mem = ((r['memory'].get('device') or {}).get('peak_bytes_in_use') or
           (r['memory'].get('compiled') or {}).get('total_bytes'))
    gf = f"{_num(f['jaxpr'] / 1e9)}/{_num(f['xla'] and f['xla'] / 1e9)}"
    lines.append(
        f"{r['batch_size']:>5} {r['precision']:>8} {_num(r['img_s']):>8} {_num(r['img_s_pipelined']):>8} "
        f"{_num(r['img_s_host_fed']):>8} {_num(r['step_s'] * 1e3):>8} {_num(r['tflops']):>8} "
        f"{_num(r['mfu'] and 100 * r['mfu']):>6} {gf:>17} {_num(r['compile_s']):>9} "
        f"{_num(mem and mem / 2**30):>7} {_num(p.get('img_s')):>10} "
        f"{_num(ratios.get((r['batch_size'], r['precision']))):>6}")
  for (b, m), p in sorted(peer_rows.items(), key=lambda kv: (kv[0][0] or 0, str(kv[0][1]))):
    lines.append(f'peer {m} batch {b}: ' + (f"{_num(p['img_s'])} img/s, {_num(p['step_s'] * 1e3)} ms/step, "
                                            f"{_num(p.get('tflops'))} TFLOP/s"
                                            if 'img_s' in p else f"error {p.get('error')}"))
  if results:
    f = results[0]['flops_per_image']
    reference = _num(f['reference'] and f['reference'] / 1e9, 'n/a (not the paper\'s model: no ratio)')
    lines.append(f"GFLOP/img: jaxpr (model FLOPs, the MFU basis) {_num(f['jaxpr'] / 1e9)} = conv "
                 f"{_num(f['jaxpr_conv'] / 1e9)} + matmul {_num(f['jaxpr_matmul'] / 1e9)}; XLA cost "
                 f"analysis {_num(f['xla'] and f['xla'] / 1e9)}; docs/design.md {reference}; UNet fwd "
                 f"{_num(f['unet_fwd'] / 1e9)}, embedder fwd {_num(f.get('embedder_fwd') and f['embedder_fwd'] / 1e9)}")
    if results[0].get('mfu_measured_peak') is not None:
      lines.append('MFU vs the measured bf16 matmul rate: ' + ', '.join(
          f"b{r['batch_size']} {r['precision']} {100 * r['mfu_measured_peak']:.1f}%" for r in results
          if r.get('mfu_measured_peak') is not None))
  if peer and peer.get('info'):
    lines.append(f"peer GFLOP/img {_num(peer['info']['train_flop_per_img'] / 1e9)} "
                 f"(torch FlopCounter), torch {peer['info'].get('torch')}, {peer['info'].get('device')}")
  return '\n'.join(l for l in lines if l)


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
  """Results of several runs of this script (JSON) and of the peer (JSON lines) as one report."""
  report = {'benchmark': 'train_step', 'device': None, 'results': [], 'peer': None, 'sources': []}
  for path in paths:
    if not Path(path).exists():
      print(f'report: {path} missing, skipped')
      continue
    report['sources'].append(path)
    text = Path(path).read_text()
    try:
      data = json.loads(text)
    except json.JSONDecodeError:
      data = None
    if isinstance(data, dict) and data.get('benchmark') == 'train_step':
      report['device'] = report['device'] or data.get('device')
      report['results'] += data.get('results', [])
      report.setdefault('errors', []).extend(data.get('errors', []))
      if data.get('peer'):
        report['peer'] = data['peer']
      for k in ('measured_peak_bf16', 'date', 'config'):
        if data.get(k) is not None:
          report.setdefault(k, data[k])
    else:
      peer = read_peer_lines(path)
      if peer['rows'] or peer['info']:
        report['peer'] = peer
  report['comparison'] = compare(report['results'], report['peer'])
  return report


def print_summary(report: dict[str, Any]) -> None:
  print(table(report['results'], report['peer'], _device_line(report.get('device'))))
  for e in report.get('errors', []):
    print(f"JAX batch {e['batch_size']} {e['precision']} failed: {e['error'][:300]}")
  for c in report.get('comparison', []):
    print(f"JAX / peer ({c['peer_mode']}) at batch {c['batch_size']}: {c['ratio']:.2f}x")


def _device_line(device: dict | None) -> str:
  if not device:
    return ''
  return (f"{device['device_kind']} x{device['device_count']} ({device['platform']}), jax {device['jax']}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if FLAGS['verbosity'].using_default_value:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every embedder save and load at INFO
  if FLAGS.report:
    report = merge_reports(FLAGS.report)
    print_summary(report)
    if FLAGS.out:
      Path(FLAGS.out).write_text(json.dumps(report, indent=1))
    return

  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  unknown = set(FLAGS.precisions) - set(PRECISIONS)
  if unknown:
    raise app.UsageError(f'--precisions: unknown {sorted(unknown)}; use {sorted(PRECISIONS)}')
  report: dict[str, Any] = {'benchmark': 'train_step',
                            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                            'command': sys.argv, 'results': [], 'peer': None}

  def save():
    if FLAGS.out:
      Path(FLAGS.out).write_text(json.dumps(report, indent=1))

  # The peer first: JAX pre-allocates most of the accelerator's memory once it starts.
  if FLAGS.peer:
    if not torch_available():
      print('peer: torch is not importable here; skipped')
    elif not Path(FLAGS.peer).exists():
      print(f'peer: {FLAGS.peer} not found; skipped')
    else:
      report['peer'] = run_peer(FLAGS.peer, batch_sizes, FLAGS.peer_modes, FLAGS.peer_steps,
                                FLAGS.peer_warmup, FLAGS.peer_timeout)
      save()
  if FLAGS.skip_jax:
    print(table([], report['peer']))
    return

  base = FLAGS.config
  report['device'] = device_info()
  report['config'] = {'model': base.model.to_dict(), 'embedder': base.embedder.to_dict(),
                      'loss': base.loss.to_dict(),
                      'degrade_on_device': degrade.resolve_on_device(
                          FLAGS.degrade_on_device if FLAGS.degrade_on_device is not None
                          else base.data.degrade_on_device)}
  print(f"{_device_line(report['device'])}; model {base.model.image_size}px ngf={base.model.ngf}, "
        f"embedder width {base.embedder.width} at {base.embedder.input_size}px", flush=True)
  if FLAGS.measure_peak and report['device']['platform'] == 'cpu':
    print('--measure_peak: skipped on CPU')
  elif FLAGS.measure_peak:
    report['measured_peak_bf16'] = measure_matmul_peak()
    print(f"measured bf16 matmul rate: {report['measured_peak_bf16'] / 1e12:.0f} TFLOP/s", flush=True)
  tmp = tempfile.mkdtemp(prefix='ipsr-bench-')
  try:
    embedder_dir = (make_random_embedder(os.path.join(tmp, 'embedder'), base.embedder)
                    if base.loss.identity_weight else None)
    for precision in FLAGS.precisions:
      for batch_size in batch_sizes:
        config = step_config(base, batch_size, precision, embedder_dir, FLAGS.degrade_on_device)
        print(f'timing batch {batch_size} {precision} ...', flush=True)
        try:
          row = time_step(config, os.path.join(tmp, 'workdir'), FLAGS.steps, FLAGS.warmup,
                          host_fed=FLAGS.host_fed, profile_dir=FLAGS.profile_dir)
        except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep going)
          print(f'  batch {batch_size} {precision} failed: {e!r}'[:2000], flush=True)
          report.setdefault('errors', []).append({'batch_size': batch_size, 'precision': precision,
                                                  'error': repr(e)[:2000]})
          save()
          jax.clear_caches()
          continue
        if report.get('measured_peak_bf16'):
          row['mfu_measured_peak'] = row['tflops'] * 1e12 / (report['measured_peak_bf16'] * jax.device_count())
        report['results'].append(row)
        print(f"  {row['img_s']:.1f} img/s ({row['step_s'] * 1e3:.2f} ms/step), pipelined "
              f"{row['img_s_pipelined']:.1f}, {row['tflops']:.3f} TFLOP/s, compile {row['compile_s']:.1f}s",
              flush=True)
        if row['profile']:
          print(format_profile(row['profile']), flush=True)
        save()
        jax.clear_caches()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  report['comparison'] = compare(report['results'], report['peer'])
  save()
  print_summary(report)
  if FLAGS.out:
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure()  # one XLA CPU device per core unless the user chose
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)
