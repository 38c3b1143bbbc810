"""Independent recognizers to judge SR faces: dlib's face-recognition ResNet and SFace (128-d each).

The SR network is trained against one embedder (FaceNet); rank-1 measured with that same
embedder can reward faces that fool it rather than faces that look like the person. A judge is a
recognizer the generator never trained against: dlib's ResNet (a ResNet-29 trained with a metric
loss on ~3 M faces, run by dlib) and SFace (a MobileFaceNet trained with the sigmoid-constrained
hypersphere loss, OpenCV zoo; run in JAX by the general ONNX path), and any ONNX recognizer a user
names in `config.recognizers`. Evaluations name theirs (`config.evals.<name>.judges=('dlib',
'sface')`, names of `config.recognizers`); `open_judges` builds them.

Optional extra `judge` (dlib-bin, face-recognition-models). The weights ship inside the
face_recognition_models package; it is located with importlib's find_spec because importing it
needs pkg_resources, which recent setuptools no longer provides.

Faces here are pre-aligned crops, so no detector runs: the face box is the whole image shrunk by
`box_margin` on each side (dlib's landmark model expects its detector's tight box; on ORL a 10%
margin lifts rank-1 from 80% to 96%). The 5-point shape predictor places the landmarks and
`compute_face_descriptor` aligns a 150x150 chip from them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import logging
import multiprocessing
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ipsr_jax.models import recognizers as recognizers_lib
from ipsr_jax.models import sface

RESNET_FILE = 'dlib_face_recognition_resnet_model_v1.dat'
SHAPE_FILE = 'shape_predictor_5_face_landmarks.dat'


def models_dir() -> str | None:
  """face_recognition_models/models, or None when the package is not installed."""
  try:
    spec = importlib.util.find_spec('face_recognition_models')
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], 'models')


class DlibJudge:
  """`judge(images uint8 [N, H, W, 3]) -> float32 [N, 128]` unit vectors (cosine-ready)."""

  def __init__(self, box_margin: float = 0.1, input_size: tuple[int, int] | None = None,
               model_dir: str | None = None, num_workers: int = 1):
    """num_workers > 1: that many spawned processes share each call (dlib runs one face per core);
    0 means one per CPU core. Spawned workers re-import the main module, so a script that uses
    them needs the usual `if __name__ == '__main__':` guard."""
    if not 0.0 <= box_margin < 0.5:
      raise ValueError(f'box_margin must be in [0, 0.5), got {box_margin}')
    if num_workers < 0:
      raise ValueError(f'num_workers must be >= 0, got {num_workers}')
    import dlib  # pylint: disable=import-outside-toplevel
    model_dir = model_dir or models_dir()
    if model_dir is None:
      raise ImportError('DlibJudge needs the face_recognition_models package (pip install '
                        "'ipsr_jax[judge]')")
    self._dlib = dlib
    self._shape = dlib.shape_predictor(os.path.join(model_dir, SHAPE_FILE))
    self._resnet = dlib.face_recognition_model_v1(os.path.join(model_dir, RESNET_FILE))
    self.box_margin = float(box_margin)
    self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
    self.model_dir = model_dir
    self.num_workers = int(num_workers or os.cpu_count() or 1)
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None

  @staticmethod
  def available() -> bool:
    """True when dlib imports and both model files are present."""
    if importlib.util.find_spec('dlib') is None:
      return False
    d = models_dir()
    return d is not None and all(os.path.isfile(os.path.join(d, f))
                                 for f in (RESNET_FILE, SHAPE_FILE))

  def _landmarks(self, image: np.ndarray):
    h, w = image.shape[:2]
    mh, mw = int(round(self.box_margin * h)), int(round(self.box_margin * w))
    box = self._dlib.rectangle(mw, mh, w - 1 - mw, h - 1 - mh)
    return self._dlib.full_object_detections([self._shape(image, box)])

  def _descriptors(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Unnormalised descriptors; dlib's batched call (~25% faster than one face at a time)."""
    out = []
    for start in range(0, len(images), batch):
      chunk = [np.ascontiguousarray(im) for im in images[start:start + batch]]
      per_image = self._resnet.compute_face_descriptor(chunk, [self._landmarks(im) for im in chunk])
      out.extend(np.asarray(d[0], np.float32) for d in per_image)
    return np.stack(out)

  def embed(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected RGB images [N, H, W, 3], got {images.shape}')
    if images.dtype != np.uint8:
      images = np.clip(np.round(images.astype(np.float32)), 0, 255).astype(np.uint8)
    if self.input_size is not None and images.shape[1:3] != self.input_size:
      from ipsr_jax.ops import resize  # pylint: disable=import-outside-toplevel
      images = resize.resize_np(images, self.input_size)
    if len(images) == 0:
      return np.zeros((0, 128), np.float32)
    if self.num_workers > 1 and len(images) > 1:
      parts = np.array_split(images, min(len(images), 4 * self.num_workers))
      out = np.concatenate(list(self._workers().map(_worker_descriptors, parts)))
    else:
      out = self._descriptors(images)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

  __call__ = embed

  def _workers(self) -> concurrent.futures.ProcessPoolExecutor:
    if self._pool is None:
      # Spawned workers re-import the parent's main module (TensorFlow too, via clu) with fd 2 on
      # the terminal: keep TF's start-up INFO banners off it.
      os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
      # spawn, not fork: the parent may hold JAX's threads, which a forked child would inherit locked.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.num_workers, mp_context=multiprocessing.get_context('spawn'),
          initializer=_worker_init, initargs=(self.box_margin, self.model_dir))
    return self._pool

  def close(self) -> None:
    """Stops the worker processes (a later call starts them again)."""
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None

  @property
  def fingerprint(self) -> str:
    """A short hash of the model files and the settings (keys the evaluation's embedding cache)."""
    if getattr(self, '_fingerprint', None) is None:
      digest = hashlib.sha256(repr(self).encode())
      for name in (SHAPE_FILE, RESNET_FILE):
        with open(os.path.join(self.model_dir, name), 'rb') as f:
          digest.update(hashlib.sha256(f.read()).digest())
      self._fingerprint = digest.hexdigest()[:16]
    return self._fingerprint

  def __repr__(self) -> str:
    return (f'DlibJudge(dlib_face_recognition_resnet_model_v1, box_margin={self.box_margin}, '
            f'input_size={self.input_size})')


class OnnxJudge:
  """A `config.recognizers` entry of kind 'sface' or 'onnx' with the judge interface: uint8 faces
  -> unit [N, D], run in JAX by the general ONNX path (`serving.inference.recognizer_embedder`).

  Faces are the project's aligned crops (the ArcFace 5-point template scaled to their size), so no
  landmarks are needed: the entry's crop and input size say what the recognizer sees."""

  def __init__(self, name: str = 'sface', entry: Mapping[str, Any] | None = None):
    from ipsr_jax.serving import inference  # pylint: disable=import-outside-toplevel
    entry = recognizers_lib.default_entries()[name] if entry is None else entry
    self.name = name
    self._model = inference.recognizer_embedder(name, entry)

  @staticmethod
  def available(entry: Mapping[str, Any] | None = None) -> bool:
    """Whether the entry's file (default: the built-in SFace) and the onnx package are there."""
    e = recognizers_lib.filled(entry or recognizers_lib.default_entries()['sface'])
    if importlib.util.find_spec('onnx') is None:
      return False
    return sface.model_path() is not None if not e['path'] else os.path.isfile(os.path.expanduser(e['path']))

  def embed(self, images: np.ndarray) -> np.ndarray:
    return self._model(images)

  __call__ = embed

  def close(self) -> None:
    pass

  @property
  def fingerprint(self) -> str:
    return self._model.fingerprint

  def __repr__(self) -> str:
    return f'{self.name}: {self._model!r}'


class SFaceJudge(OnnxJudge):
  """The built-in SFace (`config.recognizers.sface`'s default entry) as a judge."""

  def __init__(self, path: str | None = None):
    entry = recognizers_lib.default_entries()['sface']
    super().__init__('sface', {**entry, 'path': path or ''})

  @staticmethod
  def available(entry: Mapping[str, Any] | None = None) -> bool:
    return OnnxJudge.available(entry)


# The judges every config knows (config.recognizers' defaults): name -> (class, what to install
# when it is missing). Any 'onnx' entry of config.recognizers judges too (`open_judges`).
JUDGES = {'dlib': (DlibJudge, "pip install 'ipsr_jax[judge]'"),
          'sface': (SFaceJudge, "pip install 'ipsr_jax[sface]'")}
JUDGE_KINDS = ('dlib', 'sface', 'onnx')


def check_names(names: Sequence[str], where: str,
                recognizers: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[str, ...]:
  """The judge names as a tuple, each a `recognizers` entry (default: config.recognizers'
  defaults) that can judge; an unknown name is an error naming the known ones."""
  known = recognizers_lib.default_entries() if recognizers is None else recognizers
  return recognizers_lib.check_names(names, known, where, kinds=JUDGE_KINDS, role='judges')


def install_hint(name: str, entry: Mapping[str, Any]) -> str:
  """What to do when a judge is not there."""
  kind = recognizers_lib.filled(entry)['kind']
  if kind == 'onnx':
    return f"its file {entry.get('path')!r} is missing, or the onnx package is not installed"
  return JUDGES['dlib' if kind == 'dlib' else 'sface'][1]


def judge_available(entry: Mapping[str, Any]) -> bool:
  return DlibJudge.available() if recognizers_lib.filled(entry)['kind'] == 'dlib' else OnnxJudge.available(entry)


def open_judges(names: Sequence[str], *, num_workers: int = 0, where: str = 'judges',
                recognizers: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """{name: judge} for each named judge that is installed; a missing one is skipped with a
  warning that says what to install (an evaluation still runs with the others).
  recognizers: the config's entries (default: config.recognizers' defaults); num_workers: dlib's
  processes (0: one per core)."""
  known = recognizers_lib.default_entries() if recognizers is None else recognizers
  judges = {}
  for name in check_names(names, where, known):
    entry = known[name]
    if not judge_available(entry):
      logging.warning('%s: the %s judge is not installed (%s); no %s column.', where, name,
                      install_hint(name, entry), name)
      continue
    if recognizers_lib.filled(entry)['kind'] == 'dlib':
      judges[name] = DlibJudge(num_workers=num_workers)
    else:
      judges[name] = OnnxJudge(name, entry)
  return judges


def close_judges(judges: Mapping[str, Any]) -> None:
  for judge in judges.values():
    judge.close()


_WORKER_JUDGE: DlibJudge | None = None


def _worker_init(box_margin: float, model_dir: str | None) -> None:
  global _WORKER_JUDGE  # pylint: disable=global-statement
  _WORKER_JUDGE = DlibJudge(box_margin=box_margin, model_dir=model_dir)


def _worker_descriptors(images: np.ndarray) -> np.ndarray:
  return _WORKER_JUDGE._descriptors(images)  # pylint: disable=protected-access
