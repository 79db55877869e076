"""Train state (params, EMA, optimizer state, step, RNG) and its sharded creation."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from mdt_jax.models.mdt import MDT, MDTConfig
from mdt_jax.models.params import InitKeys, abstract_model
from mdt_jax.training import sharding, strategies
from mdt_jax.training.adan import adan
from mdt_jax.training.run import OptimizerSettings


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # pure dict of float32 parameters (nnx.to_pure_dict layout)
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data; the step's key is fold_in(key, step): exact resume


def make_optimizer(cfg: OptimizerSettings) -> optax.GradientTransformation:
  """Global-norm clipping, then Adan with a constant learning rate (the original recipe)."""
  if cfg.name == 'adan':
    opt = adan(
        cfg.learning_rate,
        b1=cfg.b1,
        b2=cfg.b2,
        b3=cfg.b3,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
  elif cfg.name == 'adamw':  # MDT v1's optimizer
    opt = optax.adamw(
        cfg.learning_rate, b1=0.9, b2=0.999, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
  else:
    raise ValueError(f"optimizer.name must be 'adan' or 'adamw', got {cfg.name!r}")
  if cfg.clip_norm:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt


def state_shardings(
    abstract: TrainState,
    model: MDT,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    state_axes: Sequence[str] = (),
) -> TrainState:
  """Shardings of every leaf: params/EMA by the rules (split further over `state_axes`, a
  strategy's: mdt_jax/training/strategies.py); optimizer moments like their params."""
  p_sh = sharding.param_shardings(nnx.state(model), mesh, rules)
  p_sh = strategies.state_layout(p_sh, abstract.params, state_axes)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract.opt_state, p_sh, transform_non_params=lambda _: rep
  )
  return TrainState(step=rep, params=p_sh, ema_params=p_sh, opt_state=opt_sh, rng=rep)


def _initializer(model_cfg: MDTConfig, optimizer: optax.GradientTransformation, seed: int):
  init_key, train_key = jax.random.split(jax.random.key(seed))

  def init():
    params = nnx.to_pure_dict(nnx.state(MDT(model_cfg, rngs=InitKeys(init_key))))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(train_key),
    )

  return init


def _abstract_state(model: MDT, optimizer: optax.GradientTransformation) -> TrainState:
  """The shapes and dtypes `_initializer` returns, read off the abstract model: the model's
  init is traced once (by `abstract_model`), not again for the optimizer's state."""
  params = nnx.to_pure_dict(nnx.state(model))
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=jax.eval_shape(optimizer.init, params),
      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
  )


def abstract_train_state(
    model_cfg: MDTConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    state_axes: Sequence[str] = (),
) -> tuple[TrainState, TrainState, nnx.GraphDef]:
  """(shape/dtype/sharding structs of the state, its shardings, graphdef); nothing allocated."""
  model = abstract_model(model_cfg)
  graphdef, _ = nnx.split(model)
  abstract = _abstract_state(model, optimizer)
  shardings = state_shardings(abstract, model, optimizer, mesh, rules, state_axes)
  structs = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings
  )
  return structs, shardings, graphdef


def create_train_state(
    model_cfg: MDTConfig,
    optimizer: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    rules,
    state_axes: Sequence[str] = (),
) -> tuple[TrainState, TrainState, nnx.GraphDef]:
  """Initialise directly into the sharded layout (no host copy of the full model).

  Returns (state, shardings, graphdef).
  """
  _, shardings, graphdef = abstract_train_state(model_cfg, optimizer, mesh, rules, state_axes)
  state = jax.jit(_initializer(model_cfg, optimizer, seed), out_shardings=shardings)()
  return state, shardings, graphdef
