"""The training loop: data -> sharded train step -> metrics, checkpoints, sample grids and
evaluations (mdt_jax/training/evaluation.py)."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from typing import Callable, Sequence

import jax
import ml_collections
from absl import logging

from mdt_jax.data import pipeline
from mdt_jax.data.device_prefetch import DevicePrefetch
from mdt_jax.images import grid_image
from mdt_jax.training import checkpoints, cost, evaluation, logdir, samples, sharding, strategies
from mdt_jax.training import run_summary, train_metrics
from mdt_jax.training.lock import WorkdirLock
from mdt_jax.training.run import RunConfig, as_run, stored_features
from mdt_jax.training.state import TrainState, create_train_state, make_optimizer
from mdt_jax.training.step import jit_step_from_config


class Preemption:
  """Preemption notices (SIGTERM), turned into a step at which to save and stop.

  One process: a SIGTERM handler sets a flag the loop reads at step boundaries. Several
  processes: JAX's distributed preemption service catches the notice on whichever hosts get it
  and agrees with all of them on one step to stop at (``reached_preemption_sync_point``), so
  every process takes part in the same final checkpoint.
  """

  def __init__(self):
    self.requested = False
    self.multihost = jax.process_count() > 1
    self._old = None

  def __enter__(self):
    if not self.multihost:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the end of this step')
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process."""
    if self.multihost:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning('preemption notice: every process saves and stops at step %d', step)
        return True
      return False
    return self.requested

  def notice_pending(self) -> bool:
    """A notice this process has seen (one process only: several must agree on a sync step, so
    work they share, such as an evaluation, is not abandoned on one alone)."""
    return self.requested and not self.multihost

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _check_finite(host_metrics: list[dict], first_step: int, last_good: int | None) -> None:
  for i, m in enumerate(host_metrics):
    loss = float(m['loss'])
    if not math.isfinite(loss):
      raise FloatingPointError(
          f'loss is {loss} at step {first_step + i}; training stopped. The last good checkpoint '
          f'(step {last_good}) is untouched; lower the learning rate or check the data.'
      )


StepCallback = Callable[[int, TrainState], None]
PROFILE_AFTER_STEPS = 2  # --profile: the first profiled step is the run's first step + this


def train_and_evaluate(
    config: RunConfig | ml_collections.ConfigDict,
    workdir: str,
    *,
    callbacks: Sequence[StepCallback] = (),
    devices: Sequence[jax.Device] | None = None,
) -> dict:
  """Train (resuming from the workdir's latest checkpoint) and return the last logged metrics.

  ``callbacks`` are called as ``cb(step, state)`` after every step (e.g. an evaluation); the next
  step donates the state's buffers, so a callback must not keep references to them. ``devices``:
  the devices of the run's mesh (default: all); a checkpoint resumes on any mesh. ``config``: the
  run (`mdt_jax.training.run.validate`), or a config to validate.
  """
  with WorkdirLock(workdir) as workdir_lock:  # one writer per workdir (mdt_jax/training/lock.py)
    return _train(config, workdir, workdir_lock, callbacks, devices)


def _train(config, workdir, workdir_lock, callbacks, devices) -> dict:
  run = as_run(config, check_data=True)
  loop = run.loop
  strategy = cost.resolve(dict(run.mesh.shape), run.model, loop.global_batch_size, devices)
  mesh = strategies.make_mesh(strategy, devices)
  dp = sharding.data_parallel_size(mesh)
  if loop.global_batch_size % dp:
    raise ValueError(
        f'global_batch_size {loop.global_batch_size} is not divisible by the '
        f'data-parallel size {dp} (mesh {dict(mesh.shape)})'
    )
  checkpoints.check_workdir(workdir, run)
  # Evaluation files (reference, Inception, VAE) are checked before any work starts.
  evaluator = evaluation.Evaluator(run, workdir) if run.evaluation.num_samples else None
  batch_sh = sharding.batch_sharding(mesh)
  reader = pipeline.make_iterator(
      run.data, seed=loop.seed, global_batch=loop.global_batch_size, align=stored_features(run)
  )
  source = run.data.path or run.data.name

  def place(batch):
    return pipeline.to_global(pipeline.check_batch(batch, run.model.num_classes, source), batch_sh)

  data_iter = DevicePrefetch(reader, place, run.data.device_prefetch)
  optimizer = make_optimizer(run.optimizer)
  state, shardings, graphdef = create_train_state(
      run.model, optimizer, loop.seed, mesh, run.mesh.rules, strategy.state_axes
  )
  workdir_lock.acquire()  # before the first write
  ckpt = checkpoints.Checkpointer(
      workdir, keep=loop.keep_checkpoints, async_save=loop.async_checkpointing
  )
  last_saved = ckpt.latest_step()
  if last_saved is not None:
    logging.info('resuming from step %d', last_saved)
    state = ckpt.restore(state, shardings, data_iter, last_saved)
  checkpoints.write_config(workdir, run)
  layout = strategies.step_layout(strategy, run.model, mesh, run.mesh.rules, shardings.params)
  step_fn = jit_step_from_config(
      run, shardings, batch_sh, graphdef=graphdef, optimizer=optimizer, layout=layout
  )

  writer, log_dir = logdir.create_writer(
      workdir, just_logging=jax.process_index() > 0, kind=loop.metric_writer
  )
  total = loop.total_steps
  start = int(state.step)
  run_summary.write_run_start(writer, run.config(), state.params, start)
  # The window opens PROFILE_AFTER_STEPS into this run, past the compiling first step, so that a
  # resumed run is profiled too.
  profile = logdir.ProfileWindow(
      log_dir,
      after=start + PROFILE_AFTER_STEPS,
      steps=loop.profile_steps if jax.process_index() == 0 else 0,
  )
  grids = samples.GridSampler(run, graphdef)
  if evaluator:
    evaluator.attach(grids, writer)
    evaluator.resume(start)
  pending, pending_from, logged = [], start + 1, {}
  t_log, n_log = time.perf_counter(), 0
  # closing: a run stopped by an error still finishes the checkpoint being written (and the trace)
  with contextlib.closing(ckpt), contextlib.closing(profile), Preemption() as preempt:
    if evaluator and evaluator.missing(start):  # interrupted before it was recorded
      logged.update(evaluator(start, state.ema_params, preempt.notice_pending) or {})
    for step in range(start + 1, total + 1):
      batch = next(data_iter)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      n_log += 1
      profile(step)
      for cb in callbacks:
        cb(step, state)
      stop = preempt.should_stop(step)  # read once: the save and the exit below must agree
      save_now = step % loop.checkpoint_every_steps == 0 or step == total or stop
      if step % loop.log_every_steps == 0 or save_now:
        host = jax.device_get(pending)
        _check_finite(host, pending_from, last_saved)
        dt = time.perf_counter() - t_log
        logged = train_metrics.reduce_steps(host)
        logged.update(steps_per_sec=n_log / dt, images_per_sec=n_log * loop.global_batch_size / dt)
        writer.write_scalars(step, logged)
        _log_progress(step, total, logged['steps_per_sec'])
        pending, pending_from, t_log, n_log = [], step + 1, time.perf_counter(), 0
      if save_now:
        ckpt.save(state, data_iter, step)
        last_saved = step
        writer.flush()  # the events so far reach the workdir with every checkpoint
      if evaluator and not stop and evaluator.due(step):
        result = evaluator(step, state.ema_params, preempt.notice_pending)
        if result is None:  # abandoned for a preemption notice: save, stop
          stop = True
          if not save_now:
            ckpt.save(state, data_iter, step)
            last_saved = step
        elif step == total:
          logged.update(result)
      if loop.sample_every_steps and (step % loop.sample_every_steps == 0 or step == total):
        write_sample_grid(grids, state, workdir, step, writer)
      if stop:
        logging.warning('stopping at step %d after the preemption checkpoint', step)
        break
  writer.close()
  return {'step': int(state.step), **logged, 'state': state}


def _log_progress(step: int, total: int, steps_per_sec: float) -> None:
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else math.inf
  logging.info(
      'step %d of %d (%.1f%%), %.3g steps/s, %s to go',
      step,
      total,
      100 * step / total,
      steps_per_sec,
      f'{eta / 60:.1f} min' if math.isfinite(eta) else 'unknown time',
  )


def write_sample_grid(grids: samples.GridSampler, state, workdir: str, step: int, writer) -> None:
  """A class-conditional grid from the EMA weights: PNG in workdir/samples and TensorBoard."""
  images = grids.grid(state.ema_params)
  if images is None or jax.process_index() != 0:
    return
  ncols = grids.run.grid.per_class
  path = samples.save(images, workdir, step, ncols)
  writer.write_images(step, {'samples': grid_image(images, ncols)[None]})
  logging.info('wrote %s', path)
