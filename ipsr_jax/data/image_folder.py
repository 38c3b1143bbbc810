"""A folder of images, read recursively in batches for the command-line tools.

    folder = ImageFolder('/data/probes')           # or a single image file
    for batch in folder.batches(64, image_size=128):
      ...  batch.names (relative POSIX paths), batch.images (uint8 [n, H, W, 3])
    folder.unreadable                              # [Unreadable(name, reason)], never fatal
    folder.reduced                                 # [Reduced(name, original, size)]

Every command-line tool that reads images lists and decodes them here, so they all see the same
files and pixels. The listing keeps every file with an image extension, broken links included
(they fail to decode and are reported as unreadable, never dropped unseen); a folder without any
image raises `NoImagesError`. Images decode with `image_io.decode_image` (the pipeline's decoder)
in a thread pool, reduced on decode when their larger side exceeds `max_side` (default `MAX_SIDE`):
a tool's memory stays bounded whatever the photos' size. A batch holds images of one shape: with
`image_size` every image is bicubic-resized on the host to that square (PIL-exact, uint8, like the
training data), otherwise images are grouped by shape.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Any, Iterator, Mapping

import numpy as np

from ipsr_jax.data import image_io
from ipsr_jax.data.sources.folders import natural_key

# Images whose larger side exceeds this are reduced on decode (`image_io.decode_image_and_size`):
# a face needs far fewer pixels, and a 6000x6000 photo would otherwise take gigabytes downstream.
MAX_SIDE = 2048


class NoImagesError(FileNotFoundError):
  """A folder given as input holds no image file."""


@dataclasses.dataclass(frozen=True)
class Unreadable:
  name: str      # relative to the folder's root
  reason: str    # the decoder's error


@dataclasses.dataclass(frozen=True)
class Reduced:
  name: str                    # relative to the folder's root
  original: tuple[int, int]    # (width, height) in the file
  size: tuple[int, int]        # (width, height) after the reduction on decode


@dataclasses.dataclass
class ImageBatch:
  names: list[str]
  images: np.ndarray  # uint8 [n, H, W, 3]


def list_image_names(root: str | os.PathLike) -> list[str]:
  """Image files under root at any depth (hidden folders and non-image files skipped), as
  relative POSIX paths in natural order (2.png before 10.png). Broken symbolic links are listed:
  decoding them fails, so they are reported, not lost."""
  root = os.fspath(root)
  names = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel = os.path.relpath(dirpath, root)
    for f in filenames:
      if image_io.is_image_file(f):
        names.append(f if rel == '.' else os.path.join(rel, f).replace(os.sep, '/'))
  return sorted(names, key=natural_key)


def require_images(root: str | os.PathLike) -> list[str]:
  """`list_image_names(root)`; raises FileNotFoundError without the folder, NoImagesError when it
  holds no image (the one message every tool gives for an empty input)."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'input folder {root!r} does not exist')
  names = list_image_names(root)
  if not names:
    extensions = ', '.join(sorted(image_io.IMAGE_EXTENSIONS))
    raise NoImagesError(f'no images under {root} (read recursively; extensions {extensions})')
  return names


def reduced_summary(report: Mapping[str, Any]) -> str:
  """One line for the terminal from `ImageFolder.reduced_report()`'s fields (as a tool's report
  holds them): how many images were reduced on decode, with an example; '' when none was."""
  reduced = report.get('reduced_images') or []
  if not reduced:
    return ''
  first = reduced[0]
  example = '{} {}x{} -> {}x{}'.format(first['path'], *first['original'], *first['size'])
  count = report.get('reduced', len(reduced))
  images, verb = ('image', 'was') if count == 1 else ('images', 'were')
  return (f"{count} {images} larger than {report['max_side']} px {verb} reduced on decode "
          f'(e.g. {example})')


def as_image_folder(source: str | os.PathLike | ImageFolder,
                    max_side: int | None = None) -> ImageFolder:
  """`source` itself when already an ImageFolder, else `ImageFolder(source)` with the tools'
  `--max_side` convention: None is `MAX_SIDE`, 0 no cap."""
  if isinstance(source, ImageFolder):
    return source
  if max_side is not None and max_side < 0:
    raise ValueError(f'max_side must be >= 0 (0: no cap), got {max_side}')
  return ImageFolder(source, max_side=MAX_SIDE if max_side is None else (max_side or None))


class ImageFolder:
  """The images under `root` (a directory, read recursively, or one image file).

  `max_side`: images with a larger side over it are reduced on decode (None: full size).
  """

  def __init__(self, root: str | os.PathLike, *, max_side: int | None = MAX_SIDE):
    root = self.input = os.fspath(root)
    if os.path.isfile(root):
      self.root, self.names = os.path.dirname(root) or '.', [os.path.basename(root)]
    elif os.path.isdir(root):
      self.root, self.names = root, require_images(root)
    else:
      raise FileNotFoundError(f'input {root!r} is neither a folder nor a file')
    self.max_side = max_side
    self.unreadable: list[Unreadable] = []
    self._reduced: dict[str, Reduced] = {}

  def __len__(self) -> int:
    return len(self.names)

  def path(self, name: str) -> str:
    return os.path.join(self.root, *name.split('/'))

  def read(self, name: str) -> np.ndarray:
    """uint8 [H, W, 3], reduced on decode over `max_side`; raises what the decoder raises."""
    image, original = image_io.decode_image_and_size(self.path(name), max_side=self.max_side)
    if self.max_side is not None and max(original) > self.max_side:
      self._reduced[name] = Reduced(name, original, (image.shape[1], image.shape[0]))
    return image

  @property
  def reduced(self) -> list[Reduced]:
    """The images read so far that were reduced on decode, in the folder's order."""
    order = {n: i for i, n in enumerate(self.names)}
    return sorted(self._reduced.values(), key=lambda r: order.get(r.name, len(order)))

  def reduced_report(self) -> dict[str, Any]:
    """The cap and the images reduced so far, as the tools' reports hold them: `max_side`,
    `reduced` (the count) and `reduced_images` (path, original and new [width, height])."""
    return dict(max_side=self.max_side, reduced=len(self._reduced),
                reduced_images=[dict(path=r.name, original=list(r.original), size=list(r.size))
                                for r in self.reduced])

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
