"""Input pipeline throughput: decoded + degraded 128x128 faces per second, and per CPU-second.

Runs the real training pipeline (`make_train_iterator`: JPEG decode, shuffle, batching, multi-scale
degradation) over a folder of 128x128 JPEG faces, the format of aligned training data: LFW's
central crops when `../shared/data/lfw` exists beside the checkout, else generated faces. For each
Grain worker count and each place of degradation (host: in the pipeline; device: decode only, the
step degrades), then the same decode + host degradation in this thread without Grain:

    python benchmarks/input_pipeline.py --out=/tmp/input_pipeline.json

"Per CPU-second" divides faces by the CPU seconds of this process and its Grain workers (psutil,
user + system) while timed, so it barely depends on what else runs; faces/s does, so every row
records the load average. The table goes to stdout (markdown), everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
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


def _cpu_seconds(proc: psutil.Process) -> float:
  total = 0.0
  for p in [proc] + proc.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def measure(source, workers: int, batch_size: int, batches: int, on_device: bool,
            read_threads: int = 2, warmup: int | None = None) -> dict:
  """One pipeline configuration: faces/s and faces per CPU-second of this process + workers."""
  config = base_config.get_config()
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
  for _ in range(warmup):
    next(it)
  startup_s = time.perf_counter() - t_start
  proc = psutil.Process()
  cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - t0
  cpu = _cpu_seconds(proc) - cpu0
  # Thread counts show what runs where (a worker that started XLA would hold dozens).
  threads = {'main': proc.num_threads(),
             'children': [p.num_threads() for p in proc.children(recursive=True)]}
  it.close()
  assert batch['hr'].shape == (batch_size, 128, 128, 3) and ('lr' in batch) == (not on_device)
  faces = batches * batch_size
  return {'workers': workers, 'degrade': 'device' if on_device else 'host',
          'faces_per_s': faces / seconds, 'faces_per_cpu_s': faces / max(cpu, 1e-9),
          'cpu_cores_busy': cpu / seconds, 'seconds': seconds, 'faces': faces,
          'startup_s': startup_s, 'read_threads_per_process': max(1, read_threads // max(1, workers)),
          'threads': threads, 'load_avg': load}


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


def table(results: list[dict], in_process: dict | None) -> str:
  lines = ['| workers | degradation | faces/s | faces per CPU-s | cores busy | load avg 1/5/15 min |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in results:
    lines.append(f"| {r['workers']} | {r['degrade']} | {r['faces_per_s']:.0f} | "
                 f"{r['faces_per_cpu_s']:.0f} | {r['cpu_cores_busy']:.2f} | "
                 f"{' / '.join(f'{x:.1f}' for x in r['load_avg'])} |")
  rows = {(r['workers'], r['degrade']): r for r in results}
  for mode in ('host', 'device'):
    if (0, mode) in rows and (2, mode) in rows:
      ratio = rows[(2, mode)]['faces_per_s'] / rows[(0, mode)]['faces_per_s']
      lines.append(f'\n{mode} degradation: 2 workers give {ratio:.2f}x the faces/s of 0 workers')
  if in_process:
    lines.append(
        f"\nIn-process (one thread, no Grain): decode {in_process['decode_faces_per_cpu_s']:.0f}, "
        f"host degradation {in_process['degrade_faces_per_cpu_s']:.0f}, decode + LR sizes + "
        f"degradation {in_process['decode_and_degrade_faces_per_cpu_s']:.0f} faces per CPU-s "
        f"(load {' / '.join(f'{x:.1f}' for x in in_process['load_avg'])})")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', default='0,1,2', help='comma-separated Grain worker counts')
  parser.add_argument('--degrade', default='host,device',
                      help="'host' (in the pipeline), 'device' (decode only), or both")
  parser.add_argument('--images', type=int, default=2000,
                      help="dataset size; Grain's shuffle costs ~80 us a record at 400, ~20 at 2000")
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=40, help='timed batches per configuration')
  parser.add_argument('--read_threads', type=int, default=2, help='data.read_threads (per host)')
  parser.add_argument('--data', choices=('auto', 'lfw', 'generated'), default='auto')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  args = parser.parse_args()

  modes = [m.strip() for m in args.degrade.split(',') if m.strip()]
  if not set(modes) <= {'host', 'device'}:
    parser.error(f'--degrade takes host and/or device, got {args.degrade!r}')
  with tempfile.TemporaryDirectory() as tmp:
    use_lfw = args.data == 'lfw' or (args.data == 'auto' and LFW.is_dir())
    data = (write_lfw_faces if use_lfw else write_generated_faces)(Path(tmp), args.images)
    source = folders.IdentityFolders(tmp)
    results = []
    for workers in (int(w) for w in args.workers.split(',')):
      for mode in modes:
        r = measure(source, workers, args.batch_size, args.batches, mode == 'device',
                    read_threads=args.read_threads)
        results.append(r)
        print(f"workers={r['workers']} degrade={r['degrade']:6s} {r['faces_per_s']:6.0f} faces/s "
              f"{r['faces_per_cpu_s']:6.0f} faces/CPU-s ({r['cpu_cores_busy']:.2f} cores busy, "
              f"load {r['load_avg'][0]:.1f})", flush=True)
    in_process = None
    if 'host' in modes:
      in_process = measure_in_process(source, args.batch_size, max(4, args.batches // 2),
                                      base_config.PAPER_LR_SIZES)
  print()
  print(f'{data}, batch {args.batch_size}, data.read_threads={args.read_threads}, '
        f'{os.cpu_count()} CPUs')
  print(table(results, in_process))
  report = {'benchmark': 'input_pipeline', 'data': data, 'batch_size': args.batch_size,
            'image_size': 128, 'lr_sizes': 'paper (10 sizes, per example)',
            'read_threads': args.read_threads,
            'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                        'processor': platform.processor() or platform.machine()},
            'results': results, 'in_process': in_process}
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
