r"""How hard each loss term pulls on the generator's output: the weights' scale, before training.

    python -m ipsr_jax.tools.loss_balance --config=configs/lfw.py:dev \
        --config.data.root=runs/lfw/aligned --sizes=14x12,18x16 --out=runs/loss_balance

A weight's number says little by itself: a term's pull on the generator is the size of its
gradient, which depends on the distance's form (a mean over 512 embedding dimensions, a cross
entropy over the batch, a mean over activations) as much as on the weight. This takes `--faces`
training faces of the config's data, degrades them to each LR size, and at SR = the bicubic input
(where training starts: `model.residual` generators return it untrained) reports each weighted
term's value and the L2 norm of its gradient with respect to the SR pixels, and that norm over the
pixel term's. Weighted as the config weighs them: pass `--config.loss.*` to try other weights.
Writes `--out`/loss_balance.json.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from ipsr_jax.runtime import console


def define_flags() -> dict[str, flags.FlagHolder]:
  # Defined only when run as a program: importing this module must not claim global flag names.
  return dict(
      config=config_flags.DEFINE_config_file('config', 'configs/lfw.py:dev', 'The training configuration '
                                             '(overrides as --config.a.b=v).'),
      faces=flags.DEFINE_integer('faces', 16, 'Training faces in the batch (the first of a seeded draw).'),
      sizes=flags.DEFINE_list('sizes', ['14x12', '18x16'], 'LR sizes, HxW.'),
      seed=flags.DEFINE_integer('seed', 0, 'Which faces are drawn.'),
      out=flags.DEFINE_string('out', None, 'Output directory (loss_balance.json).'),
  )


def term_configs(loss_config) -> dict[str, object]:
  """The loss config split into one config per active term, each weighted as in the whole."""
  base = loss_config.to_dict()
  off = dict(identity_weight=0.0, pixel_weight=0.0, feature_weight=0.0)
  terms = {'pixel': dict(base, **dict(off, pixel_weight=base['pixel_weight']))}
  if base['identity_weight']:
    terms['identity'] = dict(base, **dict(off, identity_weight=base['identity_weight']))
  if base.get('feature_weight', 0.0):
    terms['features'] = dict(base, **dict(off, feature_weight=base['feature_weight']))
  return {k: ml_collections.ConfigDict(v) for k, v in terms.items()}


def measure(config, faces: int, sizes: list[tuple[int, int]], seed: int = 0) -> dict:
  """{size: {term: {value, grad_norm, over_pixel}}} at SR = bicubic input (see the module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ipsr_jax.training import losses  # pylint: disable=g-import-not-at-top
  from ipsr_jax.training import train  # pylint: disable=g-import-not-at-top
  from ipsr_jax.data import degrade  # pylint: disable=g-import-not-at-top
  from ipsr_jax.data import sources  # pylint: disable=g-import-not-at-top
  from ipsr_jax.models import embedder_store  # pylint: disable=g-import-not-at-top
  from ipsr_jax.ops import pixels as pixels_lib  # pylint: disable=g-import-not-at-top

  source = sources.make_source(config.data, split=config.data.split)
  order = np.random.default_rng(seed).permutation(len(source))
  hr = np.stack([source.load_image(source.records[i]) for i in order[:faces]])
  loss_config = config.loss
  embed = None
  if losses.uses_recognizer(loss_config):
    module, variables = None, None
    if losses.reads_embedder(loss_config):
      module, variables, _ = embedder_store.load(config.embedder.checkpoint)
    recognizers = train.loss_recognizers(config)
    embed = train.make_embed_fn(module, variables, config.embedder.input_size, recognizers,
                                {n: r.params for n, r in recognizers.items()},
                                losses.feature_layers(loss_config), names=losses.loss_recognizers(loss_config) or None)
  hr_x = pixels_lib.from_pixels(jnp.asarray(hr))
  key = jax.random.key(seed)
  results = {}
  for h, w in sizes:
    lr = np.stack([degrade.degrade(face, (h, w), hr.shape[1:3]) for face in hr])
    sr = pixels_lib.from_pixels(jnp.asarray(lr))
    rows = {}
    for name, term_config in term_configs(loss_config).items():
      fn = lambda s, c=term_config: losses.ipsr_loss(s, hr_x, embed, c, key=key)[0]
      value, grad = jax.value_and_grad(fn)(sr)
      rows[name] = dict(value=float(value), grad_norm=float(jnp.linalg.norm(grad)))
    for row in rows.values():
      row['over_pixel'] = row['grad_norm'] / max(rows['pixel']['grad_norm'], 1e-30)
    results[f'{h}x{w}'] = rows
  return results


def main(argv, holders: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ipsr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import cpu_devices  # pylint: disable=g-import-not-at-top
  from ipsr_jax.runtime import paths  # pylint: disable=g-import-not-at-top
  config = holders['config'].value
  sizes = []
  for text in holders['sizes'].value:
    try:
      h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
      raise app.UsageError(f'--sizes entries are HxW, got {text!r}') from None
    sizes.append((h, w))
  config_lib.validate_lr_sizes(sizes, 'sizes', config.data.image_size)
  if holders['faces'].value < 2:
    raise app.UsageError('--faces must be >= 2 (the contrastive term needs other faces in the batch)')
  config_lib.validate(config)
  paths.resolve_config(config)
  cpu_devices.configure_from(config.mesh)  # before JAX starts its backends
  results = measure(config, holders['faces'].value, sizes, holders['seed'].value)
  out = holders['out'].value
  os.makedirs(out, exist_ok=True)
  report = dict(faces=holders['faces'].value, seed=holders['seed'].value, loss=config.loss.to_dict(),
                embedder=str(config.embedder.checkpoint), results=results)
  with open(os.path.join(out, 'loss_balance.json'), 'w') as f:
    json.dump(report, f, indent=1, default=list)
  console.say('gradient norm of each weighted term w.r.t. the SR pixels, at SR = bicubic input:')
  for size, rows in results.items():
    console.say('  ' + size + ': ' + ', '.join(
        f"{name} {row['value']:.4g} (grad {row['grad_norm']:.3g}, {row['over_pixel']:.2f}x pixel)"
        for name, row in rows.items()))
  console.say(f'Wrote {os.path.join(out, "loss_balance.json")}')


def run() -> None:
  holders = define_flags()
  flags.mark_flags_as_required(['out'])
  console.run_tool(lambda argv: main(argv, holders), 'loss_balance')


if __name__ == '__main__':
  run()
