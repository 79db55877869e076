"""The model's parameters by name: the abstract model, flat {name: array} dicts and back.

A parameter's name is its nnx path joined by dots (``en_inblocks.0.attn.qkv.kernel``): the
keys of a model folder's ``model.safetensors`` and of every message that names a parameter.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview
from flax import nnx

from mdt_jax.models.mdt import MDT, MDTConfig

SEP = '.'


def param_name(path: Iterable[Any]) -> str:
  """An nnx state path or a jax tree key path -> 'a.b.0.kernel'."""

  def part(k):
    return str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))

  return SEP.join(part(k) for k in path)


class InitKeys:
  """The initialisation keys of ``nnx.Rngs(seed)`` (``fold_in(key, n)`` for n = 0, 1, ...: the
  same weights, bit for bit) with the draw count a Python int, for constructors that are traced
  (an abstract model, the jitted initialiser). Model constructors only call ``rngs.params()``.

  Why: inside a trace, ``nnx.Rngs`` keeps its count as a traced array, and each draw's update
  asks the traced count for its ``sharding``; the tracer answers with an AttributeError whose
  message walks the whole trace so far, so a model's abstract construction grows with the square
  of its size (MDTv2-XL/2: 2.8 s -> 0.4 s here, BENCHMARKS.md "Start-up of a training process").
  """

  def __init__(self, seed: int | jax.Array):
    if isinstance(seed, int):
      seed = jax.random.key(seed)
    elif not jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
      raise ValueError(f'InitKeys takes an int seed or a typed key, got dtype {seed.dtype}')
    self._key = seed
    self._draws = 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._draws)
    self._draws += 1
    return key


def abstract_model(config: MDTConfig | dict) -> MDT:
  """The model with shapes and dtypes but no weights (nothing is allocated)."""
  return nnx.eval_shape(lambda: MDT(config, rngs=InitKeys(0)))


def count_params(config: MDTConfig | dict) -> int:
  """Parameter count without allocating weights."""
  state = nnx.state(abstract_model(config), nnx.Param)
  return int(sum(np.prod(v.shape) for v in jax.tree.leaves(state)))


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a.b.0.c' -> shape of every array (or array metadata) of a pytree."""
  return {
      param_name(path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def param_shapes(config: MDTConfig) -> dict[str, tuple[int, ...]]:
  """Every parameter of the model (name -> shape), from its abstract init."""
  return leaf_shapes(nnx.to_pure_dict(nnx.state(abstract_model(config))))


def flat_params(params: nnx.State) -> dict[str, np.ndarray]:
  """nnx.State of parameters -> {'a.b.0.kernel': float32 array}."""
  out = {}
  for path, v in nnx.to_flat_state(params):
    value = v.get_value() if hasattr(v, 'get_value') else v
    out[param_name(path)] = np.asarray(jax.device_get(value), np.float32)
  return out


def parameter_table(params, *, stats: bool = False, max_lines: int | None = None) -> str:
  """clu's parameter overview of an nnx.State (or pytree) of parameters, named as
  `param_name` names them: shape, dtype, size and, with `stats`, mean and std (computed on the
  host: a model folder's weights), else the sharding (nothing computed: a run's sharded state)."""
  if isinstance(params, nnx.State):
    leaves = [
        (p, v.get_value() if hasattr(v, 'get_value') else v) for p, v in nnx.to_flat_state(params)
    ]
  else:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  flat = {param_name(path): value for path, value in leaves}
  return parameter_overview.get_parameter_overview(
      flat, include_stats=True if stats else 'sharding', max_lines=max_lines
  )


def key_mismatches(
    found: Mapping[str, tuple],
    expected: Mapping[str, tuple],
    *,
    allowed_extra: Iterable[str] = (),
    more_mismatched: Iterable[str] = (),
    shown: int = 20,
) -> list[str]:
  """Lines naming the missing, unexpected and shape-mismatched keys of ``found`` (name -> shape)
  against ``expected``, at most ``shown`` names each; empty when they match."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected) - set(allowed_extra))
  mismatched = sorted(
      f'{k}: file {tuple(found[k])} vs model {tuple(v)}'
      for k, v in expected.items()
      if k in found and tuple(found[k]) != tuple(v)
  )
  mismatched += list(more_mismatched)
  return [
      f'{len(v)} {n} keys: ' + ', '.join(v[:shown]) + (' ...' if len(v) > shown else '')
      for n, v in (('missing', missing), ('unexpected', unexpected), ('mismatched', mismatched))
      if v
  ]


def model_from_flat(flat: dict[str, np.ndarray], config: MDTConfig, where: str = 'weights') -> MDT:
  """Build the model from flat parameters, refusing missing, unexpected or mismatched keys."""
  model = abstract_model(config)
  expected = {
      param_name(path): (path, tuple(v.shape))
      for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  lines = key_mismatches(
      {k: v.shape for k, v in flat.items()}, {k: shape for k, (_, shape) in expected.items()}
  )
  if lines:
    raise ValueError(f'{where} do not match the model config:\n  ' + '\n  '.join(lines))
  state = nnx.from_flat_state(
      [(expected[k][0], nnx.Param(jnp.asarray(flat[k], jnp.float32))) for k in expected]
  )
  nnx.update(model, state)
  return model
