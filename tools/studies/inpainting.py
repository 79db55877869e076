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

    from studies import inpainting
    results = inpainting.run_study('runs/quickstart', 'docs/inpainting')   # writes the .json
    inpainting.write_report(results, 'docs/inpainting')                  # the .png and the .md
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import time

import jax
import numpy as np
from absl import logging

from mdt_jax import atomic
from mdt_jax.data.digits import load_digits_images, select_split
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.diffusion import objective_of
from mdt_jax.hub.pretrained import load_for_sampling
from mdt_jax.images import grid_image, to_uint8
from mdt_jax.sampling import inpaint as inp
from mdt_jax.sampling.config import make_sampler_config

MASKS = ('lower_half', 'right_half', 'random_tokens')
# 'class': conditioned on the true class (guided as the model recommends); 'none': the null class,
# unguided, so the class must come from the known pixels (the accuracy then measures that).
CONDITIONS = ('class', 'none')
MASK_TITLES = {
    'lower_half': 'lower half unknown',
    'right_half': 'right half unknown',
    'random_tokens': 'random 50% of tokens unknown',
}
METRICS = {'class_accuracy': 'higher', 'fd': 'lower', 'known_mae': 'lower', 'unknown_rmse': 'lower'}
RESULTS_VERSION = 2
MASK_SEED = 1234


def study_masks(kind: str, n: int, size: int, patch: int) -> np.ndarray:
  """bool [n, size, size], True = known."""
  m = np.ones((n, size, size), bool)
  if kind == 'lower_half':
    m[:, size // 2 :] = False
  elif kind == 'right_half':
    m[:, :, size // 2 :] = False
  elif kind == 'random_tokens':
    g = size // patch
    rng = np.random.default_rng(MASK_SEED)
    order = np.argsort(rng.random((n, g * g)), axis=1)
    tokens = np.ones((n, g * g), bool)
    np.put_along_axis(tokens, order[:, : g * g // 2], False, axis=1)
    m = np.repeat(np.repeat(tokens.reshape(n, g, g), patch, 1), patch, 2)
  else:
    raise ValueError(f'mask must be one of {MASKS}, got {kind!r}')
  return m


def held_out(num_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The held-out digits (images [-1, 1] [N, 16, 16, 1], labels), the first num_images."""
  images, labels = select_split(*load_digits_images(16), 'test')
  return images[:num_images], labels[:num_images]


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


EXAMPLES = 8


def encode_examples(x: np.ndarray) -> str:
  """Example completions [n, 16, 16, 1] as base64 of their uint8 pixels (compact JSON)."""
  return base64.b64encode(to_uint8(x)[..., 0].tobytes()).decode('ascii')


def decode_examples(text: str) -> np.ndarray:
  """uint8 [n, 16, 16, 3] from encode_examples."""
  g = np.frombuffer(base64.b64decode(text), np.uint8).reshape(-1, 16, 16, 1)
  return np.repeat(g, 3, axis=-1)


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


def _load(path: str, setup: dict) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    old = json.load(f)
  return old if old.get('setup') == setup else None


def _write_json(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.write_json(path, results, indent=1)


# ------------------------------------------------------------------ report

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
