"""Pretrains Inception-ResNet-v1 (any width) as a face recognizer, for users without FaceNet weights.

`--config=configs/embedder.py`: softmax (facenet-pytorch's `logits` head) or an ArcFace-style
additive angular margin head on an identity-labelled source. The result is saved with
`embedder_store.save_embedder` to `<workdir>/embedder`, the format the IPSR training loads as its
frozen embedder (`config.embedder.checkpoint`).
"""

import os
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics

from ipsr_jax.runtime import checkpointing
from ipsr_jax import config as config_lib
from ipsr_jax.runtime import console
from ipsr_jax.runtime import sharding
from ipsr_jax.training import loop
from ipsr_jax.training import train as train_lib
from ipsr_jax.data import degrade
from ipsr_jax.data import pipeline
from ipsr_jax.data import sources
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.ops import resize as resize_lib


class ArcFaceHead(nn.Module):
  """cos(theta + m) on the true class, scaled by s (Deng et al. 2019)."""
  num_classes: int
  scale: float = 30.0
  margin: float = 0.3

  @nn.compact
  def __call__(self, embeddings: jax.Array, labels: jax.Array) -> jax.Array:
    w = self.param('kernel', nn.initializers.normal(0.01), (embeddings.shape[-1], self.num_classes))
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
    cos = jnp.clip(embeddings.astype(jnp.float32) @ w, -1.0 + 1e-6, 1.0 - 1e-6)
    target = jnp.cos(jnp.arccos(cos) + self.margin)
    onehot = jax.nn.one_hot(labels, self.num_classes)
    return self.scale * jnp.where(onehot > 0, target, cos)


@flax.struct.dataclass
class EmbedderMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Average.from_output('accuracy')


def module_kwargs(config, num_classes: int) -> dict:
  e = config.embedder
  return dict(embedding_size=e.embedding_size, width=e.width, dropout_rate=e.dropout_rate,
              bn_epsilon=e.bn_epsilon, num_classes=num_classes if config.pretrain.head == 'softmax' else None)


def _augment(hr: jax.Array, rng: jax.Array, config,
             blur: degrade.DeviceDegrader | None = None) -> jax.Array:
  """Random horizontal flip (faces are left-right symmetric, identities are not) and, with `blur`,
  a bicubic down-and-up round trip through one of `pretrain.blur_sizes` with probability
  `pretrain.blur_probability`: a recognizer that tolerates mild blur, as real ones do."""
  flip = jax.random.bernoulli(rng, 0.5, (hr.shape[0], 1, 1, 1))
  hr = jnp.where(flip, hr[:, :, ::-1], hr)
  if blur is None:
    return hr
  pick_rng, use_rng = jax.random.split(jax.random.fold_in(rng, 1))
  index = jax.random.randint(pick_rng, (hr.shape[0],), 0, len(blur.lr_sizes))
  use = jax.random.bernoulli(use_rng, config.pretrain.blur_probability, (hr.shape[0], 1, 1, 1))
  return jnp.where(use, blur(hr, index), hr)


def blur_degrader(config) -> degrade.DeviceDegrader | None:
  """The degradation `_augment` applies, or None when `pretrain.blur_probability` is 0."""
  p = config.pretrain
  if not p.blur_probability:
    return None
  return degrade.DeviceDegrader(p.blur_sizes, (config.data.image_size,) * 2, round_lr=config.data.round_lr)


def make_step(config, embedder, head, tx):
  input_size = config.embedder.input_size
  blur = blur_degrader(config)

  def step(state: train_lib.TrainState, batch: dict) -> tuple[train_lib.TrainState, EmbedderMetrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, drop_rng = jax.random.split(rng)
    pixels = _augment(batch['hr'].astype(jnp.float32), aug_rng, config, blur)
    x = inception_resnet_v1.standardize(_resize_to(pixels, input_size), embedder.standardization)
    labels = batch['label']

    def loss_fn(params):
      variables = {'params': params['embedder'], 'batch_stats': state.batch_stats}
      if head is None:
        logits, updates = embedder.apply(variables, x, train=True, classify=True, rngs={'dropout': drop_rng},
                                         mutable=['batch_stats'])
      else:
        emb, updates = embedder.apply(variables, x, train=True, rngs={'dropout': drop_rng},
                                      mutable=['batch_stats'])
        logits = head.apply({'params': params['head']}, emb, labels)
      logits = logits.astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
      return loss, (accuracy, updates['batch_stats'])

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = train_lib.apply_if_finite(state, loss, grads, batch_stats, tx)
    return new_state, EmbedderMetrics.single_from_model_output(loss=loss, accuracy=accuracy)

  return step


def _resize_to(pixels: jax.Array, size: int) -> jax.Array:
  if pixels.shape[1:3] == (size, size):
    return pixels
  return resize_lib.resize(pixels, (size, size))


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, 'embedder')


def train_embedder(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains, then writes the frozen-embedder checkpoint; returns its directory. Resumes if interrupted."""
  config_lib.validate(config)
  out = export_dir(workdir)
  if os.path.exists(os.path.join(out, 'embedder.json')):
    console.say(f'Embedder already trained: {out}')
    return out
  mesh = sharding.make_mesh(config.mesh, config.train.batch_size)
  sharding.check_batch_size(config.train.batch_size, mesh)
  source = sources.make_source(config.data, split=config.data.split)
  num_classes = source.num_identities
  num_steps = config.train.num_train_steps
  kwargs = module_kwargs(config, num_classes)
  dtype = train_lib.compute_dtype(config.train)
  embedder = inception_resnet_v1.InceptionResnetV1(**kwargs, dtype=dtype)
  head = (ArcFaceHead(num_classes, scale=config.pretrain.arcface_scale, margin=config.pretrain.arcface_margin)
          if config.pretrain.head == 'arcface' else None)
  tx = train_lib.make_optimizer(config.train, num_steps)

  def init() -> train_lib.TrainState:
    rng = jax.random.PRNGKey(config.seed)
    size = config.embedder.input_size
    variables = embedder.init(train_lib.init_key(config.seed), jnp.zeros((1, size, size, 3)), train=False,
                              classify=head is None)
    params = {'embedder': variables['params']}
    if head is not None:
      params['head'] = head.init(train_lib.init_key(config.seed + 1), jnp.zeros((1, config.embedder.embedding_size)),
                                 jnp.zeros((1,), jnp.int32))['params']
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables['batch_stats'],
                         opt_state=tx.init(params), rng=jax.random.fold_in(rng, 2),
                         nonfinite_step=jnp.full((), -1, jnp.int32))

  abstract = jax.eval_shape(init)
  state_sharding = train_lib.state_shardings(abstract, mesh)
  step_fn = jax.jit(make_step(config, embedder, head, tx),
                    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  train_lib.record_run_config(config, workdir, 'pretrain_embedder')

  def on_start(start: int, writer) -> None:
    del writer
    console.say(f'Pretraining the embedder ({config.pretrain.head} head, {num_classes} identities, width '
                f'{config.embedder.width}) for {num_steps} steps' + (f' from step {start}' if start else '') + '.')

  state = loop.run(workdir, config.train, mesh=mesh,
                   iterator=pipeline.make_train_iterator(config, source, seed=config.seed), step_fn=step_fn,
                   abstract_state=checkpointing.abstract_like(abstract, state_sharding),
                   init_state=lambda: sharding.put_global(jax.jit(init)(), state_sharding), num_steps=num_steps,
                   prefix='embedder', on_start=on_start)
  variables = jax.device_get({'params': state.params['embedder'], 'batch_stats': state.batch_stats})
  variables = jax.tree.map(np.asarray, variables)
  embedder_store.save_embedder(out, variables, module_kwargs=kwargs,
                               source=f'pretrained by ipsr_jax on {source!r} ({config.pretrain.head} head, '
                                      f'{num_steps} steps)')
  console.say(f'Wrote the embedder to {out}')
  return out
