"""The learning-speed study's plot (PNG) and Markdown report, written from its results dict."""

from __future__ import annotations

import math
import os

import numpy as np

from studies import page
from studies.curves import BASELINE, METRICS, VARIANTS
from studies.page import fmt

LABELS = {'mdt': 'MDTv2 (masked branch)', 'dit': 'DiT-style (no masked branch)'}
COLORS = {'mdt': 'tab:red', 'dit': 'tab:blue'}
TITLES = {'fd': 'Frechet distance (classifier features)', 'class_accuracy': 'class accuracy'}


def plot(results: dict, path: str) -> str:
  """Both metrics against steps and against training seconds: seed mean, +-1 std band, seeds."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summary, ref = results['summary'], results['reference']
  n = len(results['study']['seeds'])
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
  for row, metric in enumerate(METRICS):
    target = summary['reach_baseline_final'][metric]['target']
    for col, xkey in enumerate(('steps', 'train_seconds')):
      ax = axes[row, col]
      for variant in VARIANTS:
        s, color = summary['variants'][variant], COLORS[variant]
        x = np.array(s['steps'] if xkey == 'steps' else s['train_seconds']['mean'])
        mean, std = np.array(s[metric]['mean']), np.array(s[metric]['std'])
        ax.plot(x, mean, color=color, marker='o', ms=3, label=f'{LABELS[variant]}, mean')
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)
        for r in results['runs']:
          if r['variant'] == variant:
            ax.plot(r[xkey], r[metric], color=color, lw=0.6, alpha=0.45)
      real = ref['fd_real_images'] if metric == 'fd' else ref['classifier_test_accuracy']
      ax.axhline(
          real,
          color='gray',
          ls='--',
          lw=1,
          label='real images' if metric == 'fd' else 'classifier on held-out data',
      )
      ax.axhline(target, color=COLORS[BASELINE], ls=':', lw=1, label='baseline final (mean)')
      if metric == 'fd':
        ax.set_yscale('log')
      ax.set_xlabel(
          'training step'
          if xkey == 'steps'
          else 'training seconds (compilation and evaluation excluded)'
      )
      ax.set_ylabel(TITLES[metric])
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(
      f'MDTv2 vs DiT-style on digits: mean, +-1 std band and the {n} seeds (thin lines)',
      fontsize=11,
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------- numbers


def _final(s: dict, metric: str) -> tuple[float, float, float, float]:
  m = s[metric]
  return m['mean'][-1], m['std'][-1], m['min'][-1], m['max'][-1]


def _difference(summary: dict, metric: str, n: int) -> tuple[float, float]:
  """(MDT final mean - baseline final mean, standard error of that difference over seeds)."""
  a, sa, _, _ = _final(summary['variants']['mdt'], metric)
  b, sb, _, _ = _final(summary['variants'][BASELINE], metric)
  return a - b, math.sqrt((sa**2 + sb**2) / n)


def conclusion(results: dict) -> list[str]:
  """Plain sentences computed from the numbers, whichever way they fall."""
  summary = results['summary']
  n = len(results['study']['seeds'])
  total = summary['variants'][BASELINE]['steps'][-1]
  out = []
  for metric, better in METRICS.items():
    name = 'Frechet distance' if metric == 'fd' else 'class accuracy'
    diff, se = _difference(summary, metric, n)
    mdt_better = diff < 0 if better == 'lower' else diff > 0
    if n > 1 and abs(diff) > 2 * se:
      verdict = (
          f"MDTv2's final {name} is {'better' if mdt_better else 'worse'} than the "
          f"baseline's by {fmt(abs(diff))} (more than twice the standard error of the "
          f'difference, {fmt(se)}, over {n} seeds).'
      )
    else:
      verdict = (
          f'The final values of the {name} differ by {fmt(abs(diff))} '
          f"({'MDTv2' if mdt_better else 'the baseline'} ahead), within twice the "
          f'standard error of the difference ({fmt(se)}, {n} seed(s)): no clear '
          'difference at the end of training.'
      )
    reach = summary['reach_baseline_final'][metric]
    m, d = reach['mdt'], reach[BASELINE]
    if m['step'] is None:
      speed = (
          f"MDTv2's mean curve does not reach the baseline's final {name} "
          f"({fmt(reach['target'])}) within {total} steps."
      )
    else:
      speed = (
          f"MDTv2's mean curve reaches the baseline's final {name} "
          f"({fmt(reach['target'])}) at step ~{m['step']:.0f}, the baseline at "
          f"~{d['step']:.0f}: {fmt(d['step'] / m['step'])}x the steps for the baseline; "
          f"in training seconds {fmt(m['train_seconds'])} vs "
          f"{fmt(d['train_seconds'])} s "
          f"({fmt(d['train_seconds'] / m['train_seconds'])}x)."
      )
    out.append(f'{verdict} {speed}')
  ratio = lambda k: (
      summary['variants']['mdt'][k]['mean'][0] / summary['variants'][BASELINE][k]['mean'][0]
  )
  out.append(
      f"An MDTv2 step cost {fmt(ratio('seconds_per_step'))}x a baseline step in "
      f"wall-clock and {fmt(ratio('cpu_seconds_per_step'))}x in CPU time here (two "
      'forward/backward branches; means over seeds).'
  )
  return out


# ---------------------------------------------------------------------------------- markdown


def _setup(results: dict) -> list[str]:
  st, ref, env = results['study'], results['reference'], results['environment']
  tr, mdl = st['train'], st['train']['model']
  samp = tr['sampling']
  tokens = (mdl['input_size'] // mdl['patch_size']) ** 2
  loads = [r[k] for r in results['runs'] for k in ('load_average_start', 'load_average_end')]
  params = results.get('num_params')
  return [
      f"- Model: MDTv2, hidden size {mdl['hidden_size']}, depth {mdl['depth']} "
      f"(decoder {mdl['decode_layer']}), {mdl['num_heads']} heads, patch {mdl['patch_size']} on "
      f'16x16x1 digits ({tokens} tokens)'
      + (f', {params:,} parameters' if params else '')
      + f"; mask ratio {mdl['mask_ratio']} +- {mdl['mask_ratio_span']}.",
      '- Variants: **MDTv2** (`mask_branch=True`: the plain and the masked branch, their losses '
      'summed, one backward pass) and the **DiT-style** baseline (`mask_branch=False`: the plain '
      'branch only; the masked encoder pass and the side-interpolater are never run). Same model, '
      'and per seed the same initial weights, data order, timesteps and noise of the plain branch.',
      f"- Training: batch {tr['global_batch_size']}, {tr['total_steps']} steps, "
      f"{tr['optimizer']['name']} lr {tr['optimizer']['learning_rate']}, EMA decay "
      f"{tr['ema_decay']}, min-SNR gamma {tr['diffusion']['min_snr_gamma']}; seeds "
      f"{', '.join(str(s) for s in st['seeds'])}.",
      f"- Evaluation every {st['eval_every_steps']} steps and at the last, from the EMA weights: "
      f"{st['eval_num_samples']} guided samples (labels 0..9 repeated, sampling seed "
      f"{st['eval_seed']}, the same at every evaluation), {samp['sampler']} with "
      f"{samp['steps']} steps, guidance scale {samp['cfg_scale']} "
      f"({'constant' if not samp.get('scale_pow') else 'power-cosine'}). Frechet distance of the digits "
      "classifier's 64-d features against all 1,797 digits images; class accuracy = the "
      'fraction the classifier assigns to the conditioning label.',
      f"- For scale: {ref['num_real_images']} real digits images score a Frechet distance of "
      f"{fmt(ref['fd_real_images'])} (its floor at this sample size); the classifier's "
      f"held-out accuracy is {fmt(ref['classifier_test_accuracy'])}.",
      f'- Clock: training seconds (wall-clock) after the first (compiling) step, evaluations '
      f'excluded; CPU seconds: the same span in CPU time of the process, all threads. '
      f"{env['cpu_count']} CPU cores ({env['backend']}, jax {env['jax']}), niceness "
      f"{env['niceness']}, shared with other jobs: 1-minute load average "
      f'{fmt(min(loads))}-{fmt(max(loads))} during the runs. Whole study: '
      f"{results['study_seconds'] / 60:.1f} min wall-clock (training, evaluation, compilation).",
  ]


def _results_tables(results: dict) -> list[str]:
  summary = results['summary']
  lines = [
      '| variant | final FD (mean +- std, [min, max]) | final class accuracy | '
      's / step | CPU s / step | training s |',
      '|---|---|---|---|---|---|',
  ]
  for v in VARIANTS:
    s = summary['variants'][v]
    cells = []
    for metric in METRICS:
      mean, std, lo, hi = _final(s, metric)
      cells.append(f'{fmt(mean)} +- {fmt(std, 2)} [{fmt(lo)}, {fmt(hi)}]')
    per_step = [
        f"{s[k]['mean'][0]:.3f} +- {s[k]['std'][0]:.3f}"
        for k in ('seconds_per_step', 'cpu_seconds_per_step')
    ]
    lines.append(
        f"| {LABELS[v]} | {' | '.join(cells + per_step)} | "
        f"{fmt(s['train_seconds']['mean'][-1])} |"
    )
  lines += [
      '',
      'Steps (and training seconds) until the seed-mean curve first reaches the '
      "baseline's final mean, linear between evaluations; per seed in brackets:",
      '',
      '| metric | target | MDTv2 step | DiT-style step | MDTv2 s | DiT-style s |',
      '|---|---|---|---|---|---|',
  ]
  for metric in METRICS:
    r = summary['reach_baseline_final'][metric]
    seeds = lambda v: ', '.join(fmt(x, 4) for x in r[v]['per_seed_steps'])
    lines.append(
        f"| {metric} | {fmt(r['target'])} | {fmt(r['mdt']['step'], 4)} "
        f"[{seeds('mdt')}] | {fmt(r[BASELINE]['step'], 4)} [{seeds(BASELINE)}] | "
        f"{fmt(r['mdt']['train_seconds'])} | {fmt(r[BASELINE]['train_seconds'])} |"
    )
  m, d = summary['variants']['mdt'], summary['variants'][BASELINE]
  lines += [
      '',
      'The curves (seed means +- std):',
      '',
      '| step | MDTv2 FD | DiT-style FD | MDTv2 accuracy | DiT-style accuracy |',
      '|---|---|---|---|---|',
  ]
  for i, step in enumerate(m['steps']):
    cell = lambda s, k: f"{fmt(s[k]['mean'][i])} +- {fmt(s[k]['std'][i], 2)}"
    lines.append(
        f"| {step} | {cell(m, 'fd')} | {cell(d, 'fd')} | "
        f"{cell(m, 'class_accuracy')} | {cell(d, 'class_accuracy')} |"
    )
  return lines


def write(
    results: dict, out: str, command: str = 'python tools/learning_curves.py'
) -> tuple[str, str]:
  """``out``.png and ``out``.md (keeping the discussion of an existing .md); their paths."""
  return page.report(
      results,
      out,
      command,
      required=('summary',),
      title='Learning speed: MDTv2 vs the DiT-style baseline on digits',
      intro='The MDTv2 paper reports that mask latent modeling makes diffusion transformers learn '
      'much faster than DiT (">10x" on ImageNet 256x256). This study checks the claim at a '
      'scale anyone can run offline on a CPU: the bundled digits dataset.',
      figure='learning curves',
      plot=plot,
      setup=_setup,
      tables=_results_tables,
      conclusion=conclusion,
  )
