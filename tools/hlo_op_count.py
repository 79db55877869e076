"""Op counts of a config's compiled train step: StableHLO as lowered, and XLA's optimized HLO.

python tools/hlo_op_count.py --config=configs/quickstart.py [--masked=false] [--json]

A refactor that should leave the computation alone (e.g. reshapes written with einops) keeps
both counts; the per-opcode table says where they differ. Nothing is allocated or run: the step
is lowered on abstract inputs and compiled for this host's devices.
"""

from __future__ import annotations

import collections
import json
import re
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from mdt_jax.configs_base import model_of
from mdt_jax.training import sharding
from mdt_jax.training.state import abstract_train_state, make_optimizer
from mdt_jax.training.step import jit_step_from_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file')
_MASKED = flags.DEFINE_boolean('masked', None, 'mask branch (default: the config)')
_JSON = flags.DEFINE_boolean('json', False, 'print the counts as one JSON object')

_HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(')
_MLIR_OP = re.compile(r'^\s*(?:%[\w:#, ]+=\s*)?"?([a-z_]+\.[a-z_.]+)')


def hlo_opcodes(text: str) -> collections.Counter:
  """Opcode -> instruction count of an HLO module's text (every computation, fusions' too)."""
  return collections.Counter(m.group(1) for m in map(_HLO_OP.match, text.splitlines()) if m)


def mlir_ops(text: str) -> collections.Counter:
  """Op name -> count of a StableHLO module's text (func.return and the like included)."""
  return collections.Counter(m.group(1) for m in map(_MLIR_OP.match, text.splitlines()) if m)


def lower_step(config, mask_branch: bool | None = None):
  """The config's train step lowered on abstract inputs of its global batch."""
  mc = model_of(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict())
  opt = make_optimizer(config.optimizer)
  structs, shardings, graphdef = abstract_train_state(mc, opt, mesh, config.sharding_rules)
  bsh = sharding.batch_sharding(mesh)
  step = jit_step_from_config(
      config, shardings, bsh, graphdef=graphdef, optimizer=opt, mask_branch=mask_branch
  )
  n = config.global_batch_size
  batch = {
      'x': jax.ShapeDtypeStruct((n, mc.input_size, mc.input_size, mc.in_channels), jnp.float32),
      'y': jax.ShapeDtypeStruct((n,), jnp.int32),
  }
  return step.lower(structs, batch)


def op_counts(config, mask_branch: bool | None = None) -> dict:
  lowered = lower_step(config, mask_branch)
  stablehlo = mlir_ops(lowered.as_text())
  optimized = hlo_opcodes(lowered.compile().as_text())
  return {
      'stablehlo_ops': sum(stablehlo.values()),
      'optimized_hlo_ops': sum(optimized.values()),
      'stablehlo': dict(sorted(stablehlo.items())),
      'optimized_hlo': dict(sorted(optimized.items())),
  }


def main(argv):
  del argv
  counts = op_counts(_CONFIG.value, _MASKED.value)
  if _JSON.value:
    json.dump(counts, sys.stdout, indent=1)
    print()
    return
  print(
      f"StableHLO ops: {counts['stablehlo_ops']}, optimized HLO ops: {counts['optimized_hlo_ops']}"
  )
  for name in ('stablehlo', 'optimized_hlo'):
    print(f'\n{name}:')
    for op, n in counts[name].items():
      print(f'  {op:32s} {n}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
