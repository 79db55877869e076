"""The largest global batch whose compiled train step fits a memory budget (compiles only)."""

from __future__ import annotations

import jax
import ml_collections

from mdt_jax.configs_base import model_of
from benchmarks.compiled import compile_or_refusal, lower_train_step, memory_figures
from mdt_jax.training import sharding


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
