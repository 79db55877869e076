"""Markdown tables of the benchmark results and the columns each table shows."""

from __future__ import annotations

from typing import Any


def markdown_table(rows: list[dict], keys: list[str]) -> str:
  def fmt(v: Any) -> str:
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)

  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(fmt(r.get(k, '')) for k in keys) + ' |' for r in rows]
  return '\n'.join(lines)


TRAIN_KEYS = [
    'branches',
    'device_kind',
    'devices',
    'global_batch',
    'dtype',
    'remat',
    'steps_per_s',
    'images_per_s',
    'torch_images_per_s',
    'speedup_vs_torch_f32',
    'speedup_vs_torch_f32_cpu_time',
    'model_tflop_per_step',
    'xla_tflop_per_step',
    'achieved_tflops_per_device',
    'mfu',
    'compile_s',
    'memory_peak_estimate_gb',
    'device_peak_memory_gb',
]
SAMPLE_KEYS = [
    'sampler',
    'steps',
    'cfg_scale',
    'batch',
    'dtype',
    'device_kind',
    'images_per_s',
    'run_s',
    'compile_and_first_run_s',
    'speedup_vs_torch_eager_f32',
    'speedup_vs_jax_eager_f32',
]
FIT_KEYS = [
    'branches',
    'device_kind',
    'dtype',
    'remat',
    'budget_gb',
    'fixed_gb',
    'per_sample_gb',
    'affine_guess_global_batch',
    'max_per_device_batch',
    'estimate_at_max_gb',
    'exact',
    'compiles',
]
