"""MTCNN face detection + 5-point similarity alignment, the paper's preprocessing (Section 3.3, 4).

Detection reproduces facenet-pytorch's `detect_face` step for step (same pyramid, thresholds, NMS
flavours, box regression, square-and-clip, area resampling), with the three nets of
`ipsr_jax.models.mtcnn` in JAX. Shapes are kept fixed so JAX compiles once per input size, not
per image: the whole PNet pyramid is one jitted function of the image size, and RNet/ONet run on
batches padded to a few bucket sizes. NMS and box bookkeeping are small and data-dependent, so
they stay in numpy.

Alignment: the least-squares similarity transform (Umeyama) from the 5 detected landmarks (eyes,
nose, mouth corners) to the standard ArcFace 112x112 template scaled by size/112, then a bicubic
warp to size x size. Scaled to 128 the template puts the eyes at y=59 and 40 px apart: the face
fills the frame from the eyebrows to the chin and ear to ear, like the paper's 128x128 MTCNN
crops (a loose facenet-style box crop), and in-plane rotation is removed.

Whole folders (`align_tree`, the `tools.align` command) are listed and decoded by
`data.image_folder`, like every other tool's input, and written through `runtime.outputs`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import pathlib
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ipsr_jax.runtime import console
from ipsr_jax.data import image_folder
from ipsr_jax.data import image_io
from ipsr_jax.models import mtcnn
from ipsr_jax.runtime import outputs

# ArcFace / insightface 5-point template for 112x112 crops: left eye, right eye, nose tip, left and
# right mouth corners (x, y) in pixel-index coordinates.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
# RNet/ONet batch sizes: a few fixed shapes, so no recompilation whatever the number of boxes
# (on LFW RNet sees 18-150 boxes an image, median 49; ONet 2-25, median 9).
RNET_BUCKETS = (32, 64, 128, 256)
ONET_BUCKETS = (8, 16, 32, 64)
_NORM_MEAN, _NORM_SCALE = 127.5, 0.0078125


def template(size: int) -> np.ndarray:
  """[5, 2] landmark template (x, y) for a size x size aligned face."""
  return ARCFACE_TEMPLATE_112 * (size / 112.0)


@dataclasses.dataclass(frozen=True)
class Detections:
  boxes: np.ndarray      # [K, 5] float32: x1, y1, x2, y2, score (facenet-pytorch's convention)
  landmarks: np.ndarray  # [K, 5, 2] float32 (x, y): left eye, right eye, nose, mouth left, mouth right


@dataclasses.dataclass(frozen=True)
class AlignResult:
  face: np.ndarray | None        # uint8 [size, size, 3], None when no face was found
  box: np.ndarray | None         # [4] x1, y1, x2, y2 in the input image's pixels
  landmarks: np.ndarray | None   # [5, 2] (x, y) in the input image's pixels
  score: float                   # ONet face probability (0 when no face)
  reason: str = ''               # why `face` is None ('no face'), '' on success


# ---------------------------------------------------------------------------------------------
# Resampling ("area" = torch's adaptive average pooling, which facenet-pytorch uses everywhere).


def _area_windows(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  i = np.arange(out_size)
  return (i * in_size) // out_size, ((i + 1) * in_size + out_size - 1) // out_size


@functools.lru_cache(maxsize=128)
def area_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix of torch's interpolate(mode='area') along one axis."""
  start, end = _area_windows(in_size, out_size)
  w = np.zeros((out_size, in_size), np.float32)
  for o, (s, e) in enumerate(zip(start, end)):
    w[o, s:e] = 1.0 / (e - s)
  return w


def _crop_area_resample(sat: np.ndarray, boxes: np.ndarray, out: int) -> np.ndarray:
  """Area-resample crops [y0, y1) x [x0, x1) (boxes [K, 4] int) to [K, out, out, 3] float32.

  Uses the image's summed-area table (int64, exact), so every crop costs out*out*4 lookups.
  """
  y0, y1, x0, x1 = (boxes[:, i:i + 1] for i in range(4))
  i = np.arange(out)[None]
  r0 = y0 + (i * (y1 - y0)) // out
  r1 = y0 + ((i + 1) * (y1 - y0) + out - 1) // out
  c0 = x0 + (i * (x1 - x0)) // out
  c1 = x0 + ((i + 1) * (x1 - x0) + out - 1) // out
  r0, r1 = r0[:, :, None], r1[:, :, None]
  c0, c1 = c0[:, None, :], c1[:, None, :]
  total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
  area = ((r1 - r0) * (c1 - c0))[..., None]
  return (total.astype(np.float32) / area.astype(np.float32)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Box bookkeeping, exactly as facenet_pytorch/models/utils/detect_face.py (float32).


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
  m = 12.0 / min_face_size
  min_side = min(height, width) * m
  scales, scale = [], m
  while min_side >= 12:
    scales.append(scale)
    scale *= factor
    min_side *= factor
  return scales


def nms_union(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """Greedy NMS with IoU (areas without +1), as torchvision.ops.nms: indices by falling score."""
  if len(boxes) == 0:
    return np.zeros((0,), np.int64)
  x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
  area = (x2 - x1) * (y2 - y1)
  order = np.argsort(-scores, kind='stable')
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    w = np.maximum(np.minimum(x2[i], x2) - np.maximum(x1[i], x1), 0)
    h = np.maximum(np.minimum(y2[i], y2) - np.maximum(y1[i], y1), 0)
    inter = w * h
    suppressed |= inter / (area[i] + area - inter) > threshold
  return np.asarray(keep, np.int64)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """facenet-pytorch's `nms_numpy(..., 'Min')`: overlap over the smaller area, areas with +1."""
  if len(boxes) == 0:
    return np.zeros((0,), np.int64)
  x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
  area = (x2 - x1 + 1) * (y2 - y1 + 1)
  order = np.argsort(scores)
  keep = []
  while order.size > 0:
    i, rest = order[-1], order[:-1]
    keep.append(i)
    w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
    h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
    overlap = w * h / np.minimum(area[i], area[rest])
    order = rest[overlap <= threshold]
  return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
  """facenet's `rerec`: grow the shorter side to make each box square about its centre."""
  boxes = boxes.copy()
  h = boxes[:, 3] - boxes[:, 1]
  w = boxes[:, 2] - boxes[:, 0]
  side = np.maximum(w, h)
  boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
  boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
  boxes[:, 2] = boxes[:, 0] + side
  boxes[:, 3] = boxes[:, 1] + side
  return boxes


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
  """facenet's `bbreg` (sides with +1)."""
  boxes = boxes.copy()
  w = boxes[:, 2] - boxes[:, 0] + 1
  h = boxes[:, 3] - boxes[:, 1] + 1
  boxes[:, 0] += reg[:, 0] * w
  boxes[:, 1] += reg[:, 1] * h
  boxes[:, 2] += reg[:, 2] * w
  boxes[:, 3] += reg[:, 3] * h
  return boxes


def _clip(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
  """facenet's `pad`: truncate, clip to the image, keep non-empty crops.

  Returns (valid mask, int crops [K_valid, 4] as y0, y1, x0, x1 half-open 0-based).
  """
  b = np.trunc(boxes[:, :4]).astype(np.int64)
  x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
  ex, ey = np.minimum(b[:, 2], width), np.minimum(b[:, 3], height)
  valid = (ey > y - 1) & (ex > x - 1)
  return valid, np.stack([y - 1, ey, x - 1, ex], 1)[valid]


# ---------------------------------------------------------------------------------------------
# The detector.


def _pad_to_bucket(x: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  size = next(b for b in buckets if b >= len(x))
  if size == len(x):
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


# Compiled once per process and shared by every MTCNN instance: the params are arguments.
_rnet_apply = jax.jit(mtcnn.RNet().apply)
_onet_apply = jax.jit(mtcnn.ONet().apply)


@functools.lru_cache(maxsize=32)
def pnet_pyramid(height: int, width: int, min_face_size: float, factor: float):
  """(scales, jitted fn(pnet_params, image [H, W, 3] float 0..255) -> [(reg, face prob)] per scale).

  One compiled function per image size: area-resize to every pyramid scale (two small matmuls,
  torch's interpolate(mode='area')), normalise, PNet.
  """
  scales = pyramid_scales(height, width, min_face_size, factor)
  sizes = [(int(height * s + 1), int(width * s + 1)) for s in scales]
  weights = [(area_weights(height, h), area_weights(width, w)) for h, w in sizes]
  pnet = mtcnn.PNet()

  def pyramid(params, image):
    hi = jax.lax.Precision.HIGHEST
    outs = []
    for wy, wx in weights:
      x = jnp.einsum('oh,hwc->owc', wy, image, precision=hi)
      x = jnp.einsum('pw,owc->opc', wx, x, precision=hi)
      reg, prob = pnet.apply(params, ((x - _NORM_MEAN) * _NORM_SCALE)[None])
      outs.append((reg[0], prob[0, ..., 1]))
    return outs

  return scales, jax.jit(pyramid)


class MTCNN:
  """facenet-pytorch's MTCNN face detector (min face 20, factor .709, thresholds .6/.7/.7) in JAX."""

  def __init__(self, params: Mapping[str, Any] | None = None, *,
               weights_dir: str | os.PathLike | None = None, min_face_size: float = 20.0,
               thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709,
               rnet_buckets: Sequence[int] = RNET_BUCKETS,
               onet_buckets: Sequence[int] = ONET_BUCKETS):
    self.params = params if params is not None else mtcnn.load_params(weights_dir)
    self.min_face_size = float(min_face_size)
    self.thresholds = tuple(thresholds)
    self.factor = float(factor)
    self.rnet_buckets = tuple(sorted(rnet_buckets))
    self.onet_buckets = tuple(sorted(onet_buckets))

  @staticmethod
  def _run_bucketed(apply_fn, params, x: np.ndarray, buckets: Sequence[int]) -> list[np.ndarray]:
    parts = []
    for start in range(0, len(x), buckets[-1]):
      chunk = x[start:start + buckets[-1]]
      outs = apply_fn(params, _pad_to_bucket(chunk, buckets))
      parts.append([np.asarray(o)[:len(chunk)] for o in outs])
    return [np.concatenate(p) for p in zip(*parts)]

  def detect(self, image: np.ndarray) -> Detections:
    """All faces of one uint8 [H, W, 3] image, as facenet-pytorch's `detect_face` finds them."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    empty = Detections(np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32))
    scales, pyramid = pnet_pyramid(height, width, self.min_face_size, self.factor)
    if not scales:
      return empty
    outs = pyramid(self.params['pnet'], jnp.asarray(image, jnp.float32))

    # Stage 1: PNet proposals, NMS per scale then across scales, regression, square.
    proposals = []
    for scale, (reg, prob) in zip(scales, outs):
      reg, prob = np.asarray(reg), np.asarray(prob)
      ys, xs = np.nonzero(prob >= self.thresholds[0])
      if len(ys) == 0:
        continue
      cell = np.stack([xs, ys], 1).astype(np.float32)
      scale32 = np.float32(scale)
      q1 = np.floor((2 * cell + 1) / scale32)
      q2 = np.floor((2 * cell + 12) / scale32)
      b = np.concatenate([q1, q2, prob[ys, xs, None], reg[ys, xs]], 1).astype(np.float32)
      proposals.append(b[nms_union(b[:, :4], b[:, 4], 0.5)])
    if not proposals:
      return empty
    b = np.concatenate(proposals)
    b = b[nms_union(b[:, :4], b[:, 4], 0.7)]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    boxes = np.stack([b[:, 0] + b[:, 5] * w, b[:, 1] + b[:, 6] * h,
                      b[:, 2] + b[:, 7] * w, b[:, 3] + b[:, 8] * h, b[:, 4]], 1)
    boxes = _square(boxes)

    sat = np.zeros((height + 1, width + 1, 3), np.int64)
    sat[1:, 1:] = image.astype(np.int64).cumsum(0).cumsum(1)

    # Stage 2: RNet on 24x24 crops.
    valid, crops = _clip(boxes, width, height)
    boxes = boxes[valid]
    if len(boxes) == 0:
      return empty
    x = (_crop_area_resample(sat, crops, 24) - _NORM_MEAN) * _NORM_SCALE
    reg, prob = self._run_bucketed(_rnet_apply, self.params['rnet'], x,
                                   self.rnet_buckets)
    keep = prob[:, 1] > self.thresholds[1]
    boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1)
    reg = reg[keep]
    pick = nms_union(boxes[:, :4], boxes[:, 4], 0.7)
    boxes = _square(_regress(boxes[pick], reg[pick]))

    # Stage 3: ONet on 48x48 crops: final boxes and the 5 landmarks.
    valid, crops = _clip(boxes, width, height)
    boxes = boxes[valid]
    if len(boxes) == 0:
      return empty
    x = (_crop_area_resample(sat, crops, 48) - _NORM_MEAN) * _NORM_SCALE
    reg, marks, prob = self._run_bucketed(_onet_apply, self.params['onet'], x,
                                          self.onet_buckets)
    keep = prob[:, 1] > self.thresholds[2]
    boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1)
    reg, marks = reg[keep], marks[keep]
    bw = boxes[:, 2:3] - boxes[:, 0:1] + 1
    bh = boxes[:, 3:4] - boxes[:, 1:2] + 1
    points = np.stack([bw * marks[:, :5] + boxes[:, 0:1] - 1,
                       bh * marks[:, 5:] + boxes[:, 1:2] - 1], -1)
    boxes = _regress(boxes, reg)
    pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
    return Detections(boxes[pick].astype(np.float32), points[pick].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Alignment.


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """[2, 3] least-squares similarity (rotation, uniform scale, shift; no reflection) src -> dst.

  Umeyama (1991), the estimator insightface and skimage use for 5-point face alignment.
  """
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s, d = src - mu_s, dst - mu_d
  u, sig, vt = np.linalg.svd(d.T @ s / len(src))
  sign = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sign[-1] = -1.0
  rot = u @ np.diag(sign) @ vt
  scale = (sig * sign).sum() / (s**2).sum(1).mean()
  shift = mu_d - scale * rot @ mu_s
  return np.concatenate([scale * rot, shift[:, None]], 1)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  """Bicubic warp of uint8 [H, W, 3] by the index-coordinate similarity `matrix` to size x size.

  PIL samples at pixel centres (index + 0.5), so the map is shifted by half a pixel each side.
  A face 2x or more larger than the output is first box-reduced by the integer part of the
  shrink factor, since PIL's transform does not antialias.
  """
  a, t = matrix[:, :2], matrix[:, 2]
  a_inv = np.linalg.inv(a)
  reduce = int(1.0 / np.sqrt(abs(np.linalg.det(a))))
  pil = Image.fromarray(image)
  if reduce >= 2:
    pil = pil.reduce(reduce)
  # output centre coords c -> input centre coords: A^-1 (c - 0.5 - t) + 0.5, then / reduce.
  offset = (a_inv @ (-0.5 - t) + 0.5)
  k = max(reduce, 1)
  coeffs = np.concatenate([a_inv[0] / k, [offset[0] / k], a_inv[1] / k, [offset[1] / k]])
  out = pil.transform((size, size), Image.Transform.AFFINE, tuple(coeffs.tolist()),
                      resample=Image.Resampling.BICUBIC)
  return np.asarray(out)


def pad_pixels(pad: float, height: int, width: int) -> tuple[int, int]:
  """`pad` in pixels (>= 1) or as a fraction of each side (< 1) -> (pad_y, pad_x)."""
  if pad < 0:
    raise ValueError(f'pad must be >= 0, got {pad}')
  if pad < 1:
    return int(round(pad * height)), int(round(pad * width))
  return int(pad), int(pad)


def select_face(boxes: np.ndarray, height: int, width: int, center_weight: float = 2.0) -> int:
  """The largest, most central face: box area - center_weight * squared offset from the centre.

  facenet-pytorch's 'center_weighted_size' selection.
  """
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
  offset2 = (cx - width / 2) ** 2 + (cy - height / 2) ** 2
  return int(np.argmax(area - center_weight * offset2))


class FaceAligner:
  """Detect (MTCNN), pick one face, warp its 5 landmarks onto the template: size x size RGB."""

  def __init__(self, size: int = 128, *, pad: float = 0, detector: MTCNN | None = None,
               weights_dir: str | os.PathLike | None = None):
    self.size = int(size)
    self.pad = float(pad)
    self.template = template(self.size)
    self.detector = detector if detector is not None else MTCNN(weights_dir=weights_dir)

  def __call__(self, image: np.ndarray) -> AlignResult:
    image = image_io.as_rgb(image)
    height, width = image.shape[:2]
    py, px = pad_pixels(self.pad, height, width)
    # Tight crops (ORL) hide the context MTCNN's boxes need: replicate the border outwards.
    padded = np.pad(image, ((py, py), (px, px), (0, 0)), mode='edge') if py or px else image
    det = self.detector.detect(padded)
    if len(det.boxes) == 0:
      return AlignResult(None, None, None, 0.0, 'no face')
    i = select_face(det.boxes, *padded.shape[:2])
    landmarks = det.landmarks[i].astype(np.float64)
    matrix = similarity_transform(landmarks, self.template)
    face = warp(padded, matrix, self.size)
    shift = np.array([px, py], np.float64)
    box = det.boxes[i, :4].astype(np.float64) - np.tile(shift, 2)
    return AlignResult(face, box, landmarks - shift, float(det.boxes[i, 4]))


_DEFAULT_ALIGNERS: dict[tuple[int, float], FaceAligner] = {}
_DEFAULT_LOCK = threading.Lock()


def default_aligner(size: int = 128, pad: float = 0) -> FaceAligner:
  """A shared FaceAligner (the weights load once per process)."""
  with _DEFAULT_LOCK:
    key = (int(size), float(pad))
    if key not in _DEFAULT_ALIGNERS:
      detector = next(iter(_DEFAULT_ALIGNERS.values())).detector if _DEFAULT_ALIGNERS else None
      _DEFAULT_ALIGNERS[key] = FaceAligner(size, pad=pad, detector=detector)
    return _DEFAULT_ALIGNERS[key]


def align_face(image_uint8: np.ndarray, size: int = 128, pad: float = 0) -> AlignResult:
  """Align the main face of one uint8 image ([H, W] grey or [H, W, 3|4]) to size x size."""
  return default_aligner(size, pad)(image_uint8)


# ---------------------------------------------------------------------------------------------
# Whole folders.


TOOL = 'align'


def output_names(names: Sequence[str], suffix: str) -> dict[str, str]:
  """Relative input path -> relative output path: the same layout, the output format's suffix."""
  return {n: os.path.splitext(n)[0] + suffix for n in names}


def align_tree(input_root: str | os.PathLike, output_root: str | os.PathLike, size: int = 128,
               workers: int | None = None, pad: float = 0, *, image_format: str = 'png',
               aligner: FaceAligner | None = None, weights_dir: str | os.PathLike | None = None,
               progress: bool = False, overwrite: bool = False,
               max_side: int | None = None) -> dict[str, Any]:
  """Align every image of `<input_root>/<identity>/<image>` into the same layout under output_root.

  Images are listed and decoded as every tool does (`image_folder.ImageFolder`, capped at
  `max_side` as `--max_side`: None is `image_folder.MAX_SIDE`, 0 none). Writes PNG (or JPEG q=95)
  faces and `<output_root>/report.json` with the counts, the failures (relative path + reason:
  'no face' or 'unreadable: ...', broken links included) and the wall time; returns the report.
  The input and output_root are checked before the detector loads (`outputs.prepare_folder`): a
  non-empty output_root that align did not write is refused unless `overwrite`.
  Resumable: faces already in output_root are kept, not aligned again (each face is written to a
  temporary name and renamed, so a killed run leaves no half-written face); they count as
  aligned, with `resumed` saying how many.
  """
  image_format = image_format.lower()
  if image_format not in ('png', 'jpg', 'jpeg'):
    raise ValueError(f'image_format must be png or jpg, got {image_format!r}')
  suffix = '.png' if image_format == 'png' else '.jpg'
  input_root, output_root = pathlib.Path(input_root), pathlib.Path(output_root)
  folder = image_folder.as_image_folder(input_root, max_side)
  if aligner is not None and (aligner.size != size or aligner.pad != float(pad)):
    raise ValueError(f'aligner has size={aligner.size}, pad={aligner.pad}; asked for {size}, {pad}')
  names = output_names(folder.names, suffix)
  # The tool's own earlier output (its report.json, or only faces it writes) resumes.
  outputs.prepare_folder(str(output_root), tool=TOOL, overwrite=overwrite,
                         expected={*names.values(), outputs.REPORT_FILE})
  if aligner is None:
    aligner = FaceAligner(size, pad=pad, weights_dir=weights_dir)
  workers = workers or os.cpu_count() or 1
  start = time.perf_counter()

  def one(name: str) -> tuple[str, str, float | None]:
    out = output_root.joinpath(*names[name].split('/'))
    if out.exists():
      return name, '', None
    try:
      image = folder.read(name)
    except Exception as e:  # pylint: disable=broad-except
      return name, f'unreadable: {type(e).__name__}: {e}', 0.0
    result = aligner(image)
    if result.face is None:
      return name, result.reason, 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    with outputs.atomic_path(out) as partial:
      Image.fromarray(result.face).save(partial, format='PNG' if suffix == '.png' else 'JPEG',
                                        **({} if suffix == '.png' else {'quality': 95}))
    return name, '', result.score

  failures, scores, resumed = [], [], 0
  # A bar on a terminal, plain lines in a file (no carriage-return redraws in a log).
  bar = console.Progress(len(folder), f'align {input_root.name}', unit='img', quiet=not progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, bar:
    for done, (rel, reason, score) in enumerate(pool.map(one, folder.names), 1):
      bar.update(done)
      if reason:
        failures.append({'path': rel, 'reason': reason})
        logging.info('align: %s: %s', rel, reason)
      elif score is None:
        resumed += 1
      else:
        scores.append(score)
  seconds = time.perf_counter() - start
  failures.sort(key=lambda f: f['path'])
  total = len(folder)
  report = {
      'tool': TOOL, 'input_root': str(input_root), 'output_root': str(output_root), 'size': size,
      'pad': pad, 'format': suffix[1:], 'template': 'arcface_112x112 * size/112',
      'template_points': template(size).round(3).tolist(),
      'total': total, 'aligned': len(scores) + resumed, 'resumed': resumed,
      'failed': len(failures),
      'no_face': sum(f['reason'] == 'no face' for f in failures),
      'unreadable': sum(f['reason'].startswith('unreadable') for f in failures),
      'success_rate': (len(scores) + resumed) / total if total else 0.0,
      'mean_score': float(np.mean(scores)) if scores else 0.0,  # of the faces aligned by this run
      'seconds': round(seconds, 6), 'workers': workers,  # a tiny tree takes under 5 ms
      'images_per_second': round(total / seconds, 2) if seconds > 0 else 0.0,
      **folder.reduced_report(),
      'failures': failures,
  }
  outputs.write_json(output_root / outputs.REPORT_FILE, report)
  return report
