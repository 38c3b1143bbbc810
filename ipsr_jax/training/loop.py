"""The training loop both trainers run: the generator's (`train.py`) and the embedder's.

`run` owns everything around the jitted step: restoring the newest checkpoint or initialising,
putting the next batch on the devices while the current step runs, the clu metric writer (resumed
runs keep one metrics.jsonl row per step), the progress lines, the finite-loss check, periodic and
final checkpoints, and stopping on SIGTERM or Ctrl-C after a save (`Preempted`, exit code 75 in
`ipsr_jax.main`). A trainer brings its state, its step and its `Periodic` actions (image
summaries, evaluations).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
from clu import metrics as clu_metrics

from ipsr_jax.runtime import checkpointing
from ipsr_jax.runtime import console
from ipsr_jax.runtime import preemption as preemption_lib
from ipsr_jax.runtime import sharding
from ipsr_jax.runtime import summaries

# state, global batch -> new state, this step's metrics
StepFn = Callable[[Any, dict], tuple[Any, clu_metrics.Collection]]
# step, state after it, its global batch, the metric writer
ActionFn = Callable[[int, Any, dict, Any], None]


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`fn(step, state, batch, writer)` after every `every_steps`-th step (0: never).

  `at_last`: True also runs it after the last step, False never does (the caller handles the final
  state). `after_progress`: run after the step's progress line (an evaluation, whose own lines
  follow that step's) instead of before the step's checkpoint (an image summary of the state saved).
  """
  every_steps: int
  fn: ActionFn
  at_last: bool = True
  after_progress: bool = False

  def due(self, step: int, last: bool) -> bool:
    if not self.every_steps:
      return False
    return (step % self.every_steps == 0 or last) if self.at_last else (step % self.every_steps == 0 and not last)


def prefetch(iterator, mesh) -> Iterator[tuple[dict, Any]]:
  """Yields (global device batch, iterator state after it): the next batch is put on the devices
  while the current step runs."""
  pending = None
  while True:
    batch = next(iterator)
    state = iterator.get_state()
    current = (sharding.to_global(batch, mesh), state)
    if pending is not None:
      yield pending
    pending = current


def check_finite(state: Any, ckpt: checkpointing.Checkpointer) -> None:
  """Raises NonFiniteLossError when `state.nonfinite_step` records a step whose loss was not finite."""
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    last = ckpt.latest_step()
    kept = (f'The last checkpoint (step {last}, before that step) is kept and restorable' if last is not None
            else 'No checkpoint was written before that step')
    raise NonFiniteLossError(
        f'Non-finite loss at step {bad + 1}: training stopped. {kept}; lower train.learning_rate or set '
        'train.grad_clip_norm, then run again.')


def run(workdir: str, train_config, *, mesh, iterator, step_fn: StepFn, abstract_state: Any,
        init_state: Callable[[], Any], num_steps: int, prefix: str,
        metric_names: tuple[str, ...] | None = None, on_start: Callable[[int, Any], None] | None = None,
        actions: Sequence[Periodic] = ()) -> Any:
  """Trains from the newest checkpoint in `workdir` (or `init_state()`) to `num_steps`; returns the
  final state.

  Args:
    workdir: the run's folder (checkpoints, metrics.jsonl, TensorBoard events).
    train_config: `config.train` (log, checkpoint and profile intervals, checkpoints kept).
    mesh: the device mesh the step runs on; batches are put on it.
    iterator: a Grain-checkpointable iterator of host batches (`pipeline.make_train_iterator`).
    step_fn: the jitted step, (state, global batch) -> (state, clu metrics of the step).
    abstract_state: shapes, dtypes and shardings of the state, to restore a checkpoint onto.
    init_state: the state of a fresh run (placed on the devices).
    num_steps: the step to train to.
    prefix: metrics are written as `<prefix>/<name>`.
    metric_names: the metrics the progress lines show (None: all).
    on_start: `on_start(start_step, writer)` once the state is ready, before the first step.
    actions: `Periodic` actions (image summaries, evaluations).

  Raises:
    NonFiniteLossError: a loss was not finite (the last checkpoint before it is kept).
    preemption.Preempted: SIGTERM or Ctrl-C stopped the run after saving its step.
  """
  t = train_config
  ckpt = checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints)
  consumed = checkpointing.ConsumedIteratorState(iterator)
  if ckpt.latest_step() is not None:
    _, state = ckpt.restore(abstract_state, consumed)
  else:
    state = init_state()
  start = int(jax.device_get(state.step))
  writer = summaries.create_writer(workdir, resume_step=start)
  if on_start is not None:
    on_start(start, writer)
  hooks = [summaries.periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                     every_steps=t.log_every_steps)]
  if t.profile_steps and jax.process_index() == 0:
    hooks.append(summaries.periodic_actions.Profile(num_profile_steps=t.profile_steps, first_profile=start + 10,
                                                    logdir=workdir))
  before_save = [a for a in actions if not a.after_progress]
  after_progress = [a for a in actions if a.after_progress]
  batches = prefetch(consumed.iterator, mesh)
  progress = console.TrainProgress(num_steps, 'step', start=start, metric_names=metric_names)
  metrics = None
  step = start
  try:
    with preemption_lib.Preemption() as preemption, mesh, progress:
      while step < num_steps:
        batch, iter_state = next(batches)
        state, step_metrics = step_fn(state, batch)
        consumed.state = iter_state
        step += 1
        metrics = step_metrics if metrics is None else metrics.merge(step_metrics)
        for hook in hooks:
          hook(step)
        last = step == num_steps
        logged = None
        if step % t.log_every_steps == 0 or last:
          check_finite(state, ckpt)
          logged = {f'{prefix}/{k}': v for k, v in metrics.compute().items()}
          writer.write_scalars(step, logged)
          metrics = None
        for action in before_save:
          if action.due(step, last):
            action.fn(step, state, batch, writer)
        stopping = preemption.poll()
        final = last or stopping
        saved = step % t.checkpoint_every_steps == 0 or final
        if saved:
          check_finite(state, ckpt)
          ckpt.save(step, state, consumed, force=True)
          if final:
            ckpt.wait()  # the last line says 'saved' only once the save is confirmed complete
        progress.step(step, logged, checkpoint=('saved' if final else 'started') if saved else '')
        for action in after_progress:
          if action.due(step, last):
            action.fn(step, state, batch, writer)
        writer.flush()
        if stopping:
          break
  finally:
    ckpt.close()  # waits for an async save in flight
    writer.close()
  if step < num_steps:
    preemption.stop(step)
  return state
