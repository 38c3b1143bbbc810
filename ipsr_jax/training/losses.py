"""The identity-preserving loss: L = L_embedding(E(SR), E(HR)) + beta * L_pixel(SR, HR)  (Eq. 3.3),
optionally + feature_weight * L_features (the recognizer's intermediate layers; not the paper's).

SR and HR are generator-range images in [-1, 1]. The embedder sees them as pixels resized
128 -> 160 (bicubic) and standardised; the HR embedding carries no gradient, the SR embedding
sends its gradient through the frozen embedder into the generator (unlike the authors' code,
whose embeddings were computed outside the gradient tape).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ipsr_jax.config import IDENTITY_DISTANCES
from ipsr_jax.ops import views
from ipsr_jax.ops.pixels import to_pixels


class Recognition(NamedTuple):
  """What the recognizers in the loss make of a batch of faces."""
  embeddings: dict[str, jax.Array]  # unit embeddings by recognizer name (loss.recognizers' order)
  features: dict[str, jax.Array]    # the run's embedder's intermediate layers by name ({} unless asked)


def as_recognition(out: Any) -> Recognition:
  """An embed function's output as a Recognition: it may also return the embeddings alone (an
  array, or a dict of them by recognizer)."""
  if isinstance(out, Recognition):
    return out
  return Recognition(out if isinstance(out, dict) else {'embedder': out}, {})


def uses_recognizer(loss_config) -> bool:
  """Whether the loss reads a recognizer at all (pixel-only ablations do not)."""
  return bool(loss_config.identity_weight) or bool(loss_config.get('feature_weight', 0.0))


def loss_recognizers(loss_config) -> tuple[str, ...]:
  """The names of the identity term's recognizers (`loss.recognizers`), none when it is off."""
  if not loss_config.identity_weight:
    return ()
  return tuple(loss_config.get('recognizers', ('facenet',)))


def reads_embedder(loss_config) -> bool:
  """Whether the loss runs config.embedder: FaceNet is in the identity term, or the feature term
  reads its layers."""
  return 'facenet' in loss_recognizers(loss_config) or bool(loss_config.get('feature_weight', 0.0))


def recognizer_weights(loss_config) -> dict[str, float]:
  """{name: weight} of the identity term's recognizers (`loss.recognizer_weights`, one per name
  in order; () weighs them equally)."""
  names = loss_recognizers(loss_config)
  weights = tuple(loss_config.get('recognizer_weights', ()) or ()) or (1.0,) * len(names)
  return dict(zip(names, (float(w) for w in weights)))


def feature_layers(loss_config) -> tuple[str, ...]:
  """The embedder layers the feature term reads: `loss.feature_layers`, or none when it is off."""
  return tuple(loss_config.feature_layers) if loss_config.get('feature_weight', 0.0) else ()


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
    # The positives as a row-wise dot, not diagonal(logits): with the batch split over devices the
    # diagonal of the gathered matrix is a gather, a conditional and one more cross-device wait.
    positives = jnp.sum(e_sr * e_hr, axis=-1) / temperature
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positives)
  raise ValueError(f'loss.identity_distance must be one of {IDENTITY_DISTANCES}, got {kind!r}')


def feature_distance(f_sr: dict[str, jax.Array], f_hr: dict[str, jax.Array]) -> jax.Array:
  """Mean over layers of the squared distance between channel-normalised activations, averaged
  over positions (LPIPS's form, without its learned channel weights). Each position's feature
  vector is scaled to unit length first, so every layer counts alike whatever its activation scale;
  per layer the value lies in [0, 4]."""
  def unit(f):
    f = f.astype(jnp.float32)
    return f * jax.lax.rsqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-10)
  per_layer = [jnp.mean(jnp.sum(jnp.square(unit(f_sr[k]) - unit(f_hr[k])), axis=-1)) for k in f_sr]
  return sum(per_layer) / len(per_layer)


def pixel_mse(sr: jax.Array, hr: jax.Array) -> jax.Array:
  """Eq. 3.1 as the authors' code computes it: mean squared error in the [-1, 1] range."""
  return jnp.mean(jnp.square(sr.astype(jnp.float32) - hr.astype(jnp.float32)))


def ipsr_loss(sr: jax.Array, hr: jax.Array, embed: Callable[[jax.Array], Any],
              loss_config, key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its terms. `embed` maps 0..255 pixel images to a `Recognition` (or to the
  unit embeddings alone: an array, or a dict {recognizer: embeddings} for an ensemble).

  With `loss_config.views.enabled` the recognizers see one random view of each (SR, HR) pair,
  the same for both (`ops/views.py`), drawn from `key`.
  """
  terms = {'pixel_mse': pixel_mse(sr, hr)}
  total = loss_config.beta * loss_config.pixel_weight * terms['pixel_mse']
  if uses_recognizer(loss_config):
    sr_pixels, hr_pixels = to_pixels(sr), to_pixels(hr)
    view_cfg = loss_config.get('views')
    if view_cfg is not None and view_cfg.enabled:
      if key is None:
        raise ValueError('loss.views.enabled needs a random key')
      sr_pixels, hr_pixels = views.same_view(key, sr_pixels, hr_pixels, view_cfg)
    r_sr = as_recognition(embed(sr_pixels))
    r_hr = jax.tree.map(jax.lax.stop_gradient, as_recognition(embed(hr_pixels)))
    e_sr, e_hr = r_sr.embeddings, r_hr.embeddings
    if e_sr:  # the first recognizer's (the feature term alone embeds nothing)
      first = next(iter(e_sr))
      terms['cosine_similarity'] = jnp.mean(jnp.sum(e_sr[first].astype(jnp.float32) * e_hr[first], axis=-1))
    if loss_config.identity_weight:
      # Several recognizers (`loss.recognizers`): the identity term is the weighted mean of their
      # distances, so no single network's features can carry it alone.
      distances = [identity_distance(e_sr[k], e_hr[k], loss_config.identity_distance,
                                     loss_config.get('temperature', 0.1)) for k in e_sr]
      weights = recognizer_weights(loss_config)
      w = [weights.get(k, 1.0) for k in e_sr]
      if len(set(w)) == 1:  # equal weights: the plain mean
        terms['identity'] = sum(distances) / len(distances)
      else:
        terms['identity'] = sum(wk * d for wk, d in zip(w, distances)) / sum(w)
      total = total + loss_config.identity_weight * terms['identity']
    if loss_config.get('feature_weight', 0.0):
      if not r_sr.features:
        raise ValueError('loss.feature_weight > 0 needs an embed function that returns features')
      terms['features'] = feature_distance(r_sr.features, r_hr.features)
      total = total + loss_config.feature_weight * terms['features']
  terms['loss'] = total
  return total, terms
