"""Sharding strategies (mdt_jax/training/strategies.py), their cost model (training/cost.py) and
the TPU overlap flags (training/xla_flags.py); training and resume across strategies:
tests/test_mesh_resume.py."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from micro_config import get_config
from mdt_jax.models import platform
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.presets import model_config
from mdt_jax.training import cost, sharding, strategies, tpu_chips, xla_flags
from mdt_jax.training.state import create_train_state, make_optimizer
from mdt_jax.training.step import loss_fn, loss_settings
from mdt_jax.training.strategies import Strategy


def test_the_mesh_section_names_a_strategy():
  auto = dict(strategy='auto', data=-1, fsdp=1, tensor=1)
  assert strategies.explicit(auto, 8) is None  # the cost model's (or, off TPU, dp)
  assert strategies.explicit({**auto, 'data': 2, 'fsdp': 4}, 8) == Strategy('fsdp', 2, 4)
  assert strategies.explicit({**auto, 'strategy': 'zero'}, 8) == Strategy('zero', 8, 1)
  assert strategies.explicit({**auto, 'strategy': 'fsdp'}, 8) == Strategy('fsdp', 1, 8)
  assert strategies.explicit({**auto, 'strategy': 'hybrid'}, 8) is None  # group size: chosen
  assert cost.resolve(auto, None, 16) == Strategy('dp', 8, 1)  # CPU devices: data parallel
  with pytest.raises(ValueError, match=r"mesh.strategy 'zero3'.*'dp', 'fsdp', 'zero', 'hybrid'"):
    strategies.explicit({**auto, 'strategy': 'zero3'}, 8)
  with pytest.raises(ValueError, match=r"collective_dtype 'fp8'.*'float32', 'bfloat16'"):
    strategies.explicit({**auto, 'collective_dtype': 'fp8'}, 8)
  # the strategy settings are not mesh axes
  assert dict(sharding.make_mesh({**auto, 'fsdp': 2}).shape) == dict(data=4, fsdp=2, tensor=1)


def test_state_is_split_further_over_the_strategy_axes():
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  split = lambda spec, shape: strategies.split_further(  # noqa: E731
      NamedSharding(mesh, spec), shape, ('data',)
  ).spec
  assert split(P('fsdp', None), (32, 128)) == P(('fsdp', 'data'), None)  # the split dimension
  assert split(P(None, None), (32, 128)) == P(None, 'data')  # else the largest
  assert split(P('fsdp', None), (4, 6)) == P('fsdp', 'data')  # 4 / (4 * 2) does not divide
  assert split(P(), (3,)) == P(None)  # nothing divides: left as it is
  assert split(P('data'), (8,)) == P('data')  # already there


@functools.lru_cache(maxsize=1)
def _xl2_sizes():
  mc = MDTConfig.from_dict(model_config('XL/2', dtype='bfloat16', mask_ratio=0.3).to_dict())
  return cost.model_sizes(mc)


def test_cost_model_ranks_strategies_by_what_limits_them():
  sizes = _xl2_sizes()
  assert 7.0e8 < sizes.params < 8.0e8  # XL/2: 742M parameters
  v5p = cost.CHIPS['TPU v5']
  est = {(e.strategy.name, e.strategy.fsdp): e for e in cost.rank(sizes, v5p, 64, 256)}
  # ZeRO keeps 1/64 of the state and so of the optimizer's HBM traffic; dp all of it
  assert est['zero', 1].memory_gb < est['dp', 1].memory_gb / 2
  assert est['zero', 1].hbm_ms < est['dp', 1].hbm_ms / 2
  # per-use weight gathers cost fsdp wire time that data parallelism does not pay
  assert est['fsdp', 64].ici_ms > est['dp', 1].ici_ms
  bf16 = cost.rank(sizes, v5p, 64, 256, 'zero', 'bfloat16')[0]
  assert bf16.ici_ms < est['zero', 1].ici_ms  # half the gathered bytes
  # 16 GB chips: replicated state does not fit, the first choice does
  v5e = cost.rank(sizes, cost.CHIPS['TPU v5 lite'], 8, 64)
  assert v5e[0].fits and v5e[0].strategy.name != 'dp'
  assert not [e for e in v5e if e.strategy.name == 'dp'][0].fits


class _Chip:
  """A TPU device as the cost model reads one: its kind and torus coordinates."""

  def __init__(self, kind, coords):
    self.device_kind, self.coords, self.platform = kind, coords, 'tpu'


def _cube(kind, shape):
  full = tuple(shape) + (1,) * (3 - len(shape))
  return [_Chip(kind, c) for c in itertools.product(*(range(d) for d in full))]


def test_a_closed_torus_runs_collectives_over_every_chip_on_every_axis():
  assert tpu_chips.torus_shape(_cube('TPU v5', (4, 4, 4))) == (4, 4, 4)
  assert cost.torus_dims(_cube('TPU v5', (4, 4, 4))) == 3  # v5p-128: whole cube, wrapped
  assert cost.torus_dims(_cube('TPU v5', (2, 4, 4))) == 1  # v5p-64: open
  assert cost.torus_dims(_cube('TPU v6 lite', (16, 16))) == 2  # v6e-256
  assert cost.torus_dims(_cube('TPU v6 lite', (8, 16))) == 1  # an axis of 8 stays open
  assert not tpu_chips.closed_torus(jax.devices()) and cost.torus_dims(jax.devices()) == 1
  sizes, v5p = _xl2_sizes(), cost.CHIPS['TPU v5']
  one = {e.strategy: e for e in cost.rank(sizes, v5p, 64, 256)}
  three = {e.strategy: e for e in cost.rank(sizes, v5p, 64, 256, torus_dims=3)}
  dp, zero = Strategy('dp', 64, 1), Strategy('zero', 64, 1)
  assert three[dp].ici_ms == pytest.approx(one[dp].ici_ms / 3)  # one all-reduce of all 64
  # zero: the gather and one all-reduce on three axes' links, below the two stages on one
  assert three[zero].ici_ms < one[zero].ici_ms / 1.5
  assert three[zero].hbm_ms == one[zero].hbm_ms
  # an fsdp group of 4 inside the 64 still runs on one ring
  fsdp4 = Strategy('fsdp', 16, 4)
  assert three[fsdp4].ici_ms > one[fsdp4].ici_ms / 3


def test_overlap_flags_leave_the_users_own():
  got = xla_flags.with_overlap_flags('--xla_tpu_enable_latency_hiding_scheduler=false --foo=1')
  flags = got.split()
  assert '--xla_tpu_enable_latency_hiding_scheduler=false' in flags and '--foo=1' in flags
  assert '--xla_tpu_enable_latency_hiding_scheduler=true' not in flags
  assert '--xla_enable_async_all_gather=true' in flags
  env = {}
  assert xla_flags.set_overlap_flags(env) and not xla_flags.set_overlap_flags(env)
  assert xla_flags.on_tpu_host() is False  # the test host: JAX_PLATFORMS=cpu or no chips


def _step_grads(collective_dtype: str):
  """One step's gradients (the micro model, 8 devices, ZeRO) with the collectives in
  `collective_dtype`, as float32 arrays."""
  config = get_config()
  mc = MDTConfig.from_dict(config.model.to_dict())
  strategy = Strategy('zero', 8, 1, collective_dtype=collective_dtype)
  mesh = strategies.make_mesh(strategy)
  opt = make_optimizer(config.optimizer)
  state, shardings, graphdef = create_train_state(
      mc, opt, 0, mesh, config.sharding_rules, strategy.state_axes
  )
  layout = strategies.step_layout(strategy, mc, mesh, config.sharding_rules, shardings.params)
  rng = np.random.default_rng(0)
  batch = {
      'x': jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
      'y': jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
  }
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  settings = loss_settings(config)
  process = settings.pop('process')

  def grads(params, batch):
    fn = jax.grad(functools.partial(loss_fn, **settings), has_aux=True)
    g, _ = fn(layout.forward_weights(params), graphdef, process, batch, jax.random.key(1))
    return layout.reduced_grads(g)

  return jax.device_get(jax.jit(platform.traced_for(mesh.devices.flat, grads))(state.params, batch))


def test_bfloat16_collectives_change_a_steps_gradients_by_their_rounding():
  f32, bf16 = _step_grads('float32'), _step_grads('bfloat16')
  a, b = (np.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (f32, bf16))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16))
  rel = np.linalg.norm(b - a) / np.linalg.norm(a)
  cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  print(f'bfloat16 collectives: relative L2 change of the gradients {rel:.3g}, cosine {cos:.6f}')
  # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.002 per value), and the
  # rounded weights change the gradients through the model as well
  assert 0 < rel < 0.05 and cos > 0.999


def test_zero_reduce_scatters_the_gradients_of_each_batch_shard():
  """ZeRO's per-shard gradients, reduce-scattered in two stages onto the state's layout, and
  the shard-averaged metrics equal the whole batch's (the same draws per row) to float
  tolerance; so do the gradients ZeRO takes on a closed TPU torus (the whole batch's, reduced
  by XLA onto the state's layout: `scatter` None)."""
  config = get_config()
  mc = MDTConfig.from_dict(config.model.to_dict())
  opt = make_optimizer(config.optimizer)
  rng = np.random.default_rng(0)
  host = {
      'x': jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
      'y': jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
  }
  settings = loss_settings(config)
  process = settings.pop('process')
  grad_fn = jax.grad(functools.partial(loss_fn, **settings), has_aux=True)
  out = {}
  for name in ('dp', 'zero', 'zero on a closed torus'):
    strategy = Strategy(name.split()[0], 8, 1)
    mesh = strategies.make_mesh(strategy)
    state, shardings, graphdef = create_train_state(
        mc, opt, 0, mesh, config.sharding_rules, strategy.state_axes
    )
    layout = strategies.step_layout(strategy, mc, mesh, config.sharding_rules, shardings.params)
    batch = jax.device_put(host, sharding.batch_sharding(mesh))
    if name == 'zero on a closed torus':
      layout = dataclasses.replace(layout, scatter=None)

    def grads(params, batch, layout=layout, graphdef=graphdef):
      if layout is None:
        return grad_fn(params, graphdef, process, batch, jax.random.key(1))
      if layout.scatter is None:  # as train_step takes them
        g, m = grad_fn(layout.forward_weights(params), graphdef, process, batch, jax.random.key(1))
        return layout.reduced_grads(g), m
      assert layout.scatter == (4, 2)
      fn = lambda w, b, k: grad_fn(w, graphdef, process, b, k)  # noqa: E731
      g, m = layout.shard_grads(fn, layout.forward_weights(params), batch, jax.random.key(1))
      return layout.reduced_grads(g), m

    step = jax.jit(platform.traced_for(mesh.devices.flat, grads))
    text = step.lower(state.params, batch).compile().as_text()
    out[name] = jax.device_get(step(state.params, batch)), text
  (g_dp, m_dp), _ = out['dp']
  assert 'reduce-scatter' in out['zero'][1]
  for name in ('zero', 'zero on a closed torus'):
    (g_zero, m_zero), _ = out[name]
    for k in m_dp:
      np.testing.assert_allclose(m_zero[k], m_dp[k], rtol=1e-5, err_msg=f'{name}: {k}')
    for a, b in zip(jax.tree.leaves(g_zero), jax.tree.leaves(g_dp)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=name)
