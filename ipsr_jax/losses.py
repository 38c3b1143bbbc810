"""The identity-preserving loss: L = L_embedding(E(SR), E(HR)) + beta * L_pixel(SR, HR)  (Eq. 3.3).

SR and HR are generator-range images in [-1, 1]. The embedder sees them as pixels resized
128 -> 160 (bicubic) and standardised; the HR embedding carries no gradient, the SR embedding
sends its gradient through the frozen embedder into the generator (unlike the authors' code,
whose embeddings were computed outside the gradient tape).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ipsr_jax.ops import views
from ipsr_jax.ops.pixels import to_pixels

IDENTITY_DISTANCES = ('mse', 'cosine', 'contrastive')


def identity_distance(e_sr: jax.Array, e_hr: jax.Array, kind: str = 'mse',
                      temperature: float = 0.1) -> jax.Array:
  """Mean over the batch of the distance between unit embeddings.

  'mse' is Eq. 3.2; 'cosine' the same up to scale (|a - b|^2 = 2 - 2 cos for unit vectors).
  'contrastive' (not the paper's) asks for more than closeness: each SR face's embedding must be
  nearer its own HR face than every other HR face of the batch (InfoNCE, cross-entropy over the
  cosines / temperature). Moving every SR embedding toward the population's mean face raises all
  cosines alike: the paper's distance rewards that, this one does not.
  """
  e_sr, e_hr = e_sr.astype(jnp.float32), e_hr.astype(jnp.float32)
  if kind == 'mse':
    return jnp.mean(jnp.square(e_sr - e_hr))
  if kind == 'cosine':
    return jnp.mean(1.0 - jnp.sum(e_sr * e_hr, axis=-1))
  if kind == 'contrastive':
    logits = (e_sr @ e_hr.T) / temperature
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits))
  raise ValueError(f'loss.identity_distance must be one of {IDENTITY_DISTANCES}, got {kind!r}')


def pixel_mse(sr: jax.Array, hr: jax.Array) -> jax.Array:
  """Eq. 3.1 as the authors' code computes it: mean squared error in the [-1, 1] range."""
  return jnp.mean(jnp.square(sr.astype(jnp.float32) - hr.astype(jnp.float32)))


def ipsr_loss(sr: jax.Array, hr: jax.Array, embed: Callable[[jax.Array], jax.Array],
              loss_config, key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its terms. `embed` maps 0..255 pixel images to unit embeddings, or to a
  dict {recognizer: unit embeddings} ('embedder' the run's own) for an ensemble.

  With `loss_config.views.enabled` the recognizer sees one random view of each (SR, HR) pair,
  the same for both (`ops/views.py`), drawn from `key`.
  """
  terms = {'pixel_mse': pixel_mse(sr, hr)}
  total = loss_config.beta * loss_config.pixel_weight * terms['pixel_mse']
  if loss_config.identity_weight:
    sr_pixels, hr_pixels = to_pixels(sr), to_pixels(hr)
    view_cfg = loss_config.get('views')
    if view_cfg is not None and view_cfg.enabled:
      if key is None:
        raise ValueError('loss.views.enabled needs a random key')
      sr_pixels, hr_pixels = views.same_view(key, sr_pixels, hr_pixels, view_cfg)
    e_sr = embed(sr_pixels)
    e_hr = jax.lax.stop_gradient(embed(hr_pixels))
    # An ensemble (`loss.extra_recognizers`) embeds with each recognizer: {name: embeddings},
    # 'embedder' first; the identity term is the mean of their distances, so no single
    # network's features can carry it alone.
    e_sr, e_hr = (e_sr, e_hr) if isinstance(e_sr, dict) else ({'embedder': e_sr}, {'embedder': e_hr})
    distances = [identity_distance(e_sr[k], e_hr[k], loss_config.identity_distance,
                                   loss_config.get('temperature', 0.1)) for k in e_sr]
    terms['identity'] = sum(distances) / len(distances)
    terms['cosine_similarity'] = jnp.mean(jnp.sum(e_sr['embedder'].astype(jnp.float32) * e_hr['embedder'],
                                                  axis=-1))
    total = total + loss_config.identity_weight * terms['identity']
  terms['loss'] = total
  return total, terms
