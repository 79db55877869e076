"""A small cost model of the sharding strategies (mdt_jax/training/strategies.py) on a TPU slice:
per chip and per step, the compute, HBM and ICI times and the memory of each candidate strategy
and mesh, from the parameter and optimizer-state sizes, activations per sample and the chip's
figures. `mesh.strategy='auto'` takes the fastest candidate that fits; `tools/aot_compile.py
--search` compiles the first few to check them.

The estimates are a ranking, not a measurement (compiled figures: BENCHMARKS.md):

    compute  6 x parameters x tokens per sample (x 1 + kept fraction with the mask branch)
    HBM      weights read in the forward and backward passes of each branch, the optimizer's
             update over the chip's share of the state, and activation traffic per sample
             (fitted to the HBM-only traffic of compiled XL/2 steps, the roofline's HBM)
    ICI      ring collectives (wire bytes per chip as tools/benchmarks/hlo.py counts them) over
             one link's bandwidth, or one per torus axis for a collective over every chip of a
             slice whose axes all close into rings (the compiler's algorithm runs on all of
             them): gradients all-reduced in the compute dtype (dp, and across fsdp groups:
             XLA's reduction; zero on a closed torus) or reduce-scattered in the collective
             dtype in two stages (zero elsewhere: per-shard gradients), weights gathered once
             per step (zero, hybrid) or at each use (fsdp: about 2.6 gathers per step)
    memory   stored state over its split, the gathered weights, float32 gradients and
             activations per sample
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.params import abstract_model
from mdt_jax.training import strategies, tpu_chips
from mdt_jax.training.strategies import Strategy

Chip = tpu_chips.Generation
# jax's device_kind -> figures (mdt_jax/training/tpu_chips.py)
CHIPS = {kind: tpu_chips.GENERATIONS[name] for kind, name in tpu_chips.DEVICE_KINDS.items()}
HBM_MARGIN = 0.85  # of the chip's HBM the model plans to use (the runtime and XLA keep some)
FSDP_GATHERS = 2.6  # weight gathers per step under fsdp (compiled XL/2 step, v5p-128)
# Activation memory and HBM traffic per sample, per block and token of width 1152 in bf16
# (fitted to the compiled XL/2 step on v5p-8: 37 GB per chip at 64 per chip; float32 doubles).
ACT_BYTES_PER_TOKEN_DIM = 30.0
WEIGHT_PASSES = 8.0  # HBM bytes per weight and step per compute-dtype byte (fwd+bwd, 2 branches)
# Fitted to the HBM-only traffic of four compiled full XL/2 steps (v5p-8 zero f32 and fsdp bf16
# at 64 per chip, v5p-128 zero f32 and fsdp 16x4 bf16 at 4 per chip; within 10% of each): the
# weights' and optimizer's bytes above times STATE_TRAFFIC_FIT, activation traffic per sample.
STATE_TRAFFIC_FIT = 1.15
ACT_TRAFFIC_PER_TOKEN_DIM = 215.0


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the model makes of a step (counts per step, whole model)."""

  params: int
  opt_state_bytes: int
  tokens: int
  depth: int
  hidden: int
  compute_bytes: int  # 2 for bfloat16 compute, 4 for float32
  remat: bool
  mask_fraction: float  # the masked branch's kept tokens over all (0: no mask branch)


def model_sizes(mc: MDTConfig, opt_state_bytes: int | None = None, mask_branch=True) -> Sizes:
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_model_params(mc)))
  kept = 1.0 - (mc.mask_ratio + mc.mask_ratio_span / 2) if mc.mask_ratio is not None else 0.0
  return Sizes(
      params=params,
      opt_state_bytes=opt_state_bytes if opt_state_bytes is not None else 4 * 4 * params,
      tokens=mc.num_tokens,
      depth=mc.depth,
      hidden=mc.hidden_size,
      compute_bytes=2 if mc.dtype == 'bfloat16' else 4,
      remat=mc.remat,
      mask_fraction=kept if mask_branch else 0.0,
  )


def abstract_model_params(mc: MDTConfig):
  return nnx.to_pure_dict(nnx.state(abstract_model(mc), nnx.Param))


@dataclasses.dataclass(frozen=True)
class Estimate:
  strategy: Strategy
  compute_ms: float
  hbm_ms: float
  ici_ms: float
  memory_gb: float
  fits: bool

  @property
  def bound_ms(self) -> float:
    return max(self.compute_ms, self.hbm_ms, self.ici_ms)

  @property
  def mfu_bound(self) -> float:
    return self.compute_ms / self.bound_ms if self.bound_ms else 0.0

  def row(self) -> dict:
    return {
        'strategy': self.strategy.name,
        'mesh': f'data={self.strategy.data},fsdp={self.strategy.fsdp}',
        'collective_dtype': self.strategy.collective_dtype,
        'est_compute_ms': round(self.compute_ms, 2),
        'est_hbm_ms': round(self.hbm_ms, 2),
        'est_ici_ms': round(self.ici_ms, 2),
        'est_mfu_bound': round(self.mfu_bound, 3),
        'est_memory_gb': round(self.memory_gb, 2),
        'est_fits': self.fits,
    }


def _ring(n: int, nbytes: float, factor: float = 1.0) -> float:
  return factor * (n - 1) / n * nbytes if n > 1 else 0.0


def estimate(
    s: Strategy, sizes: Sizes, chip: Chip, global_batch: int, torus_dims: int = 1
) -> Estimate:
  """One candidate's estimate; `torus_dims`: the links a collective over every chip runs on at
  once (the slice's axes where they all close into rings, else 1)."""
  n = s.data * s.fsdp * s.tensor
  b = global_batch / n
  p, a, c = sizes.params, sizes.compute_bytes, (2 if s.collective_dtype == 'bfloat16' else 4)
  g = min(a, c)  # gradients are reduced in the dtype they are computed in
  w4 = 4.0 * p
  store = (2 * w4 + sizes.opt_state_bytes) / (n if s.state_axes else s.fsdp)
  branches = 1.0 + sizes.mask_fraction
  token_dims = sizes.tokens * sizes.hidden * sizes.depth * branches * (a / 2)
  act = ACT_BYTES_PER_TOKEN_DIM * token_dims * (0.3 if sizes.remat else 1.0)
  flops = 6.0 * p * sizes.tokens * branches * b
  # the gathered weights beside the stored ones; float32 gradients before their reduction
  gathered = {'dp': 0.0, 'fsdp': 2 * a * p / s.fsdp, 'zero': c * p, 'hybrid': c * p / s.fsdp}
  memory = store + gathered[s.name] + w4 / s.fsdp + act * b
  optimizer_traffic = (5 * w4 + 2 * sizes.opt_state_bytes) / (n if s.state_axes else s.fsdp)
  hbm = STATE_TRAFFIC_FIT * (WEIGHT_PASSES * a * p + optimizer_traffic)
  hbm += ACT_TRAFFIC_PER_TOKEN_DIM * token_dims * b
  links = lambda group: torus_dims if group == n else 1  # noqa: E731
  ring = lambda group, nbytes, factor=1.0: _ring(group, nbytes, factor) / links(group)  # noqa
  if s.name == 'dp':
    wire = ring(n, g * p, 2.0)
  elif s.name == 'zero' and torus_dims > 1:  # the weights gathered once, the gradients reduced
    wire = ring(n, c * p) + ring(n, c * p, 2.0)  # by one all-reduce over every axis's links
  elif s.name == 'zero':  # the gradients reduce-scattered in two stages (collective dtype)
    outer, inner = strategies.scatter_split(n)
    wire = ring(n, c * p) + ring(outer, c * p) + ring(inner, c * p / outer)
  elif s.name == 'fsdp':  # the data axis all-reduces the float32 gradient shards
    wire = FSDP_GATHERS * ring(s.fsdp, a * p) + ring(s.fsdp, g * p)
    wire += ring(s.data, w4 / s.fsdp, 2.0)
  else:  # hybrid
    wire = FSDP_GATHERS * ring(s.fsdp, a * p) + ring(s.fsdp, g * p)
    wire += ring(s.data, g * p / s.fsdp, 2.0) + ring(s.data, c * p / s.fsdp)
  return Estimate(
      strategy=s,
      compute_ms=flops / (chip.peak_bf16_tflops * 1e12) * 1e3,
      hbm_ms=hbm / (chip.hbm_gbps * 1e9) * 1e3,
      ici_ms=wire / (chip.ici_link_gbps * 1e9) * 1e3,
      memory_gb=memory / 1e9,
      fits=memory / 1e9 <= HBM_MARGIN * chip.hbm_gb,
  )


def candidates(n: int, global_batch: int, dtypes: Sequence[str] = ('float32',)) -> list[Strategy]:
  """Every strategy and mesh of n chips (tensor=1) whose data axes split the batch."""
  out = []
  groups = [f for f in (2**k for k in range(int(math.log2(n)) + 1)) if n % f == 0]
  for dtype in dtypes:
    out += [Strategy('dp', n, 1, collective_dtype=dtype)]
    out += [Strategy('zero', n, 1, collective_dtype=dtype)]
    out += [Strategy('fsdp', n // f, f, collective_dtype=dtype) for f in groups if f > 1]
    out += [Strategy('hybrid', n // f, f, collective_dtype=dtype) for f in groups if 1 < f < n]
  return [s for s in out if global_batch % (s.data * s.fsdp) == 0]


def rank(
    sizes: Sizes,
    chip: Chip,
    n: int,
    global_batch: int,
    only: str | None = None,
    dtype='float32',
    torus_dims: int = 1,
) -> list[Estimate]:
  """The candidates' estimates, fitting ones first, fastest first (the simpler strategy of
  equal bounds first: the candidates' order)."""
  est = [
      estimate(s, sizes, chip, global_batch, torus_dims)
      for s in candidates(n, global_batch, (dtype,))
  ]
  est = [e for e in est if only is None or e.strategy.name == only]
  return sorted(est, key=lambda e: (not e.fits, round(e.bound_ms, 3)))


def chip_of(device) -> Chip | None:
  return tpu_chips.of_device(device)


def torus_dims(devices: Sequence[jax.Device]) -> int:
  """The torus axes a collective over all `devices` runs on at once: those of more than one
  chip where every axis closes into a ring (`tpu_chips.closed_torus`), else 1."""
  devices = list(devices)
  shape = tpu_chips.torus_shape(devices)
  if shape is None or not tpu_chips.closed(tpu_chips.of_device(devices[0]), shape):
    return 1
  return max(1, sum(d > 1 for d in shape))


def resolve(
    mesh_cfg,
    mc: MDTConfig,
    global_batch: int,
    devices: Sequence[jax.Device] | None = None,
    mask_branch: bool = True,
) -> Strategy:
  """The run's strategy: as the config names it, else the cost model's choice on TPU (logged
  with the alternatives' estimates), else data parallel."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  named, dtype, _ = strategies.mesh_settings(mesh_cfg)
  fixed = strategies.explicit(mesh_cfg, n)
  if fixed is not None:
    return fixed
  chip = chip_of(devices[0])
  if chip is None or devices[0].platform != 'tpu':
    chosen = strategies.default(n, dtype)
    if named == 'hybrid':
      raise ValueError(
          'mesh.strategy=hybrid needs its group size off TPU: set mesh.data and mesh.fsdp'
      )
    logging.info('mesh: %s (not a TPU: no cost model)', chosen.describe())
    return chosen
  est = rank(
      model_sizes(mc, mask_branch=mask_branch),
      chip,
      n,
      global_batch,
      None if named == 'auto' else named,
      dtype,
      torus_dims(devices),
  )
  if not est:
    raise ValueError(f'no {named} mesh of {n} chips splits global batch {global_batch}')
  logging.info(
      'mesh %s: %s chosen by the cost model; estimates:', named, est[0].strategy.describe()
  )
  for e in est[:8]:
    logging.info('  %s', e.row())
  return est[0].strategy
