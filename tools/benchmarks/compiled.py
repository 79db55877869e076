"""The train step compiled without running it: lowered on abstract inputs, XLA's FLOP and memory
figures of the compiled program, and the TPU compiler's refusal of a program too large for HBM."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mdt_jax.configs_base import model_of
from benchmarks.tpu import compiler_memory_figures
from mdt_jax.models import dinov2
from mdt_jax.training import cost, sharding, strategies
from mdt_jax.training.run import as_run, stored_features
from mdt_jax.training.state import abstract_train_state, make_optimizer
from mdt_jax.training.step import jit_step_from_config


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


def cost_flops(compiled) -> float | None:
  """XLA's FLOPs of a compiled program (per device), or None where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def lower_train_step(
    config: ml_collections.ConfigDict, *, mask_branch: bool, global_batch: int, devices=None
):
  """The config's train step lowered on abstract inputs (nothing allocated) over `devices`
  (default: this host's), e.g. the compile-only devices of a TPU topology."""
  aligned = config.get('align') is not None and config.align.method != 'none'
  run = as_run(config) if aligned else None
  mc = run.model if aligned else model_of(config.model.to_dict())  # with the projector
  # the strategy training would run (mesh.strategy, or the cost model's choice for the slice)
  strategy = cost.resolve(config.mesh.to_dict(), mc, global_batch, devices, mask_branch)
  mesh = strategies.make_mesh(strategy, devices)
  opt = make_optimizer(config.optimizer)
  structs, shardings, graphdef = abstract_train_state(
      mc, opt, mesh, config.sharding_rules, strategy.state_axes
  )
  bsh = sharding.batch_sharding(mesh)
  layout = strategies.step_layout(strategy, mc, mesh, config.sharding_rules, shardings.params)
  step = jit_step_from_config(
      config,
      shardings,
      bsh,
      graphdef=graphdef,
      optimizer=opt,
      mask_branch=mask_branch,
      layout=layout,
  )
  shape = (global_batch, mc.input_size, mc.input_size, mc.in_channels)
  batch = {
      'x': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bsh),
      'y': jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=bsh),
  }
  if aligned and stored_features(run):  # REPA on latents: the stored teacher features
    teacher = dinov2.read_config(run.align.teacher)
    tokens = (run.align.resolution // teacher.patch_size) ** 2
    batch['align'] = jax.ShapeDtypeStruct(
        (global_batch, tokens, teacher.hidden_size), jnp.float32, sharding=bsh
    )
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
