"""A folder of images, read recursively in batches for the command-line tools.

    folder = ImageFolder('/data/probes')           # or a single image file
    for batch in folder.batches(64, image_size=128):
      ...  batch.names (relative POSIX paths), batch.images (uint8 [n, H, W, 3])
    folder.unreadable                              # [Unreadable(name, reason)], never fatal

Images decode with `image_io.decode_image` (the pipeline's decoder) in a thread pool. A batch holds
images of one shape: with `image_size` every image is bicubic-resized on the host to that square
(PIL-exact, uint8, like the training data), otherwise images are grouped by shape.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Iterator

import numpy as np

from ipsr_jax.data import image_io
from ipsr_jax.data.sources.folders import natural_key


@dataclasses.dataclass(frozen=True)
class Unreadable:
  name: str      # relative to the folder's root
  reason: str    # the decoder's error


@dataclasses.dataclass
class ImageBatch:
  names: list[str]
  images: np.ndarray  # uint8 [n, H, W, 3]


def list_image_names(root: str | os.PathLike) -> list[str]:
  """Image files under root at any depth (hidden folders and non-image files skipped), as
  relative POSIX paths in natural order (2.png before 10.png)."""
  root = os.fspath(root)
  names = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel = os.path.relpath(dirpath, root)
    for f in filenames:
      if image_io.is_image_file(f):
        names.append(f if rel == '.' else os.path.join(rel, f).replace(os.sep, '/'))
  return sorted(names, key=natural_key)


class ImageFolder:
  """The images under `root` (a directory, read recursively, or one image file)."""

  def __init__(self, root: str | os.PathLike):
    root = os.fspath(root)
    if os.path.isfile(root):
      self.root, self.names = os.path.dirname(root) or '.', [os.path.basename(root)]
    elif os.path.isdir(root):
      self.root, self.names = root, list_image_names(root)
    else:
      raise FileNotFoundError(f'input {root!r} is neither a folder nor a file')
    self.unreadable: list[Unreadable] = []

  def __len__(self) -> int:
    return len(self.names)

  def path(self, name: str) -> str:
    return os.path.join(self.root, *name.split('/'))

  def read(self, name: str) -> np.ndarray:
    """uint8 [H, W, 3]; raises what the decoder raises."""
    return image_io.decode_image(self.path(name))

  def batches(self, batch_size: int, *, image_size: int | None = None, workers: int = 4,
              max_pending: int | None = None) -> Iterator[ImageBatch]:
    """Every readable image once, in batches of at most `batch_size` images of one shape.

    Unreadable files are appended to `self.unreadable` and skipped. Images of a shape wait until
    their group is full; when more than `max_pending` (default 4 batches) wait, the fullest group
    goes out early, so memory stays bounded on folders of many different sizes.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    max_pending = max_pending or 4 * batch_size
    self.unreadable = []

    def load(name: str) -> tuple[str, np.ndarray | None, str]:
      try:
        image = self.read(name)
        if image_size is not None:
          image = image_io.resize_to(image, image_size)
        return name, image, ''
      except Exception as e:  # pylint: disable=broad-except  (any decoder error: listed, not fatal)
        return name, None, f'{type(e).__name__}: {e}'

    groups: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}

    def emit(shape) -> ImageBatch:
      items = groups.pop(shape)
      return ImageBatch([n for n, _ in items], np.stack([im for _, im in items]))

    def collect(result) -> Iterator[ImageBatch]:
      name, image, reason = result
      if image is None:
        self.unreadable.append(Unreadable(name, reason))
        return
      group = groups.setdefault(image.shape, [])
      group.append((name, image))
      if len(group) >= batch_size:
        yield emit(image.shape)
      elif sum(len(g) for g in groups.values()) > max_pending:
        yield emit(max(groups, key=lambda s: len(groups[s])))

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
      # Decode a bounded window ahead, in order: memory never holds the whole folder.
      window = max(batch_size, 2 * max(1, workers))
      futures: collections.deque = collections.deque()
      for name in self.names:
        futures.append(pool.submit(load, name))
        if len(futures) >= window:
          yield from collect(futures.popleft().result())
      while futures:
        yield from collect(futures.popleft().result())
    for shape in list(groups):
      yield emit(shape)
