"""The inpainting study's summary over seeds and its report: the picture grid of examples (PNG)
and the tables (Markdown), written from its results dict."""

from __future__ import annotations

import itertools
import os

import numpy as np

from mdt_jax import atomic
from mdt_jax.images import grid_image, to_uint8
from studies.inpainting_setup import (
    CONDITIONS,
    MASK_TITLES,
    MASKS,
    METRICS,
    decode_examples,
    held_out,
    study_masks,
)


def summarize(results: dict) -> dict:
  """Mean and std over seeds of every (condition, mask, method) metric."""
  out = {}
  for cond, kind, method in itertools.product(
      CONDITIONS, results['setup']['masks'], results['setup']['methods']
  ):
    keys = [f'{cond}/{kind}/{method}/{s}' for s in results['setup']['seeds']]
    cells = [results['cells'][k] for k in keys if k in results['cells']]
    if cells:
      out[f'{cond}/{kind}/{method}'] = {
          m: dict(
              mean=float(np.mean([c[m] for c in cells])),
              std=float(np.std([c[m] for c in cells])),
              n=len(cells),
          )
          for m in METRICS
      }
  return out


def paired_differences(results: dict, metric: str) -> dict:
  """Per seed, metric(method) - metric(general method), for the MDT methods: the seeds share
  their draws across methods, so these differences are sharper than the spread over seeds."""
  out, seeds = {}, results['setup']['seeds']
  for cond, kind, method in itertools.product(
      CONDITIONS, results['setup']['masks'], results['setup']['methods']
  ):
    if method.startswith('mdt@'):
      out[f'{cond}/{kind}/{method}'] = [
          results['cells'][f'{cond}/{kind}/{method}/{s}'][metric]
          - results['cells'][f'{cond}/{kind}/repaint/{s}'][metric]
          for s in seeds
      ]
  return out


METHOD_TITLES = {'repaint': 'general (RePaint replacement)', 'scratch': 'from scratch'}


def method_title(method: str) -> str:
  if method.startswith('mdt@'):
    return f'MDT side-interpolater (first {float(method[4:]):.0%} of steps)'
  return METHOD_TITLES[method]


CONDITION_TITLES = {
    'class': 'conditioned on the true class, guided',
    'none': 'unconditional (null class), unguided',
}


def plot_examples(results: dict, path: str, n: int = 6) -> str:
  """One panel per (condition, mask): rows of original, input (unknown grey), each method."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  images, _ = held_out(results['setup']['num_images'])
  methods = results['setup']['methods']
  fig, axes = plt.subplots(
      len(CONDITIONS),
      len(MASKS),
      squeeze=False,
      figsize=(4.2 * len(MASKS), len(CONDITIONS) * (1.0 + 0.75 * n)),
      constrained_layout=True,
  )
  for row, cond in enumerate(CONDITIONS):
    for ax, kind in zip(axes[row], MASKS):
      known = study_masks(kind, n, 16, 4)
      cols = [to_uint8(images[:n]), to_uint8(np.where(known[..., None], images[:n], 0.0))]
      cols += [decode_examples(results['examples'][f'{cond}/{kind}/{m}'])[:n] for m in methods]
      tiles = np.stack(cols, 1).reshape((-1, 16, 16, 3))
      ax.imshow(grid_image(tiles, ncols=len(cols)), interpolation='nearest')
      ax.set_title(f'{MASK_TITLES[kind]}\n{CONDITION_TITLES[cond]}', fontsize=9)
      ax.set_xticks([(i + 0.5) * 18 - 1 for i in range(len(cols))])
      ax.set_xticklabels(
          ['original', 'input'] + [_short(m) for m in methods], fontsize=8, rotation=30
      )
      ax.set_yticks([])
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _short(method: str) -> str:
  return {'repaint': 'general', 'scratch': 'scratch'}.get(method, method.replace('@', ' '))


def table(results: dict) -> list[str]:
  s, ref = results['summary'], results['reference']
  lines = []
  for cond in CONDITIONS:
    for kind in MASKS:
      lines += [
          f'**{MASK_TITLES[kind]}, {CONDITION_TITLES[cond]}**',
          '',
          '| method | class accuracy | Frechet distance | known-pixel MAE | '
          'unknown-pixel RMSE |',
          '|---|---|---|---|---|',
      ]
      for method in results['setup']['methods']:
        c = s[f'{cond}/{kind}/{method}']
        lines.append(
            f'| {method_title(method)} | '
            + ' | '.join(f"{c[m]['mean']:.3f} ± {c[m]['std']:.3f}" for m in METRICS)
            + ' |'
        )
      if cond == CONDITIONS[0]:
        k = ref[f'{kind}/known_only']
        lines.append(
            '| (known pixels only, rest background) | '
            + ' | '.join(f'{k[m]:.3f}' for m in METRICS)
            + ' |'
        )
      lines.append('')
  lines += [
      '**MDT minus general, per seed (same draws)**',
      '',
      '| condition | mask | method | class accuracy | Frechet distance |',
      '|---|---|---|---|---|',
  ]
  acc, fd = (paired_differences(results, m) for m in ('class_accuracy', 'fd'))
  for key in acc:
    cond, kind, method = key.split('/')
    lines.append(
        f'| {cond} | {MASK_TITLES[kind]} | {method} | '
        + ', '.join(f'{v:+.3f}' for v in acc[key])
        + ' | '
        + ', '.join(f'{v:+.2f}' for v in fd[key])
        + ' |'
    )
  return lines + ['']


def write_report(results: dict, out: str, command: str = '') -> tuple[str, str]:
  """OUT.png (picture grid) and OUT.md (setup and table)."""
  png = plot_examples(results, out + '.png')
  st = results['setup']
  md = [
      '# Inpainting on the digits: general vs MDT side-interpolater vs from scratch',
      '',
      f"Written by `{command or 'python tools/inpainting.py'}` from "
      f'`{os.path.basename(out)}.json`.',
      '',
      f"Model `{st['model']}`; {st['num_images']} held-out digits; sampler "
      f"{st['sampler']['sampler']} with {st['sampler']['steps']} steps, guidance scale "
      f"{st['sampler']['cfg_scale']} (class condition; the unconditional runs are unguided); "
      f"seeds {st['seeds']} (mean ± std over seeds). Classifier accuracy on the originals: "
      f"{results['reference']['originals_class_accuracy']:.3f}.",
      '',
      f'![inpainting examples]({os.path.basename(png)})',
      '',
      *table(results),
  ]
  path = out + '.md'
  atomic.write_text(path, '\n'.join(md) + '\n')
  return png, path
