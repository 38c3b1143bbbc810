"""The one training loop: a toy step through it (resume, preemption, actions, finite check), and
both trainers driving their steps through it."""

import inspect
import os
import signal
import threading

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics

from configs import base
from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import preemption
from ipsr_jax.runtime import sharding
from ipsr_jax.runtime import summaries
from ipsr_jax.training import embedder_train
from ipsr_jax.training import loop
from ipsr_jax.training import train


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: jax.Array
  nonfinite_step: jax.Array


@flax.struct.dataclass
class ToyMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')


def _toy_step(state, batch, rate=0.1):
  """One SGD step of (w - x)^2 on the batch; a non-finite loss freezes the state, as the trainers' do."""
  loss, grad = jax.value_and_grad(lambda w: jnp.mean((w - batch['x']) ** 2))(state.params)
  ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
  return state.replace(step=state.step + 1, params=jnp.where(ok, state.params - rate * grad, state.params),
                       nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step,
                                                state.nonfinite_step)), ToyMetrics.single_from_model_output(loss=loss)


def _toy_config(**overrides):
  config = base.get_config('tiny').train
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.update(overrides)
  return config


def _toy_run(workdir, values=None, step=_toy_step, **kwargs):
  """loop.run over the toy step on one device: batches {'x': [value]} of `values` (default 0, 1, ...)."""
  mesh = sharding.make_mesh(base.get_config('tiny').mesh, 1)
  values = np.arange(100, dtype=np.float32) if values is None else np.asarray(values, np.float32)
  iterator = iter(grain.MapDataset.source(values).map(lambda v: {'x': np.full((1,), v, np.float32)})
                  .to_iter_dataset())
  init = lambda: ToyState(step=jnp.zeros((), jnp.int32), params=jnp.zeros(()),
                          nonfinite_step=jnp.full((), -1, jnp.int32))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init))
  config = kwargs.pop('train_config', _toy_config())
  return loop.run(str(workdir), config, mesh=mesh, iterator=iterator, step_fn=jax.jit(step),
                  abstract_state=checkpointing.abstract_like(jax.eval_shape(init), shardings),
                  init_state=lambda: jax.device_put(init(), shardings), num_steps=config.num_train_steps,
                  prefix='toy', **kwargs)


def _sigterm_at_batch(monkeypatch, index):
  """Sends this process SIGTERM as the loop takes batch `index` (0-based) of its run."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers need the main thread')
  prefetch = loop.prefetch

  def prefetch_then_sigterm(iterator, mesh):
    for i, item in enumerate(prefetch(iterator, mesh)):
      if i == index:
        os.kill(os.getpid(), signal.SIGTERM)
      yield item

  monkeypatch.setattr(loop, 'prefetch', prefetch_then_sigterm)


def _rows(workdir, name):
  return {r['step']: r[name] for r in summaries.read_metrics(str(workdir)) if name in r}


def test_preempted_run_saves_stops_and_resumes_to_the_same_result(tmp_path, monkeypatch, capfd):
  handler = signal.getsignal(signal.SIGTERM)
  straight = _toy_run(tmp_path / 'straight')
  assert int(straight.step) == 6
  with monkeypatch.context() as patch:
    _sigterm_at_batch(patch, 1)
    with pytest.raises(preemption.Preempted, match='at step 2; checkpoint 2 is saved') as stopped:
      _toy_run(tmp_path / 'resumed')
  assert stopped.value.signal_name == 'SIGTERM'
  assert 'Warning: SIGTERM received: saving a checkpoint and stopping.' in capfd.readouterr().err
  assert checkpointing.Checkpointer(str(tmp_path / 'resumed'), read_only=True).all_steps() == [2]
  resumed = _toy_run(tmp_path / 'resumed')  # the same call again: from step 2, batches 2.. as before
  assert float(resumed.params) == float(straight.params)
  assert _rows(tmp_path / 'resumed', 'toy/loss') == _rows(tmp_path / 'straight', 'toy/loss')
  assert signal.getsignal(signal.SIGTERM) is handler  # the loop put the handler back


def test_actions_run_on_their_steps_in_order(tmp_path):
  calls = []
  log = lambda name: lambda step, state, batch, writer: calls.append((name, step, int(state.step),
                                                                      float(batch['x'][0])))
  starts = []
  _toy_run(tmp_path, on_start=lambda start, writer: starts.append(start),
           actions=[loop.Periodic(4, log('summary')), loop.Periodic(2, log('eval'), at_last=False, after_progress=True),
                    loop.Periodic(0, log('never'))])
  assert starts == [0]
  assert calls == [('eval', 2, 2, 1.0), ('summary', 4, 4, 3.0), ('eval', 4, 4, 3.0), ('summary', 6, 6, 5.0)]


def test_nonfinite_loss_stops_the_loop(tmp_path):
  values = np.arange(100, dtype=np.float32)
  values[4] = np.inf  # the fifth step's loss
  config = _toy_config(checkpoint_every_steps=2)
  with pytest.raises(loop.NonFiniteLossError, match=r'Non-finite loss at step 5: training stopped. The last '
                     r'checkpoint \(step 4, before that step\) is kept'):
    _toy_run(tmp_path, values, train_config=config)
  assert checkpointing.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2, 4]


class _Called(Exception):
  pass


def test_both_trainers_step_only_through_loop_run(tmp_path, monkeypatch):
  """The generator's and the embedder's trainers hand their step to `loop.run`, and neither
  writes a loop of its own (no writer, checkpoint save, signal handling or progress lines)."""
  calls = []

  def fake_run(workdir, train_config, **kwargs):
    calls.append((workdir, kwargs))
    raise _Called

  monkeypatch.setattr(loop, 'run', fake_run)
  config = base.get_config('tiny')
  config.loss.identity_weight = 0.0  # no embedder to load
  with pytest.raises(_Called):
    train.train_and_evaluate(config, str(tmp_path / 'generator'))
  config.mode = 'pretrain_embedder'
  config.embedder.width = 0.125
  with pytest.raises(_Called):
    embedder_train.train_embedder(config, str(tmp_path / 'embedder'))
  assert [(w, k['prefix'], k['num_steps']) for w, k in calls] == [
      (str(tmp_path / 'generator'), 'train', 6), (str(tmp_path / 'embedder'), 'embedder', 6)]
  for module in (train, embedder_train):
    source = inspect.getsource(module)
    for primitive in ('create_writer', 'Preemption(', 'TrainProgress(', '.save(', 'prefetch(', 'check_finite('):
      assert primitive not in source, (module.__name__, primitive)
