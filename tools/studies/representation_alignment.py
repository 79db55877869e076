"""Representation alignment with MDT's masking, trained alike on digits.

Every (seed, variant) runs the project's training loop with the learning-speed study's model and
recipe; a variant sets ``mask_branch`` and ``config.align``'s method and branches (the study's
``variants`` table), the other alignment settings are the study's ``align``. The REPA teacher is
the digits' stand-in for DINOv2 (`studies.digits_teacher`: a small ViT of DINOv2's architecture
trained as a digits classifier, not the evaluation classifier nor anything trained from it),
trained once per invocation into a temporary folder with the study's ``teacher`` settings.

Scores, from the EMA weights every ``eval_every_steps`` and at the last step: Frechet distance
in the digits classifier's feature space and class accuracy (`learning_curves.DigitsScorer`,
one compiled sampler per model structure: the projector's width differs by method).

    from studies import representation_alignment as ra, alignment_report
    results = ra.run_study(study_config, 'docs/representation_alignment')   # the .json
    alignment_report.write(results, 'docs/representation_alignment')        # .png and .md
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Callable

import jax
import ml_collections
from absl import logging
import numpy as np
from flax import nnx

from mdt_jax import atomic
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.models.params import count_params
from mdt_jax.training.run import as_run, validate
from studies import curves, digits_teacher, learning_curves as lc

RESULTS_VERSION = 1
VARIANT_SETTINGS = ('branches', 'mask_branch', 'method')


def variant_config(
    study: ml_collections.ConfigDict, variant: str, seed: int, teacher: str = ''
) -> ml_collections.ConfigDict:
  """The training config of one run: ``train`` with the seed, the variant's masked branch and
  alignment (the study's ``align`` settings, the variant's method and branches, ``teacher``
  the REPA teacher's folder)."""
  if variant not in study.variants:
    raise ValueError(f'variant must be one of {sorted(study.variants)}, got {variant!r}')
  v = study.variants[variant]
  c = ml_collections.ConfigDict(study.train.to_dict())
  c.seed, c.mask_branch = int(seed), bool(v.mask_branch)
  c.align.update(study.align.to_dict())
  c.align.update(method=v.method, branches=v.branches)
  if v.method == 'repa':
    c.align.teacher = teacher
  return c


def teacher_config(study: ml_collections.ConfigDict) -> digits_teacher.TeacherConfig:
  return dataclasses.replace(
      digits_teacher.TeacherConfig(), seed=int(study.teacher.seed), epochs=int(study.teacher.epochs)
  )


def digits_teacher_folder(config: digits_teacher.TeacherConfig, root: str) -> tuple[str, dict]:
  """(the REPA teacher's DINOv2 folder under ``root``, what it is: its settings, parameter count
  and held-out accuracy). Trained once per teacher config: a later invocation (a resumed study)
  reads the folder its first one wrote."""
  settings = dataclasses.asdict(config)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  folder = os.path.join(root, f'digits_teacher_{key}')
  info_path = folder + '.json'
  if os.path.isdir(folder) and os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if info.get('settings') == settings:
      logging.info('the REPA teacher of %s: %s', settings, folder)
      return folder, info
  model, accuracy = digits_teacher.train(config)
  digits_teacher.save_backbone(model, folder, accuracy, overwrite=True)
  state = nnx.state(model.backbone, nnx.Param)
  info = {
      'settings': settings,
      **settings,
      'num_params': int(sum(np.prod(v.shape) for v in jax.tree.leaves(state))),
      'test_accuracy': accuracy,
  }
  atomic.write_json(info_path, info)
  return folder, info


def enable_compilation_cache(path: str) -> None:
  """Compiled programs kept on disk: the seeds of a variant compile the same train step (kept
  as it is when a cache is set already)."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def check_study(study: ml_collections.ConfigDict, teacher: str) -> None:
  """Refuse a study that cannot run, before any training starts (``teacher``: the REPA
  teacher's folder, which the aligned configs are validated with)."""
  lc.check_variants(study, VARIANT_SETTINGS)
  seeds = list(study.seeds)
  for variant in study.variants:
    validate(variant_config(study, variant, seeds[0], teacher))
  lc.check_study(
      ml_collections.ConfigDict(
          dict(study.to_dict(), train=variant_config(study, study.baseline, seeds[0]).to_dict())
      )
  )


def masked_branch_pairs(study: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(variant aligning the plain branch only, variant aligning both branches) of the same
  method and masked branch: the comparison that answers what the masked branch's alignment
  adds."""
  vs = study.variants
  return [
      (a, b)
      for a in vs
      for b in vs
      if vs[a].branches == 'plain'
      and vs[b].branches == 'both'
      and vs[a].method == vs[b].method
      and vs[a].mask_branch == vs[b].mask_branch
  ]


def run_study(
    study: ml_collections.ConfigDict,
    out: str,
    *,
    fresh: bool = False,
    workdir_root: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
  """Train the REPA teacher, then every (seed, variant), writing ``out``.json after each run
  (`learning_curves.study_loop`: an interrupted study resumes unless ``fresh``)."""
  variants = list(study.variants)
  root = workdir_root or tempfile.gettempdir()
  teacher, info = digits_teacher_folder(teacher_config(study), root)
  enable_compilation_cache(os.path.join(root, 'compilation_cache'))
  check_study(study, teacher)
  configs = {v: variant_config(study, v, study.seeds[0], teacher) for v in variants}
  head = {
      'num_params': {v: count_params(as_run(c).model) for v, c in configs.items()},
      'teacher': info,
  }

  def make_run(classifier: dc.DigitsClassifier):
    scorers: dict[str, lc.DigitsScorer] = {}

    def run(variant: str, seed: int) -> dict:
      key = repr(as_run(configs[variant]).model)  # one sampler per model structure
      if key not in scorers:
        scorers[key] = lc.DigitsScorer(study, classifier, train=configs[variant])
      config = variant_config(study, variant, seed, teacher)
      r = lc.run_one(study, variant, seed, scorers[key], workdir_root, config=config)
      v = study.variants[variant]
      r.update(method=v.method, branches=v.branches)
      return r

    return run

  def finish(runs: list[dict]) -> dict:
    return {
        'summary': curves.summarize(runs, list(study.seeds), variants, study.baseline),
        'masked_branch_pairs': masked_branch_pairs(study),
    }

  return lc.study_loop(
      study,
      out,
      variants,
      make_run,
      version=RESULTS_VERSION,
      head=head,
      finish=finish,
      fresh=fresh,
      progress=progress,
  )


def finished_seeds(runs: list[dict], variants, seeds) -> list[int]:
  """The seeds every variant has finished, in the study's order."""
  done = {(r['variant'], r['seed']) for r in runs}
  return [s for s in seeds if all((v, s) in done for v in variants)]


def partial_results(study: ml_collections.ConfigDict, out: str) -> dict:
  """The results of a study still running or interrupted (``out``.json of the same config),
  summarised over the seeds every variant has finished (``finished_seeds`` in the results)."""
  path = out + '.json'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: no run of the study has finished yet')
  with open(path) as f:
    results = json.load(f)
  if results.get('version') != RESULTS_VERSION or results.get('study') != lc.study_record(study):
    raise ValueError(f'{path} was written with another study config')
  variants = list(study.variants)
  seeds = finished_seeds(results['runs'], variants, list(study.seeds))
  if not seeds:
    raise ValueError(f'{path}: no seed is finished for every variant yet')
  results['runs'] = [r for r in results['runs'] if r['seed'] in seeds]
  results['finished_seeds'] = seeds
  results['summary'] = curves.summarize(results['runs'], seeds, variants, study.baseline)
  results['masked_branch_pairs'] = masked_branch_pairs(study)
  return results
