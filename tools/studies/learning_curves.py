"""Learning speed: MDTv2 (masked branch on) vs the DiT-style baseline, trained alike on digits.

For every seed both variants run the project's training loop (``train_and_evaluate``) with the
same config apart from ``mask_branch``: same model (the baseline never calls the masked branch or
the side-interpolater), same initial weights, data order, batch and steps. A step callback
evaluates the EMA weights at regular intervals: guided samples of a fixed label set, their
Frechet distance in the digits classifier's feature space and their class accuracy. It also
times the training alone: the clock starts after the first (compiling) step and evaluations
are taken out.

    from studies import learning_curves as lc, learning_report
    results = lc.run_study(study_config, 'docs/learning_speed')   # writes the .json
    learning_report.write(results, 'docs/learning_speed')         # the .png and the .md

The statistics over seeds are `studies.curves`'s, the report `studies.learning_report`'s.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from mdt_jax.configs_base import model_of
from mdt_jax import atomic
from mdt_jax.data.digits import load_digits_images
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.models.params import abstract_model, count_params
from mdt_jax.training.run import as_run, validate
from mdt_jax.training.loop import train_and_evaluate
from mdt_jax.training.samples import GridSampler, sampler_config
from mdt_jax.training.state import TrainState
from studies.curves import METRICS, VARIANTS, summarize

RESULTS_VERSION = 1


# ------------------------------------------------------------------------------------- configs


def variant_config(
    study: ml_collections.ConfigDict, variant: str, seed: int
) -> ml_collections.ConfigDict:
  """The training config of one run: the study's ``train`` with the seed and mask_branch set."""
  if variant not in VARIANTS:
    raise ValueError(f'variant must be one of {sorted(VARIANTS)}, got {variant!r}')
  c = ml_collections.ConfigDict(study.train.to_dict())
  c.seed = int(seed)
  c.mask_branch = VARIANTS[variant]
  return c


def eval_labels(n: int) -> np.ndarray:
  """The fixed label set: 0..9 repeated (balanced up to n % 10)."""
  return (np.arange(n) % dc.NUM_CLASSES).astype(np.int32)


def check_seeds(study: ml_collections.ConfigDict) -> None:
  seeds = list(study.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or any(int(s) != s or s < 0 for s in seeds):
    raise ValueError(f'seeds must be distinct non-negative integers, got {study.seeds!r}')


def check_variants(study: ml_collections.ConfigDict, settings: tuple[str, ...]) -> None:
  """A variant study's seeds, its baseline among the variants, and every variant setting
  exactly ``settings``."""
  check_seeds(study)
  if study.baseline not in study.variants:
    raise ValueError(
        f'baseline {study.baseline!r} is not one of the variants {sorted(study.variants)}'
    )
  for variant, v in study.variants.items():
    if set(v.keys()) != set(settings):
      raise ValueError(f'variant {variant!r} must set exactly {settings}, got {sorted(v.keys())}')


def check_study(study: ml_collections.ConfigDict) -> None:
  """Refuse a study that cannot run, before any training starts."""
  check_seeds(study)
  if int(study.eval_every_steps) <= 0:
    raise ValueError(f'eval_every_steps must be positive, got {study.eval_every_steps}')
  if int(study.eval_num_samples) < 2:
    raise ValueError(
        f'eval_num_samples must be >= 2 (a Frechet distance needs 2 images), got '
        f'{study.eval_num_samples}'
    )
  train = study.train
  if train.data.name != 'digits':
    raise ValueError(
        f'the study evaluates with the digits classifier: train.data.name must be '
        f"'digits', got {train.data.name!r}"
    )
  size = dc.TrainConfig().size
  if train.model.input_size != size or train.model.in_channels != 1:
    raise ValueError(
        f'the digits classifier takes {size}x{size}x1 images; got '
        f'train.model.input_size={train.model.input_size}, '
        f'in_channels={train.model.in_channels}'
    )
  if train.model.mask_ratio is None:
    raise ValueError('train.model.mask_ratio is None: the MDT variant needs a mask ratio')
  for variant in VARIANTS:
    validate(variant_config(study, variant, study.seeds[0]))
  sampler_config(train)  # raises on bad sampler settings


def study_record(study: ml_collections.ConfigDict) -> dict:
  """The study config as plain JSON values (what a results file is matched against)."""
  return json.loads(study.to_json_best_effort())


# ---------------------------------------------------------------------------------- evaluation


class DigitsScorer:
  """EMA weights -> guided samples of the fixed label set -> Frechet distance, class accuracy.

  One sampler (one compilation) serves every run of the study: the model structure is the same,
  only the weights are swapped in.
  """

  def __init__(
      self,
      study: ml_collections.ConfigDict,
      classifier: dc.DigitsClassifier,
      train: ml_collections.ConfigDict | None = None,
  ):
    train = study.train if train is None else train  # model and sampler settings
    # the run's model: with config.align on, its projector too (the EMA weights carry it)
    graphdef, _ = nnx.split(abstract_model(as_run(train).model))
    self.grids = GridSampler(train, graphdef)  # sampler settings: train.sampling
    self.labels = eval_labels(int(study.eval_num_samples))
    self.seed = int(study.eval_seed)
    self.classifier = classifier

  def __call__(self, ema_params) -> dict:
    x = self.grids.samples(ema_params, self.labels, self.seed)
    if not np.isfinite(x).all():
      logging.warning('non-finite samples: metrics recorded as NaN')
      return {'fd': float('nan'), 'class_accuracy': float('nan')}
    x = np.clip(x, -1.0, 1.0)
    return {
        'fd': dc.digits_frechet_distance(x, classifier=self.classifier),
        'class_accuracy': dc.class_accuracy(x, self.labels, classifier=self.classifier),
    }


def data_reference(study: ml_collections.ConfigDict, classifier: dc.DigitsClassifier) -> dict:
  """What real data scores with the same number of images: the floor of the Frechet distance
  (it is biased upwards at small sizes) and the classifier's held-out accuracy."""
  images, _ = load_digits_images(classifier.config.size)
  n = min(int(study.eval_num_samples), len(images))
  pick = np.random.default_rng(0).choice(len(images), n, replace=False)
  return {
      'fd_real_images': dc.digits_frechet_distance(images[pick], classifier=classifier),
      'num_real_images': n,
      'classifier_test_accuracy': classifier.test_accuracy,
  }


class CurveRecorder:
  """Step callback: evaluates every ``every`` steps and at the last, and times the training.

  train_seconds at step s is the wall-clock time of steps 2..s without the evaluations: step 1
  (which compiles) and the setup before it are recorded apart as startup_seconds.
  train_cpu_seconds is the same span in CPU time of this process (all its threads): less
  sensitive to other jobs on a shared machine than the wall-clock.
  """

  def __init__(self, evaluate: Callable[[dict], dict], every: int, total: int):
    self.evaluate, self.every, self.total = evaluate, int(every), int(total)
    self.rows: list[dict] = []
    self.t_created = time.perf_counter()
    self.t_first = self.cpu_first = None
    self.startup_seconds = 0.0
    self.eval_seconds = self.eval_cpu_seconds = 0.0

  def __call__(self, step: int, state: TrainState) -> None:
    if self.t_first is None:
      jax.block_until_ready(state)
      self.t_first, self.cpu_first = time.perf_counter(), time.process_time()
      self.startup_seconds = self.t_first - self.t_created
    if step % self.every and step != self.total:
      return
    jax.block_until_ready(state)
    t, cpu = time.perf_counter(), time.process_time()
    train_seconds = t - self.t_first - self.eval_seconds
    train_cpu_seconds = cpu - self.cpu_first - self.eval_cpu_seconds
    metrics = self.evaluate(state.ema_params)
    dt = time.perf_counter() - t
    self.eval_seconds += dt
    self.eval_cpu_seconds += time.process_time() - cpu
    self.rows.append(
        {
            'step': step,
            'train_seconds': train_seconds,
            'train_cpu_seconds': train_cpu_seconds,
            'eval_seconds': dt,
            **metrics,
        }
    )
    logging.info(
        'step %d: %s (train %.1f s, eval %.1f s)',
        step,
        ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()),
        train_seconds,
        dt,
    )


# ------------------------------------------------------------------------------------- runs


def run_one(
    study: ml_collections.ConfigDict,
    variant: str,
    seed: int,
    evaluate: Callable,
    workdir_root: str | None = None,
    config: ml_collections.ConfigDict | None = None,
    callbacks=(),
) -> dict:
  """Train one variant for one seed in a temporary workdir; its curve and timings.

  ``config`` replaces ``variant_config``'s; ``callbacks`` run after the curve's (e.g. a sampler
  sweep at the last step, while the weights exist)."""
  config = variant_config(study, variant, seed) if config is None else config
  t0, load0 = time.perf_counter(), os.getloadavg()
  recorder = CurveRecorder(evaluate, study.eval_every_steps, config.total_steps)
  with tempfile.TemporaryDirectory(prefix=f'lc_{variant}_{seed}_', dir=workdir_root) as wd:
    out = train_and_evaluate(config, wd, callbacks=[recorder, *callbacks])
  rows = recorder.rows
  if not rows or rows[-1]['step'] != config.total_steps:
    raise RuntimeError(
        f'run {variant}/seed {seed} stopped before step {config.total_steps} '
        f'(evaluated steps: {[r["step"] for r in rows]})'
    )
  run = {
      'variant': variant,
      'seed': int(seed),
      'mask_branch': bool(config.mask_branch),
      **{
          k: [r[k] for r in rows]
          for k in ('step', 'train_seconds', 'train_cpu_seconds', 'eval_seconds', *METRICS)
      },
  }
  run['steps'] = run.pop('step')
  run.update(
      startup_seconds=recorder.startup_seconds,
      seconds_per_step=rows[-1]['train_seconds'] / max(config.total_steps - 1, 1),
      cpu_seconds_per_step=rows[-1]['train_cpu_seconds'] / max(config.total_steps - 1, 1),
      wall_seconds=time.perf_counter() - t0,
      final_loss=float(out['loss']) if 'loss' in out else None,
      load_average_start=load0[0],
      load_average_end=os.getloadavg()[0],
  )
  return run


def load_previous(
    path: str, study: ml_collections.ConfigDict, version: int = RESULTS_VERSION
) -> list[dict]:
  """Finished runs of an earlier invocation with the same study config (else none)."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    old = json.load(f)
  if old.get('version') != version or old.get('study') != study_record(study):
    logging.warning('%s was written with another study config: starting afresh', path)
    return []
  return old.get('runs', [])


def environment() -> dict:
  return {
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'niceness': os.nice(0),
  }


def open_study(
    study: ml_collections.ConfigDict, out: str, fresh: bool, version: int = RESULTS_VERSION
) -> tuple[str, list[dict], dc.DigitsClassifier]:
  """(``out``.json, the finished runs it holds for the same study config unless ``fresh``, the
  digits classifier that scores the samples)."""
  path = out + '.json'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  runs = [] if fresh else load_previous(path, study, version)
  if runs:
    logging.info('resuming: %d finished runs in %s', len(runs), path)
  return path, runs, dc.load_digits_classifier(seed=int(study.classifier_seed))


def run_all(
    study: ml_collections.ConfigDict,
    variants,
    results: dict,
    path: str,
    run: Callable[[str, int], dict],
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
  """``run(variant, seed)`` for every pair not in ``results['runs']`` yet, writing ``path`` after
  each. The variants alternate within each seed, so slow spells of a shared machine fall on all
  alike. ``progress`` is called with the results after each run."""
  runs = results['runs']
  for seed in study.seeds:
    for variant in variants:
      if any(r['variant'] == variant and r['seed'] == seed for r in runs):
        continue
      logging.info('training %s, seed %d', variant, seed)
      runs.append(run(variant, seed))
      results['study_seconds'] = float(sum(r['wall_seconds'] for r in runs))
      atomic.write_json(path, results, indent=1)
      if progress:
        progress(results)
  results['study_seconds'] = float(sum(r['wall_seconds'] for r in runs))
  return runs


def study_loop(
    study: ml_collections.ConfigDict,
    out: str,
    variants,
    make_run: Callable[[dc.DigitsClassifier], Callable[[str, int], dict]],
    *,
    version: int,
    head: dict,
    finish: Callable[[list[dict]], dict],
    fresh: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> dict:
  """The resumable seed x variant loop of every study: ``make_run(classifier)`` gives
  ``run(variant, seed)`` -> the run's dict; ``out``.json is written after each run, with the
  study config, ``head`` (e.g. parameter counts), the machine and the real-data reference;
  ``finish(runs)``'s entries (the summaries) are added at the end. Runs already in ``out``.json
  for the same study config and ``version`` are kept (an interrupted study resumes) unless
  ``fresh``. Returns the results."""
  path, runs, classifier = open_study(study, out, fresh, version)
  run = make_run(classifier)
  results = {
      'version': version,
      'study': study_record(study),
      **head,
      'environment': environment(),
      'reference': data_reference(study, classifier),
      'runs': runs,
  }
  run_all(study, list(variants), results, path, run, progress)
  results.update(finish(runs))
  atomic.write_json(path, results, indent=1)
  return results


def run_study(
    study: ml_collections.ConfigDict,
    out: str,
    *,
    fresh: bool = False,
    workdir_root: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
  """Train every (seed, variant), write ``out``.json after each run; return the results
  (``study_loop``: an interrupted study resumes unless ``fresh``)."""
  check_study(study)

  def make_run(classifier):
    scorer = DigitsScorer(study, classifier)
    return lambda variant, seed: run_one(study, variant, seed, scorer, workdir_root)

  return study_loop(
      study,
      out,
      VARIANTS,
      make_run,
      version=RESULTS_VERSION,
      head={'num_params': count_params(model_of(study.train.model.to_dict()))},
      finish=lambda runs: {'summary': summarize(runs, list(study.seeds))},
      fresh=fresh,
      progress=progress,
  )
