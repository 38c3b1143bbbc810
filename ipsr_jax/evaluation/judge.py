"""An independent recognizer to judge SR faces: dlib's face-recognition ResNet (128-d).

The SR network is trained against one embedder (FaceNet); rank-1 measured with that same
embedder can reward faces that fool it rather than faces that look like the person. dlib's
ResNet (a different architecture, trained on different data) is a second opinion.

Optional extra `judge` (dlib-bin, face-recognition-models). The weights ship inside the
face_recognition_models package; it is located with importlib's find_spec because importing it
needs pkg_resources, which recent setuptools no longer provides.

Faces here are pre-aligned crops, so no detector runs: the face box is the whole image shrunk by
`box_margin` on each side (dlib's landmark model expects its detector's tight box; on ORL a 10%
margin lifts rank-1 from 80% to 96%). The 5-point shape predictor places the landmarks and
`compute_face_descriptor` aligns a 150x150 chip from them.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

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
               model_dir: str | None = None):
    if not 0.0 <= box_margin < 0.5:
      raise ValueError(f'box_margin must be in [0, 0.5), got {box_margin}')
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

  @staticmethod
  def available() -> bool:
    """True when dlib imports and both model files are present."""
    if importlib.util.find_spec('dlib') is None:
      return False
    d = models_dir()
    return d is not None and all(os.path.isfile(os.path.join(d, f))
                                 for f in (RESNET_FILE, SHAPE_FILE))

  def _descriptor(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    mh, mw = int(round(self.box_margin * h)), int(round(self.box_margin * w))
    box = self._dlib.rectangle(mw, mh, w - 1 - mw, h - 1 - mh)
    shape = self._shape(image, box)
    return np.asarray(self._resnet.compute_face_descriptor(image, shape), np.float32)

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
    out = np.stack([self._descriptor(np.ascontiguousarray(im)) for im in images])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

  __call__ = embed

  def __repr__(self) -> str:
    return (f'DlibJudge(dlib_face_recognition_resnet_model_v1, box_margin={self.box_margin}, '
            f'input_size={self.input_size})')
