"""Sharding strategies as data: how the weights, gradients and optimizer state of a run are split.

``config.mesh`` holds the strategy beside the mesh axis sizes:

    dp      data parallel: everything replicated, gradients all-reduced (mesh data=N)
    fsdp    the weights, EMA and optimizer state split over ``fsdp`` by ``config.sharding_rules``;
            XLA gathers each weight where it is used and reduce-scatters its gradient (mesh
            fsdp=N; with data > 1 as well: FSDP inside a group, data parallel across)
    zero    data parallel with sharded state (ZeRO): weights, EMA and optimizer state split over
            every data axis; each step gathers the weights once, in ``collective_dtype``, and
            reduce-scatters the gradients (on a closed TPU torus: one all-reduce, `step_layout`),
            so the optimizer update runs on 1/N of the state (mesh data=N)
    hybrid  FSDP inside a group of ``fsdp`` chips and ZeRO across the groups: the rules' split
            over ``fsdp``, then the state split over ``data`` too; each step gathers over ``data``
            once (mesh data=N/F, fsdp=F)
    auto    the cost model (``mdt_jax.training.cost``) picks one and its mesh for the slice and
            batch; off TPU, and when axis sizes other than the defaults are given, it is the
            layout of today's rules (``dp`` for the default sizes, else ``fsdp``)

``collective_dtype``: 'float32' (default: the step is the same program as before, the weights
gathered as they are stored) or 'bfloat16' (the matmul kernels are rounded to bfloat16 before they
are gathered and their gradients are taken, and so reduced, in bfloat16; float32 master weights
and optimizer state). Every strategy stores the same values: a checkpoint of one resumes on any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mdt_jax.models import attention, shards
from mdt_jax.models.params import abstract_model
from mdt_jax.training import sharding, tpu_chips

STRATEGIES = ('dp', 'fsdp', 'zero', 'hybrid')
COLLECTIVE_DTYPES = ('float32', 'bfloat16')
# config.mesh's sizes when nobody set them: 'auto' may then choose the mesh
DEFAULT_SIZES = {'data': -1, 'fsdp': 1, 'tensor': 1}
SETTINGS = ('strategy', 'collective_dtype')


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One strategy on one mesh: its name, the mesh axis sizes and the collectives' dtype."""

  name: str
  data: int
  fsdp: int
  tensor: int = 1
  collective_dtype: str = 'float32'

  def __post_init__(self):
    if self.name not in STRATEGIES:
      raise ValueError(f'mesh.strategy {self.name!r}: expected one of {STRATEGIES} or auto')
    if self.collective_dtype not in COLLECTIVE_DTYPES:
      raise ValueError(
          f'mesh.collective_dtype {self.collective_dtype!r}: expected one of {COLLECTIVE_DTYPES}'
      )

  @property
  def shape(self) -> dict:
    return {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}

  @property
  def state_axes(self) -> tuple[str, ...]:
    """Mesh axes the stored state is split over beyond the rules' layout."""
    return ('data',) if self.name in ('zero', 'hybrid') else ()

  def describe(self) -> str:
    return (
        f'{self.name} data={self.data} fsdp={self.fsdp} tensor={self.tensor} '
        f'{self.collective_dtype}'
    )


def mesh_settings(mesh_cfg: Mapping) -> tuple[str, str, dict]:
  """(strategy, collective dtype, axis sizes) of a config's mesh section."""
  cfg = dict(mesh_cfg)
  strategy = cfg.pop('strategy', 'auto')
  dtype = cfg.pop('collective_dtype', 'float32')
  if strategy != 'auto' and strategy not in STRATEGIES:
    raise ValueError(f"mesh.strategy {strategy!r}: expected 'auto' or one of {STRATEGIES}")
  if dtype not in COLLECTIVE_DTYPES:
    raise ValueError(f'mesh.collective_dtype {dtype!r}: expected one of {COLLECTIVE_DTYPES}')
  return strategy, dtype, cfg


def _filled(sizes: dict, n: int) -> dict:
  """The axis sizes with -1 resolved over n devices (`sharding.make_mesh`'s rule)."""
  full = {**DEFAULT_SIZES, **sizes}
  rest = int(np.prod([v for v in full.values() if v != -1]))
  return {k: (n // rest if v == -1 else int(v)) for k, v in full.items()}


def explicit(mesh_cfg: Mapping, n: int) -> Strategy | None:
  """The strategy the mesh section names without the cost model, or None (the cost model's
  choice: 'auto' on TPU with the default sizes, or a named strategy that leaves its group
  size open)."""
  strategy, dtype, sizes = mesh_settings(mesh_cfg)
  given = {**DEFAULT_SIZES, **sizes} != DEFAULT_SIZES
  if strategy == 'auto':
    return Strategy('fsdp', **_filled(sizes, n), collective_dtype=dtype) if given else None
  if given:
    return Strategy(strategy, **_filled(sizes, n), collective_dtype=dtype)
  if strategy in ('dp', 'zero'):
    return Strategy(strategy, data=n, fsdp=1, collective_dtype=dtype)
  if strategy == 'fsdp':
    return Strategy(strategy, data=1, fsdp=n, collective_dtype=dtype)
  return None  # hybrid: the cost model picks the group size


def default(n: int, dtype: str = 'float32') -> Strategy:
  """Off TPU: data parallel over every device (the mesh default before strategies)."""
  return Strategy('dp', data=n, fsdp=1, collective_dtype=dtype)


# ------------------------------------------------------------------------------ the layouts


def split_further(sh: NamedSharding, shape: Sequence[int], axes: Sequence[str]) -> NamedSharding:
  """`sh` with each of `axes` (size > 1, not yet used) added to a dimension it divides: the
  dimension already split, else the largest; an axis that divides none is left out."""
  mesh = sh.mesh
  spec = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
  dims = [[] if e is None else list(e) if isinstance(e, tuple) else [e] for e in spec]
  for axis in axes:
    if mesh.shape[axis] <= 1 or any(axis in d for d in dims):
      continue
    split = lambda i: int(np.prod([mesh.shape[a] for a in dims[i]]))  # noqa: E731
    order = sorted(range(len(shape)), key=lambda i: (not dims[i], -shape[i]))
    for i in order:
      if shape[i] % (split(i) * mesh.shape[axis]) == 0:
        dims[i].append(axis)
        break
  out = [None if not d else d[0] if len(d) == 1 else tuple(d) for d in dims]
  return NamedSharding(mesh, P(*out))


def state_layout(rules_layout: Any, abstract_params: Any, state_axes: Sequence[str]) -> Any:
  """Shardings of the stored parameters (and so EMA and optimizer moments): the rules' layout
  split further over a strategy's state axes."""
  if not state_axes:
    return rules_layout
  return jax.tree.map(
      lambda sh, a: split_further(sh, a.shape, state_axes), rules_layout, abstract_params
  )


@dataclasses.dataclass(frozen=True, eq=False)
class StepLayout:
  """What the train step does at the strategy's two collectives: the stored parameters become
  the forward's weights (cast to `dtype`, laid out as `weights`: gathered once), and the
  gradients become the optimizer's (laid out as `grads`, float32). With `scatter` (zero) each
  chip takes the gradient of its own batch shard under shard_map and the gradients are
  reduce-scattered onto `grads` in two stages over a split of the data axis (`scatter`: outer,
  inner; the TPU compiler makes one reduce-scatter over every chip an all-reduce); else XLA
  reduces them where the weight gradients are computed and keeps this chip's share (on a
  closed torus, one all-reduce that runs on every axis's links)."""

  weights: Any  # pure dict of NamedShardings: the rules' layout
  grads: Any  # pure dict of NamedShardings: the stored state's layout
  dtype: str
  scatter: tuple[int, int] | None = None

  def forward_weights(self, params):
    """The matmul kernels (nearly all the bytes) in `dtype`; biases, tables and scales as
    stored (the model computes some of them in float32)."""
    cast = jnp.dtype(self.dtype)

    def one(path, p):
      kernel = getattr(path[-1], 'key', None) == 'kernel'
      return p.astype(cast) if kernel and p.dtype != cast else p

    params = jax.tree_util.tree_map_with_path(one, params)
    # the barrier keeps XLA from moving the gather into each use (one gather per use and pass
    # otherwise: 4 per step in the compiled two-branch step)
    return jax.lax.optimization_barrier(jax.lax.with_sharding_constraint(params, self.weights))

  def reduced_grads(self, grads):
    grads = jax.lax.with_sharding_constraint(grads, self.grads)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads)

  def shard_grads(self, grad_fn, weights, batch, key):
    """`grad_fn(weights, batch, key)` -> (grads, metrics) of the whole batch, computed per batch
    shard and reduce-scattered (`scatter`); the metrics (batch means) averaged over the shards."""
    stored = jax.tree.leaves(self.grads)[0].mesh
    outer, inner = self.scatter
    mesh = Mesh(stored.devices.reshape(outer, inner), ('outer', 'inner'))
    axes = ('outer', 'inner')
    dims = jax.tree.map(lambda sh: _data_dim(sh.spec), self.grads)

    def reduce(g, dim):
      if dim < 0:
        return jax.lax.psum(g, axes) / (outer * inner)
      g = jax.lax.psum_scatter(g, 'outer', scatter_dimension=dim, tiled=True)
      return jax.lax.psum_scatter(g, 'inner', scatter_dimension=dim, tiled=True) / (outer * inner)

    def local(weights, batch, key):
      weights = jax.lax.pcast(weights, axes, to='varying')  # this shard's gradient, not the sum
      with shards.batch_split(axes, outer * inner), attention.batch_sharded(None, None):
        grads, metrics = grad_fn(weights, batch, key)
      grads = jax.tree.map(reduce, grads, dims)
      return grads, jax.tree.map(lambda m: jax.lax.pmean(m, axes), metrics)

    def spec(dim, shape_len):
      return P(*[axes if i == dim else None for i in range(shape_len)]) if dim >= 0 else P()

    grad_specs = jax.tree.map(lambda d, w: spec(d, w.ndim), dims, weights)
    batch_specs = jax.tree.map(lambda _: P(axes), batch)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(jax.tree.map(lambda _: P(), weights), batch_specs, P()),
        out_specs=(grad_specs, P()),
    )
    return run(weights, batch, key)


def _data_dim(spec) -> int:
  """The dimension a stored layout splits over 'data', or -1."""
  for i, e in enumerate(spec):
    if e == 'data' or (isinstance(e, tuple) and 'data' in e):
      return i
  return -1


def scatter_split(n: int) -> tuple[int, int]:
  """(outer, inner) chips of the two-stage reduce-scatter: inner the smallest factor of n."""
  inner = next((f for f in range(2, n) if n % f == 0), 1)
  return n // inner, inner


def step_layout(
    strategy: Strategy, model_cfg, mesh: Mesh, rules, stored_layout: Any
) -> StepLayout | None:
  """The step's layout for `strategy` (`stored_layout`: the shardings of the stored parameters);
  None where the step needs no extra constraint (dp and fsdp in float32: the same program as
  before strategies). zero over the data axis alone gets `scatter`: its gradients per batch
  shard, reduce-scattered (the train step keeps XLA's reduction where its loss needs the whole
  batch at once: with alignment), except on a TPU slice whose every axis closes into a ring:
  there the compiler runs XLA's all-reduce over all the chips on every axis's links at once,
  and the two stages' rings on one (BENCHMARKS.md: XL/2 on v5p-128, 14.5 ms on the wire
  instead of 23.7)."""
  if not strategy.state_axes and strategy.collective_dtype == 'float32':
    return None
  rules_layout = sharding.param_shardings(nnx.state(abstract_model(model_cfg)), mesh, rules)
  scatter = None
  if (
      strategy.name == 'zero'
      and strategy.data > 1
      and strategy.fsdp * strategy.tensor == 1
      and not tpu_chips.closed_torus(list(mesh.devices.flat))
  ):
    scatter = scatter_split(strategy.data)
  return StepLayout(rules_layout, stored_layout, strategy.collective_dtype, scatter)


def make_mesh(strategy: Strategy, devices: Sequence[jax.Device] | None = None) -> Mesh:
  return sharding.make_mesh(strategy.shape, devices)
