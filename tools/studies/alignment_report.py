"""The representation-alignment study's plot (PNG) and Markdown report, written from its
results dict."""

from __future__ import annotations

import math
import os

import numpy as np

from studies import page
from studies.page import fmt

LABELS = {
    'mdt': 'MDT',
    'mdt_sra': 'MDT+SRA',
    'mdt_repa': 'MDT+REPA',
    'dit_repa': 'DiT+REPA',
    'mdt_repa_both': 'MDT+REPA, both branches',
}
COLORS = {
    'mdt': 'black',
    'mdt_sra': 'tab:green',
    'mdt_repa': 'tab:red',
    'dit_repa': 'tab:blue',
    'mdt_repa_both': 'tab:purple',
}
TITLES = {'fd': 'Frechet distance (classifier features)', 'class_accuracy': 'class accuracy'}
METRICS = ('fd', 'class_accuracy')


def _label(variant: str) -> str:
  return LABELS.get(variant, variant)


def _order(results: dict) -> list[str]:
  """The variants, the baseline first."""
  base = results['study']['baseline']
  return [base] + [v for v in results['summary']['variants'] if v != base]


def plot(results: dict, path: str) -> str:
  """Both metrics against training steps: seed means, +-1 std band, the seeds as thin lines."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summary, ref = results['summary'], results['reference']
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
  for ax, metric in zip(axes, METRICS):
    for variant in _order(results):
      s, color = summary['variants'][variant], COLORS.get(variant)
      x = np.array(s['steps'])
      mean, std = np.array(s[metric]['mean']), np.array(s[metric]['std'])
      ax.plot(x, mean, color=color, marker='o', ms=3, label=_label(variant))
      ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12, lw=0)
      for r in results['runs']:
        if r['variant'] == variant:
          ax.plot(r['steps'], r[metric], color=color, lw=0.5, alpha=0.35)
    real = ref['fd_real_images'] if metric == 'fd' else ref['classifier_test_accuracy']
    ax.axhline(real, color='gray', ls='--', lw=1, label='real images' if metric == 'fd' else None)
    if metric == 'fd':
      target = summary['reach_baseline_final']['fd']['target']
      ax.axhline(target, color='black', ls=':', lw=1, label='threshold: MDT final (mean)')
      ax.set_yscale('log')
    ax.set_xlabel('training step')
    ax.set_ylabel(TITLES[metric])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  n = len(seeds(results))
  fig.suptitle(
      f'Representation alignment with MDT on digits ({n} seeds: mean, +-1 std, seeds)',
      fontsize=11,
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------- numbers


def _final(results: dict, variant: str, metric: str) -> tuple[float, float]:
  m = results['summary']['variants'][variant][metric]
  return m['mean'][-1], m['std'][-1]


def seeds(results: dict) -> list[int]:
  """The seeds summarised: all of the study's, or those finished (an unfinished study)."""
  return results.get('finished_seeds', results['study']['seeds'])


def compare(results: dict, a: str, b: str, metric: str) -> tuple[float, float, str]:
  """(final mean of b - final mean of a, the standard error of that difference over seeds,
  a verdict: 'better', 'worse' or 'no clear difference' for b, at twice the error)."""
  n = len(seeds(results))
  ma, sa = _final(results, a, metric)
  mb, sb = _final(results, b, metric)
  diff, se = mb - ma, math.sqrt((sa**2 + sb**2) / n)
  if n < 2 or abs(diff) <= 2 * se:
    return diff, se, 'no clear difference'
  lower_better = metric == 'fd'
  return diff, se, 'better' if (diff < 0) == lower_better else 'worse'


def reach_ratio(results: dict, variant: str) -> float | None:
  """Steps plain MDT's mean curve takes to the threshold / the variant's (>1: faster)."""
  reach = results['summary']['reach_baseline_final']['fd']
  base, mine = reach[results['study']['baseline']]['step'], reach[variant]['step']
  return None if not base or not mine else base / mine


def conclusion(results: dict) -> list[str]:
  """Plain sentences computed from the numbers, whichever way they fall."""
  base = results['study']['baseline']
  reach = results['summary']['reach_baseline_final']['fd']
  total = results['study']['train']['total_steps']
  out = []
  for v in _order(results)[1:]:
    parts = []
    for metric in METRICS:
      diff, se, verdict = compare(results, base, v, metric)
      name = 'Frechet distance' if metric == 'fd' else 'class accuracy'
      parts.append(
          f'final {name} {fmt(_final(results, v, metric)[0])} vs '
          f'{fmt(_final(results, base, metric)[0])} ({verdict}: difference {fmt(diff)} +- '
          f'{fmt(se, 2)} standard error)'
      )
    step, ratio = reach[v]['step'], reach_ratio(results, v)
    if step is None:
      speed = (
          f"does not reach MDT's final Frechet distance ({fmt(reach['target'])}) in {total} steps"
      )
    else:
      speed = (
          f"reaches MDT's final Frechet distance ({fmt(reach['target'])}) at step ~{step:.0f} "
          f"(MDT: ~{reach[base]['step']:.0f}; ratio {fmt(ratio)})"
      )
    out.append(f'{_label(v)} against {_label(base)}: ' + '; '.join(parts) + f'; {speed}.')
  for a, b in results.get('masked_branch_pairs', []):
    diff, se, verdict = compare(results, a, b, 'fd')
    effect = {'better': 'helps', 'worse': 'hurts', 'no clear difference': 'does nothing clear'}
    out.append(
        f'Aligning the masked branch as well ({_label(b)} against {_label(a)}) '
        f'{effect[verdict]} at this scale: final Frechet distance {fmt(_final(results, b, "fd")[0])} '
        f'vs {fmt(_final(results, a, "fd")[0])} (difference {fmt(diff)} +- {fmt(se, 2)}).'
    )
  per_step = {
      v: results['summary']['variants'][v]['seconds_per_step']['mean'][0] for v in _order(results)
  }
  out.append(
      'Seconds per training step (wall-clock, means over seeds, shared machine): '
      + ', '.join(f'{_label(v)} {x:.3f}' for v, x in per_step.items())
      + '.'
  )
  return out


def _setup(results: dict) -> list[str]:
  st, ref, env, teacher = (
      results['study'],
      results['reference'],
      results['environment'],
      results['teacher'],
  )
  tr, mdl, al = st['train'], st['train']['model'], st['align']
  loads = [r[k] for r in results['runs'] for k in ('load_average_start', 'load_average_end')]
  variants = '; '.join(
      f"**{_label(v)}** (`{v}`: mask_branch {s['mask_branch']}, align.method {s['method']}"
      + ('' if s['method'] == 'none' else f", branches {s['branches']}")
      + ')'
      for v, s in ((v, st['variants'][v]) for v in _order(results))
  )
  return [
      f"- Model: MDTv2, hidden size {mdl['hidden_size']}, depth {mdl['depth']} (decoder "
      f"{mdl['decode_layer']}), {mdl['num_heads']} heads, patch {mdl['patch_size']} on 16x16x1 "
      f"digits (16 tokens); mask ratio {mdl['mask_ratio']} +- {mdl['mask_ratio_span']}. "
      'Parameters (with the projector): '
      + ', '.join(f'{v} {n:,}' for v, n in results['num_params'].items())
      + '.',
      f'- Variants: {variants}. DiT = the same model with the masked branch off.',
      f"- Alignment: encoder block {al['depth'] or 1} of 2 (align.depth {al['depth']}: REPA's 8 of 28 "
      f"scaled), weight {al['weight']}, projector {al['projector_dim']} wide (three linear "
      "layers, SiLU), negative cosine per token. SRA: the EMA model's block "
      f"{al['teacher_depth'] or 2} at time t - {al['noise_offset']} x u of the range.",
      f"- REPA teacher: the digits' stand-in for DINOv2, a ViT of DINOv2's architecture "
      f"({teacher['hidden_size']} wide, {teacher['layers']} layers, {teacher['heads']} heads, "
      f"{teacher['patch_size']} x {teacher['patch_size']} px patches: a 4 x 4 grid, "
      f"{teacher['num_params']:,} parameters) trained as a digits classifier on the fixed 80% split "
      f"(seed {teacher['seed']}, {teacher['epochs']} epochs): **{fmt(teacher['test_accuracy'])} "
      'accuracy on the held-out 20%**. It is not the evaluation classifier (a CNN) nor trained '
      'from it. A supervised ViT on 1,797 tiny digits is only a stand-in for DINOv2, a '
      'self-supervised encoder of ImageNet: what it does here says little about DINOv2 at scale.',
      f"- Training: batch {tr['global_batch_size']}, {tr['total_steps']} steps, "
      f"{tr['optimizer']['name']} lr {tr['optimizer']['learning_rate']}, EMA decay "
      f"{tr['ema_decay']}, min-SNR gamma {tr['diffusion']['min_snr_gamma']}; seeds "
      f"{', '.join(str(s) for s in st['seeds'])} (per seed: the same data order and noise)"
      + (
          '.'
          if seeds(results) == st['seeds']
          else f"; **unfinished: summarised over seed(s) {', '.join(map(str, seeds(results)))}**, "
          'the seeds every variant has finished.'
      ),
      f"- Evaluation every {st['eval_every_steps']} steps and at the last, from the EMA weights: "
      f"{st['eval_num_samples']} guided samples (labels 0..9 repeated, noise seed "
      f"{st['eval_seed']}), {tr['sampling']['sampler']} with {tr['sampling']['steps']} steps, "
      f"guidance {tr['sampling']['cfg_scale']}. Frechet distance of the digits classifier's "
      f"features against all 1,797 images ({ref['num_real_images']} real images score "
      f"{fmt(ref['fd_real_images'])}); class accuracy (the classifier's held-out accuracy: "
      f"{fmt(ref['classifier_test_accuracy'])}).",
      "- Threshold: plain MDT's final mean Frechet distance (fixed by that rule before the "
      'runs); the step where a mean curve first reaches it is interpolated linearly between '
      "evaluations; ratio = MDT's step / the variant's (above 1: faster than MDT).",
      f"- Machine: {env['cpu_count']} CPU cores ({env['backend']}, jax {env['jax']}), niceness "
      f"{env['niceness']}, shared with other jobs (1-minute load average "
      f'{fmt(min(loads))}-{fmt(max(loads))}). Whole study: '
      f"{results['study_seconds'] / 60:.1f} min wall-clock (training, evaluation, compilation; "
      "the teacher's training not counted).",
  ]


def _cell(stats: dict, i: int = -1) -> str:
  return f"{fmt(stats['mean'][i])} +- {fmt(stats['std'][i], 2)}"


def _tables(results: dict) -> list[str]:
  summary = results['summary']
  variants = _order(results)
  reach = summary['reach_baseline_final']['fd']
  lines = [
      f"Final values and steps to the threshold (Frechet distance {fmt(reach['target'])}); "
      'seed means +- std, per seed in brackets:',
      '',
      '| variant | final FD | final accuracy | step to threshold [per seed] | ratio to MDT | s / step |',
      '|---|---|---|---|---|---|',
  ]
  for v in variants:
    s = summary['variants'][v]
    seeds = ', '.join(fmt(x, 4) for x in reach[v]['per_seed_steps'])
    lines.append(
        f"| {_label(v)} | {_cell(s['fd'])} | {_cell(s['class_accuracy'])} | "
        f"{fmt(reach[v]['step'], 4)} [{seeds}] | {fmt(reach_ratio(results, v))} | "
        f"{s['seconds_per_step']['mean'][0]:.3f} |"
    )
  for metric, name in (('fd', 'Frechet distance'), ('class_accuracy', 'class accuracy')):
    lines += [
        '',
        f'{name} against steps (seed means +- std):',
        '',
        '| step | ' + ' | '.join(_label(v) for v in variants) + ' |',
        '|---' * (1 + len(variants)) + '|',
    ]
    for i, step in enumerate(summary['variants'][variants[0]]['steps']):
      cells = [_cell(summary['variants'][v][metric], i) for v in variants]
      lines.append(f'| {step} | ' + ' | '.join(cells) + ' |')
  return lines


def write(
    results: dict, out: str, command: str = 'python tools/representation_alignment.py'
) -> tuple[str, str]:
  """``out``.png and ``out``.md (keeping the discussion of an existing .md); their paths."""
  return page.report(
      results,
      out,
      command,
      required=('summary', 'teacher'),
      title="Representation alignment with MDT's masking: a study on digits",
      intro="REPA (a frozen encoder's patch features, here a stand-in for DINOv2) and SRA (the "
      "EMA model's own deeper block at lower noise) added to MDTv2, against plain MDTv2 and "
      'against REPA without the masked branch (DiT+REPA), on the bundled digits dataset '
      "(CPU, offline); and REPA on both of MDT's branches against the plain branch only.",
      figure='representation alignment curves',
      plot=plot,
      setup=_setup,
      tables=_tables,
      conclusion=conclusion,
  )
