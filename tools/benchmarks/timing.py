"""Throughput, MFU and memory of the MDTv2 train step and samplers (``tools/bench.py``).

All timings: warm-up excluded (the step is compiled ahead of time and run ``warmup`` times),
``jax.block_until_ready`` before reading the clock, median of ``repeats`` timed runs.
FLOPs come from the compiled program's cost analysis and from the analytic count
(`benchmarks.flops`).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mdt_jax.configs_base import model_of
from mdt_jax.models.mdt import MDT
from benchmarks.baselines import torch_train_run
from benchmarks.compiled import cost_flops, memory_figures
from benchmarks.flops import peak_tflops, train_step_flops
from mdt_jax.sampling import SamplerConfig, build_sampler
from mdt_jax.training import sharding
from mdt_jax.training.state import create_train_state, make_optimizer
from mdt_jax.training.step import jit_step_from_config


def _timed(fn, repeats: int, cpu_times: list[float] | None = None) -> list[float]:
  """Wall seconds of each of `repeats` calls (this process's CPU seconds appended to
  `cpu_times`: on shared cores the work done, where wall time also counts waiting)."""
  out = []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
    if cpu_times is not None:
      cpu_times.append(time.process_time() - c0)
  return out


def bench_train_step(
    config: ml_collections.ConfigDict,
    *,
    mask_branch: bool,
    steps: int = 10,
    repeats: int = 3,
    warmup: int = 2,
    compile_only: bool = False,
    trace_dir: str | None = None,
    torch_baseline: bool = False,
) -> dict:
  """Compile and time the real train step on synthetic data of the config's shape.

  With `trace_dir`, the timed repeats (only: compilation and warm-up stay out of it) are
  recorded as a `jax.profiler` trace there. With `torch_baseline`, the original's step in
  PyTorch (`torch_reference.train`) starts from the same weights and batch, and each
  timed repeat of the JAX step is followed by one of it (interleaved, so that load on shared
  cores hits both alike); the ratio of the medians is `speedup_vs_torch_f32`, that of the
  process CPU times `speedup_vs_torch_f32_cpu_time`.
  """
  mc = model_of(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict())
  opt = make_optimizer(config.optimizer)
  batch = config.global_batch_size
  t0 = time.perf_counter()
  state, shardings, graphdef = create_train_state(mc, opt, config.seed, mesh, config.sharding_rules)
  init_s = time.perf_counter() - t0
  bsh = sharding.batch_sharding(mesh)
  step = jit_step_from_config(
      config, shardings, bsh, graphdef=graphdef, optimizer=opt, mask_branch=mask_branch
  )
  shape = (batch, mc.input_size, mc.input_size, mc.in_channels)
  data = {
      'x': jax.device_put(jax.random.normal(jax.random.key(0), shape), bsh),
      'y': jax.device_put(jnp.arange(batch, dtype=jnp.int32) % mc.num_classes, bsh),
  }
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  out = {
      'branches': 'plain+masked (MDT)' if mask_branch else 'plain (DiT-style)',
      'global_batch': batch,
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      'dtype': mc.dtype,
      'remat': mc.remat,
      'compile_s': time.perf_counter() - t0,
      'init_s': init_s,
      'model_tflop_per_step': train_step_flops(mc, batch, mask_branch) / 1e12,
      'executed_tflop_per_step': train_step_flops(mc, batch, mask_branch, True) / 1e12,
  }
  flops = cost_flops(compiled)
  if flops is not None:
    # XLA reports the per-device program; scale to the whole mesh.
    out['xla_tflop_per_step'] = flops * jax.device_count() / 1e12
  out.update(memory_figures(compiled))
  if compile_only:
    return out
  holder = {'s': state}

  def run():
    for _ in range(steps):
      holder['s'], m = compiled(holder['s'], data)
    return m['loss']

  torch_run = (
      torch_train_run(config, state, data, mask_branch, steps, warmup) if torch_baseline else None
  )
  for _ in range(warmup):
    holder['s'], m = compiled(holder['s'], data)
    jax.block_until_ready(m['loss'])
  if trace_dir:
    with jax.profiler.trace(trace_dir):
      times = _timed(run, repeats)
  elif torch_run:
    times, torch_times, cpu, torch_cpu = [], [], [], []
    for _ in range(repeats):
      times += _timed(run, 1, cpu)
      torch_times += _timed(torch_run, 1, torch_cpu)
  else:
    times = _timed(run, repeats)
  step_s = statistics.median(times) / steps
  out.update(step_s=step_s, steps_per_s=1.0 / step_s, images_per_s=batch / step_s)
  achieved = out['model_tflop_per_step'] / step_s
  out['achieved_tflops_per_device'] = achieved / jax.device_count()
  peak = peak_tflops(jax.devices()[0])
  if peak:
    out['mfu'] = out['achieved_tflops_per_device'] / peak
  stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_memory_gb'] = stats['peak_bytes_in_use'] / 1e9
  if torch_run:
    import torch

    torch_s = statistics.median(torch_times) / steps
    out.update(
        torch_step_s=torch_s,
        torch_images_per_s=batch / torch_s,
        speedup_vs_torch_f32=torch_s / step_s,
        cpu_s_per_step=statistics.median(cpu) / steps,
        torch_cpu_s_per_step=statistics.median(torch_cpu) / steps,
        speedup_vs_torch_f32_cpu_time=statistics.median(torch_cpu) / statistics.median(cpu),
        speedup_vs_torch_f32_per_repeat=[b / a for a, b in zip(times, torch_times)],
        jax_step_s_per_repeat=[t / steps for t in times],
        torch_step_s_per_repeat=[t / steps for t in torch_times],
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
  return out


def bench_sampling(
    config: ml_collections.ConfigDict,
    *,
    sampler: str,
    steps: int,
    batch: int,
    cfg_scale: float | None = 4.0,
    repeats: int = 1,
) -> dict:
  """Images/s of a full sampling run (compile excluded) on randomly initialised weights."""
  mc = model_of(config.model.to_dict())
  model = MDT(mc, rngs=nnx.Rngs(0))
  scfg = SamplerConfig(
      sampler=sampler,
      steps=steps,
      cfg_scale=cfg_scale,
      guided_channels='first3' if mc.in_channels > 3 else 'all',
  )
  smp = build_sampler(model, scfg)
  idx = np.arange(batch)
  y = idx % mc.num_classes
  t0 = time.perf_counter()
  jax.block_until_ready(smp(idx, y, 0))  # first call compiles
  first = time.perf_counter() - t0
  times = _timed(lambda: smp(idx, y, 1), repeats)
  run_s = statistics.median(times)
  return {
      'sampler': sampler,
      'steps': steps,
      'cfg_scale': cfg_scale,
      'batch': batch,
      'dtype': mc.dtype,
      'device_kind': jax.devices()[0].device_kind,
      'compile_and_first_run_s': first,
      'run_s': run_s,
      'images_per_s': batch / run_s,
  }
