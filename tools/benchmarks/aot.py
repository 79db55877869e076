"""Compile the real steps for a TPU slice on a host without one (``tools/aot_compile.py``).

For each step (the MDT two-branch train step, the DiT-style one, one guided sampler call) the
compiled TPU program gives, per chip: XLA's FLOPs and ``bytes accessed``, an HBM-only traffic
estimate (`benchmarks.traffic`), memory (arguments, outputs, temporaries, donated aliases) and
its collectives (from the optimized HLO). With the generation's peak figures (`benchmarks.tpu`)
they give a roofline:

    compute = XLA FLOPs / peak    HBM = HBM bytes / HBM bandwidth    ICI = wire time
    bound = max(compute, HBM, ICI)    MFU bound = model FLOPs / (bound * peak)

The bound is what the step cannot beat if the estimates hold (perfect overlap of the three); the
MFU bound uses the analytic model FLOPs (masked encoder at the mean kept count), as MFU does in
`benchmarks.timing`. Two figures are given both ways, the `_xla` columns as XLA counts them:

  HBM  the top-level instructions' HBM operands and results (`hbm_ms`); XLA's ``bytes
       accessed`` (`hbm_xla_ms`) also counts the on-chip (VMEM) side of every prefetch and the
       layout bitcasts inside fusions, 2.9x the known traffic of a lone matmul (`proxy_checks`)
  ICI  each collective's wire bytes over one link per torus dimension its compiled algorithm
       runs over (`ici_ms`, `hlo.Collective.seconds`); over one link (`ici_one_link_ms`)

How far each can be trusted: BENCHMARKS.md, "TPU, compiled without hardware".
"""

from __future__ import annotations

import copy
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mdt_jax.configs_base import model_of
from mdt_jax.models import platform
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.params import abstract_model
from benchmarks import hlo, tables, traffic
from benchmarks.compiled import compile_or_refusal, lower_train_step, memory_figures
from benchmarks.fit import fit_batch
from benchmarks.flops import forward_flops, train_step_flops
from benchmarks.tpu import Slice
from mdt_jax.sampling.guidance import guided_model
from mdt_jax.sampling.sampler import data_mesh, functional_model
from mdt_jax.training import cost, strategies
from mdt_jax.training.run import training_sampler

STEPS = {
    'train': 'train: plain+masked (MDT)',
    'dit': 'train: plain (DiT-style)',
    'sample': 'sample: one guided model call',
}


def cost_figures(compiled) -> dict:
  """XLA's FLOPs, bytes accessed and `optimal_seconds` of a compiled program (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {
      'xla_flops': float(cost.get('flops', 0.0)),
      'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
      'xla_optimal_s': float(cost['optimal_seconds']) if 'optimal_seconds' in cost else None,
  }


def roofline(
    flops: float,
    hbm_bytes: float,
    ici_seconds: float,
    slc: Slice,
    model_flops: float | None = None,
) -> dict:
  """Times per chip (ms) at the generation's peaks, the bottleneck and the MFU bound."""
  g = slc.generation
  times = {
      'compute': flops / (g.peak_bf16_tflops * 1e12),
      'HBM': hbm_bytes / (g.hbm_gbps * 1e9),
      'ICI': ici_seconds,
  }
  bound = max(times.values())
  out = {
      'compute_ms': times['compute'] * 1e3,
      'hbm_ms': times['HBM'] * 1e3,
      'ici_ms': times['ICI'] * 1e3,
      'bound_ms': bound * 1e3,
      'roofline_ms': max(times['compute'], times['HBM']) * 1e3,
      'bottleneck': max(times, key=times.get),
      'flop_per_byte': flops / hbm_bytes if hbm_bytes else None,
      'ridge_flop_per_byte': g.peak_bf16_tflops * 1e3 / g.hbm_gbps,
  }
  if model_flops is not None and bound > 0:
    out['mfu_bound'] = model_flops / (bound * g.peak_bf16_tflops * 1e12)
  return out


def both_rooflines(
    flops: float,
    hbm_bytes: float,
    xla_bytes: float,
    collectives: list,
    slc: Slice,
    model_flops: float | None = None,
) -> dict:
  """The roofline of the HBM-only traffic and the torus's links (`hbm_ms`, `ici_ms`, `mfu_bound`),
  and beside it the one of XLA's bytes accessed and one link (`hbm_xla_ms`, `ici_one_link_ms`,
  `mfu_bound_xla`)."""
  link = slc.generation.ici_link_gbps * 1e9
  torus = hlo.wire_seconds(collectives, link, slc.closed)
  one_link = hlo.wire_seconds(collectives, link, False)
  out = roofline(flops, hbm_bytes, torus, slc, model_flops)
  xla = roofline(flops, xla_bytes, one_link, slc, model_flops)
  out.update(
      hbm_xla_ms=xla['hbm_ms'],
      ici_one_link_ms=xla['ici_ms'],
      bound_xla_ms=xla['bound_ms'],
      bottleneck_xla=xla['bottleneck'],
  )
  if 'mfu_bound' in xla:
    out['mfu_bound_xla'] = xla['mfu_bound']
  return out


def analyse(
    compiled,
    slc: Slice,
    *,
    model_flops: float | None = None,
    hbm_usable_gb: float | None = None,
    hlo_path: str | None = None,
    traffic_top: int = 0,
) -> dict:
  """Every per-chip figure of one compiled program (model_flops: analytic, per chip);
  `traffic_top` > 0 adds where the bytes go (`benchmarks.traffic`)."""
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, 'w') as f:
      f.write(text)
  colls = hlo.parse_collectives(text, slc.chips)
  cost = cost_figures(compiled)
  wire = sum(c.wire_bytes for c in colls)
  moved = traffic.summarize(text, traffic_top)
  g = slc.generation
  out = {
      'xla_tflop_per_chip': cost['xla_flops'] / 1e12,
      'bytes_accessed_gb': cost['bytes_accessed'] / 1e9,
      # the top-level instructions' HBM operands and results: XLA's figure also counts
      # on-chip (VMEM) buffers XLA prefetches into (BENCHMARKS.md)
      'hbm_estimate_gb': moved['hbm_gb'],
      'xla_optimal_s': cost['xla_optimal_s'],
      'collectives': hlo.summarize(colls),
      'collective_wire_gb': wire / 1e9,
      'while_loops': hlo.while_loops(text),
  }
  out.update(
      both_rooflines(
          cost['xla_flops'], moved['hbm_gb'] * 1e9, cost['bytes_accessed'], colls, slc, model_flops
      )
  )
  out.update(memory_figures(compiled))
  if traffic_top:
    out['traffic'] = moved
  out['hbm_spec_gb'] = g.hbm_gb
  out['hbm_usable_gb'] = hbm_usable_gb
  peak = out.get('memory_peak_estimate_gb')
  if peak is not None:
    out['fits'] = peak <= (hbm_usable_gb or g.hbm_gb)
  return out


def lower_sample_step(config: ml_collections.ConfigDict, devices, batch: int):
  """One guided model call of the sampler ([x; x] with labels [y; null], guided eps) as the
  sampler runs it: weights replicated, the batch split over a 1-D 'data' mesh (no
  communication), the guidance settings of `config.sampling`."""
  mc = model_of(config.model.to_dict())
  scfg = training_sampler(config.sampling.to_dict(), mc, config.diffusion.to_dict())
  mesh = data_mesh(devices)
  apply, params = functional_model(abstract_model(mc))

  def local(params, x, t, y):
    fn = guided_model(
        lambda xx, tt, yy: apply(params, xx, tt, yy),
        scfg.guidance,
        null_label=mc.num_classes,
        channels=mc.in_channels,
    )
    return fn(x, t, y)

  step = jax.jit(
      jax.shard_map(
          platform.traced_for(mesh.devices.flat, local),
          mesh=mesh,
          in_specs=(P(), P('data'), P('data'), P('data')),
          out_specs=P('data'),
      )
  )
  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params)
  shape = (batch, mc.input_size, mc.input_size, mc.in_channels)
  return step.lower(
      params,
      jax.ShapeDtypeStruct(shape, jnp.float32, sharding=dat),
      jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dat),
      jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dat),
  )


def _model_flops(mc: MDTConfig, step: str, batch: int) -> tuple[float, float]:
  """(analytic model FLOPs, analytic executed FLOPs) of a step, whole global batch."""
  if step == 'sample':  # guided: the model runs on 2B rows; no backward pass
    f = 2.0 * forward_flops(mc) * batch
    return f, f
  mask = step == 'train'
  return (
      train_step_flops(mc, batch, mask),
      train_step_flops(mc, batch, mask, executed=True),
  )


def _mesh_text(config: ml_collections.ConfigDict, devices, batch: int | None = None) -> str:
  """The strategy and mesh the train step runs with: 'zero data=64 fsdp=1 tensor=1 float32'."""
  mc = model_of(config.model.to_dict())
  batch = config.global_batch_size if batch is None else batch
  return cost.resolve(config.mesh.to_dict(), mc, batch, devices).describe()


def compile_step(
    config: ml_collections.ConfigDict,
    slc: Slice,
    devices,
    step: str,
    *,
    sample_batch: int | None = None,
    hbm_usable_gb: float | None = None,
    hlo_dir: str | None = None,
    traffic_top: int = 0,
) -> dict:
  """Compile one step ('train', 'dit' or 'sample') for the slice; its report row."""
  if step not in STEPS:
    raise ValueError(f'unknown step {step!r}; expected some of {list(STEPS)}')
  mc = model_of(config.model.to_dict())
  batch = config.global_batch_size
  if step == 'sample' and sample_batch:
    batch = sample_batch
  if batch % len(devices):
    raise ValueError(
        f'global batch {batch} of step {step!r} does not split over the '
        f'{len(devices)} chips of {slc.name}'
    )
  t0 = time.perf_counter()
  if step == 'sample':
    lowered = lower_sample_step(config, devices, batch)
    mesh = f'data={len(devices)}'
  else:
    lowered = lower_train_step(
        config, mask_branch=step == 'train', global_batch=batch, devices=devices
    )
    mesh = _mesh_text(config, devices, batch)
  compiled, refused = compile_or_refusal(lowered)
  compile_s = time.perf_counter() - t0
  model, executed = _model_flops(mc, step, batch)
  n = len(devices)
  row = {
      'step': STEPS[step],
      'slice': slc.name,
      'topology': slc.topology,
      'chips': n,
      'device_kind': devices[0].device_kind,
      'mesh': mesh,
      'global_batch': batch,
      'batch_per_chip': batch / n,
      'dtype': mc.dtype,
      'remat': mc.remat,
      'model_tflop_per_chip': model / n / 1e12,
      'executed_tflop_per_chip': executed / n / 1e12,
  }
  if refused:  # too large for the chip: a row that says so, with the refusal's figures
    required, available = refused
    row.update(memory_peak_estimate_gb=required, hbm_usable_gb=available, fits=False)
  else:
    path = os.path.join(hlo_dir, f'{step}.hlo.txt') if hlo_dir else None
    row.update(
        analyse(
            compiled,
            slc,
            model_flops=model / n,
            hbm_usable_gb=hbm_usable_gb,
            hlo_path=path,
            traffic_top=traffic_top,
        )
    )
  row['compile_s'] = compile_s
  return row


AOT_KEYS = [
    'step',
    'slice',
    'mesh',
    'global_batch',
    'dtype',
    'remat',
    'model_tflop_per_chip',
    'xla_tflop_per_chip',
    'bytes_accessed_gb',
    'hbm_estimate_gb',
    'compute_ms',
    'hbm_ms',
    'ici_ms',
    'bottleneck',
    'mfu_bound',
    'hbm_xla_ms',
    'ici_one_link_ms',
    'mfu_bound_xla',
    'memory_peak_estimate_gb',
    'hbm_usable_gb',
    'fits',
    'compile_s',
]
# The search's columns (benchmarks.tables.FIT_KEYS) under the slice's: the slice names the device,
# the step the branches; the first affine guess is bench.py's alone.
FIT_KEYS = ['step', 'slice', 'mesh'] + [
    k for k in tables.FIT_KEYS if k not in ('branches', 'device_kind', 'affine_guess_global_batch')
]


def fit(
    config: ml_collections.ConfigDict,
    slc: Slice,
    devices,
    step: str,
    budget_gb: float,
    max_compiles: int = 4,
) -> dict:
  """The largest batch per chip whose train step fits `budget_gb` (`benchmarks.fit.fit_batch`)."""
  if step == 'sample':
    raise ValueError('--fit searches the train steps (train, dit), not sample')
  row = fit_batch(
      config,
      mask_branch=step == 'train',
      budget_gb=budget_gb,
      max_compiles=max_compiles,
      devices=devices,
  )
  row.update(step=STEPS[step], slice=slc.name, mesh=_mesh_text(config, devices))
  return row


# ---------------------------------------------------------------------- is the proxy sound?


def proxy_programs(n_matmul: int = 8192, n_elem: int = 1 << 26, n_loop: int = 10):
  """Programs whose traffic and FLOPs are known, to check what the roofline makes of them:
  name -> (function, argument structs (shape, dtype), donate, FLOPs, minimum HBM bytes)."""
  mm = (n_matmul, n_matmul)
  vec = (n_elem,)

  def chain(x):  # one fused pass: read x once, write once; 3 FLOPs per element
    return jnp.tanh(x) * 2.0 + jnp.sin(x) * x  # (tanh, sin: XLA's transcendentals)

  def centered(x):  # the mean needs a pass of its own before the subtraction
    return x - jnp.mean(x)

  def sliced(x, i):  # one fused pass over 1/64 of x: only that slice is read
    return jax.lax.dynamic_slice(x, (i,), (n_elem // 64,)) * 2.0 + 1.0

  def update(buf, block):  # in place into a donated buffer: only the block moves
    return jax.lax.dynamic_update_slice(buf, block, (n_elem // 2,))

  def loop(x):  # n_loop passes over x
    return jax.lax.fori_loop(0, n_loop, lambda _, y: y * 1.0001 + 1.0, x)

  f32, bf16 = jnp.float32, jnp.bfloat16
  tall, w = (16384, 1152), (1152, 1152)  # a transformer's token matmul: x gets prefetched
  rows, fc1 = (1024, 1152), (1152, 4608)  # XL/2's MLP at 4 samples a chip: the weight prefetched
  return {
      'bf16 matmul': (
          lambda a, b: a @ b,
          [(mm, bf16), (mm, bf16)],
          (),
          2.0 * n_matmul**3,
          3 * n_matmul**2 * 2,
      ),
      'bf16 matmul [16384,1152]x[1152,1152]': (
          lambda a, b: a @ b,
          [(tall, bf16), (w, bf16)],
          (),
          2.0 * 16384 * 1152**2,
          2 * (2 * 16384 * 1152 + 1152**2),
      ),
      'f32 matmul [1024,1152]x[1152,4608]': (
          lambda a, b: a @ b,
          [(rows, f32), (fc1, f32)],
          (),
          2.0 * 1024 * 1152 * 4608,
          4 * (1024 * 1152 + 1152 * 4608 + 1024 * 4608),
      ),
      'f32 elementwise chain': (chain, [(vec, f32)], (), 3.0 * n_elem, 2 * 4 * n_elem),
      'f32 x - mean(x)': (centered, [(vec, f32)], (), 2.0 * n_elem, 3 * 4 * n_elem),
      'f32 dynamic slice of 1/64 of x, fused': (
          sliced,
          [(vec, f32), ((), jnp.int32)],
          (),
          2.0 * n_elem // 64,
          2 * 4 * n_elem // 64 + 4,
      ),
      'dynamic_update_slice, donated': (
          update,
          [(vec, f32), ((1024,), f32)],
          (0,),
          0.0,
          2 * 4 * 1024,
      ),
      f'fori_loop x{n_loop} elementwise': (
          loop,
          [(vec, f32)],
          (),
          2.0 * n_loop * n_elem,
          2 * 4 * n_elem * n_loop,
      ),
  }


def proxy_checks(slc: Slice, device, **sizes) -> list[dict]:
  """Compile each proxy program for one chip; XLA's figures against the known ones."""
  from jax.sharding import Mesh

  sh = NamedSharding(Mesh(np.array([device]), ('x',)), P())
  rows = []
  for name, (fn, args, donate, flops, min_bytes) in proxy_programs(**sizes).items():
    structs = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in args]
    compiled = jax.jit(fn, donate_argnums=donate).lower(*structs).compile()
    cost = cost_figures(compiled)
    hbm = traffic.summarize(compiled.as_text())['hbm_gb'] * 1e9
    row = {
        'program': name,
        'slice': slc.name,
        'known_gflop': flops / 1e9,
        'xla_gflop': cost['xla_flops'] / 1e9,
        'min_hbm_mb': min_bytes / 1e6,
        'bytes_accessed_mb': cost['bytes_accessed'] / 1e6,
        'bytes_over_min': cost['bytes_accessed'] / min_bytes,
        'hbm_estimate_over_min': hbm / min_bytes,
    }
    row.update(roofline(cost['xla_flops'], hbm, 0.0, slc))
    rows.append(row)
  return rows


def collective_checks(slc: Slice, devices, megabytes: int = 256) -> list[dict]:
  """All-gathers and all-reduces of a known array over one, two and every torus axis of the
  slice (devices in the torus's order, `mesh_utils.create_device_mesh`): the wire bytes the
  ring algorithms send (known), those read from the compiled HLO, the torus dimensions the
  compiler's algorithm runs over and the ICI time over one link and over the torus."""
  from jax import shard_map
  from jax.experimental import mesh_utils
  from jax.sharding import Mesh

  names = ('x', 'y', 'z')[: len(slc.shape)]
  mesh = Mesh(mesh_utils.create_device_mesh(slc.shape, devices), names)
  n_elem = megabytes * 2**20 // 4
  link = slc.generation.ici_link_gbps * 1e9
  rows = []
  for k in range(1, len(names) + 1):
    axes = names[-k:]
    group = math.prod(mesh.shape[a] for a in axes)
    if group < 2:
      continue
    split = NamedSharding(mesh, P(axes))
    whole = NamedSharding(mesh, P())
    gather = jax.jit(lambda v: v * 2.0, out_shardings=whole)
    reduce = jax.jit(
        shard_map(lambda v: jax.lax.psum(v, axes), mesh=mesh, in_specs=P(), out_specs=P())
    )
    for kind, fn, sharding, factor in (
        ('all-gather', gather, split, 1.0),
        ('all-reduce', reduce, whole, 2.0),
    ):
      text = fn.lower(jax.ShapeDtypeStruct((n_elem,), jnp.float32, sharding=sharding))
      colls = hlo.parse_collectives(text.compile().as_text(), slc.chips)
      known = factor * (group - 1) / group * n_elem * 4
      rows.append(
          {
              'program': f'{kind} f32[{n_elem}] over {"x".join(str(mesh.shape[a]) for a in axes)}',
              'slice': slc.name,
              'group': group,
              'known_wire_mb': known / 1e6,
              'hlo_wire_mb': sum(c.wire_bytes for c in colls) / 1e6,
              'torus_dims': max((c.dims for c in colls), default=0),
              'ici_one_link_ms': hlo.wire_seconds(colls, link, False) * 1e3,
              'ici_ms': hlo.wire_seconds(colls, link, slc.closed) * 1e3,
          }
      )
  return rows


COLLECTIVE_KEYS = [
    'program',
    'slice',
    'group',
    'known_wire_mb',
    'hlo_wire_mb',
    'torus_dims',
    'ici_one_link_ms',
    'ici_ms',
]


PROXY_KEYS = [
    'program',
    'slice',
    'known_gflop',
    'xla_gflop',
    'min_hbm_mb',
    'bytes_accessed_mb',
    'bytes_over_min',
    'hbm_estimate_over_min',
    'flop_per_byte',
    'ridge_flop_per_byte',
    'compute_ms',
    'hbm_ms',
    'bottleneck',
]


# ------------------------------------------------------------ the cost model's candidates


SEARCH_KEYS = [
    'strategy',
    'mesh',
    'collective_dtype',
    'global_batch',
    'est_mfu_bound',
    'est_memory_gb',
    'compute_ms',
    'hbm_ms',
    'ici_ms',
    'bottleneck',
    'mfu_bound',
    'mfu_bound_xla',
    'collective_wire_gb',
    'memory_peak_estimate_gb',
    'fits',
    'compile_s',
]


def search(
    config: ml_collections.ConfigDict,
    slc: Slice,
    devices,
    top: int,
    *,
    hbm_usable_gb: float | None = None,
) -> list[dict]:
  """Compile the train step (both branches) with each of the cost model's first `top`
  strategies and meshes for the slice (`mdt_jax.training.cost.rank`): the estimate beside the
  compiled figures, so the choice of `mesh.strategy='auto'` can be checked before a run."""
  mc = model_of(config.model.to_dict())
  chip = cost.chip_of(devices[0])
  if chip is None:
    raise ValueError(f'no cost-model figures for {devices[0].device_kind!r}')
  _, dtype, _ = strategies.mesh_settings(config.mesh.to_dict())
  ranked = cost.rank(
      cost.model_sizes(mc),
      chip,
      len(devices),
      config.global_batch_size,
      None,
      dtype,
      cost.torus_dims(devices),
  )
  rows = []
  for est in ranked[:top]:
    s = est.strategy
    cfg = copy.deepcopy(config)
    cfg.mesh.update(strategy=s.name, data=s.data, fsdp=s.fsdp, tensor=s.tensor)
    row = compile_step(cfg, slc, devices, 'train', hbm_usable_gb=hbm_usable_gb)
    row.update(est.row())
    rows.append(row)
  return rows
