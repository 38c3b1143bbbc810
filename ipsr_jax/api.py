"""The public inference API.

    from ipsr_jax import api
    emb = api.Embedder.from_facenet_pytorch('20180402-114759-vggface2.pt')  # or a state dict
    emb = api.Embedder.from_checkpoint('/ckpt/facenet_vggface2')           # convert_facenet output
    vecs = emb(images)   # uint8 or float [N, H, W, 3] in 0..255 -> float32 [N, 512], unit norm

Any N and any H, W work: images are resized on device to the embedder's input size, and batches
are padded to a few fixed sizes (`ipsr_jax.ops.batching.PaddedBatcher`), so a new N never
recompiles; each (H, W, bucket) compiles once.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from jax.sharding import Mesh
import numpy as np

from ipsr_jax.models import convert, embedder_store
from ipsr_jax.models.inception_resnet_v1 import FACENET_INPUT_SIZE, InceptionResnetV1, embed_images
from ipsr_jax.ops.batching import PaddedBatcher


class Embedder:
  """Face images -> L2-normalised identity embeddings with a frozen Inception-ResNet-v1."""

  def __init__(self, module: InceptionResnetV1, variables: Mapping[str, Any], *,
               input_size: int = FACENET_INPUT_SIZE, buckets: Sequence[int] = (8, 64, 256),
               mesh: Mesh | None = None, info: Mapping[str, Any] | None = None):
    self.module = module
    self.input_size = int(input_size)
    self.info = dict(info or {})
    inference = {c: variables[c] for c in ('params', 'batch_stats') if c in variables}

    def embed(images, variables):
      return embed_images(module, variables, images, self.input_size)

    self._batcher = PaddedBatcher(embed, buckets=buckets, mesh=mesh)
    # Put the weights on device once; every call reuses them.
    self.variables = self._batcher.replicate(inference)

  @classmethod
  def from_facenet_pytorch(cls, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                           **kwargs: Any) -> 'Embedder':
    """From a facenet-pytorch InceptionResnetV1 `.pt` file (read without torch) or state dict."""
    module, variables = convert.load_facenet_pytorch(path_or_state_dict)
    source = (os.fspath(path_or_state_dict) if not isinstance(path_or_state_dict, Mapping)
              else 'state_dict')
    return cls(module, variables, info=dict(source=f'facenet-pytorch:{source}'), **kwargs)

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, **kwargs: Any) -> 'Embedder':
    """From a directory written by `embedder_store.save_embedder` (e.g. convert_facenet)."""
    module, variables, info = embedder_store.load_embedder(directory)
    return cls(module, variables, info=info, **kwargs)

  @property
  def embedding_size(self) -> int:
    return self.module.embedding_size

  @property
  def compiled_sizes(self) -> set[int]:
    """Batch sizes compiled so far (one entry per bucket used)."""
    return set(self._batcher.compiled_sizes)

  @property
  def compile_count(self) -> int:
    """Programs compiled so far: one per (H, W, bucket)."""
    return self._batcher.compile_count

  def __call__(self, images: Any) -> np.ndarray:
    """uint8 or float [N, H, W, 3] (or one [H, W, 3]) in 0..255 -> float32 [N, embedding_size]."""
    images = np.asarray(images)
    single = images.ndim == 3
    if single:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected [N, H, W, 3] RGB images, got shape {images.shape}')
    # One float dtype on the device side: uint8 and float inputs share one compiled program.
    out = self._batcher(images.astype(np.float32, copy=False), self.variables)
    out = np.asarray(out, np.float32)
    return out[0] if single else out


from ipsr_jax.inference import SuperResolver, Pipeline  # noqa: E402  pylint: disable=wrong-import-position
