"""Input pipeline throughput: decoded + degraded 128x128 faces per second, and per CPU core.

Runs the real training pipeline (`make_train_iterator`: JPEG decode, shuffle, multi-scale
degradation, batching) over a folder of 128x128 JPEG faces, the format of aligned training data:
LFW's central crops when `../shared/data/lfw` exists beside the checkout, else generated faces.

    python benchmarks/input_pipeline.py --workers=0,2 --out=/tmp/input_pipeline.json

"Per core" divides faces by the CPU seconds the main process and its Grain workers spent while
timed (psutil), so it does not depend on how busy the machine's other cores are.
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


def measure(source, workers: int, batch_size: int, batches: int, warmup: int,
            on_device: bool) -> dict:
  config = base_config.get_config()
  config.train.batch_size = batch_size
  config.data.num_workers = workers
  config.data.degrade_on_device = on_device
  config.data.read_threads = 2
  it = pipeline.make_train_iterator(config, source)
  for _ in range(warmup):
    next(it)
  proc = psutil.Process()
  cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - t0
  cpu = _cpu_seconds(proc) - cpu0
  it.close()
  assert batch['hr'].shape == (batch_size, 128, 128, 3)
  faces = batches * batch_size
  return {'workers': workers, 'degrade': 'device' if on_device else 'host',
          'faces_per_s': faces / seconds, 'faces_per_cpu_s': faces / max(cpu, 1e-9),
          'cpu_cores_busy': cpu / seconds, 'seconds': seconds, 'faces': faces}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', default='0,2', help='comma-separated Grain worker counts')
  parser.add_argument('--images', type=int, default=1000)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--warmup', type=int, default=4)
  parser.add_argument('--data', choices=('auto', 'lfw', 'generated'), default='auto')
  parser.add_argument('--decode_only', action='store_true',
                      help='also time data.degrade_on_device=True (no host degradation)')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    use_lfw = args.data == 'lfw' or (args.data == 'auto' and LFW.is_dir())
    data = (write_lfw_faces if use_lfw else write_generated_faces)(Path(tmp), args.images)
    source = folders.IdentityFolders(tmp)
    results = []
    for workers in (int(w) for w in args.workers.split(',')):
      for on_device in (False, True) if args.decode_only else (False,):
        r = measure(source, workers, args.batch_size, args.batches, args.warmup, on_device)
        results.append(r)
        print(f"workers={r['workers']} degrade={r['degrade']:6s} {r['faces_per_s']:8.0f} faces/s  "
              f"{r['faces_per_cpu_s']:7.0f} faces/CPU-s  ({r['cpu_cores_busy']:.2f} cores busy)",
              flush=True)
  report = {'benchmark': 'input_pipeline', 'data': data, 'batch_size': args.batch_size,
            'image_size': 128, 'lr_sizes': 'paper (10 sizes, per example)',
            'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                        'processor': platform.processor() or platform.machine()},
            'results': results}
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
