"""The learning-speed study's variants and metrics, and the statistics of its curves over seeds:
per-variant mean and spread, and where each variant reaches the baseline's final quality.
Plain numbers in, plain numbers out (the reports read them without loading the training code)."""

from __future__ import annotations

import numpy as np

VARIANTS = {'mdt': True, 'dit': False}  # name -> config.mask_branch
BASELINE = 'dit'
METRICS = {'fd': 'lower', 'class_accuracy': 'higher'}  # which way is better


def seed_stats(a: np.ndarray) -> dict:
  """Mean, standard deviation (n - 1; 0 for one seed), min and max over axis 0."""
  std = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1:])
  return {
      'mean': a.mean(axis=0).tolist(),
      'std': std.tolist(),
      'min': a.min(axis=0).tolist(),
      'max': a.max(axis=0).tolist(),
  }


def crossing(values, target: float, better: str) -> float | None:
  """Fractional index where ``values`` first reach ``target`` (linear between evaluations);
  None if never. ``better`` is 'lower' or 'higher'."""
  v = np.asarray(values, np.float64)
  ok = v <= target if better == 'lower' else v >= target
  hits = np.flatnonzero(ok & np.isfinite(v))
  if hits.size == 0:
    return None
  i = int(hits[0])
  if i == 0 or v[i] == v[i - 1] or not np.isfinite(v[i - 1]):
    return float(i)
  return i - 1 + float((target - v[i - 1]) / (v[i] - v[i - 1]))


def _at(xs, frac: float | None) -> float | None:
  return None if frac is None else float(np.interp(frac, np.arange(len(xs)), xs))


def summarize(runs: list[dict], seeds, variants=VARIANTS, baseline: str = BASELINE) -> dict:
  """Per-variant mean and spread over seeds, and when each reaches the baseline's final quality."""
  summary, reach = {}, {}
  for variant in variants:
    mine = sorted((r for r in runs if r['variant'] == variant), key=lambda r: r['seed'])
    if [r['seed'] for r in mine] != sorted(seeds):
      raise ValueError(
          f'{variant}: runs for seeds {[r["seed"] for r in mine]}, expected {sorted(seeds)}'
      )
    steps = mine[0]['steps']
    if any(r['steps'] != steps for r in mine):
      raise ValueError(f'{variant}: the seeds were evaluated at different steps')
    s = {
        'steps': steps,
        'train_seconds': seed_stats(np.array([r['train_seconds'] for r in mine])),
        'seconds_per_step': seed_stats(np.array([[r['seconds_per_step']] for r in mine])),
        'cpu_seconds_per_step': seed_stats(np.array([[r['cpu_seconds_per_step']] for r in mine])),
        'wall_seconds': float(sum(r['wall_seconds'] for r in mine)),
    }
    for m in METRICS:
      s[m] = seed_stats(np.array([r[m] for r in mine], np.float64))
    summary[variant] = s
  for m, better in METRICS.items():
    target = summary[baseline][m]['mean'][-1]
    reach[m] = {'target': target, 'better': better}
    for variant in variants:
      s = summary[variant]
      secs = s['train_seconds']['mean']
      frac = crossing(s[m]['mean'], target, better)
      per_seed = [
          _at(r['steps'], crossing(r[m], target, better))
          for r in sorted(runs, key=lambda r: r['seed'])
          if r['variant'] == variant
      ]
      reach[m][variant] = {
          'step': _at(s['steps'], frac),
          'train_seconds': _at(secs, frac),
          'per_seed_steps': per_seed,
      }
  return {'variants': summary, 'reach_baseline_final': reach}
