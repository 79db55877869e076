"""Inpainting study on the bundled digits: the general (RePaint-style) method, MDT's
side-interpolater method and sampling from scratch, on held-out digits with three masks.

The images are the fixed held-out 20% of the digits (``data.digits.split_indices``), which a
model trained with ``--config.data.split=train`` never saw. Masks: the lower half unknown, the
right half unknown, and a random half of the tokens unknown (one draw per image, the same for
every method and seed). Every method of one seed uses the same random draws (sampling from scratch
is inpainting with nothing known). Completions are scored by the digits classifier's accuracy on
the true class, by the Frechet distance of its features to the held-out originals, by the mean
absolute error on the known pixels and the RMSE on the unknown ones (against the original: a
completion may be right and still differ).

    from studies import inpainting, inpainting_report
    results = inpainting.run_study('runs/quickstart', 'docs/inpainting')   # writes the .json
    inpainting_report.write_report(results, 'docs/inpainting')           # the .png and the .md

The masks, images and metrics are `studies.inpainting_setup`'s; the summary over seeds and the
report `studies.inpainting_report`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import logging

from mdt_jax import atomic
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.diffusion import objective_of
from mdt_jax.hub.pretrained import load_for_sampling
from mdt_jax.sampling import inpaint as inp
from mdt_jax.sampling.config import make_sampler_config
from studies.inpainting_report import summarize
from studies.inpainting_setup import (
    CONDITIONS,
    EXAMPLES,
    MASKS,
    encode_examples,
    held_out,
    study_masks,
)

RESULTS_VERSION = 2


def score(
    completions: np.ndarray,
    originals: np.ndarray,
    labels: np.ndarray,
    known: np.ndarray,
    clf: dc.DigitsClassifier,
) -> dict:
  """The study's four numbers for one set of completions."""
  x = np.clip(completions, -1.0, 1.0)
  k = np.broadcast_to(known[..., None], x.shape)
  diff = x - originals
  return {
      'class_accuracy': float(np.mean(clf.predict(x) == labels)),
      'fd': float(dc.digits_frechet_distance(x, originals, clf)),
      'known_mae': float(np.abs(diff[k]).mean()) if k.any() else 0.0,
      'unknown_rmse': float(np.sqrt(np.mean(diff[~k] ** 2))) if (~k).any() else 0.0,
  }


def method_names(mdt_fractions) -> list[str]:
  return ['repaint'] + [f'mdt@{f:g}' for f in mdt_fractions] + ['scratch']


def inpaint_config(method: str) -> inp.InpaintConfig:
  if method == 'repaint':
    return inp.InpaintConfig(method='repaint')
  return inp.InpaintConfig(method='mdt', mdt_fraction=float(method.split('@')[1]))


def run_study(
    model_dir: str,
    out: str,
    *,
    seeds=(0, 1, 2),
    mdt_fractions=(0.5,),
    num_images: int | None = None,
    batch_size: int = 128,
    fresh: bool = False,
) -> dict:
  """Every (mask, method, seed) cell, written to OUT.json after each (a rerun skips done cells);
  the completions of the first seed's first examples are kept for the picture grid."""
  sm = load_for_sampling(model_dir)
  if sm.space != 'pixel' or sm.model.config.input_size != 16:
    raise ValueError(
        f'{model_dir}: the study needs a 16x16 pixel digits model (the quickstart), '
        f'got a {sm.space} model of size {sm.model.config.input_size}'
    )
  cfg = make_sampler_config(
      sm.sampling,
      sm.model.config.in_channels,
      int(sm.diffusion.get('num_timesteps', 1000)),
      objective_of(sm.diffusion),
  )
  images, labels = held_out(num_images)
  clf = dc.load_digits_classifier()
  methods = method_names(mdt_fractions)
  setup = dict(
      model=model_dir,
      sampler=cfg.record(),
      seeds=list(seeds),
      methods=methods,
      masks=list(MASKS),
      conditions=list(CONDITIONS),
      num_images=len(images),
      version=RESULTS_VERSION,
  )
  setup = json.loads(json.dumps(setup))
  results = _load(out + '.json', setup) if not fresh else None
  results = results or dict(
      setup=setup,
      cells={},
      examples={},
      environment=dict(devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}'),
  )
  results['reference'] = reference(images, labels, clf)
  num_classes = sm.model.config.num_classes
  for cond in CONDITIONS:
    runners = {}
    c = cfg if cond == 'class' else dataclasses.replace(cfg, cfg_scale=None)
    y = labels if cond == 'class' else np.full_like(labels, num_classes)
    for seed in seeds:
      for method in methods:
        for kind in MASKS:
          key = f'{cond}/{kind}/{method}/{seed}'
          if key in results['cells']:
            continue
          known = study_masks(kind, len(images), 16, sm.model.config.patch_size)
          t0 = time.time()
          x = _complete(runners, sm.model, c, method, images, known, y, seed, batch_size)
          cell = score(x, images, labels, known, clf)
          cell['seconds'] = round(time.time() - t0, 1)
          results['cells'][key] = cell
          if seed == seeds[0]:
            results['examples'][f'{cond}/{kind}/{method}'] = encode_examples(x[:EXAMPLES])
          logging.info('%s: %s', key, cell)
          _write_json(results, out + '.json')
  results['summary'] = summarize(results)
  _write_json(results, out + '.json')
  return results


def _complete(
    runners: dict, model, cfg, method: str, images, known, labels, seed: int, batch_size: int
) -> np.ndarray:
  """Completions by one method. From scratch is inpainting with nothing known (plain
  sampling with the same draws, as tests/test_inpaint.py checks); it serves every mask."""
  if 'inpaint' not in runners:  # one program for every method and switch point
    runners['inpaint'] = inp.build_inpainter(model, cfg, inpaint_config('repaint'))
  if method == 'scratch':
    if ('scratch', seed) not in runners:
      runners[('scratch', seed)] = inp.inpaint(
          runners['inpaint'], images, np.zeros_like(known), labels, seed=seed, batch_size=batch_size
      )
    return runners[('scratch', seed)]
  inpainter = runners['inpaint'].with_config(inpaint_config(method))
  return inp.inpaint(inpainter, images, known, labels, seed=seed, batch_size=batch_size)


def reference(images: np.ndarray, labels: np.ndarray, clf: dc.DigitsClassifier) -> dict:
  """The originals and the known pixels alone (unknown set to the background, -1)."""
  ref = {'originals_class_accuracy': float(np.mean(clf.predict(images) == labels))}
  for kind in MASKS:
    known = study_masks(kind, len(images), 16, 4)
    blank = np.where(known[..., None], images, -1.0).astype(np.float32)
    ref[f'{kind}/known_only'] = score(blank, images, labels, known, clf)
  return ref


def _load(path: str, setup: dict) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    old = json.load(f)
  return old if old.get('setup') == setup else None


def _write_json(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.write_json(path, results, indent=1)
