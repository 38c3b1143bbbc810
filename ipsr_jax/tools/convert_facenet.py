r"""Convert facenet-pytorch InceptionResnetV1 weights to an Orbax embedder checkpoint (no torch).

    python -m ipsr_jax.tools.convert_facenet --pt=20180402-114759-vggface2.pt \
        --out=/ckpt/facenet_vggface2 [--keep_logits]

The weights are facenet-pytorch's GitHub release v2.2.9 files (20180402-114759-vggface2.pt,
20180408-102900-casia-webface.pt). After writing, the checkpoint is reloaded and must embed a
random batch bit-identically to the freshly converted weights, or the tool exits non-zero.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from ipsr_jax.models import convert, embedder_store, pt_reader
from ipsr_jax.models.inception_resnet_v1 import FACENET_INPUT_SIZE, embed_images



def define_flags() -> None:
  # Defined only when run as a program: importing convert_file must not claim global flag names.
  flags.DEFINE_string('pt', None, 'facenet-pytorch state dict (.pt) to convert.')
  flags.DEFINE_string('out', None, 'Directory (local or gs://) for the Orbax embedder.')
  flags.DEFINE_bool('keep_logits', False, 'Keep the classification head (8631 classes for VGGFace2).')
  flags.DEFINE_integer('verify_batch', 4, 'Random images embedded to verify.')
  flags.mark_flags_as_required(['pt', 'out'])


def _count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def convert_file(pt: str | os.PathLike, out: str | os.PathLike, *, keep_logits: bool = False,
                 verify_batch: int = 4, seed: int = 0) -> dict[str, Any]:
  """Converts, saves, reloads and verifies; returns a summary dict."""
  state_dict = pt_reader.read_state_dict(pt)
  module, variables = convert.load_facenet_pytorch(state_dict, keep_logits=keep_logits)
  embedder_store.save_embedder(
      out, variables, module_kwargs=embedder_store.module_kwargs_of(module),
      source=f'facenet-pytorch:{os.path.basename(os.fspath(pt))}')
  module2, reloaded, info = embedder_store.load_embedder(out)

  # One jitted function, weights as arguments: both variable sets share one compilation.
  embed = jax.jit(lambda v, x: embed_images(module2, v, x))
  images = np.random.default_rng(seed).uniform(
      0, 255, (verify_batch, FACENET_INPUT_SIZE, FACENET_INPUT_SIZE, 3)).astype(np.float32)
  before = np.asarray(embed(variables, images))
  after = np.asarray(embed(reloaded, images))
  same_module = embedder_store.module_kwargs_of(module2) == embedder_store.module_kwargs_of(module)
  identical = bool(np.array_equal(before, after)) and same_module
  summary = dict(
      pt=os.fspath(pt), out=os.fspath(out), torch_keys=len(state_dict),
      ignored_keys=sorted(k for k in state_dict if k.endswith('num_batches_tracked')
                          or (not keep_logits and k.startswith('logits.'))),
      params=_count(variables['params']), batch_stats=_count(variables.get('batch_stats', {})),
      modules=list(variables['params']), module_kwargs=info['module_kwargs'],
      verified=identical, max_abs_diff=float(np.max(np.abs(before - after))),
      embedding_norms=np.linalg.norm(after, axis=-1).round(6).tolist())
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  summary = convert_file(f.pt, f.out, keep_logits=f.keep_logits, verify_batch=f.verify_batch)
  ignored = summary.pop('ignored_keys')
  modules = summary.pop('modules')
  for k, v in summary.items():
    print(f'{k}: {v}')
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
  app.run(main)
