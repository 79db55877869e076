"""The flow-matching study's summaries over seeds (the sampler sweep, the target) and its plot
(PNG) and Markdown report, written from its results dict."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from studies import curves, page
from studies.page import fmt

LABELS = {
    'mdt_ddpm': 'MDTv2, DDPM (as published)',
    'mdt_flow': 'MDTv2 masking, flow',
    'dit_flow': 'flow, no masked branch',
}
COLORS = {'mdt_ddpm': 'tab:blue', 'mdt_flow': 'tab:red', 'dit_flow': 'tab:orange'}
MARKERS = {'ddpm': 'o', 'dpm_solver++': 's', 'euler': 'v', 'heun': '^', 'euler_maruyama': 'x'}
TITLES = {'fd': 'Frechet distance (classifier features)', 'class_accuracy': 'class accuracy'}
METRICS = ('fd', 'class_accuracy')


def summarize_sweep(runs: list[dict], variants) -> dict:
  """Per variant and sampler: mean, std, min, max over seeds of each metric."""
  out = {}
  for variant in variants:
    mine = [r for r in runs if r['variant'] == variant]
    specs = list(mine[0]['sweep'])
    out[variant] = {
        spec: {
            'model_evaluations': mine[0]['sweep'][spec]['model_evaluations'],
            **{
                m: curves.seed_stats(np.array([[r['sweep'][spec][m]] for r in mine], np.float64))
                for m in curves.METRICS
            },
        }
        for spec in specs
    }
  return out


def target_check(sweep: dict, study: ml_collections.ConfigDict) -> dict:
  """The issue's target: does a flow variant with Heun at <= 50 model evaluations reach the
  Frechet distance the DDPM baseline reaches with 'ddpm:250'?"""
  base = sweep.get(study.baseline, {}).get(study.target_reference)
  if base is None:
    return {}
  target = base['fd']['mean'][0]
  out = {'reference': study.target_reference, 'target_fd': target, 'variants': {}}
  for variant, specs in sweep.items():
    if study.variants[variant].objective != 'flow':
      continue
    heun = {
        s: v['fd']['mean'][0]
        for s, v in specs.items()
        if s.startswith('heun:') and v['model_evaluations'] <= 50
    }
    reached = sorted(
        (s for s, fd in heun.items() if fd <= target), key=lambda s: specs[s]['model_evaluations']
    )
    out['variants'][variant] = {'heun_fd': heun, 'reached_by': reached}
  return out


def _label(variant: str) -> str:
  return LABELS.get(variant, variant)


def _order(results: dict) -> list[str]:
  """The variants, the baseline first."""
  base = results['study']['baseline']
  return [base] + [v for v in results['summary']['variants'] if v != base]


def _families(specs: dict) -> dict[str, list[str]]:
  """Sampler name -> its specs, by model evaluations."""
  out: dict[str, list[str]] = {}
  for spec in specs:
    out.setdefault(spec.split(':')[0], []).append(spec)
  return {k: sorted(v, key=lambda s: specs[s]['model_evaluations']) for k, v in out.items()}


def plot(results: dict, path: str) -> str:
  """Both metrics against training steps (curve sampler) and against model evaluations of the
  final sampler sweep: seed means, +-1 std."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summary, sweep, ref = results['summary'], results['sweep'], results['reference']
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
  for col, metric in enumerate(METRICS):
    ax = axes[0, col]
    for variant in _order(results):
      s = summary['variants'][variant]
      x, color = np.array(s['steps']), COLORS.get(variant)
      mean, std = np.array(s[metric]['mean']), np.array(s[metric]['std'])
      ax.plot(x, mean, color=color, marker='o', ms=3, label=_label(variant))
      ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)
    ax.set_xlabel('training step (curve sampler: 20 model evaluations)')
    ax = axes[1, col]
    for variant in _order(results):
      specs = sweep[variant]
      for family, names in _families(specs).items():
        x = [specs[n]['model_evaluations'] for n in names]
        mean = [specs[n][metric]['mean'][0] for n in names]
        std = [specs[n][metric]['std'][0] for n in names]
        ax.errorbar(
            x,
            mean,
            yerr=std,
            color=COLORS.get(variant),
            marker=MARKERS.get(family),
            capsize=2,
            label=f'{_label(variant)}: {family}',
        )
    ax.set_xscale('log')
    ax.set_xlabel(
        f'model evaluations per sample (step {results["study"]["train"]["total_steps"]} weights)'
    )
    for row in range(2):
      ax = axes[row, col]
      real = ref['fd_real_images'] if metric == 'fd' else ref['classifier_test_accuracy']
      ax.axhline(
          real,
          color='gray',
          ls='--',
          lw=1,
          label='real images' if metric == 'fd' else 'classifier on held-out data',
      )
      if metric == 'fd':
        ax.set_yscale('log')
      ax.set_ylabel(TITLES[metric])
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  axes[1, 0].legend(fontsize=7, ncol=2)
  n = len(results['study']['seeds'])
  fig.suptitle(
      f'Flow matching vs DDPM with MDT masking on digits ({n} seeds: mean, +-1 std)', fontsize=11
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------- numbers


def _cell(stats: dict, i: int = -1, digits: int = 3) -> str:
  return f"{fmt(stats['mean'][i], digits)} +- {fmt(stats['std'][i], 2)}"


def conclusion(results: dict) -> list[str]:
  """Plain sentences computed from the numbers, whichever way they fall."""
  summary, sweep, st = results['summary'], results['sweep'], results['study']
  base = st['baseline']
  out = []
  for metric in METRICS:
    name = 'Frechet distance' if metric == 'fd' else 'class accuracy'
    finals = {v: summary['variants'][v][metric]['mean'][-1] for v in _order(results)}
    best = (min if metric == 'fd' else max)(finals, key=finals.get)
    out.append(
        f'Final {name} with the curve samplers (20 model evaluations): '
        + ', '.join(f'{_label(v)} {fmt(x)}' for v, x in finals.items())
        + f'; best: {_label(best)}.'
    )
  target = results.get('target') or {}
  if target:
    for variant, t in target['variants'].items():
      heun = ', '.join(f'{s} {fmt(fd)}' for s, fd in t['heun_fd'].items())
      if t['reached_by']:
        verdict = f'reaches it with {t["reached_by"][0]} ({heun})'
      else:
        verdict = f'does not reach it with Heun at <= 50 model evaluations ({heun})'
      out.append(
          f"Target: {_label(base)} with {target['reference']} scores a Frechet distance "
          f"of {fmt(target['target_fd'])}; {_label(variant)} {verdict}."
      )
  for variant in _order(results):
    specs = sweep[variant]
    best = min(specs, key=lambda s: specs[s]['fd']['mean'][0])
    out.append(
        f'{_label(variant)}: lowest mean Frechet distance of the sweep with {best} '
        f"({fmt(specs[best]['fd']['mean'][0])})."
    )
  ratio = {v: summary['variants'][v]['seconds_per_step']['mean'][0] for v in _order(results)}
  out.append(
      'Seconds per training step (means over seeds): '
      + ', '.join(f'{_label(v)} {r:.3f}' for v, r in ratio.items())
      + '.'
  )
  return out


def _setup(results: dict) -> list[str]:
  st, ref, env = results['study'], results['reference'], results['environment']
  tr, mdl = st['train'], st['train']['model']
  loads = [r[k] for r in results['runs'] for k in ('load_average_start', 'load_average_end')]
  variants = '; '.join(
      f"**{_label(v)}** (`{v}`: objective {st['variants'][v]['objective']}, "
      f"mask_branch {st['variants'][v]['mask_branch']})"
      for v in _order(results)
  )
  flow = st['flow']
  return [
      f"- Model: MDTv2, hidden size {mdl['hidden_size']}, depth {mdl['depth']} (decoder "
      f"{mdl['decode_layer']}), {mdl['num_heads']} heads, patch {mdl['patch_size']} on 16x16x1 "
      f"digits; mask ratio {mdl['mask_ratio']} +- {mdl['mask_ratio_span']}. Parameters: "
      + ', '.join(f'{v} {n:,}' for v, n in results['num_params'].items())
      + '.',
      f'- Variants: {variants}. Per seed all start from the same weights (apart from the final '
      "layer's output width, C or 2C) and read the data in the same order; DDPM keeps min-SNR "
      'gamma '
      f"{tr['diffusion']['min_snr_gamma']} and the learned variance, flow trains the plain "
      f"velocity MSE with {flow['t_sampling']} times (shift {flow['t_shift']}) and no learned "
      'variance.',
      f"- Training: batch {tr['global_batch_size']}, {tr['total_steps']} steps, "
      f"{tr['optimizer']['name']} lr {tr['optimizer']['learning_rate']}, EMA decay "
      f"{tr['ema_decay']}; seeds {', '.join(str(s) for s in st['seeds'])}.",
      f"- Curves: every {st['eval_every_steps']} steps and at the last, "
      f"{st['eval_num_samples']} guided samples (labels 0..9 repeated, noise seed "
      f"{st['eval_seed']}) with {st['curve_samplers']['ddpm']} (DDPM) and "
      f"{st['curve_samplers']['flow']} (flow); guidance scale {tr['sampling']['cfg_scale']}, "
      'constant, all channels. Sweep at the last step: '
      + '; '.join(f"{k}: {', '.join(v)}" for k, v in st['final_samplers'].items())
      + ' (name: model evaluations per sample; each evaluation is one batched conditional + '
      'unconditional pass).',
      f"- Scores: Frechet distance of the digits classifier's features against all 1,797 "
      f"images (500 real images score {fmt(ref['fd_real_images'])}); class accuracy (the "
      f"classifier's held-out accuracy is {fmt(ref['classifier_test_accuracy'])}).",
      f"- Machine: {env['cpu_count']} CPU cores ({env['backend']}, jax {env['jax']}), niceness "
      f"{env['niceness']}, shared with other jobs (1-minute load average "
      f'{fmt(min(loads))}-{fmt(max(loads))}). Whole study: '
      f"{results['study_seconds'] / 60:.1f} min wall-clock.",
  ]


def _tables(results: dict) -> list[str]:
  summary, sweep = results['summary'], results['sweep']
  variants = _order(results)
  lines = [
      'Curves (curve samplers, seed means +- std):',
      '',
      '| step | '
      + ' | '.join(f'{_label(v)} FD' for v in variants)
      + ' | '
      + ' | '.join(f'{_label(v)} accuracy' for v in variants)
      + ' |',
      '|---' * (1 + 2 * len(variants)) + '|',
  ]
  steps = summary['variants'][variants[0]]['steps']
  for i, step in enumerate(steps):
    cells = [_cell(summary['variants'][v]['fd'], i) for v in variants]
    cells += [_cell(summary['variants'][v]['class_accuracy'], i) for v in variants]
    lines.append(f'| {step} | ' + ' | '.join(cells) + ' |')
  lines += [
      '',
      f'Sampler sweep at step {steps[-1]} (seed means +- std):',
      '',
      '| variant | sampler | model evaluations | FD | class accuracy |',
      '|---|---|---|---|---|',
  ]
  for v in variants:
    for spec, s in sweep[v].items():
      lines.append(
          f"| {_label(v)} | {spec.split(':')[0]} | {s['model_evaluations']} | "
          f"{_cell(s['fd'], 0)} | {_cell(s['class_accuracy'], 0)} |"
      )
  per_step = [
      '',
      'Seconds per training step (wall-clock, mean +- std over seeds): '
      + ', '.join(
          f"{_label(v)} {_cell(summary['variants'][v]['seconds_per_step'], 0)}" for v in variants
      )
      + '.',
  ]
  return lines + per_step


def write(
    results: dict, out: str, command: str = 'python tools/flow_matching.py'
) -> tuple[str, str]:
  """``out``.png and ``out``.md (keeping the discussion of an existing .md); their paths."""
  return page.report(
      results,
      out,
      command,
      required=('summary', 'sweep'),
      title="Flow matching with MDT's masking: a study on digits",
      intro='SiT-style flow matching (linear interpolant, velocity prediction, ODE/SDE samplers) '
      "with MDTv2's mask latent modeling, against MDTv2 as published (DDPM) and against flow "
      'without the masked branch, on the bundled digits dataset (CPU, offline).',
      figure='flow matching vs DDPM',
      plot=plot,
      setup=_setup,
      tables=_tables,
      conclusion=conclusion,
  )
