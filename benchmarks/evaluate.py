"""Evaluation throughput: faces embedded per second, and the wall time of an LFW-sized protocol run.

1. `api.Embedder` (Inception-ResNet-v1 behind `PaddedBatcher`) on 128x128 uint8 faces, as the
   protocols feed it: faces/s after each bucket has compiled, and the compile time.
2. `evaluation.protocols.run_protocol('lfw', ...)` over generated images with LFW's exact census
   (13,233 images of 5,749 identities, 610 with >= 4 images: 6,733 images take part), its 4 probe
   resolutions and 10 seeded trials: wall time, split into image generation ('load'), embedding,
   SR and the rest (host resizes, PSNR/SSIM, ranking).

    python benchmarks/evaluate.py --embedder=tiny --out=/tmp/evaluate.json        # CPU, minutes
    python benchmarks/evaluate.py --embedder=facenet --precision=bf16 --sr=unet   # on a GPU

`--embedder=facenet` is the real embedder's architecture (random weights: the cost is the same);
`--embedder=tiny` is a numpy stand-in (8x8 mean pool + a fixed random projection) that makes the
protocol's own host work measurable on a CPU, where Inception-ResNet-v1 would take hours.
`--sr=unet` adds the paper's generator (random weights) as an SR method; `--sr=copy` an identity
SR (exercises the SR path at no model cost).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
from pathlib import Path
import platform
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp

from configs import base as base_config
from ipsr_jax import api
from ipsr_jax.data.sources.base import Record
from ipsr_jax.evaluation import protocols
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.models import unet as unet_lib
from ipsr_jax.ops.batching import PaddedBatcher
from ipsr_jax.ops import pixels as pixels_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

# LFW (deep-funneled) census: images per identity -> number of identities with that many.
# 13,233 images, 5,749 identities; 610 identities with >= 4 images hold 6,733 images.
LFW_CENSUS: dict[int, int] = {
    1: 4069, 2: 779, 3: 291, 4: 187, 5: 112, 6: 55, 7: 39, 8: 33, 9: 26, 10: 15, 11: 16, 12: 10,
    13: 11, 14: 10, 15: 11, 16: 3, 17: 8, 18: 5, 19: 7, 20: 5, 21: 4, 22: 5, 23: 3, 24: 3, 25: 1,
    26: 2, 27: 1, 28: 2, 29: 2, 30: 2, 31: 2, 32: 3, 33: 3, 35: 1, 36: 1, 37: 1, 39: 2, 41: 2,
    42: 2, 44: 1, 48: 1, 49: 1, 52: 2, 53: 1, 55: 1, 60: 1, 71: 1, 77: 1, 109: 1, 121: 1, 144: 1,
    236: 1, 530: 1}
LFW_IMAGES = sum(k * v for k, v in LFW_CENSUS.items())
IMAGE_SIZE = 128


# ----------------------------------------------------------------------------- generated data


def census(num_images: int = LFW_IMAGES, seed: int = 0) -> list[int]:
  """Images per identity: LFW's census, or for fewer images a seeded random subset of LFW's
  identities (with their image counts) filling up to num_images."""
  counts = [k for k, n in sorted(LFW_CENSUS.items()) for _ in range(n)]
  if num_images >= LFW_IMAGES:
    return counts
  picked, total = [], 0
  for i in np.random.default_rng(seed).permutation(len(counts)):
    if total + counts[i] <= num_images:
      picked.append(counts[i])
      total += counts[i]
  if sum(1 for c in picked if c >= 4) < 2:
    raise ValueError(f'num_images={num_images} is too few for two identities with >= 4 images')
  return picked


def make_records(counts: Sequence[int]) -> list[Record]:
  records = []
  for label, count in enumerate(counts):
    identity = f'id{label:05d}'
    records += [Record(path=f'generated/{identity}/{k:04d}', label=label, identity=identity,
                       meta={'image': k}) for k in range(count)]
  return records


@functools.lru_cache(maxsize=8192)
def _identity_pattern(label: int) -> np.ndarray:
  rng = np.random.default_rng((7, label))
  return rng.uniform(40, 215, (16, 16, 3)).astype(np.float32)


def generated_image(record: Record) -> np.ndarray:
  """uint8 128x128x3: the identity's 16x16 pattern blown up 8x, shifted and noised per image."""
  pattern = np.repeat(np.repeat(_identity_pattern(record.label), 8, 0), 8, 1)
  rng = np.random.default_rng((11, record.label, int(record.meta['image'])))
  image = np.roll(pattern, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
  image *= np.float32(rng.uniform(0.85, 1.15))
  image += 8.0 * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- embedders and SR


def tiny_embed_fn(dim: int = 128, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """A cheap numpy embedder: 8x8 mean pool -> fixed random projection -> unit vectors."""
  projection = np.random.default_rng(seed).normal(0, 1, (8 * 8 * 3, dim)).astype(np.float32)

  def embed(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    n, h, w, c = x.shape
    if h % 8 == 0 and w % 8 == 0:
      pooled = x.reshape(n, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4), dtype=np.float32)
    else:
      rows, cols = np.linspace(0, h, 9).astype(int), np.linspace(0, w, 9).astype(int)
      pooled = np.stack([x[:, rows[i]:rows[i + 1], cols[j]:cols[j + 1]].mean(axis=(1, 2), dtype=np.float32)
                         for i in range(8) for j in range(8)], axis=1)
    v = (pooled.reshape(n, -1) / 127.5 - 1.0) @ projection
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

  return embed


def facenet_embedder(width: float, precision: str, buckets: Sequence[int]) -> api.Embedder:
  """`api.Embedder` around a random-init Inception-ResNet-v1 (facenet-pytorch's architecture)."""
  dtype = jnp.bfloat16 if precision == 'bf16' else jnp.float32
  module = inception_resnet_v1.InceptionResnetV1(width=width, dtype=dtype)
  variables = inception_resnet_v1.init_variables(module, 0)
  return api.Embedder(module, variables, buckets=buckets, info={'source': 'random (benchmark)'})


def _numpy_init(abstract: Any, stddev: float, seed: int = 0) -> Any:
  """Variables shaped as `abstract`, drawn in numpy (XLA:CPU compiles jax RNG inits slowly)."""
  gen = np.random.default_rng(seed)

  def draw(path, spec):
    leaf = path[-1].key
    if leaf == 'kernel':
      return gen.normal(0.0, stddev, spec.shape).astype(spec.dtype)
    return np.full(spec.shape, 1.0 if leaf in ('scale', 'var') else 0.0, spec.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def unet_sr_fn(model_config, precision: str, buckets: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
  """The paper's generator (random weights) in inference mode: uint8 bicubic -> 0..255 SR."""
  dtype = jnp.bfloat16 if precision == 'bf16' else jnp.float32
  generator = unet_lib.from_config(model_config, dtype=dtype)
  size = model_config.image_size
  abstract = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                   train=False))
  variables = _numpy_init(abstract, model_config.init_stddev)

  def sr(images, variables):
    out = generator.apply(variables, pixels_lib.from_pixels(images), train=False)
    return jnp.clip(pixels_lib.to_pixels(out.astype(jnp.float32)), 0.0, 255.0)

  batcher = PaddedBatcher(sr, buckets=buckets)
  variables = batcher.replicate(variables)
  return lambda images: batcher(np.asarray(images, np.float32), variables)


class Timed:
  """Wraps a callable and adds up its wall time and the rows it processed."""

  def __init__(self, fn: Callable[..., Any]):
    self.fn, self.seconds, self.calls, self.rows = fn, 0.0, 0, 0

  def __call__(self, x):
    t = time.perf_counter()
    out = self.fn(x)
    self.seconds += time.perf_counter() - t
    self.calls += 1
    self.rows += len(x) if isinstance(x, np.ndarray) else 1
    return out


# ----------------------------------------------------------------------------- the measurements


def embed_throughput(embed_fn: Callable[[np.ndarray], np.ndarray], num_images: int, repeats: int,
                     seed: int = 0) -> dict[str, Any]:
  """Faces/s of embed_fn on uint8 128x128 faces; the first call (compilation) is timed apart."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  t = time.perf_counter()
  out = np.asarray(embed_fn(images))
  first_s = time.perf_counter() - t
  if out.shape[0] != num_images or not np.isfinite(out).all():
    raise RuntimeError(f'embedder returned {out.shape} (finite: {np.isfinite(out).all()}) for '
                       f'{num_images} images')
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    np.asarray(embed_fn(images))
    times.append(time.perf_counter() - t)
  best = min(times)
  return {'images': num_images, 'repeats': repeats, 'first_call_s': first_s,
          'seconds_median': float(np.median(times)), 'faces_per_s': num_images / float(np.median(times)),
          'faces_per_s_best': num_images / best, 'embedding_size': int(out.shape[1])}


def protocol_wall_time(embed_fn: Callable[[np.ndarray], np.ndarray], num_images: int, trials: int,
                       sr_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                       resolutions: Sequence[Sequence[int]] | None = None, image_quality: bool = True,
                       chunk: int = 256) -> dict[str, Any]:
  """Runs the LFW protocol over generated images; the wall time and where it went."""
  counts = census(num_images)
  records = make_records(counts)
  load = Timed(generated_image)
  embed = Timed(embed_fn)
  sr = Timed(sr_fn) if sr_fn is not None else None
  t = time.perf_counter()
  results = protocols.run_protocol(
      'lfw', records, load, embed_fn=embed, sr_fns={'sr': sr} if sr else None,
      trials=trials, resolutions=resolutions, image_quality=image_quality, chunk=chunk)
  wall = time.perf_counter() - t
  parts = {'load_s': load.seconds, 'embed_s': embed.seconds, 'sr_s': sr.seconds if sr else 0.0}
  return {
      'wall_s': wall, **parts, 'other_s': wall - sum(parts.values()),
      'images_total': len(records), 'identities': len(counts),
      'identities_4plus': sum(1 for c in counts if c >= 4),
      'images_used': load.calls, 'embeddings': embed.rows,
      'embeddings_per_s_in_protocol': embed.rows / embed.seconds if embed.seconds else None,
      'sr_images': sr.rows if sr else 0,
      'num_gallery': results['num_gallery'], 'num_probes': results['num_probes'],
      'trials': len(results['trials']), 'conditions': results['conditions'],
      'methods': results['methods'], 'rank1': results['rank1'],
  }


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {'platform': d.platform, 'device_kind': d.device_kind, 'device_count': jax.device_count(),
          'jax': jax.__version__, 'python': platform.python_version(), 'host_cpus': os.cpu_count()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--embedder', choices=('tiny', 'facenet'), default='tiny')
  parser.add_argument('--width', type=float, default=1.0, help='facenet: channel multiplier')
  parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                      help='facenet and unet compute dtype')
  parser.add_argument('--buckets', default='8,64,256', help='PaddedBatcher batch sizes')
  parser.add_argument('--embed_images', type=int, default=1024, help='faces per embed call')
  parser.add_argument('--embed_repeats', type=int, default=3)
  parser.add_argument('--num_images', type=int, default=LFW_IMAGES,
                      help='protocol images (LFW: 13,233); fewer takes a random subset of '
                      'LFW\'s identities')
  parser.add_argument('--trials', type=int, default=10)
  parser.add_argument('--resolutions', default='',
                      help='probe LR sizes as HxW,HxW (default LFW\'s 7x6,14x12,16x14,18x16)')
  parser.add_argument('--sr', choices=('none', 'copy', 'unet'), default='none')
  parser.add_argument('--ngf', type=int, default=0, help='unet: base width (default configs/base.py)')
  parser.add_argument('--no_quality', action='store_true', help='skip PSNR/SSIM')
  parser.add_argument('--chunk', type=int, default=256, help='run_protocol chunk size')
  parser.add_argument('--skip_embed', action='store_true')
  parser.add_argument('--skip_protocol', action='store_true')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)

  buckets = [int(b) for b in args.buckets.split(',')]
  resolutions = ([tuple(int(v) for v in r.split('x')) for r in args.resolutions.split(',')]
                 if args.resolutions else None)
  report: dict[str, Any] = {
      'benchmark': 'evaluate',
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': sys.argv if argv is None else ['evaluate.py', *argv], 'device': device_info(),
      'embedder': {'kind': args.embedder, 'width': args.width if args.embedder == 'facenet' else None,
                   'precision': args.precision if args.embedder == 'facenet' else 'numpy',
                   'buckets': buckets},
      'embed': None, 'protocol': None}

  def save():  # after each part: a run stopped by a time limit keeps what it measured
    if args.out:
      Path(args.out).write_text(json.dumps(report, indent=1))

  t = time.perf_counter()
  embed_fn = (tiny_embed_fn() if args.embedder == 'tiny'
              else facenet_embedder(args.width, args.precision, buckets))
  report['embedder']['build_s'] = time.perf_counter() - t
  if not args.skip_embed:
    report['embed'] = embed_throughput(embed_fn, args.embed_images, args.embed_repeats)
    e = report['embed']
    print(f"embed ({args.embedder}): {e['faces_per_s']:.0f} faces/s over {e['images']} faces "
          f"(first call {e['first_call_s']:.1f}s)", flush=True)
    save()
  if not args.skip_protocol:
    sr_fn = None
    if args.sr == 'copy':
      sr_fn = lambda images: np.asarray(images)
    elif args.sr == 'unet':
      model = base_config.get_config().model
      if args.ngf:
        model.ngf = args.ngf
      sr_fn = unet_sr_fn(model, args.precision, buckets)
    p = protocol_wall_time(embed_fn, args.num_images, args.trials, sr_fn, resolutions,
                           image_quality=not args.no_quality, chunk=args.chunk)
    p['sr'] = args.sr
    p['sr_ngf'] = args.ngf or None
    report['protocol'] = p
    print(f"LFW protocol: {p['wall_s']:.1f}s wall for {p['images_total']} images "
          f"({p['images_used']} used, {p['identities_4plus']} identities with >= 4), {p['trials']} "
          f"trials x {len(p['conditions'])} resolutions; load {p['load_s']:.1f}s, embed "
          f"{p['embed_s']:.1f}s ({p['embeddings']} embeddings), sr {p['sr_s']:.1f}s, other "
          f"{p['other_s']:.1f}s", flush=True)
  save()
  if args.out:
    print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure()  # one XLA CPU device per core unless the user chose
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
