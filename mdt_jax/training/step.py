"""The MDT train step: a plain and a masked branch, one backward pass, Adan, EMA.

Both objectives share the step: the DDPM one (``process`` a ``Diffusion``: integer timesteps, eps
MSE with min-SNR weight plus the VLB term) and the flow one (``process`` a ``FlowMatching``:
continuous times, velocity MSE). Either way the two branches share the time draw and each draws
its own noise, label dropout and mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mdt_jax.diffusion import Diffusion, FlowMatching, flow, q_sample, training_losses
from mdt_jax.models import attention, platform, shards
from mdt_jax.training import align as alignment
from mdt_jax.training.run import RunConfig, as_run, stored_features
from mdt_jax.training.state import TrainState


def _forward(model, x_t, t, y, model_key, masked, aligner):
  """The model's output, and with an aligner its terms (the aligned block's features)."""
  if aligner is None:
    return model(x_t, t, y, rng=model_key, train=True, enable_mask=masked), None
  return model(x_t, t, y, rng=model_key, train=True, enable_mask=masked, features_at=aligner.block)


def _noise(key, x0):
  return shards.rows(lambda n: jax.random.normal(key, (n,) + x0.shape[1:], jnp.float32), len(x0))


def _with_align(terms, model, aligner, features, x0, noise, t, y, model_key) -> dict:
  out = {k: v.mean() for k, v in terms.items()}
  if aligner is not None:
    got = aligner.terms(model, features, x0, noise, t, y, model_key)
    out.update({f'align_{k}': v for k, v in got.items()})
  return out


def branch_loss(
    model,
    process: Diffusion,
    x0,
    y,
    t,
    key,
    *,
    masked: bool,
    min_snr_gamma: float | None,
    aligner: alignment.BranchAligner | None = None,
):
  """One branch of the original forward_backward: own noise, own label-dropout (and mask) draw;
  with an aligner, also its alignment terms (align_loss, align_cos)."""
  noise_key, model_key = jax.random.split(key)
  noise = _noise(noise_key, x0)
  x_t = q_sample(process, x0, t, noise)
  out, features = _forward(model, x_t, t, y, model_key, masked, aligner)
  terms = training_losses(process, out, x0, x_t, t, noise, min_snr_gamma)
  return _with_align(terms, model, aligner, features, x0, noise, t, y, model_key)


def flow_branch_loss(
    model,
    process: FlowMatching,
    x0,
    y,
    t,
    key,
    *,
    masked: bool,
    min_snr_gamma: float | None = None,
    aligner: alignment.BranchAligner | None = None,
):
  """``branch_loss`` of the flow objective: x_t on the line from x_0 to the noise, velocity MSE."""
  if min_snr_gamma is not None:
    raise ValueError('min-SNR weighting is a DDPM setting; the flow loss is unweighted')
  noise_key, model_key = jax.random.split(key)
  noise = _noise(noise_key, x0)
  x_t = flow.interpolate(x0, noise, t)
  out, features = _forward(model, x_t, flow.model_time(process, t), y, model_key, masked, aligner)
  terms = flow.training_losses(out, x0, noise)
  return _with_align(terms, model, aligner, features, x0, noise, t, y, model_key)


def draw_times(process: Diffusion | FlowMatching, key, n: int):
  """The batch's times [n], shared by both branches: DDPM timesteps or flow times (the rows of
  the whole batch's draw where the step runs per batch shard: mdt_jax/models/shards.py)."""
  if isinstance(process, FlowMatching):
    return shards.rows(lambda m: flow.sample_time(process, key, m), n)
  return shards.rows(lambda m: jax.random.randint(key, (m,), 0, process.num_timesteps), n)


def loss_fn(
    params,
    graphdef,
    process,
    batch,
    key,
    *,
    mask_branch: bool,
    min_snr_gamma: float | None,
    align: alignment.Alignment | None = None,
    teacher_params=None,
    step=None,
):
  """The branches' losses summed; with `align`, plus its weight times the aligned branches'
  alignment losses (`teacher_params`: SRA's teacher weights; `step`: for align.stop_step)."""
  model = nnx.merge(graphdef, params)
  x0, y = batch['x'], batch['y']
  t_key, plain_key, mask_key = jax.random.split(key, 3)
  t = draw_times(process, t_key, x0.shape[0])
  branch = flow_branch_loss if isinstance(process, FlowMatching) else branch_loss
  aligners = {} if align is None else align.aligners(graphdef, teacher_params, process, x0, batch)
  plain = branch(
      model,
      process,
      x0,
      y,
      t,
      plain_key,
      masked=False,
      min_snr_gamma=min_snr_gamma,
      aligner=aligners.get('plain'),
  )
  metrics = {f'plain/{k}': v for k, v in plain.items()}
  total = plain['loss']
  branches = [plain]
  if mask_branch:
    masked = branch(
        model,
        process,
        x0,
        y,
        t,
        mask_key,
        masked=True,
        min_snr_gamma=min_snr_gamma,
        aligner=aligners.get('masked'),
    )
    metrics.update({f'masked/{k}': v for k, v in masked.items()})
    total = total + masked['loss']
    branches.append(masked)
  if align is not None:
    aligned = [b for b in branches if 'align_loss' in b]
    metrics['align/loss'] = sum(b['align_loss'] for b in aligned)
    metrics['align/cos'] = sum(b['align_cos'] for b in aligned) / len(aligned)
    metrics['align/weight'] = align.weight(step)
    total = total + metrics['align/weight'] * metrics['align/loss']
  metrics['loss'] = total
  return total, metrics


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef,
    process: Diffusion | FlowMatching,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    mask_branch: bool,
    min_snr_gamma: float | None,
    learning_rate: float,
    layout=None,
    align: alignment.Alignment | None = None,
):
  """`layout` (a strategy's `StepLayout`, mdt_jax/training/strategies.py): where the weights are
  gathered and the gradients reduced; None: as the stored parameters are laid out."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  settings = dict(mask_branch=mask_branch, min_snr_gamma=min_snr_gamma)
  if align is not None:  # SRA's teacher: the EMA weights or the current ones, as configured
    teacher = state.ema_params if align.config.ema_source == 'ema' else state.params
    settings.update(align=align, teacher_params=teacher, step=state.step)
  grad_fn = jax.grad(functools.partial(loss_fn, **settings), has_aux=True)
  weights = layout.forward_weights(state.params) if layout else state.params
  if layout and layout.scatter and align is None:  # per batch shard, reduce-scattered
    per_shard = lambda w, b, k: grad_fn(w, graphdef, process, b, k)  # noqa: E731
    grads, metrics = layout.shard_grads(per_shard, weights, batch, key)
  else:
    grads, metrics = grad_fn(weights, graphdef, process, batch, key)
  if layout:
    grads = layout.reduced_grads(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay), state.ema_params, params)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['learning_rate'] = jnp.asarray(learning_rate, jnp.float32)
  new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new, metrics


def jit_train_step(shardings: TrainState, batch_sharding, **kw):
  """One compiled step with the state donated and sharded as ``shardings`` says."""

  def step(state, batch):
    # the TPU attention kernel runs per batch shard (models/attention.py)
    with attention.batch_sharded(batch_sharding.mesh, batch_sharding.spec[0]):
      return train_step(state, batch, **kw)

  # the XLA module is then jit_train_step, the name profiles look for (tools/benchmarks/profile.py)
  step.__name__ = step.__qualname__ = 'train_step'
  return jax.jit(
      platform.traced_for(batch_sharding.mesh.devices.flat, step),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=(0,),
  )


def loss_settings(
    run: RunConfig | ml_collections.ConfigDict, mask_branch: bool | None = None
) -> dict:
  """`loss_fn`'s settings of a run: the diffusion (or flow) process, the mask branch
  (`mask_branch` defaults to the run's), the min-SNR weight and the alignment (none unless
  the run's align says)."""
  run = as_run(run)
  settings = dict(
      process=run.process,
      mask_branch=run.loop.mask_branch if mask_branch is None else mask_branch,
      min_snr_gamma=run.diffusion.min_snr_gamma,
  )
  if run.align.enabled:
    settings['align'] = alignment.Alignment(run.align, run.model, stored_features(run))
  return settings


def jit_step_from_config(
    run: RunConfig | ml_collections.ConfigDict,
    shardings: TrainState,
    batch_sharding,
    *,
    graphdef,
    optimizer: optax.GradientTransformation,
    mask_branch: bool | None = None,
    layout=None,
):
  """`jit_train_step` with the loss, EMA and learning-rate settings of a run (training and
  benchmarks build the same step); `layout`: the strategy's (`train_step`)."""
  run = as_run(run)
  return jit_train_step(
      shardings,
      batch_sharding,
      graphdef=graphdef,
      optimizer=optimizer,
      layout=layout,
      ema_decay=run.loop.ema_decay,
      learning_rate=run.optimizer.learning_rate,
      **loss_settings(run, mask_branch),
  )
