"""Throughput, FLOPs, MFU and memory of the MDTv2 train step and samplers (``tools/bench.py``).

All timings: warm-up excluded (the step is compiled ahead of time and run ``warmup`` times),
``jax.block_until_ready`` before reading the clock, median of ``repeats`` timed runs.
FLOPs come from the compiled program's cost analysis and from the analytic count below; MFU uses
the analytic *useful* FLOPs (masked encoder at the mean kept count) over the device's peak.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mdt_jax.configs_base import model_of
from mdt_jax.hub import official
from mdt_jax.models import masking
from mdt_jax.models.mdt import MDT, MDTConfig
from benchmarks import torch_reference_path
from benchmarks.tpu import compiler_memory_figures
from mdt_jax.sampling import SamplerConfig, build_sampler, labels as labels_lib
from mdt_jax.sampling.sampler import draw_samples
from mdt_jax.training import sharding
from mdt_jax.training.state import abstract_train_state, create_train_state, make_optimizer
from mdt_jax.training.step import jit_step_from_config

# Dense bf16 peak TFLOP/s (no sparsity), by device kind substring.
PEAK_BF16_TFLOPS = {
    'H200': 989.0,
    'H100': 989.0,
    'A100': 312.0,
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5p': 459.0,
    'TPU v6': 918.0,
}


def peak_tflops(device: jax.Device) -> float | None:
  kind = device.device_kind
  for k, v in PEAK_BF16_TFLOPS.items():
    if k.lower() in kind.lower():
      return v
  return None


# ------------------------------------------------------------------------------ analytic FLOPs


def block_flops(n: int, d: int, mlp_ratio: float, skip: bool) -> float:
  """Forward FLOPs (2 per multiply-add) of one MDTBlock on n tokens, per sample."""
  f = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, attention, proj
  f += 2 * 2 * n * d * int(d * mlp_ratio)  # fc1, fc2
  f += 2 * d * 6 * d  # adaLN (per sample)
  if skip:
    f += 2 * n * 2 * d * d
  return float(f)


def forward_flops(cfg: MDTConfig, kept: float | None = None) -> float:
  """Forward FLOPs per sample; ``kept`` tokens in the encoder for the masked pass."""
  d, n, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
  f = 2 * n * cfg.in_channels * p * p * d  # patch embed
  f += 2 * 256 * d + 2 * d * d  # timestep MLP
  f += 2 * d * 2 * d + 2 * n * d * p * p * cfg.out_channels  # final layer
  enc_n = n if kept is None else kept
  if cfg.arch == 'mdtv2':
    f += cfg.half_depth * (
        block_flops(enc_n, d, cfg.mlp_ratio, False) + block_flops(enc_n, d, cfg.mlp_ratio, True)
    )
    f += cfg.decode_layer * block_flops(n, d, cfg.mlp_ratio, True)
  else:
    f += (cfg.depth - cfg.decode_layer) * block_flops(enc_n, d, cfg.mlp_ratio, False)
    f += cfg.decode_layer * block_flops(n, d, cfg.mlp_ratio, False)
  if kept is not None:
    f += block_flops(n, d, cfg.mlp_ratio, False)  # side-interpolater
  return float(f)


def mean_kept(cfg: MDTConfig) -> float:
  """E[floor(L (1 - r))], r ~ U[mask_ratio, mask_ratio + span)."""
  r = np.linspace(cfg.mask_ratio, cfg.mask_ratio + cfg.mask_ratio_span, 20001)[:-1]
  return float(np.floor(cfg.num_tokens * (1 - r)).mean())


def train_step_flops(
    cfg: MDTConfig, batch: int, mask_branch: bool, executed: bool = False
) -> float:
  """Model FLOPs of one train step (forward + backward = 3x forward), whole global batch.

  ``executed=True`` counts the masked encoder at the static buffer size (what runs).
  """
  f = forward_flops(cfg)
  if mask_branch:
    k = masking.max_kept(cfg.num_tokens, cfg.mask_ratio) if executed else mean_kept(cfg)
    f += forward_flops(cfg, kept=k)
  return 3.0 * f * batch


# ------------------------------------------------------------------------------ measurement


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


def memory_figures(compiled) -> dict:
  """Per-device memory of a compiled program in GB ({} where the backend gives none)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if m is None:
    return {}
  args, outs = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  # alias: output buffers that reuse donated arguments (the train state), not counted twice
  return {
      'memory_args_gb': args / 1e9,
      'memory_output_gb': outs / 1e9,
      'memory_temp_gb': temp / 1e9,
      'memory_alias_gb': alias / 1e9,
      'memory_code_gb': m.generated_code_size_in_bytes / 1e9,
      'memory_peak_estimate_gb': (args + outs + temp - alias) / 1e9,
  }


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


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
  flops = _cost_flops(compiled)
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
      _torch_train_run(config, state, data, mask_branch, steps, warmup) if torch_baseline else None
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


def _torch_train_run(
    config: ml_collections.ConfigDict, state, data: dict, mask_branch: bool, steps: int, warmup: int
):
  """A function running `steps` of the original's train step in PyTorch (float32, eager, CPU)
  from the JAX state's current weights on the same batch, warmed up `warmup` steps."""
  try:
    import torch
  except ImportError as e:
    raise ImportError('the PyTorch train baseline needs torch (pip install torch)') from e
  torch_reference_path()
  from torch_reference.train import TorchTrainStep  # needs torch: imported when used

  mc = model_of(config.model.to_dict())
  sd = official.from_flax_params(nnx.State(jax.device_get(state.params)), mc)
  torch.manual_seed(0)  # the step's draws come from torch's RNG
  step = TorchTrainStep.from_config(config, sd, mask_branch=mask_branch)
  x = torch.from_numpy(np.asarray(data['x']).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.asarray(data['y']).astype(np.int64))

  def run():
    for _ in range(steps):
      loss = step(x, y)['loss']
    return loss

  for _ in range(warmup):
    step(x, y)
  return run


def lower_train_step(
    config: ml_collections.ConfigDict, *, mask_branch: bool, global_batch: int, devices=None
):
  """The config's train step lowered on abstract inputs (nothing allocated) over `devices`
  (default: this host's), e.g. the compile-only devices of a TPU topology."""
  mc = model_of(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  opt = make_optimizer(config.optimizer)
  structs, shardings, graphdef = abstract_train_state(mc, opt, mesh, config.sharding_rules)
  bsh = sharding.batch_sharding(mesh)
  step = jit_step_from_config(
      config, shardings, bsh, graphdef=graphdef, optimizer=opt, mask_branch=mask_branch
  )
  shape = (global_batch, mc.input_size, mc.input_size, mc.in_channels)
  batch = {
      'x': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bsh),
      'y': jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=bsh),
  }
  return step.lower(structs, batch)


def compile_or_refusal(lowered) -> tuple[Any, tuple[float, float] | None]:
  """(compiled, None), or (None, (required GB, usable GB)) where the TPU compiler refuses the
  program as larger than the chip's HBM; any other compile error is raised."""
  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    refused = compiler_memory_figures(str(e))
    if refused is None:
      raise
    return None, refused


def memory_estimate_gb(
    config: ml_collections.ConfigDict, *, mask_branch: bool, global_batch: int, devices=None
) -> float:
  """Peak device memory of the compiled train step (compile only, nothing allocated).

  The TPU compiler refuses a program larger than the chip's HBM; its message's figure (total
  memory required) is returned then.
  """
  lowered = lower_train_step(
      config, mask_branch=mask_branch, global_batch=global_batch, devices=devices
  )
  compiled, refused = compile_or_refusal(lowered)
  if refused:
    return refused[0]
  mem = memory_figures(compiled)
  if 'memory_peak_estimate_gb' not in mem:
    raise RuntimeError(f'{jax.default_backend()} gives no memory analysis of compiled programs')
  return mem['memory_peak_estimate_gb']


def fit_batch(
    config: ml_collections.ConfigDict,
    *,
    mask_branch: bool,
    budget_gb: float,
    probe: int | None = None,
    max_compiles: int = 8,
    devices=None,
) -> dict:
  """Largest global batch whose compiled step fits ``budget_gb`` per device.

  Memory is roughly affine in the batch (weights and optimizer state + activations per sample):
  two compiles give a first guess, secant steps over batches that are multiples of the
  data-parallel size settle it, with bisection where the line stalls (each probe is one compile,
  nothing is allocated; `max_compiles` caps them). `devices`: the mesh's (default: this
  host's), e.g. a TPU topology's compile-only devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  dp = sharding.data_parallel_size(mesh)
  seen: dict[int, float] = {}

  def mem(b: int) -> float:
    if b not in seen:
      seen[b] = memory_estimate_gb(config, mask_branch=mask_branch, global_batch=b, devices=devices)
    return seen[b]

  def line_guess(x0: int, x1: int) -> int | None:
    """The largest batch (a multiple of dp) that the line through two probes says fits."""
    slope = (mem(x1) - mem(x0)) / (x1 - x0)
    return int(x0 + (budget_gb - mem(x0)) / slope) // dp * dp if slope > 0 else None

  lo, hi = 0, None  # lo fits (0: nothing checked fits yet)
  sides: list[bool] = []  # did each probe fit?

  def check(b: int) -> None:
    nonlocal lo, hi
    fits = mem(b) <= budget_gb
    sides.append(fits)
    if fits:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)

  def settled() -> bool:
    return len(seen) >= max_compiles or (hi is not None and hi - lo <= dp)

  b1 = max(dp, (probe or config.global_batch_size) // dp * dp)
  b2 = 2 * b1
  check(b1)
  check(b2)
  per_sample = (mem(b2) - mem(b1)) / (b2 - b1)
  fixed = mem(b1) - per_sample * b1
  guess = line_guess(b1, b2)
  # Secant steps: the line through the two nearest probes (around the budget once one probe is
  # over it) says where the budget is; each next probe is its guess, at least one step past
  # what fits. Near-affine memory settles in 4-5 compiles; bisection if the line stalls.
  b = None if guess is None else min(guess, 4 * b2)  # a line through two small batches may
  while not settled():  # be far off: no leaps past 4x
    if (
        b is None
        or b in seen
        or b <= lo
        or (hi is not None and b >= hi)
        or (hi is not None and sides[-2:] == [True, True])
    ):
      b = max(2 * lo, dp) if hi is None else (lo + hi) // 2 // dp * dp
    check(b)
    if hi is None:
      x0, x1 = sorted(seen)[-2:]
      g = line_guess(x0, x1)
      b = None if g is None else min(max(g, lo + dp), 4 * lo)
    elif lo:
      g = line_guess(lo, hi)
      b = None if g is None else min(max(g, lo + dp), hi - dp)
    else:
      b = None
  mc = model_of(config.model.to_dict())
  return {
      'branches': 'plain+masked (MDT)' if mask_branch else 'plain (DiT-style)',
      'dtype': mc.dtype,
      'remat': mc.remat,
      'budget_gb': budget_gb,
      'fixed_gb': fixed,
      'per_sample_gb': per_sample * dp,
      'affine_guess_global_batch': guess,
      'max_global_batch': lo,
      'max_per_device_batch': lo // dp,
      'estimate_at_max_gb': seen.get(lo),
      'exact': hi is not None and hi - lo <= dp,
      'compiles': len(seen),
      'device_kind': devices[0].device_kind,
  }


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


def bench_sampling_torch(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    batch: int,
    cfg_scale: float = 4.0,
    device: str | None = None,
) -> dict:
  """Images/s of the original's guided DDPM sampler in PyTorch, float32 and eager.

  The same weights as `bench_sampling` (random init, seed 0) in the official module tree
  (`torch_reference`); CUDA when torch sees a GPU, else CPU. Warm-up: two steps.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        'the PyTorch baseline needs torch (pip install torch); --eager_baseline '
        'is the float32 eager baseline without it'
    ) from e
  torch_reference_path()
  from torch_reference import from_official_state, sample_ddpm  # needs torch

  mc = model_of(config.model.to_dict())
  if mc.in_channels < 3:
    raise ValueError(
        'the original sampler guides eps channels 0..2; the torch baseline needs '
        f'in_channels >= 3, got {mc.in_channels}'
    )
  device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  sd = official.from_flax_params(nnx.state(MDT(mc, rngs=nnx.Rngs(0)), nnx.Param), mc)
  model = from_official_state(sd, mc, device)
  labels = np.arange(batch) % mc.num_classes
  gen = torch.Generator(device=device).manual_seed(0)
  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
  sample_ddpm(model, labels, steps=2, cfg_scale=cfg_scale, generator=gen)
  sync()
  t0 = time.perf_counter()
  sample_ddpm(model, labels, steps=steps, cfg_scale=cfg_scale, generator=gen)
  sync()
  run_s = time.perf_counter() - t0
  return {
      'sampler': 'ddpm (torch eager)',
      'steps': steps,
      'cfg_scale': cfg_scale,
      'batch': batch,
      'dtype': 'float32',
      'torch': torch.__version__,
      'device_kind': torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu',
      'run_s': run_s,
      'images_per_s': batch / run_s,
  }


def eager_ddpm(
    model, labels: np.ndarray, *, steps: int, cfg_scale: float, seed: int = 0
) -> jax.Array:
  """The guided DDPM sampler run op by op (no jit), float32 as the model computes.

  The jitted sampler's own code (`draw_samples`: guidance, the DDPM loop, per-sample noise),
  each primitive dispatched on its own as in an eager framework.
  """
  mc = model.config
  scfg = SamplerConfig(
      sampler='ddpm',
      steps=steps,
      cfg_scale=cfg_scale,
      guided_channels='first3' if mc.in_channels > 3 else 'all',
  )
  y = jnp.asarray(labels, jnp.int32)
  with jax.disable_jit():
    return draw_samples(
        model,
        scfg,
        (mc.input_size, mc.input_size, mc.in_channels),
        mc.num_classes,
        labels_lib.noise_key(seed),
        jnp.arange(y.shape[0], dtype=jnp.int32),
        y,
    )


def bench_sampling_eager(
    config: ml_collections.ConfigDict, *, steps: int, batch: int, cfg_scale: float = 4.0
) -> dict:
  """Images/s of `eager_ddpm` in float32 on the same random weights as `bench_sampling`.

  A float32 eager baseline that needs no PyTorch (for machines without it); warm-up: 2 steps.
  """
  mc = model_of(config.model.to_dict(), dtype='float32')
  model = MDT(mc, rngs=nnx.Rngs(0))
  labels = np.arange(batch) % mc.num_classes
  jax.block_until_ready(eager_ddpm(model, labels, steps=2, cfg_scale=cfg_scale))  # warm-up
  t0 = time.perf_counter()
  jax.block_until_ready(eager_ddpm(model, labels, steps=steps, cfg_scale=cfg_scale))
  run_s = time.perf_counter() - t0
  return {
      'sampler': 'ddpm (JAX eager)',
      'steps': steps,
      'cfg_scale': cfg_scale,
      'batch': batch,
      'dtype': 'float32',
      'device_kind': jax.devices()[0].device_kind,
      'run_s': run_s,
      'images_per_s': batch / run_s,
  }


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
