"""XLA flags that let the TPU compiler overlap collectives with compute: the latency-hiding
scheduler and asynchronous collectives, so the gradient reductions of the backward pass and the
weight gathers run under the matmuls. The training entry point sets them on a TPU host only
(``mdt_jax.main``), ``tools/aot_compile.py`` when it compiles for a TPU; flags the user already
put in LIBTPU_INIT_ARGS win."""

from __future__ import annotations

import glob
import importlib.util
import os

OVERLAP_FLAGS = (
    '--xla_tpu_enable_latency_hiding_scheduler=true',
    '--xla_tpu_enable_async_collective_fusion=true',
    '--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true',
    '--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true',
    '--xla_tpu_enable_async_collective_fusion_multiple_steps=true',
    '--xla_tpu_overlap_compute_collective_tc=true',
    '--xla_enable_async_all_gather=true',
    '--xla_enable_async_all_reduce=true',
    '--xla_tpu_enable_data_parallel_all_reduce_opt=true',
    '--xla_tpu_data_parallel_opt_different_sized_ops=true',
)
VARIABLE = 'LIBTPU_INIT_ARGS'


def with_overlap_flags(current: str) -> str:
  """`current` (LIBTPU_INIT_ARGS) with each overlap flag it does not already set appended."""
  given = {f.split('=', 1)[0] for f in current.split()}
  extra = [f for f in OVERLAP_FLAGS if f.split('=', 1)[0] not in given]
  return ' '.join([current.strip(), *extra]).strip()


def on_tpu_host() -> bool:
  """libtpu is installed, TPU chips are attached and JAX_PLATFORMS does not exclude TPUs; read
  before JAX starts its backends (the flags must be set before libtpu loads)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and 'tpu' not in platforms.split(','):
    return False
  chips = glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')
  return bool(chips) and importlib.util.find_spec('libtpu') is not None


def set_overlap_flags(environ=os.environ) -> bool:
  """Add the overlap flags to LIBTPU_INIT_ARGS; True if anything was added."""
  new = with_overlap_flags(environ.get(VARIABLE, ''))
  changed = new != environ.get(VARIABLE, '').strip()
  environ[VARIABLE] = new
  return changed
