"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (set where they are created, in ``mdt_jax.models.layers``):

    embed     the hidden size D (model width) of inputs/outputs of most kernels
    embed2    the 2D input of skip_linear          embed_out  the output of the t-MLP's 2nd layer
    heads     the 3D / D attention width (qkv output, proj input)
    mlp       the MLP hidden width                 ada        the adaLN modulation outputs (6D, 2D)
    vocab     the class-table rows

``config.sharding_rules`` maps each name to a mesh axis (or None). A dimension is sharded only if
the axis exists, has size > 1, divides the dimension and is not already used by another
dimension of the same array; otherwise it is replicated. The batch is sharded over the data axes.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
DATA_AXES = ('data', 'fsdp')

# FSDP over the model width; tensor parallelism over heads and MLP width when the axis is > 1.
DEFAULT_RULES = (
    ('embed', 'fsdp'), ('embed2', 'fsdp'), ('embed_out', 'tensor'), ('heads', 'tensor'),
    ('mlp', 'tensor'), ('ada', 'tensor'), ('vocab', None),
)


def make_mesh(shape: dict | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over ('data', 'fsdp', 'tensor'); one size may be -1 (= all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, dict):
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
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'{len(devices)} are available')
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


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: dict,
                    mesh: Mesh) -> P:
  used, out = set(), []
  for name, dim in zip(names, shape):
    axis = rules.get(name) if name is not None else None
    ok = (axis is not None and axis in mesh.shape and mesh.shape[axis] > 1
          and dim % mesh.shape[axis] == 0 and axis not in used)
    out.append(axis if ok else None)
    if ok:
      used.add(axis)
  return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Sequence) -> dict:
  """Pure-dict tree of NamedShardings for a model's parameters (from their logical names)."""
  rules = dict(rules)

  def one(var):
    names = var.get_metadata().get('out_sharding') or (None,) * var.ndim
    return NamedSharding(mesh, logical_to_spec(names, var.shape, rules, mesh))

  specs = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)
