"""tools/hlo_op_count.py counts the ops of a module's text by opcode."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

_TOOL = pathlib.Path(__file__).parents[1] / 'tools' / 'hlo_op_count.py'
_spec = importlib.util.spec_from_file_location('hlo_op_count', _TOOL)
hlo_op_count = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hlo_op_count)


def _double_transpose(x):
  return jnp.transpose(x.reshape(4, 6)) * 2.0 + x.reshape(6, 4)


def test_counts_name_the_ops_of_both_levels():
  lowered = jax.jit(_double_transpose).lower(jax.ShapeDtypeStruct((24,), jnp.float32))
  stablehlo = hlo_op_count.mlir_ops(lowered.as_text())
  assert stablehlo['stablehlo.reshape'] == 2
  assert stablehlo['stablehlo.transpose'] == 1
  assert stablehlo['stablehlo.multiply'] == 1 and stablehlo['stablehlo.add'] == 1
  optimized = hlo_op_count.hlo_opcodes(lowered.compile().as_text())
  assert optimized['parameter'] >= 1
  assert sum(optimized.values()) > 2
