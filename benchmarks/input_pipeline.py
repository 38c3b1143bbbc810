"""Input pipeline throughput: decoded + degraded 128x128 faces per second, and per CPU-second.

Runs the real training pipeline (`make_train_iterator`: JPEG decode, shuffle, batching, multi-scale
degradation) over a folder of 128x128 JPEG faces, the format of aligned training data: LFW's
central crops when `../shared/data/lfw` exists beside the checkout, else generated faces. For each
Grain worker count and each place of degradation (host: in the pipeline; device: decode only, the
step degrades), then the same decode + host degradation in this thread without Grain:

    python benchmarks/input_pipeline.py --out=/tmp/input_pipeline.json

"Per CPU-second" divides faces by the CPU seconds of this process and its Grain workers (psutil,
user + system) while timed, so it barely depends on what else runs; faces/s does, so every row
records the load average, and each configuration runs --repeats times (the row is the median
run). Besides the configured read threads, 0 workers also runs with `data.read_threads=0` (the
whole pipeline in the consuming thread: one core), the baseline that worker scaling is measured
from, and workers run with each `data.worker_handoff` in --handoffs. The consumer reads every
byte of each batch once (a copy into a kept buffer), as `jax.device_put` would. The cost of a
first-touched memory page is measured too: Grain's shared-memory hand-off puts each batch in new
pages, so it is what a worker pays per face beyond the work itself there.
The table goes to stdout (markdown), everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
from pathlib import Path
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import base as base_config
from ipsr_jax.data import degrade
from ipsr_jax.data import image_io
from ipsr_jax.data import pipeline
from ipsr_jax.data.sources import folders
# pylint: enable=g-import-not-at-top,wrong-import-position

LFW = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'lfw'


def write_lfw_faces(out: Path, count: int) -> str:
  """The central half of `count` LFW photos (the face), resized to 128x128, as JPEG q95."""
  lfw = folders.LFW(LFW)
  step = max(1, len(lfw) // count)
  with degrade.one_blas_thread():
    for i in range(0, step * count, step)[:count]:
      record = lfw.records[i]
      face = image_io.resize_to(image_io.center_crop(lfw[i]['image'], 0.5), 128)
      folder = out / record.identity
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(face).save(folder / f'{i}.jpg', quality=95)
  return f'LFW central crops ({count} images)'


def write_generated_faces(out: Path, count: int) -> str:
  """Smooth random 128x128 images (a bicubic blow-up of 8x8 noise) as JPEG q95."""
  rng = np.random.default_rng(0)
  for i in range(count):
    small = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    face = np.clip(np.round(degrade.bicubic_resize(small, (128, 128))), 0, 255).astype(np.uint8)
    folder = out / f'id{i // 10:04d}'
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face).save(folder / f'{i}.jpg', quality=95)
  return f'generated faces ({count} images)'


def minor_faults(pid: int) -> int | None:
  """Minor page faults of a process so far (Linux: /proc/PID/stat field 10), else None."""
  try:
    return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[7])
  except (OSError, IndexError, ValueError):
    return None


def _snapshot(proc: psutil.Process) -> tuple[float, float, int | None]:
  """CPU seconds (user + system) of `proc` and its children, of `proc` alone, and their minor
  page faults (None where not readable)."""
  total = main = 0.0
  faults = 0
  for p in [proc] + proc.children(recursive=True):
    try:
      t = p.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += t.user + t.system
    main = t.user + t.system if p is proc else main
    f = minor_faults(p.pid)
    faults = None if f is None or faults is None else faults + f
  return total, main, faults


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


class Consumer:
  """Reads every byte of a batch once, into buffers it keeps: the host side of `device_put`
  (which is where a batch in shared memory gets faulted into the consuming process)."""

  def __init__(self):
    self.buffers = {}

  def __call__(self, batch: dict[str, np.ndarray]) -> None:
    for key in ('hr', 'lr'):
      if key in batch:
        kept = self.buffers.get(key)
        if kept is None or kept.shape != batch[key].shape:
          kept = self.buffers[key] = np.empty_like(batch[key])
        np.copyto(kept, batch[key])


def measure(source, workers: int, batch_size: int, batches: int, on_device: bool,
            read_threads: int = 2, warmup: int | None = None, retain_freed_memory: bool = True,
            handoff: str = 'pipe') -> dict:
  """One pipeline configuration: faces/s and faces per CPU-second of this process + workers."""
  config = base_config.get_config()
  config.data.retain_freed_memory = retain_freed_memory
  config.data.worker_handoff = handoff
  config.train.batch_size = batch_size
  config.data.num_workers = workers
  config.data.degrade_on_device = on_device
  config.data.read_threads = read_threads
  load = _load()
  t_start = time.perf_counter()
  it = pipeline.make_train_iterator(config, source)
  # Warm-up waits for every worker's first batch (process start, imports) and then drains the
  # batches they buffered meanwhile, so the timed window is steady state.
  warmup = 2 + workers * (config.data.worker_buffer_size + 1) if warmup is None else warmup
  consume = Consumer()
  for _ in range(warmup):
    consume(next(it))
  startup_s = time.perf_counter() - t_start
  proc = psutil.Process()
  (cpu0, main0, faults0), t0 = _snapshot(proc), time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    consume(batch)
  seconds = time.perf_counter() - t0
  cpu, main_cpu, faults = _snapshot(proc)
  cpu, main_cpu = cpu - cpu0, main_cpu - main0
  faults = None if faults is None or faults0 is None else faults - faults0
  # Thread counts show what runs where (a worker that started XLA would hold dozens).
  threads = {'main': proc.num_threads(),
             'children': [p.num_threads() for p in proc.children(recursive=True)]}
  it.close()
  assert batch['hr'].shape == (batch_size, 128, 128, 3) and ('lr' in batch) == (not on_device)
  faces = batches * batch_size
  return {'workers': workers, 'degrade': 'device' if on_device else 'host',
          'read_threads': read_threads, 'handoff': handoff if workers else None,
          'faces_per_s': faces / seconds,
          # CPU time is counted in clock ticks: a window shorter than one tick reads 0 (None).
          'faces_per_cpu_s': faces / cpu if cpu > 0 else None,
          'cpu_cores_busy': cpu / seconds, 'main_process_cores_busy': main_cpu / seconds,
          'page_faults_per_face': None if faults is None else faults / faces,
          'seconds': seconds, 'faces': faces, 'startup_s': startup_s,
          'read_threads_per_process': read_threads // max(1, workers),
          'threads': threads, 'load_avg': load}


def measure_median(repeats: int, *args, **kwargs) -> dict:
  """`measure` `repeats` times; the run with the median faces/s, with every run's faces/s."""
  runs = sorted((measure(*args, **kwargs) for _ in range(max(1, repeats))),
                key=lambda r: r['faces_per_s'])
  row = dict(runs[len(runs) // 2])
  row['faces_per_s_runs'] = [r['faces_per_s'] for r in runs]
  return row


def fresh_page_us(megabytes: int = 16, repeats: int = 20) -> float:
  """CPU microseconds to first-touch one 4 KiB page of new memory (the kernel allocates and zeroes
  it): the unit cost of Grain's per-batch shared memory. 2.5-3.8 us on the 2-core VM of
  benchmarks/NOTES.md; commonly far less on bare metal (not measured here)."""
  data = np.ones(megabytes << 20, np.uint8)
  best = float('inf')
  for _ in range(repeats):
    t0 = time.process_time()
    fresh = mmap.mmap(-1, data.nbytes)
    np.frombuffer(fresh, np.uint8)[:] = data
    best = min(best, time.process_time() - t0)
    fresh.close()
  return best / (data.nbytes / 4096) * 1e6


def measure_in_process(source, batch_size: int, batches: int, lr_sizes) -> dict:
  """Decode + host degradation in this thread, no Grain: the work one batch costs, per phase."""
  sampler = degrade.LRSampler(lr_sizes, per='example', seed=0)
  load = _load()
  decode_s = sample_s = degrade_s = 0.0
  n = len(source)
  for b in range(batches + 1):
    keys = np.arange(b * batch_size, (b + 1) * batch_size)
    t0 = time.process_time()
    images = [source[int(k) % n] for k in keys]
    hr = np.stack([e['image'] for e in images if e is not None])
    t1 = time.process_time()
    lr_index = sampler.for_batch(keys[:len(hr)])
    t2 = time.process_time()
    degrade.degrade_batch(hr, lr_index, lr_sizes)
    t3 = time.process_time()
    if b:  # the first batch warms caches and the BLAS library
      decode_s, sample_s, degrade_s = decode_s + t1 - t0, sample_s + t2 - t1, degrade_s + t3 - t2
  faces = batches * batch_size
  return {'faces': faces, 'decode_faces_per_cpu_s': faces / decode_s,
          'degrade_faces_per_cpu_s': faces / degrade_s,
          'decode_and_degrade_faces_per_cpu_s': faces / (decode_s + sample_s + degrade_s),
          'load_avg': load}


def _workers_label(r: dict) -> str:
  if r['workers'] == 0:
    return '0 (one thread)' if r['read_threads'] == 0 else '0'
  return f"{r['workers']} (shared memory)" if r.get('handoff') == 'shared_memory' else str(
      r['workers'])


def speedups(results: list[dict]) -> dict[str, dict[str, float]]:
  """2 workers' faces/s over 0 workers', per degradation ('host', 'device'; through shared
  memory 'host/shared_memory', 'device/shared_memory'): against the pipeline with read threads
  and against the one-thread pipeline (one core)."""
  out = {}
  for mode in ('host', 'device'):
    rows = [r for r in results if r['degrade'] == mode]
    threaded = [r for r in rows if r['workers'] == 0 and r['read_threads'] > 0]
    single = [r for r in rows if r['workers'] == 0 and r['read_threads'] == 0]
    for handoff, key in (('pipe', mode), ('shared_memory', f'{mode}/shared_memory')):
      two = [r for r in rows if r['workers'] == 2 and r.get('handoff', 'pipe') == handoff]
      if two:
        ratios = {}
        if threaded:
          ratios['vs_0_workers'] = two[0]['faces_per_s'] / threaded[0]['faces_per_s']
        if single:
          ratios['vs_0_workers_one_thread'] = two[0]['faces_per_s'] / single[0]['faces_per_s']
        if ratios:
          out[key] = ratios
  return out


def measure_degradation_on_cpu(batch_size: int, batches: int, lr_sizes) -> dict:
  """Where `data.degrade_on_device` should degrade on a CPU backend: `degrade_batch` (host, one
  BLAS thread) against the step's `DeviceDegrader` jitted on XLA:CPU, same faces and sizes,
  in faces per CPU-second of this process (XLA's threads included)."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  hr = rng.integers(0, 256, (batch_size, 128, 128, 3), dtype=np.uint8)
  lr_index = degrade.LRSampler(lr_sizes, seed=0).for_batch(np.arange(batch_size))
  degrader = degrade.DeviceDegrader(lr_sizes, (128, 128))
  on_device = jax.jit(degrader)
  hr_device, index_device = jax.device_put(hr), jax.device_put(lr_index)

  def rate(fn) -> float:
    fn()  # compile / warm
    t0 = time.process_time()
    for _ in range(batches):
      fn()
    return batches * batch_size / (time.process_time() - t0)

  host = rate(lambda: degrade.degrade_batch(hr, lr_index, lr_sizes))
  device = rate(lambda: on_device(hr_device, index_device).block_until_ready())
  return {'backend': jax.default_backend(), 'host_faces_per_cpu_s': host,
          'device_faces_per_cpu_s': device, 'winner': 'host' if host > device else 'device'}


def _rate(x: float | None) -> str:
  return '-' if x is None else f'{x:.0f}'


def table(results: list[dict], in_process: dict | None, page_us: float | None = None,
          placement: dict | None = None) -> str:
  lines = ['| workers | degradation | faces/s | faces per CPU-s | cores busy | page faults a face '
           '| load avg 1/5/15 min |', '| --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    faults = r.get('page_faults_per_face')
    lines.append(f"| {_workers_label(r)} | {r['degrade']} | {r['faces_per_s']:.0f} | "
                 f"{_rate(r['faces_per_cpu_s'])} | {r['cpu_cores_busy']:.2f} | "
                 f"{'-' if faults is None else f'{faults:.1f}'} | "
                 f"{' / '.join(f'{x:.1f}' for x in r['load_avg'])} |")
  for mode, ratios in speedups(results).items():
    parts = []
    if 'vs_0_workers' in ratios:
      parts.append(f"{ratios['vs_0_workers']:.2f}x the faces/s of 0 workers")
    if 'vs_0_workers_one_thread' in ratios:
      parts.append(f"{ratios['vs_0_workers_one_thread']:.2f}x of 0 workers in one thread")
    mode, _, handoff = mode.partition('/')
    via = ' through shared memory' if handoff else ''
    lines.append(f"\n{mode} degradation: 2 workers{via} give {', '.join(parts)}")
  if in_process:
    lines.append(
        f"\nIn-process (one thread, no Grain): decode {in_process['decode_faces_per_cpu_s']:.0f}, "
        f"host degradation {in_process['degrade_faces_per_cpu_s']:.0f}, decode + LR sizes + "
        f"degradation {in_process['decode_and_degrade_faces_per_cpu_s']:.0f} faces per CPU-s "
        f"(load {' / '.join(f'{x:.1f}' for x in in_process['load_avg'])})")
  if page_us is not None:
    lines.append(f'\nA first-touched 4 KiB page costs {page_us:.2f} us of CPU here: '
                 f'{page_us * 2 * 12:.0f} us a face for the 2 x 48 KiB (hr, lr) of a batch in '
                 "fresh shared memory (data.worker_handoff='shared_memory')")
  if placement is not None:
    lines.append(f"\nDegradation on this {placement['backend'].upper()} backend: host "
                 f"{placement['host_faces_per_cpu_s']:.0f}, jitted DeviceDegrader "
                 f"{placement['device_faces_per_cpu_s']:.0f} faces per CPU-s: "
                 f"the {placement['winner']} path wins")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', default='0,1,2', help='comma-separated Grain worker counts')
  parser.add_argument('--degrade', default='host,device',
                      help="'host' (in the pipeline), 'device' (decode only), or both")
  parser.add_argument('--images', type=int, default=2000,
                      help="dataset size; Grain's shuffle costs ~80 us a record at 400, ~20 at 2000")
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=150, help='timed batches per configuration')
  parser.add_argument('--repeats', type=int, default=3,
                      help='runs per configuration; the table shows the median (faces/s)')
  parser.add_argument('--read_threads', type=int, default=2, help='data.read_threads (per host)')
  parser.add_argument('--handoffs', default='pipe,shared_memory',
                      help='data.worker_handoff values to run the worker rows with')
  parser.add_argument('--retain_freed_memory', choices=('true', 'false'), default='true',
                      help="data.retain_freed_memory; process-wide once set, so compare the two "
                           "in separate runs")
  parser.add_argument('--data', choices=('auto', 'lfw', 'generated'), default='auto')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  args = parser.parse_args()

  modes = [m.strip() for m in args.degrade.split(',') if m.strip()]
  if not set(modes) <= {'host', 'device'}:
    parser.error(f'--degrade takes host and/or device, got {args.degrade!r}')
  handoffs = [h.strip() for h in args.handoffs.split(',') if h.strip()]
  if not handoffs or not set(handoffs) <= {'pipe', 'shared_memory'}:
    parser.error(f'--handoffs takes pipe and/or shared_memory, got {args.handoffs!r}')
  workers = [int(w) for w in args.workers.split(',')]
  # (workers, read threads, hand-off): 0 workers also in one thread, the baseline of worker
  # scaling; workers with each hand-off.
  configurations = [(w, t, h) for w in workers
                    for t in ((0, args.read_threads) if w == 0 and args.read_threads else
                              (args.read_threads,))
                    for h in (handoffs if w else ('pipe',))]
  with tempfile.TemporaryDirectory() as tmp:
    use_lfw = args.data == 'lfw' or (args.data == 'auto' and LFW.is_dir())
    data = (write_lfw_faces if use_lfw else write_generated_faces)(Path(tmp), args.images)
    source = folders.IdentityFolders(tmp)
    results = []
    for w, threads, handoff in configurations:
      for mode in modes:
        r = measure_median(args.repeats, source, w, args.batch_size, args.batches,
                           mode == 'device', read_threads=threads,
                           retain_freed_memory=args.retain_freed_memory == 'true', handoff=handoff)
        results.append(r)
        print(f"workers={_workers_label(r):17s} degrade={r['degrade']:6s} "
              f"{r['faces_per_s']:6.0f} faces/s {_rate(r['faces_per_cpu_s']):>6} faces/CPU-s "
              f"({r['cpu_cores_busy']:.2f} cores busy, load {r['load_avg'][0]:.1f})", flush=True)
    in_process = None
    if 'host' in modes:
      in_process = measure_in_process(source, args.batch_size, max(4, args.batches // 2),
                                      base_config.PAPER_LR_SIZES)
  page_us = fresh_page_us()
  # Last: it starts XLA in this process, whose threads would share the cores with the rows above.
  placement = (measure_degradation_on_cpu(args.batch_size, max(4, args.batches // 5),
                                          base_config.PAPER_LR_SIZES) if 'host' in modes else None)
  print()
  print(f'{data}, batch {args.batch_size}, data.read_threads={args.read_threads}, '
        f'data.retain_freed_memory={args.retain_freed_memory}, {os.cpu_count()} CPUs, '
        f'median of {args.repeats}')
  print(table(results, in_process, page_us, placement))
  report = {'benchmark': 'input_pipeline', 'data': data, 'batch_size': args.batch_size,
            'image_size': 128, 'lr_sizes': 'paper (10 sizes, per example)',
            'read_threads': args.read_threads, 'repeats': args.repeats, 'handoffs': handoffs,
            'retain_freed_memory': args.retain_freed_memory == 'true',
            'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                        'processor': platform.processor() or platform.machine()},
            'results': results, 'speedups': speedups(results), 'in_process': in_process,
            'fresh_page_us': page_us, 'degradation_placement': placement}
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure()  # one XLA CPU device per core unless the user chose
  main()
