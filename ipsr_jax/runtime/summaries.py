"""Metric writers and periodic actions from clu, with and without TensorFlow.

clu's package `__init__` imports its TensorBoard SummaryWriter, which needs TensorFlow (absent on
the GPU machines). Without TF we load clu's TF-free writers (logging, multi, async) and its periodic
actions under a light package instead, so the same code runs and writes logs plus `metrics.jsonl`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import types
from typing import Any, Mapping

import jax
import numpy as np

from ipsr_jax.runtime import outputs


def _load_clu():
  try:
    from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
    return metric_writers, periodic_actions, True
  except ImportError as e:
    logging.warning('clu TensorBoard writer unavailable (%s): writing logs and metrics.jsonl only.', e)
  for name in [n for n in sys.modules if n.startswith('clu.metric_writers')]:
    del sys.modules[name]
  root = os.path.join(list(importlib.util.find_spec('clu').submodule_search_locations)[0], 'metric_writers')
  package = types.ModuleType('clu.metric_writers')
  package.__path__ = [root]
  sys.modules['clu.metric_writers'] = package
  for name in ('interface', 'logging_writer', 'multi_writer', 'async_writer'):
    setattr(package, name, importlib.import_module(f'clu.metric_writers.{name}'))
  package.MetricWriter = package.interface.MetricWriter
  package.LoggingWriter = package.logging_writer.LoggingWriter
  package.MultiWriter = package.multi_writer.MultiWriter
  package.AsyncMultiWriter = package.async_writer.AsyncMultiWriter
  import clu  # pylint: disable=g-import-not-at-top
  clu.metric_writers = package
  periodic_actions = importlib.import_module('clu.periodic_actions')
  return package, periodic_actions, False


metric_writers, periodic_actions, HAS_TENSORBOARD = _load_clu()


METRICS_FILE = 'metrics.jsonl'


def drop_rows_after(path: str, step: int) -> int:
  """Removes the rows of steps after `step` from a metrics.jsonl (and a torn last line); returns
  how many went. A run resumed from checkpoint `step` replays the later steps and logs them again,
  so without this a step would have two records. The file is replaced atomically."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        late = line.endswith('\n') and json.loads(line).get('step', 0) > step
      except (ValueError, AttributeError):  # a line not written by this writer: kept as it is
        late = False
      if late or not line.endswith('\n'):
        dropped += 1
      else:
        kept.append(line)
  if dropped:
    with outputs.atomic_path(path) as partial, open(partial, 'w', encoding='utf-8') as f:
      f.writelines(kept)
  return dropped


class JsonlWriter(metric_writers.MetricWriter):
  """Appends every scalar to `<workdir>/metrics.jsonl`: one JSON object per line with its step.

  `resume_step`: the run resumes from that checkpoint, so rows of later steps are dropped first.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    if resume_step is not None:
      drop_rows_after(path, resume_step)
    self._file = open(path, 'a', encoding='utf-8')

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    if not self._file.closed:
      self.flush()
      self._file.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `metrics.jsonl`; for a step logged twice (a resumed run), the last row wins."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows: dict[tuple, dict] = {}
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.endswith('\n'):
        break  # a line still being written
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError as e:
          raise ValueError(f'{path}, line {number}, is not valid JSON ({e})') from None
        rows[(row['step'], tuple(sorted(row)))] = row
  return sorted(rows.values(), key=lambda r: r['step'])


def create_writer(workdir: str, subdir: str = '', resume_step: int | None = None) -> metric_writers.MetricWriter:
  """TensorBoard (with TF) + logging + metrics.jsonl on process 0; nothing on other processes.
  `resume_step`: the step the run resumes from (metrics.jsonl keeps one record per step)."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  logdir = os.path.join(workdir, subdir) if subdir else workdir
  writers = [metric_writers.LoggingWriter(), JsonlWriter(os.path.join(logdir, METRICS_FILE), resume_step)]
  if HAS_TENSORBOARD:
    writers.insert(0, metric_writers.SummaryWriter(os.path.join(logdir, 'tensorboard')))
  return metric_writers.MultiWriter(writers)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Tile [R][N, H, W, 3] uint8 images into one [R*(H+pad), N*(W+pad), 3] picture (row = method)."""
  r, (n, h, w, c) = len(rows), rows[0].shape
  grid = np.full((r * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for i, row in enumerate(rows):
    for j in range(n):
      grid[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = row[j]
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
