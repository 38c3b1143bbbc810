"""Identity-preserving SR training: the train state, the sharded step, and what the loop runs.

`train_and_evaluate(config, workdir)` runs the same code on a laptop CPU, one GPU or a TPU pod
slice: one jitted step over a (data, fsdp) mesh of every device of every host, driven by
`ipsr_jax.training.loop` (Orbax checkpoints with the Grain iterator state, so a resumed run sees
exactly the batches an uninterrupted run would; clu metric writers), with image summaries and
periodic evaluations as its periodic actions.
"""

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics

from ipsr_jax.runtime import checkpointing
from ipsr_jax import config as config_lib
from ipsr_jax.runtime import console
from ipsr_jax.runtime import environment
from ipsr_jax.training import losses
from ipsr_jax.training import loop
from ipsr_jax.runtime import paths
from ipsr_jax.runtime import sharding
from ipsr_jax.runtime import summaries
from ipsr_jax.data import degrade
from ipsr_jax.runtime import outputs
from ipsr_jax.data import pipeline
from ipsr_jax.data import sources
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.models import recognizers as recognizers_lib
from ipsr_jax.models import unet as unet_lib
from ipsr_jax.ops import frozen_conv
from ipsr_jax.ops import pixels as pixels_lib


RUN_CONFIG = 'config.json'  # what `inference.load_run_config` reads back
ENVIRONMENT_KEY = 'environment'  # config.json's record of the installed versions, not a setting


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array              # raw uint32 key; the step's key is fold_in(rng, step)
  nonfinite_step: jax.Array   # first step whose loss was not finite, -1 while all were


@flax.struct.dataclass
class EmaTrainState(TrainState):
  """The train state of a run with config.train.ema_decay > 0: TrainState plus `params_ema`, an
  exponential moving average of the generator's parameters (`ema_update`), sharded as `params`.
  A run without it keeps the plain TrainState, so its checkpoints hold exactly the same tree."""
  params_ema: Any


def ema_decay_of(train_config) -> float:
  """config.train.ema_decay; 0 (off) for configs saved before the key existed."""
  return float(train_config.get('ema_decay', 0.0))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The decay of the update after `step` earlier ones: min(decay, (1 + step) / (10 + step)), TF's
  ExponentialMovingAverage with num_updates. The warm-up keeps the random init out of the average:
  a plain 0.999 EMA still holds 0.999**800 = 45% of it after 800 steps; with it, the average spans
  about the last tenth of the steps until that reaches 1 / (1 - decay)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(params_ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """decay_t * params_ema + (1 - decay_t) * params, decay_t = ema_decay_at(step, decay)."""
  return optax.incremental_update(params, params_ema, 1.0 - ema_decay_at(step, decay))


def with_ema(state: TrainState, params_ema: Any) -> EmaTrainState:
  return EmaTrainState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)},
                       params_ema=params_ema)


def generator_variables(state: TrainState) -> dict:
  """The generator a run's state stands for: its EMA parameters when it keeps them (with the raw
  parameters' running BatchNorm statistics), else its parameters. Evaluation and image summaries
  take these; `Checkpointer.restore_model` reads the same generator back from a checkpoint."""
  params = state.params_ema if isinstance(state, EmaTrainState) else state.params
  return {'params': params, 'batch_stats': state.batch_stats}


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  pixel_mse: clu_metrics.Average.from_output('pixel_mse')
  identity: clu_metrics.Average.from_output('identity')
  cosine_similarity: clu_metrics.Average.from_output('cosine_similarity')
  features: clu_metrics.Average.from_output('features')
  grad_norm: clu_metrics.Average.from_output('grad_norm')


def compute_dtype(train_config) -> jnp.dtype:
  return jnp.bfloat16 if train_config.compute_dtype == 'bfloat16' else jnp.float32


def make_optimizer(train_config, num_steps: int) -> optax.GradientTransformation:
  lr = train_config.learning_rate
  if train_config.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(lr, num_steps)
  elif train_config.schedule == 'warmup_cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, train_config.warmup_steps, num_steps)
  if train_config.optimizer == 'adam':
    opt = optax.adam(lr, b1=train_config.b1, b2=train_config.b2, eps=train_config.eps)
  elif train_config.optimizer == 'adamw':
    opt = optax.adamw(lr, b1=train_config.b1, b2=train_config.b2, eps=train_config.eps,
                      weight_decay=train_config.weight_decay)
  else:
    opt = optax.sgd(lr, momentum=train_config.b1)
  if train_config.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), opt)
  return opt


def init_key(seed: int) -> jax.Array:
  """Key for parameter init. RBG: XLA:CPU compiles one threefry hash per kernel very slowly (a
  tiny UNet's init took 229 s to compile under load, 15 s with RBG). Init runs on one device, so
  RBG's sharding-dependence does not matter."""
  return jax.random.key(seed, impl='rbg')


def init_state(config, generator: unet_lib.UNet, tx: optax.GradientTransformation) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  size = config.model.image_size
  variables = generator.init(init_key(config.seed), jnp.zeros((1, size, size, 3)), train=False)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                     batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']),
                     rng=jax.random.fold_in(rng, 2), nonfinite_step=jnp.full((), -1, jnp.int32))
  # The EMA starts at the initial parameters (a copy: the step donates both trees' buffers).
  return with_ema(state, jax.tree.map(jnp.copy, state.params)) if ema_decay_of(config.train) else state


def generator_input(batch: dict, degrader: degrade.DeviceDegrader | None) -> jax.Array:
  """The bicubic-upsampled LR face in [-1, 1], degraded on the host or inside the step."""
  if degrader is None:
    return pixels_lib.from_pixels(batch['lr'])
  return pixels_lib.from_pixels(degrader(batch['hr'].astype(jnp.float32), batch['lr_index']))


def loss_recognizers(config, *, abstract: bool = False) -> dict[str, recognizers_lib.Recognizer]:
  """{name: Recognizer} of the identity term's recognizers other than FaceNet (config.embedder, the
  step's `embedder`), built from config.recognizers in loss.recognizers' order; `abstract`: their
  weights as shapes only (the ahead-of-time compile)."""
  known = recognizers_lib.entries(config)
  return {n: recognizers_lib.build(n, known[n], abstract=abstract)
          for n in losses.loss_recognizers(config.loss) if n != 'facenet'}


def make_embed_fn(embedder: Any, embedder_vars: Any, input_size: int,
                  recognizers: Mapping[str, recognizers_lib.Recognizer] | None = None,
                  recognizer_vars: Mapping[str, Any] | None = None, feature_layers: Sequence[str] = (),
                  names: Sequence[str] | None = None) -> Callable[[jax.Array], losses.Recognition]:
  """pixels -> a losses.Recognition: the unit embeddings of the identity term's recognizers by
  name, in `names`' order ('facenet' is `embedder`, the run's config.embedder; default: 'facenet'
  when there is an embedder, then `recognizers`), and the embedder's `feature_layers` (from the
  same forward pass). `embedder` may be None when neither needs it."""
  recognizers = dict(recognizers or {})
  if names is None:
    names = (('facenet',) if embedder is not None else ()) + tuple(recognizers)

  def embed(pixels):
    own, features = None, {}
    if embedder is not None and feature_layers:
      own, features = inception_resnet_v1.embed_with_features(embedder, embedder_vars, pixels,
                                                              tuple(feature_layers), input_size)
    elif embedder is not None and 'facenet' in names:
      own = inception_resnet_v1.embed_images(embedder, embedder_vars, pixels, input_size)
    embeddings = {n: own if n == 'facenet' else recognizers[n].embed(recognizer_vars[n], pixels)
                  for n in names}
    return losses.Recognition(embeddings, features)
  return embed


def frozen_embedder_variables(variables: Any) -> Any:
  """The frozen embedder's variables as the step reads them: with its convolutions' input-gradient
  kernels, computed once here instead of transposed on every step (ops/frozen_conv.py)."""
  return frozen_conv.with_input_grad_kernels(variables)


def train_step(state: TrainState, batch: dict, embedder_vars: Any, recognizer_vars: Any = None, *, config,
               generator, embedder, tx, degrader, mesh=None,
               recognizers=None) -> tuple[TrainState, TrainMetrics]:
  """One generator update on a global batch; the recognizers are frozen (the embedder's variables
  are an input, as are those of the other `recognizers` of the loss: `recognizer_vars`).

  With a `mesh` whose 'fsdp' axis is > 1 the parameters arrive split over it (`state_shardings`):
  the generator's layers gather each kernel where they use it and reduce-scatter its gradient to
  the same split (`ops/strided_conv.py`), so activations stay split over the batch, and the
  optimiser updates each device's slice. Left to itself, XLA's partitioner gathers
  activations over the whole global batch and all-reduces whole gradients (docs/scale.md).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  hr = pixels_lib.from_pixels(batch['hr'])
  lr = generator_input(batch, degrader)
  # Without an identity term (the feature term alone) the embedder's embedding still gives the
  # cosine-similarity metric: `names` None is FaceNet and the other recognizers.
  embed = (make_embed_fn(embedder, embedder_vars, config.embedder.input_size, recognizers, recognizer_vars,
                         losses.feature_layers(config.loss), names=losses.loss_recognizers(config.loss) or None)
           if embedder is not None or recognizers else None)
  fsdp = mesh is not None and mesh.shape['fsdp'] > 1

  def loss_fn(params):
    sr, updates = generator.apply({'params': params, 'batch_stats': state.batch_stats}, lr, train=True,
                                  rngs={'dropout': rng}, mutable=['batch_stats'])
    loss, terms = losses.ipsr_loss(sr, hr, embed, config.loss, key=jax.random.fold_in(rng, 1))
    return loss, (terms, updates['batch_stats'])

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if fsdp:
    grads = jax.lax.with_sharding_constraint(grads, sharding.param_sharding(grads, mesh))
  new_state = apply_if_finite(state, loss, grads, batch_stats, tx, ema_decay=ema_decay_of(config.train))
  terms = dict(terms, grad_norm=optax.global_norm(grads))
  terms.setdefault('identity', jnp.zeros(()))
  terms.setdefault('cosine_similarity', jnp.zeros(()))
  terms.setdefault('features', jnp.zeros(()))
  return new_state, TrainMetrics.single_from_model_output(**terms)


def apply_if_finite(state: TrainState, loss: jax.Array, grads: Any, batch_stats: Any,
                    tx: optax.GradientTransformation, ema_decay: float = 0.0) -> TrainState:
  """The optimiser update, then (an EmaTrainState) the parameter EMA's update towards the new
  parameters, unless this loss (or an earlier one) was not finite: then the state stays at its
  last good values and `nonfinite_step` records the step for the host's next check."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new = dict(step=state.step + 1, params=keep(params, state.params), batch_stats=keep(batch_stats, state.batch_stats),
             opt_state=keep(opt_state, state.opt_state),
             nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step,
                                      state.nonfinite_step))
  if isinstance(state, EmaTrainState):
    new['params_ema'] = keep(ema_update(state.params_ema, params, state.step, ema_decay), state.params_ema)
  return state.replace(**new)


def sr_apply(generator, variables, lr: jax.Array) -> jax.Array:
  """Inference-mode generator: [-1, 1] input -> [-1, 1] SR."""
  return generator.apply(variables, lr, train=False)


def state_shardings(abstract: TrainState, mesh) -> TrainState:
  """Where each leaf of the train state lives: parameters and optimiser state by
  `sharding.param_sharding` (split over 'fsdp' when it is > 1), the counters replicated."""
  return sharding.param_sharding(abstract, mesh).replace(
      step=sharding.replicated(mesh), rng=sharding.replicated(mesh), nonfinite_step=sharding.replicated(mesh))


def batch_spec(config, degrade_on_device: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global training batch, as `pipeline.make_train_iterator` yields it
  (the LR faces only when they are made on the host)."""
  b, size = config.train.batch_size, config.data.image_size
  spec = {'hr': jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8),
          'lr_index': jax.ShapeDtypeStruct((b,), jnp.int32), 'label': jax.ShapeDtypeStruct((b,), jnp.int32)}
  if not degrade_on_device:
    spec['lr'] = jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)
  return spec


class StepParts:
  """What the jitted step is made of, from the config alone: the generator, optimiser, frozen
  embedder module, degrader, the state's abstract shapes and shardings over `mesh`, and the jitted
  step. No weights are loaded and no device is touched, so `ipsr_jax.training.aot` builds the very step
  `Trainer` runs against a TPU/GPU topology this machine does not have."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, *, num_steps: int, embedder: Any,
               degrade_on_device: bool, recognizers: Mapping[str, Any] | None = None):
    self.config, self.mesh = config, mesh
    dtype = compute_dtype(config.train)
    self.generator = unet_lib.from_config(config.model, dtype=dtype, mesh=mesh)
    self.tx = make_optimizer(config.train, num_steps)
    self.embedder = embedder.clone(dtype=dtype) if embedder is not None else None
    self.degrader = (degrade.DeviceDegrader(config.data.lr_sizes, (config.data.image_size,) * 2,
                                            round_lr=config.data.round_lr) if degrade_on_device else None)
    abstract = jax.eval_shape(functools.partial(init_state, config, self.generator, self.tx))
    self.state_sharding = state_shardings(abstract, mesh)
    self.abstract_state = checkpointing.abstract_like(abstract, self.state_sharding)
    self.batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                       for k, v in batch_spec(config, degrade_on_device).items()}
    self.recognizers = dict(recognizers or {})
    step = functools.partial(train_step, config=config, generator=self.generator, embedder=self.embedder,
                             tx=self.tx, degrader=self.degrader, mesh=mesh, recognizers=self.recognizers)
    # (state, batch, embedder variables or None, the other recognizers' variables by name or None)
    self.train_step = jax.jit(step, in_shardings=(self.state_sharding, sharding.batch_sharding(mesh),
                                                  sharding.replicated(mesh), sharding.replicated(mesh)),
                              out_shardings=(self.state_sharding, sharding.replicated(mesh)),
                              donate_argnums=(0,))


class Trainer:
  """Builds everything a run needs from the config; `train_and_evaluate` drives it."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh, config.train.batch_size)
    sharding.check_batch_size(config.train.batch_size, self.mesh)
    self.source = sources.make_source(config.data, split=config.data.split)
    steps_per_epoch = max(1, len(self.source) // config.train.batch_size)
    self.num_steps = (config.train.num_train_steps if config.train.num_train_steps > 0 else
                      config.train.num_epochs * steps_per_epoch)
    module, self.embedder_vars, self.recognizers, self.recognizer_vars = None, None, {}, None
    if losses.uses_recognizer(config.loss):
      if losses.reads_embedder(config.loss):  # FaceNet in the identity term, or the feature term
        module, variables, self.embedder_info = embedder_store.load(config.embedder.checkpoint)
        self.embedder_vars = jax.jit(frozen_embedder_variables, out_shardings=sharding.replicated(self.mesh))(
            variables)
      self.recognizers = loss_recognizers(config)
      if self.recognizers:
        self.recognizer_vars = jax.device_put({n: r.params for n, r in self.recognizers.items()},
                                              sharding.replicated(self.mesh))
    parts = StepParts(config, self.mesh, num_steps=self.num_steps, embedder=module, recognizers=self.recognizers,
                      degrade_on_device=degrade.resolve_on_device(
                          config.data.degrade_on_device, degradation=config.data.get('degradation', 'bicubic')))
    self.generator, self.tx, self.embedder, self.degrader = parts.generator, parts.tx, parts.embedder, parts.degrader
    self.state_sharding, self.abstract_state = parts.state_sharding, parts.abstract_state
    self.train_step = parts.train_step
    self._sr = jax.jit(functools.partial(sr_apply, self.generator))

  def step_inputs(self) -> tuple[Any, Any]:
    """The frozen recognizers' variables `train_step` takes after (state, batch)."""
    return self.embedder_vars, self.recognizer_vars

  def initial_state(self) -> TrainState:
    init = functools.partial(init_state, self.config, self.generator, self.tx)
    return sharding.put_global(jax.jit(init)(), self.state_sharding)

  def initialised_from(self, state: TrainState, run_dir: str) -> TrainState:
    """`state` with the generator (params, batch_stats) of another run's newest readable
    checkpoint (its parameter EMA when it keeps one, as `restore_model` gives): fine-tuning starts
    from a trained generator, with this run's fresh optimiser state and step 0 (and, with an EMA
    of its own, an EMA starting there). The run's model must have this config's shapes."""
    restored = checkpointing.Checkpointer(paths.resolve(run_dir), read_only=True).restore_generator(
        sharding=sharding.replicated(self.mesh))
    step, variables = restored.step, restored.variables
    want = {'params': state.params, 'batch_stats': state.batch_stats}
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(v.shape)
                           for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, need = shapes(variables), shapes(want)
    if have != need:
      diff = sorted(k for k in set(have) | set(need) if have.get(k) != need.get(k))
      shown = '; '.join(f'{k}: {have.get(k)} there, {need.get(k)} here' for k in diff[:3])
      raise ValueError(f'--config.train.init_from={run_dir}: its generator does not fit this config.model '
                       f'({len(diff)} arrays differ: {shown}); use the model settings of its config.json.')
    console.say(f'Generator initialised from {run_dir} (its step {step}, {restored.weights} weights); '
                'optimiser state fresh.')
    state = state.replace(params=jax.device_put(variables['params'], self.state_sharding.params),
                          batch_stats=jax.device_put(variables['batch_stats'], self.state_sharding.batch_stats))
    if isinstance(state, EmaTrainState):  # the EMA starts at the initial parameters, as in init_state
      state = state.replace(params_ema=jax.device_put(jax.tree.map(jnp.copy, variables['params']),
                                                      self.state_sharding.params_ema))
    return state

  def image_summary(self, state: TrainState, hr: np.ndarray) -> np.ndarray:
    """Rows: per LR size, the bicubic input, the SR output; last row HR."""
    hr = np.asarray(hr[:8])
    rows = []
    variables = generator_variables(state)
    for lr_hw in self.config.train.image_summary_lr_sizes:
      lr = degrade.degrade(hr, tuple(lr_hw), hr.shape[1:3], round_lr=self.config.data.round_lr)
      sr = self._sr(variables, pixels_lib.from_pixels(jnp.asarray(lr)))
      rows += [lr, np.asarray(pixels_lib.round_to_uint8(pixels_lib.to_pixels(sr)))]
    return summaries.image_grid(rows + [hr])


def record_run_config(config: ml_collections.ConfigDict, workdir: str, mode: str) -> None:
  """Writes `<workdir>/config.json`; resuming, first checks it against the saved one.

  Before any checkpoint is touched: a field that shapes the checkpoints (`config.RESUME_LOCKED`)
  that differs stops the run with both values (ConfigError); other differences are said on the
  terminal and in log.txt, and config.json then holds the new values. Beside the config, its
  `environment` entry records the installed versions the run used (`ipsr_jax.runtime.environment`).
  """
  path = os.path.join(workdir, RUN_CONFIG)
  if checkpointing.has_checkpoints(workdir) and os.path.exists(path):
    saved = paths.read_json(path)
    saved.pop(ENVIRONMENT_KEY, None)
    changes = config_lib.resume_changes(saved, config, mode, workdir)
    if changes:
      console.say('Resuming with changed settings: ' +
                  '; '.join(f'{k} {json.dumps(a)} -> {json.dumps(b)}' for k, a, b in changes))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    document = {**config.to_dict(), ENVIRONMENT_KEY: environment.installed_versions()}
    # A kill mid-write must not leave a torn config.json.
    with outputs.atomic_path(path) as partial, open(partial, 'w', encoding='utf-8') as f:
      f.write(json.dumps(document, indent=2, sort_keys=True, default=str))


def check_checkpoint_ema(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Before a resume reads anything: the newest checkpoint's state must hold a parameter EMA
  exactly when config.train.ema_decay keeps one. config.json's lock on the key catches most
  changes; this one also catches runs whose config.json predates the key."""
  if not checkpointing.has_checkpoints(workdir):
    return
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step()
  try:
    has_ema = step is not None and checkpointing.PARAMS_EMA in ckpt.state_fields(step)
  except Exception:  # pylint: disable=broad-except  (unreadable: the restore names it, tries older ones)
    return
  finally:
    ckpt.manager.close()
  decay = ema_decay_of(config.train)
  if step is None or has_ema == bool(decay):
    return
  if decay:
    raise config_lib.ConfigError(
        f'config.train.ema_decay={decay}: the checkpoints in {workdir} hold no parameter EMA (the run had '
        f'train.ema_decay=0). Nothing was changed: resume with --config.train.ema_decay=0, or start a new '
        f'--workdir from its generator with --config.train.init_from={workdir}.')
  raise config_lib.ConfigError(
      f'config.train.ema_decay=0: the checkpoints in {workdir} hold a parameter EMA. Nothing was changed: '
      f'resume with the run\'s train.ema_decay (its config.json), or use a new --workdir.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_fn: Callable[[int, dict], dict] | None = None) -> TrainState:
  """Trains (resuming from the newest checkpoint in workdir) and returns the final state."""
  trainer = Trainer(config, workdir)
  if evaluate_fn is None and config.train.eval_every_steps and config.evals:
    from ipsr_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    evaluate_fn = evaluator.make_periodic_evaluator(config, workdir)
  check_checkpoint_ema(config, workdir)
  record_run_config(config, workdir, 'train')
  t = config.train

  def init() -> TrainState:
    state = trainer.initial_state()
    return trainer.initialised_from(state, t.init_from) if t.get('init_from') else state

  def on_start(start: int, writer) -> None:
    if trainer.embedder is not None and not start:
      writer.write_texts(0, {'embedder': str(trainer.embedder_info)})
    if trainer.recognizers and not start:
      writer.write_texts(0, {'recognizers': ', '.join(r.display for r in trainer.recognizers.values())})
    logging.info('Training %d steps from step %d on %d devices (%s), global batch %d.', trainer.num_steps, start,
                 jax.device_count(), jax.devices()[0].platform, t.batch_size)
    console.say(f'Training {trainer.num_steps} steps' + (f' from step {start}' if start else '') +
                f' on {jax.device_count()} {jax.devices()[0].platform} device(s), global batch '
                f'{t.batch_size}; {workdir}')

  def image_summary(step: int, state: TrainState, batch: dict, writer) -> None:
    grid = trainer.image_summary(state, batch_host_hr(batch))
    writer.write_images(step, {'lr_sr_hr': grid[None]})
    if jax.process_index() == 0:
      summaries.save_png(os.path.join(workdir, 'images', f'step_{step:08d}.png'), grid)

  def evaluate(step: int, state: TrainState, batch: dict, writer) -> None:
    del batch
    writer.write_scalars(step, evaluate_fn(step, generator_variables(state)))

  actions = [loop.Periodic(t.image_summary_every_steps, image_summary)]
  if evaluate_fn is not None:
    actions.append(loop.Periodic(t.eval_every_steps, evaluate, at_last=False, after_progress=True))
  return loop.run(
      workdir, t, mesh=trainer.mesh, iterator=pipeline.make_train_iterator(config, trainer.source, seed=config.seed),
      step_fn=lambda state, batch: trainer.train_step(state, batch, *trainer.step_inputs()),
      abstract_state=trainer.abstract_state, init_state=init, num_steps=trainer.num_steps, prefix='train',
      metric_names=('train/loss', 'train/pixel_mse', 'train/identity', 'train/cosine_similarity')
      + (('train/features',) if config.loss.get('feature_weight', 0.0) else ()),
      on_start=on_start, actions=actions)


def batch_host_hr(batch: dict) -> np.ndarray:
  """The HR images of a global batch that this host can see (its addressable shards)."""
  shards = batch['hr'].addressable_shards
  return np.concatenate([np.asarray(s.data) for s in sorted(shards, key=lambda s: s.index[0].start or 0)])
