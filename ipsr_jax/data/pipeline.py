"""The Grain input pipeline: decoded HR faces and their multi-scale degraded inputs, per host.

    it = make_train_iterator(config)        # grain DatasetIterator
    batch = next(it)                        # {'hr', 'lr', 'lr_index', 'label'} numpy arrays
    state = it.get_state()                  # JSON-able dict; it.set_state(state) resumes exactly

Built on Grain's dataset API because its iterator state survives multiprocess workers and its
per-element index is available to every map: the global sample index is the key of all
randomness (flip, crop, grey, LR size), so what an example becomes never depends on the worker count,
the read threads or on what came before. Order of steps:

  record indices -> shuffle(seed; reshuffled each epoch) -> repeat forever -> decode (an
  unreadable image is logged, counted and replaced by the next readable record), resize to
  data.image_size, flip / pad-crop / grey (keyed on the global index) -> blocks of B/n examples
  -> process p of n takes blocks p, p+n, ... -> [Grain read threads] -> LR size per example or
  per global batch, bicubic down-then-up of the whole block (skipped when degrading on device),
  or each example through the camera model of data.degradation (`camera`, keyed on its global
  sample index; host only) -> [worker processes]

Worker processes each take whole blocks (decode, stack, degrade: one batch is one element, so
the hand-off is one batch's arrays, not pickled records) and split data.read_threads between
them: threads beyond one per core only contend for the GIL. `data.worker_handoff` says how a
batch crosses: 'pipe' pickles it through Grain's queue (two copies); 'shared_memory' is Grain's
default, a new segment per array per batch, whose pages are allocated and faulted in afresh every
batch. On the VMs measured the copies are cheaper (benchmarks/NOTES.md). A worker whose share
of the read threads is 0 reads in its own main thread; with no workers, read_threads=0 runs the
whole pipeline in the consuming thread (one core: the baseline worker scaling is measured from).
`data.retain_freed_memory` keeps glibc from handing the batch buffers back to the kernel after
every batch, in this process and in the workers (`host_memory`: a quarter of the host path's CPU
went to faulting them in again).
`data.degrade_on_device` None or 'auto' means on for a GPU/TPU backend and off on CPU, where the
host path costs a quarter of the CPU time (benchmarks/NOTES.md, "Input pipeline").

Process p's k-th batch is rows p*B/n..(p+1)*B/n of the k-th global batch of a one-process run,
so the assembled global batch, row for row, does not depend on how many hosts read it.

The iterator implements Grain's checkpoint protocol (`get_state`/`set_state`, and the
`save`/`load` that `grain.checkpoint.CheckpointSave` / `CheckpointRestore` call), so it goes into
an Orbax Composite next to the train state. A restore needs the same source (its `repr` is
compared), seed, batch size and worker count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
from absl import flags
import ml_collections
import numpy as np

from ipsr_jax.data import camera as camera_lib
from ipsr_jax.data import degrade as degrade_lib
from ipsr_jax.data import host_memory
from ipsr_jax.data import image_io
from ipsr_jax.data.sources import FaceSource, make_source

# Distinct streams of default_rng([seed, index, stream]) per random decision.
_FLIP_STREAM, _CROP_STREAM, _GREY_STREAM = 1, 2, 3
# data.worker_handoff='pipe': no array is this large, so none goes through shared memory.
_NEVER_SHARED_MEMORY = 1 << 62


def _ensure_flags_parsed() -> None:
  # Grain reads its absl flags when it starts workers; under pytest or a notebook nobody parsed
  # them (app.run does), and reading an unparsed flag raises.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def local_batch_size(global_batch_size: int, shard_count: int) -> int:
  if global_batch_size % shard_count:
    raise ValueError(f'train.batch_size={global_batch_size} does not divide over {shard_count} '
                     'processes')
  return global_batch_size // shard_count


@dataclasses.dataclass(frozen=True)
class PrepareExample:
  """Record index at global position `index` -> {'hr', 'label', 'sample_index'}.

  An unreadable image (the source logs and counts it, and raises past data.max_bad_fraction) is
  replaced by the next readable record, so batches keep their size and composition everywhere.
  """
  source: FaceSource
  image_size: int
  seed: int
  random_flip: bool = False
  crop_padding: int = 0
  grey_probability: float = 0.0

  def load(self, record_index: int) -> dict[str, Any]:
    n = len(self.source)
    for k in range(n):
      element = self.source[(int(record_index) + k) % n]
      if element is not None:
        return element
    raise ValueError(f'{self.source!r}: no readable image')

  def __call__(self, index: int, record_index: int) -> dict[str, Any]:
    element = self.load(record_index)
    hr = np.asarray(element['image'], np.uint8)
    if hr.shape[:2] != (self.image_size, self.image_size):
      hr = image_io.resize_to(hr, self.image_size)
    if self.random_flip and np.random.default_rng([self.seed, index, _FLIP_STREAM]).integers(2):
      hr = hr[:, ::-1]
    if self.crop_padding > 0:
      p = self.crop_padding
      top, left = np.random.default_rng([self.seed, index, _CROP_STREAM]).integers(0, 2 * p + 1, 2)
      padded = np.pad(hr, ((p, p), (p, p), (0, 0)), mode='reflect')
      hr = padded[top:top + self.image_size, left:left + self.image_size]
    if self.grey_probability > 0 and (
        np.random.default_rng([self.seed, index, _GREY_STREAM]).random() < self.grey_probability):
      hr = image_io.to_grey(hr)  # the HR face itself, so its LR input and its target are grey alike
    return {'hr': np.ascontiguousarray(hr), 'label': np.int32(element['label']),
            'sample_index': np.int64(index)}


@dataclasses.dataclass(frozen=True)
class DegradeBatch:
  """Adds `lr_index` (and `lr`, unless the step degrades on device) to a batch of HR faces.

  `camera` (data.degradation other than 'bicubic'): each example goes through the camera model
  keyed on its global sample index instead of the bicubic down-up.
  """
  sampler: degrade_lib.LRSampler
  global_batch_size: int
  round_lr: bool = True
  on_device: bool = False
  camera: camera_lib.CameraModel | None = None

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = batch['sample_index']
    if self.sampler.per == 'batch':  # one size per global batch, whichever process holds the rows
      keys = np.full_like(keys, keys[0] // self.global_batch_size)
    lr_index = self.sampler.for_batch(keys)
    out = {'hr': batch['hr'], 'lr_index': lr_index, 'label': batch['label'].astype(np.int32)}
    if self.on_device and self.camera is not None:
      raise ValueError('a camera degradation runs on host only')
    if self.camera is not None:
      with degrade_lib.one_blas_thread():
        out['lr'] = self.camera.degrade_batch(batch['hr'], lr_index, self.sampler.lr_sizes,
                                              batch['sample_index'])
    elif not self.on_device:
      out['lr'] = degrade_lib.degrade_batch(batch['hr'], lr_index, self.sampler.lr_sizes,
                                            round_lr=self.round_lr)
    return out


def make_train_dataset(config: ml_collections.ConfigDict, source: FaceSource | None = None, *,
                       seed: int | None = None,
                       shard_options: grain.sharding.ShardOptions | None = None
                       ) -> grain.IterDataset:
  """The infinite, sharded, batched training dataset of this process (see the module doc)."""
  data = config.data
  source = make_source(data, 'train') if source is None else source
  seed = int(config.seed if seed is None else seed) % 2**32
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  batch_size = local_batch_size(config.train.batch_size, shard_options.shard_count)
  if len(source) == 0:
    raise ValueError(f'{source!r} is empty')

  ds = grain.MapDataset.range(len(source))
  if data.shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  ds = ds.map_with_index(PrepareExample(
      source, image_size=int(data.image_size), seed=seed, random_flip=bool(data.random_flip),
      crop_padding=int(data.random_crop_padding), grey_probability=float(data.get('random_grey', 0.0))))
  # Blocks of the one global stream, dealt round-robin: disjoint shards, each 1/n of every epoch,
  # and together, block by block, the global batches of a one-process run.
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds[shard_options.shard_index::shard_options.shard_count]
  # read_threads is per host: with workers, each takes its share (each worker is a process of
  # its own, so more threads there only fight over its GIL); 0 reads in the calling thread.
  threads = int(data.read_threads) // max(1, int(data.num_workers))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  sampler = degrade_lib.LRSampler(data.lr_sizes, per=data.lr_per, seed=seed)
  # Resolved here, in the main process: workers never touch a JAX backend.
  degradation = data.get('degradation', 'bicubic')
  on_device = degrade_lib.resolve_on_device(data.degrade_on_device, degradation=degradation)
  ds = ds.map(DegradeBatch(sampler, global_batch_size=int(config.train.batch_size),
                           round_lr=bool(data.round_lr), on_device=on_device,
                           camera=camera_lib.CameraModel.from_config(degradation, seed=seed)))
  retain = bool(data.retain_freed_memory)
  if retain:
    host_memory.retain_freed_memory()
  if data.num_workers > 0:
    _ensure_flags_parsed()
    if data.worker_handoff == 'pipe':  # Grain pickles arrays below min_shm_size through its queue
      ds = grain.experimental.WithOptionsIterDataset(
          ds, grain.experimental.DatasetOptions(min_shm_size=_NEVER_SHARED_MEMORY))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data.num_workers), per_worker_buffer_size=int(data.worker_buffer_size)),
                        worker_init_fn=host_memory.init_worker if retain else None)
  return ds


class TrainIterator(grain.DatasetIterator):
  """The pipeline's iterator; its state also names the stream it belongs to.

  Grain's dataset-API state is only positions: restored into a pipeline over another source,
  seed, shard or batch size it would resume silently at a meaningless place. The state carries a
  fingerprint of those and `set_state` refuses a mismatch. Augmentation and degradation settings
  are not part of it (changing them on resume is legitimate and does not move positions).
  """

  def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, Any]):
    super().__init__(parent)
    self.fingerprint = fingerprint

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {'pipeline': dict(self.fingerprint), 'iterator': self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get('pipeline', {})
    diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
    if diff:
      raise ValueError('Cannot restore the input pipeline: the checkpoint was written for '
                       f'another stream; (saved, now) = {diff}')
    self._parent.set_state(state['iterator'])


def _fingerprint(config: ml_collections.ConfigDict, source: FaceSource, seed: int,
                 shard_options: grain.sharding.ShardOptions) -> dict[str, Any]:
  return {'source': repr(source), 'seed': seed, 'shuffle': bool(config.data.shuffle),
          'shard_index': int(shard_options.shard_index),
          'shard_count': int(shard_options.shard_count),
          'batch_size': int(config.train.batch_size),
          'num_workers': int(config.data.num_workers)}


def make_train_iterator(config: ml_collections.ConfigDict, source: FaceSource | None = None, *,
                        seed: int | None = None,
                        shard_options: grain.sharding.ShardOptions | None = None
                        ) -> TrainIterator:
  """Iterator of this process's training batches (B = train.batch_size / process count).

  Batches: hr uint8 [B, S, S, 3], lr uint8 [B, S, S, 3] (absent when degrading on device),
  lr_index int32 [B] into data.lr_sizes, label int32 [B]; S = data.image_size. `seed` defaults
  to config.seed; `shard_options` to ShardByJaxProcess. `get_state()` is a JSON-able dict.
  """
  source = make_source(config.data, 'train') if source is None else source
  seed = int(config.seed if seed is None else seed) % 2**32
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  ds = make_train_dataset(config, source, seed=seed, shard_options=shard_options)
  return TrainIterator(iter(ds), _fingerprint(config, source, seed, shard_options))


def make_eval_batches(source: FaceSource, indices: Sequence[int] | None = None,
                      batch_size: int = 64, image_size: int | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
  """Sequential, unshuffled batches of `source[indices]`: {'image', 'label', 'index'}.

  Unreadable images are left out (their index is absent from 'index'); the last batch may be
  short. `image_size` resizes (bicubic) every image to a square of that size, which batching
  needs when the source's images differ in size.
  """
  indices = range(len(source)) if indices is None else indices
  images, labels, kept = [], [], []

  def flush():
    batch = {'image': np.stack(images), 'label': np.asarray(labels, np.int32),
             'index': np.asarray(kept, np.int64)}
    images.clear(), labels.clear(), kept.clear()
    return batch

  for i in indices:
    element = source[int(i)]
    if element is None:
      continue
    image = element['image']
    if image_size is not None:
      image = image_io.resize_to(image, image_size)
    images.append(image)
    labels.append(element['label'])
    kept.append(int(i))
    if len(images) == batch_size:
      yield flush()
  if images:
    yield flush()
