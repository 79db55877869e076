"""Flow matching vs DDPM with MDT's masking, trained alike on digits.

Every (seed, variant) runs the project's training loop with the learning-speed study's model and
recipe (configs/learning_curves.py); a variant sets the objective and the masked branch. Two
measurements per run, both from the EMA weights, on the same fixed, class-balanced label set:

* curves over training steps: every ``eval_every_steps`` and at the last step, with the
  objective's curve sampler (``curve_samplers``; equal model evaluations for both);
* at the last step, a sweep over samplers and their number of model evaluations
  (``final_samplers``, "name:steps").

Scores: Frechet distance in the digits classifier's feature space and class accuracy (as
studies.learning_curves, whose run and curve machinery this reuses).

    from studies import flow_matching as fm, flow_report
    results = fm.run_study(study_config, 'docs/flow_matching')    # writes the .json
    flow_report.write(results, 'docs/flow_matching')              # the .png and the .md

The summaries over seeds (curves, sampler sweep, the target) are `studies.flow_report`'s.
"""

from __future__ import annotations

import time
from typing import Callable

import ml_collections
from absl import logging

from mdt_jax.configs_base import model_of
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.models.params import count_params
from studies import curves, learning_curves as lc
from studies.flow_report import summarize_sweep, target_check
from mdt_jax.training.run import validate
from mdt_jax.training.state import TrainState

RESULTS_VERSION = 1
OBJECTIVE_SETTINGS = ('objective', 'mask_branch')


# ------------------------------------------------------------------------------------- configs


def parse_sampler(spec: str) -> dict:
  """'heun:20' -> {'sampler': 'heun', 'steps': 20}."""
  name, _, steps = str(spec).partition(':')
  try:
    return {'sampler': name, 'steps': int(steps)}
  except ValueError:
    raise ValueError(f'sampler spec must be "name:steps" (e.g. "heun:20"), got {spec!r}') from None


def variant_config(
    study: ml_collections.ConfigDict, variant: str, seed: int, sampler: str | None = None
) -> ml_collections.ConfigDict:
  """The training config of one run: ``train`` with the seed, the variant's objective and mask
  branch, and the objective's curve sampler (or ``sampler``, "name:steps")."""
  if variant not in study.variants:
    raise ValueError(f'variant must be one of {sorted(study.variants)}, got {variant!r}')
  v = study.variants[variant]
  c = ml_collections.ConfigDict(study.train.to_dict())
  c.seed, c.mask_branch = int(seed), bool(v.mask_branch)
  if v.objective == 'flow':
    c.diffusion.update(objective='flow', min_snr_gamma=None, **study.flow.to_dict())
    c.model.learn_sigma = False
  elif v.objective != 'ddpm':
    raise ValueError(f'{variant}: objective must be "ddpm" or "flow", got {v.objective!r}')
  c.sampling.update(parse_sampler(sampler or study.curve_samplers[v.objective]))
  return c


def check_study(study: ml_collections.ConfigDict) -> None:
  """Refuse a study that cannot run, before any training starts."""
  lc.check_variants(study, OBJECTIVE_SETTINGS)
  seeds = list(study.seeds)
  for variant, v in study.variants.items():
    for spec in [None, *study.final_samplers[v.objective]]:
      validate(variant_config(study, variant, seeds[0], spec))  # the sampler fits, too
  # The learning-speed checks (digits, eval settings) on the baseline's config.
  lc.check_study(
      ml_collections.ConfigDict(
          dict(study.to_dict(), train=variant_config(study, study.baseline, seeds[0]).to_dict())
      )
  )


# ---------------------------------------------------------------------------------- evaluation


class DigitsScorers:
  """One `learning_curves.DigitsScorer` (one compiled sampler) per (objective, sampler), shared by
  every run: the model structure depends on the objective only; weights are swapped in."""

  def __init__(self, study: ml_collections.ConfigDict, classifier: dc.DigitsClassifier):
    self.study, self.classifier, self.cache = study, classifier, {}

  def get(self, variant: str, sampler: str | None = None) -> lc.DigitsScorer:
    v = self.study.variants[variant]
    spec = sampler or self.study.curve_samplers[v.objective]
    key = (v.objective, spec)
    if key not in self.cache:
      train = variant_config(self.study, variant, self.study.seeds[0], spec)
      self.cache[key] = lc.DigitsScorer(self.study, self.classifier, train=train)
    return self.cache[key]


class SamplerSweep:
  """Step callback: at the last step, every final sampler of the objective on the EMA weights."""

  def __init__(self, scorers: DigitsScorers, variant: str, total: int):
    self.scorers, self.variant, self.total = scorers, variant, int(total)
    objective = scorers.study.variants[variant].objective
    self.specs = list(scorers.study.final_samplers[objective])
    self.results: dict[str, dict] = {}

  def __call__(self, step: int, state: TrainState) -> None:
    if step != self.total:
      return
    for spec in self.specs:
      t0 = time.perf_counter()
      metrics = self.scorers.get(self.variant, spec)(state.ema_params)
      self.results[spec] = {
          **metrics,
          'model_evaluations': parse_sampler(spec)['steps'],
          'seconds': time.perf_counter() - t0,
      }
      logging.info('%s at step %d: %s', spec, step, metrics)


def run_one(
    study: ml_collections.ConfigDict,
    variant: str,
    seed: int,
    scorers: DigitsScorers,
    workdir_root: str | None = None,
) -> dict:
  """One run: its curve (learning_curves.run_one) and the final sampler sweep."""
  config = variant_config(study, variant, seed)
  sweep = SamplerSweep(scorers, variant, config.total_steps)
  run = lc.run_one(
      study, variant, seed, scorers.get(variant), workdir_root, config=config, callbacks=[sweep]
  )
  if sorted(sweep.results) != sorted(sweep.specs):
    raise RuntimeError(f'run {variant}/seed {seed}: the sampler sweep did not run')
  run.update(objective=study.variants[variant].objective, sweep=sweep.results)
  return run


def run_study(
    study: ml_collections.ConfigDict,
    out: str,
    *,
    fresh: bool = False,
    workdir_root: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
  """Train every (seed, variant), write ``out``.json after each run; return the results
  (`learning_curves.study_loop`: an interrupted study resumes unless ``fresh``)."""
  check_study(study)
  variants = list(study.variants)

  def make_run(classifier):
    scorers = DigitsScorers(study, classifier)
    return lambda variant, seed: run_one(study, variant, seed, scorers, workdir_root)

  def finish(runs):
    sweep = summarize_sweep(runs, variants)
    return {
        'summary': curves.summarize(runs, list(study.seeds), variants, study.baseline),
        'sweep': sweep,
        'target': target_check(sweep, study),
    }

  num_params = {
      v: count_params(model_of(variant_config(study, v, 0).model.to_dict())) for v in variants
  }
  return lc.study_loop(
      study,
      out,
      variants,
      make_run,
      version=RESULTS_VERSION,
      head={'num_params': num_params},
      finish=finish,
      fresh=fresh,
      progress=progress,
  )
