"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (set where they are created, in ``mdt_jax.models.layers``):

    embed     the hidden size D (model width) of inputs/outputs of most kernels
    embed2    the 2D input of skip_linear          embed_out  the output of the t-MLP's 2nd layer
    heads     the 3D / D attention width (qkv output, proj input)
    mlp       the MLP hidden width                 ada        the adaLN modulation outputs (6D, 2D)
    vocab     the class-table rows

``config.sharding_rules`` is data, (logical name, mesh axis or None) pairs as in MaxText and
maxdiffusion; Flax NNX resolves the names (``nnx.logical_axis_rules`` and
``nnx.get_partition_spec``). A mesh axis of size 1 is dropped; one that does not divide its
dimension is dropped with a warning naming the parameter; one already used by an earlier
dimension of the same array is dropped (``embed2`` and ``embed`` both map to ``fsdp``). The batch
is sharded over the data axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
DATA_AXES = ('data', 'fsdp')
# config.mesh's keys that are not axis sizes (mdt_jax/training/strategies.py)
MESH_SETTINGS = ('strategy', 'collective_dtype')


def make_mesh(shape: dict | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over ('data', 'fsdp', 'tensor'); one size may be -1 (= all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, dict):  # a config's mesh section: its strategy settings are not axes
    shape = {k: v for k, v in shape.items() if k not in MESH_SETTINGS}
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise ValueError(f'unknown mesh axes {unknown}; expected a subset of {MESH_AXES}')
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = list(shape) + [1] * (len(MESH_AXES) - len(shape))
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % rest:
      raise ValueError(f'{len(devices)} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}')
    sizes[sizes.index(-1)] = len(devices) // rest
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
        f'{len(devices)} are available'
    )
  try:
    arr = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # noqa: BLE001 - e.g. simulated CPU devices without topology
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _rules(rules: Sequence) -> tuple:
  """The rules as (logical name, mesh axis | tuple of axes | None) pairs, checked against the
  mesh's axis names (config.json gives lists for tuples)."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'sharding rule {rule!r}: expected (logical name, mesh axis or None)')
    name, axis = rule
    axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
    unknown = [
        a
        for a in (axis if isinstance(axis, tuple) else (axis,))
        if a is not None and a not in MESH_AXES
    ]
    if unknown:
      raise ValueError(
          f'sharding rule {rule!r} names mesh axes {unknown}; expected axes of '
          f'{MESH_AXES} or None'
      )
    out.append((name, axis))
  return tuple(out)


def _fit(path: str, spec: P, shape: Sequence[int], mesh: Mesh, logical: Sequence) -> P:
  """`spec` (mesh axes per dimension) with the axes that cannot apply replaced by None."""
  used, out = set(), []
  for dim, (entry, size, name) in enumerate(zip(spec, shape, logical)):
    axes = [] if entry is None else list(entry) if isinstance(entry, tuple) else [entry]
    if any(a not in mesh.shape for a in axes):
      raise ValueError(
          f'parameter {path} dimension {dim}: logical axis {name!r} has no '
          f'sharding rule (config.sharding_rules maps names to {MESH_AXES})'
      )
    axes = [a for a in axes if mesh.shape[a] > 1 and a not in used]
    split = int(np.prod([mesh.shape[a] for a in axes]))
    if axes and size % split:
      logging.warning(
          'parameter %s dimension %d (size %d, logical axis %r) is replicated: mesh '
          'axis %s of size %d does not divide it',
          path,
          dim,
          size,
          name,
          '*'.join(axes),
          split,
      )
      axes = []
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Sequence) -> dict:
  """Pure-dict tree of NamedShardings for a model's parameters (from their logical names)."""
  with nnx.logical_axis_rules(_rules(rules)):
    specs = nnx.get_partition_spec(abstract_state)

  def one(path, spec, var):
    logical = var.get_metadata().get('out_sharding') or (None,) * var.ndim
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    return NamedSharding(mesh, _fit(name, spec.get_value(), var.shape, mesh, logical))

  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  shardings = jax.tree_util.tree_map_with_path(one, specs, abstract_state, is_leaf=is_var)
  return nnx.to_pure_dict(shardings)
