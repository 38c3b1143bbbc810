"""Batch super-resolution and low-resolution probe embedding for pipelines.

    from ipsr_jax import api
    sr = api.SuperResolver.from_checkpoint('runs/ipsr')      # newest checkpoint of a run
    faces = sr(lr_images)          # uint8 or float [N, H, W, 3] 0..255, any H, W -> [N, S, S, 3]
    for faces in sr.stream(batches):   # iterable of batches larger than memory
      ...
    probe = api.Pipeline(sr, api.Embedder.from_checkpoint('/ckpt/facenet'), mode='concat')
    vecs = probe(lr_images)        # LR probes -> bicubic -> SR -> embeddings

S is the run's `config.model.image_size` (128 in the paper). Inputs are bicubic-resized to S on
device with the PIL-exact weights: uint8 inputs are rounded between the two passes, exactly as the
training pipeline and the evaluation protocols make their uint8 bicubic faces; float inputs are
resized unrounded. uint8 in -> uint8 out (rounded); float in -> float32 0..255 out (unrounded).

Calls are jitted, sharded over the local devices and padded to a few fixed batch sizes
(`ipsr_jax.ops.batching.PaddedBatcher`): a new N never recompiles, each (H, W, dtype, bucket) once.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from ipsr_jax import losses
from ipsr_jax.checkpointing import Checkpointer
from ipsr_jax.models import unet as unet_lib
from ipsr_jax.models.inception_resnet_v1 import embed_images
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.ops.batching import PaddedBatcher

DEFAULT_BUCKETS = (8, 64, 256)
PIPELINE_MODES = ('sr', 'bicubic', 'concat')
CONFIG_FILE = 'config.json'


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a training run saved as `<workdir>/config.json` (local or gs://)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: is {workdir} the --workdir of a training run?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def bicubic_pixels(images: jax.Array, image_size: int) -> jax.Array:
  """uint8 or float [N, H, W, 3] 0..255 -> float32 [N, S, S, 3], bicubic (traceable).

  uint8 input is rounded after each pass, so the result equals PIL's uint8 resize: the generator
  sees the same 8-bit bicubic faces it was trained on.
  """
  is_uint8 = images.dtype == jnp.uint8
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (image_size, image_size):
    x = resize_lib.resize(x, (image_size, image_size), round_between=is_uint8)
  return x


def sr_pixels(generator: unet_lib.UNet, variables: Mapping[str, Any], images: jax.Array,
              image_size: int) -> jax.Array:
  """LR faces (uint8 or float 0..255, any size) -> float32 SR faces [N, S, S, 3] in 0..255.

  The generator runs in inference mode (BatchNorm running statistics, no dropout), which is
  `ipsr_jax.train.sr_apply`; that module is not imported here because it pulls in the training
  stack (clu, TensorFlow summaries).
  """
  lr = losses.from_pixels(bicubic_pixels(images, image_size))
  return losses.to_pixels(generator.apply(variables, lr, train=False).astype(jnp.float32))


def round_to_uint8(pixels: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(pixels), 0.0, 255.0).astype(jnp.uint8)


def unit_concat(a: jax.Array, b: jax.Array) -> jax.Array:
  """[unit(a), unit(b)] / sqrt(2): the paper's SCface 'concat' embedding, itself unit norm."""
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return unit(jnp.concatenate([unit(a), unit(b)], axis=-1))


def _as_batch(images: Any) -> tuple[np.ndarray, bool]:
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected [N, H, W, 3] RGB images, got shape {images.shape}')
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'images must be uint8 or float in 0..255, got dtype {images.dtype}')
  if images.dtype != np.uint8 and images.dtype != np.float32:
    images = images.astype(np.float32)
  return images, single


def prefetch(iterable: Iterable[Any], depth: int = 2) -> Iterator[Any]:
  """Iterates `iterable` in a background thread, `depth` items ahead (reads overlap compute)."""
  if depth <= 0:
    yield from iterable
    return
  items: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():  # time out now and then: a consumer that stopped never reads again
      try:
        items.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterable:
        if not put((item, None)):
          return
      put((done, None))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      put((done, e))

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item, error = items.get()
      if item is done:
        if error is not None:
          raise error
        return
      yield item
  finally:
    stop.set()


class _Counted:
  """Wraps a traced function and counts its traces: one per compiled program."""

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn
    self.traces = 0

  def __call__(self, *args):
    self.traces += 1
    return self.fn(*args)


class SuperResolver:
  """LR faces of any size -> SxS SR faces with a trained UNet generator in inference mode."""

  def __init__(self, generator: unet_lib.UNet, variables: Mapping[str, Any], *, image_size: int,
               buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: Mesh | None = None,
               info: Mapping[str, Any] | None = None):
    if image_size % (2**generator.num_downs):
      raise ValueError(f'image_size={image_size} must be divisible by 2**{generator.num_downs}')
    self.generator = generator
    self.image_size = int(image_size)
    self.mesh = mesh
    self.info = dict(info or {})

    def apply(images, variables):
      pixels = sr_pixels(generator, variables, images, self.image_size)
      return round_to_uint8(pixels) if images.dtype == jnp.uint8 else pixels

    self.apply_fn = apply  # traceable (images, variables) -> SR: what calls run and export saves
    self._apply = _Counted(apply)
    self._batcher = PaddedBatcher(self._apply, buckets=buckets, mesh=mesh)
    self.buckets = self._batcher.buckets
    # Put the weights on device once; every call reuses them.
    self.variables = self._batcher.replicate(
        {c: variables[c] for c in ('params', 'batch_stats') if c in variables})

  @classmethod
  def from_checkpoint(cls, workdir: str | os.PathLike, step: int | None = None, *,
                      dtype: Any = jnp.float32, **kwargs: Any) -> 'SuperResolver':
    """The generator of a training run: `<workdir>/config.json` + its Orbax checkpoint `step`
    (default: the newest). `dtype=jnp.bfloat16` computes in bfloat16 (weights stay float32)."""
    workdir = os.fspath(workdir)
    config = load_run_config(workdir)
    generator = unet_lib.from_config(config.model, dtype=dtype)
    step, variables = Checkpointer(workdir, read_only=True).restore_model(step=step)
    info = dict(workdir=workdir, step=int(step), model=config.model.to_dict())
    return cls(generator, variables, image_size=config.model.image_size, info=info, **kwargs)

  @property
  def compiled_sizes(self) -> set[int]:
    """Batch sizes compiled so far (each a bucket)."""
    return set(self._batcher.compiled_sizes)

  @property
  def num_compilations(self) -> int:
    """Programs compiled so far: one per (bucket, H, W, dtype) seen."""
    return self._apply.traces

  def __call__(self, lr_images: Any) -> np.ndarray:
    """uint8 or float [N, H, W, 3] (or one [H, W, 3]) in 0..255 -> [N, S, S, 3], same convention."""
    images, single = _as_batch(lr_images)
    out = self._batcher(images, self.variables)
    return out[0] if single else out

  def stream(self, batches: Iterable[Any], prefetch_batches: int = 2) -> Iterator[np.ndarray]:
    """SR of each batch of an iterable (e.g. a generator reading files), in order.

    Inputs are pulled `prefetch_batches` ahead in a thread, so reading overlaps the device; only
    a few batches are ever in memory.
    """
    for batch in prefetch(batches, prefetch_batches):
      yield self(batch)


class Pipeline:
  """Low-resolution probes -> (bicubic, SR) -> identity embeddings, in one jitted program.

  mode 'sr':      E(SR(x))                      the paper's AR and LFW setting
  mode 'bicubic': E(bicubic(x))                 the baseline
  mode 'concat':  [E(bicubic(x)), E(SR(x))]/sqrt(2)   the paper's SCface setting (2x wider)

  The embedder sees the unrounded float SR face (the model's output, as in the training loss).
  `embedder` is an `api.Embedder` (anything with `module`, `variables`, `input_size`).
  """

  def __init__(self, sr: SuperResolver, embedder: Any, mode: str = 'sr', *,
               buckets: Sequence[int] | None = None, mesh: Mesh | None = None):
    if mode not in PIPELINE_MODES:
      raise ValueError(f'mode must be one of {PIPELINE_MODES}, got {mode!r}')
    self.sr, self.embedder, self.mode = sr, embedder, mode
    self.image_size = sr.image_size
    self._apply = _Counted(self.embed_fn())
    self._batcher = PaddedBatcher(self._apply, buckets=buckets or sr.buckets,
                                  mesh=mesh if mesh is not None else sr.mesh)
    self.buckets = self._batcher.buckets
    self.variables = self._batcher.replicate(
        {'generator': sr.variables,
         'embedder': {c: embedder.variables[c] for c in ('params', 'batch_stats')
                      if c in embedder.variables}})

  def outputs_fn(self) -> Callable[[jax.Array, Mapping[str, Any]], dict[str, jax.Array]]:
    """The traceable `(images, {'generator', 'embedder'} variables) -> {'sr', 'embedding'}`:
    'sr' is the float32 SR face in 0..255 (unused outputs are pruned by XLA under jit)."""
    generator, module = self.sr.generator, self.embedder.module
    size, input_size, mode = self.image_size, int(self.embedder.input_size), self.mode

    def fn(images, variables):
      embed = lambda pixels: embed_images(module, variables['embedder'], pixels, input_size)
      sr = sr_pixels(generator, variables['generator'], images, size)
      if mode == 'sr':
        embedding = embed(sr)
      else:
        embedding = embed(bicubic_pixels(images, size))
        if mode == 'concat':
          embedding = unit_concat(embedding, embed(sr))
      return {'sr': sr, 'embedding': embedding.astype(jnp.float32)}

    return fn

  def embed_fn(self) -> Callable[[jax.Array, Mapping[str, Any]], jax.Array]:
    """The traceable `(images, variables) -> embeddings` that `__call__` runs."""
    outputs = self.outputs_fn()
    return lambda images, variables: outputs(images, variables)['embedding']

  @property
  def embedding_size(self) -> int:
    size = int(self.embedder.module.embedding_size)
    return 2 * size if self.mode == 'concat' else size

  @property
  def compiled_sizes(self) -> set[int]:
    return set(self._batcher.compiled_sizes)

  @property
  def num_compilations(self) -> int:
    return self._apply.traces

  def __call__(self, lr_images: Any) -> np.ndarray:
    """uint8 or float [N, H, W, 3] (or one [H, W, 3]) 0..255 -> float32 [N, embedding_size]."""
    images, single = _as_batch(lr_images)
    out = np.asarray(self._batcher(images, self.variables), np.float32)
    return out[0] if single else out

  def stream(self, batches: Iterable[Any], prefetch_batches: int = 2) -> Iterator[np.ndarray]:
    for batch in prefetch(batches, prefetch_batches):
      yield self(batch)


def load_embedder(weights: str | os.PathLike, **kwargs: Any) -> Any:
  """An `api.Embedder` from an embedder directory (convert_facenet / pretraining output) or a
  facenet-pytorch `.pt` file."""
  from ipsr_jax import api  # pylint: disable=g-import-not-at-top  (api re-exports this module)
  weights = os.fspath(weights)
  if weights.endswith(('.pt', '.pth')) and not epath.Path(weights).is_dir():
    return api.Embedder.from_facenet_pytorch(weights, **kwargs)
  return api.Embedder.from_checkpoint(weights, **kwargs)
