"""Evaluation during training: the EMA weights' guided samples, scored every N steps.

``eval_num_samples`` samples (labels 0, 1, ..., num_classes - 1 repeated: class-balanced; noise
seed 1) are drawn with the config's sampler, sharded over every device, at every
``eval_every_steps``-th step and at the last step. Digits runs score them with the digits
classifier (Frechet distance of its features, class accuracy; 16x16 samples, or 8x8 ones, the
dataset's own resolution, upsampled as the dataset makes its 16x16 images); latent runs decode them with the
run's VAE and compute FID, sFID, precision and recall with the JAX FID Inception against
``eval_reference`` (a statistics file of ``python -m mdt_jax.evaluate --save_stats`` or an ADM
reference batch). Results go to TensorBoard, to ``eval_history.json`` (every evaluation) and,
for the last step, to ``eval.json``.

Preemption: an evaluation runs after the step's checkpoint is saved; a preemption notice during
a latent-run evaluation abandons it between batches (the loop then saves and stops). On resume an
evaluation that is due at the restored step and missing from the history is run first, and
history entries past the restored step (from a lost future) are dropped. An evaluation that
fails (an error, not a preemption) is logged and recorded in the history with its error; the
training goes on.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from etils import epath

from mdt_jax import atomic, paths
from mdt_jax.evaluation import evaluator, features, inception, metrics
from mdt_jax.sampling import postprocess
from mdt_jax.training import eval_metrics, samples
from mdt_jax.training.run import RunConfig

HISTORY_FILE = 'eval_history.json'
FINAL_FILE = 'eval.json'
EVAL_SEED = 1  # the sampling noise of every evaluation (as samples.evaluate_digits)


class Cancelled(Exception):
  """An evaluation abandoned for a preemption notice."""


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
  return (np.arange(n) % num_classes).astype(np.int32)


class InceptionScorer:
  """uint8 images -> FID / sFID / precision / recall against reference statistics."""

  def __init__(self, reference: str, weights: str, batch_size: int = 64):
    if not os.path.isfile(weights):
      raise FileNotFoundError(
          f'eval: no FID Inception weights at {weights}; write them with `python '
          f'tools/convert_inception.py --out {weights}` or set eval_inception'
      )
    evaluator.reference_kind(reference)  # refuses a file that is no reference
    self.reference, self.weights, self.batch_size = reference, weights, batch_size
    self._extractor = self._ref = self._fp = None

  def _setup(self):
    if self._extractor is None:
      model = inception.load_inception(self.weights)
      self._fp = inception.weights_fingerprint(self.weights)
      self._extractor = features.FeatureExtractor(model, self.batch_size)
      self._ref = evaluator.reference_statistics(
          self.reference, self._extractor, self._fp, progress=False
      )
    return self._extractor, self._ref

  def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
    extractor, _ = self._setup()
    return extractor(iter([images]), len(images), 'eval samples', False)

  def score(self, feats: dict[str, np.ndarray]) -> dict:
    _, ref = self._setup()
    stats = evaluator.statistics_from_features(feats, self._fp)
    out = {'fid': float('nan'), 'sfid': float('nan')}
    if ref.mu is not None:
      out['fid'] = metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
      out['sfid'] = metrics.frechet_distance(stats.mu_s, stats.sigma_s, ref.mu_s, ref.sigma_s)
    if ref.pool is not None and len(ref.pool) > 3 and stats.num_images > 3:
      out['precision'], out['recall'] = metrics.precision_recall(ref.pool, feats['pool'], 3)
    return eval_metrics.whole_set(out)


class Evaluator:
  """Evaluates the EMA weights at the due steps and keeps the history (see the module doc)."""

  def __init__(self, run: RunConfig, workdir: str, scorer: InceptionScorer | None = None):
    """Checks the reference, the Inception weights and the VAE before any training (`validate`
    checked the settings); `attach` gives it the run's sampler and metric writer."""
    self.run, self.grids, self.writer = run, None, None
    self.n, self.every = run.evaluation.num_samples, run.evaluation.every_steps
    self.total = run.loop.total_steps
    self.digits = run.data.pixels
    self.history_path = epath.Path(workdir) / HISTORY_FILE
    self.final_path = epath.Path(workdir) / FINAL_FILE
    self.history = self._read_history()
    self.postprocess = self.scorer = None
    if not self.digits:  # fail now, not after hours of training
      data = postprocess.ModelData(space='latent', vae=run.data.vae)
      self.postprocess = postprocess.make_postprocess(data)
      self.scorer = scorer or InceptionScorer(
          paths.resolve(run.evaluation.reference),
          paths.resolve(run.evaluation.inception or paths.default_inception_weights()),
      )

  def attach(self, grids: samples.GridSampler, writer) -> None:
    self.grids, self.writer = grids, writer

  # ----------------------------------------------------------------- history

  def _read_history(self) -> list[dict]:
    if not self.history_path.exists():
      return []
    try:
      return list(json.loads(self.history_path.read_text())['evaluations'])
    except (ValueError, KeyError, TypeError) as e:
      logging.warning('unreadable %s (%s): starting a new evaluation history', self.history_path, e)
      return []

  def _write_history(self) -> None:
    if jax.process_index() != 0:
      return
    # never a half-written history
    atomic.write_json(str(self.history_path), {'evaluations': self.history}, indent=1)

  def resume(self, step: int) -> None:
    """Forget evaluations past the restored step: those steps are trained again."""
    kept = [e for e in self.history if e['step'] <= step]
    if len(kept) != len(self.history):
      self.history = kept
      self._write_history()

  def due(self, step: int) -> bool:
    return (
        self.n > 0
        and step > 0
        and (step == self.total or bool(self.every and step % self.every == 0))
    )

  def missing(self, step: int) -> bool:
    """Due at `step` and not in the history (an evaluation a preemption interrupted)."""
    return self.due(step) and all(e['step'] != step for e in self.history)

  # ----------------------------------------------------------------- evaluating

  def __call__(
      self, step: int, ema_params, cancel: Callable[[], bool] = lambda: False
  ) -> dict | None:
    """Evaluate, log and record; None if `cancel` said to stop first."""
    t0 = time.perf_counter()
    try:
      if self.digits:
        result = samples.evaluate_digits(self.grids, ema_params, self.n, seed=EVAL_SEED)
      else:
        result = self._inception_metrics(ema_params, cancel)
    except Cancelled:
      logging.warning('evaluation at step %d abandoned for the preemption notice', step)
      return None
    except Exception as e:  # noqa: BLE001 - a failed evaluation must not end the training
      logging.exception('evaluation at step %d failed; training goes on', step)
      self._record(step, {'error': f'{type(e).__name__}: {e}'})
      return {}
    result['eval_seconds'] = time.perf_counter() - t0
    self.writer.write_scalars(
        step, {k: v for k, v in result.items() if k != 'eval_num_samples' and v is not None}
    )
    # eval.json before the history: a run killed between the two finds the evaluation missing
    # from the history on resume and runs it again, writing both (the other order would leave a
    # history that says done and no eval.json)
    if step == self.total and jax.process_index() == 0:
      atomic.write_text(str(self.final_path), json.dumps({'step': step, **result}, indent=2))
    self._record(step, result)
    logging.info('evaluation at step %d: %s', step, result)
    return result

  def _record(self, step: int, entry: dict) -> None:
    self.history = [e for e in self.history if e['step'] != step] + [{'step': step, **entry}]
    self.history.sort(key=lambda e: e['step'])
    self._write_history()

  def _inception_metrics(self, ema_params, cancel: Callable[[], bool]) -> dict:
    labels = balanced_labels(self.n, self.run.model.num_classes)
    chunk = max(8, min(self.n, 256))
    feats = []
    for lo in range(0, self.n, chunk):
      if cancel():
        raise Cancelled()
      x = self.grids.samples(ema_params, labels[lo : lo + chunk], EVAL_SEED, start=lo)
      if not np.isfinite(x).all():
        logging.warning('non-finite samples: evaluation metrics recorded as NaN')
        return {
            'fid': float('nan'),
            'sfid': float('nan'),
            'precision': None,
            'recall': None,
            'eval_num_samples': self.n,
        }
      feats.append(self.scorer.features(self.postprocess(x)))
    if cancel():
      raise Cancelled()
    return {**self.scorer.score(eval_metrics.collect(feats)), 'eval_num_samples': self.n}
