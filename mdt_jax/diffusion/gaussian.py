"""Gaussian diffusion: epsilon prediction, learned-range or fixed-small variance; NHWC, jittable.

A `Diffusion` is a pytree of float32 tables (computed in float64, then cast) and can be passed
into jitted functions or closed over. Timesteps `t` are int arrays [B] indexing these tables; for a
respaced process they are respaced indices and `timestep_map[t]` is the original step the model
must be given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mdt_jax.diffusion import schedules

Array = jax.Array


@struct.dataclass
class Diffusion:
  """Per-timestep tables [T] (float32) of a (possibly respaced) Gaussian diffusion."""

  betas: Array
  log_betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  snr: Array
  timestep_map: Array  # int32 [T]: original timestep of each step
  original_num_steps: int = struct.field(pytree_node=False, default=1000)

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def from_betas(
    betas: np.ndarray, timestep_map: np.ndarray | None = None, original_num_steps: int | None = None
) -> Diffusion:
  """A `Diffusion` from float64 betas (tables computed in float64, stored as float32)."""
  tables = schedules.diffusion_tables(betas)
  n = tables['betas'].shape[0]
  tmap = np.arange(n) if timestep_map is None else np.asarray(timestep_map)
  arrays = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()}
  return Diffusion(
      **arrays,
      timestep_map=jnp.asarray(tmap, dtype=jnp.int32),
      original_num_steps=int(original_num_steps or n),
  )


def create_diffusion(
    respacing: str | int | None = None, *, num_timesteps: int = 1000, schedule: str = 'linear'
) -> Diffusion:
  """The MDTv2 diffusion: T linear betas; `respacing` like "250", "10,15,20" or "ddim50".

  None or "" keeps all T steps (training); a respaced process keeps the original steps given by
  `space_timesteps` and maps each of its steps back to the original timestep (`timestep_map`).
  """
  betas = schedules.beta_schedule(schedule, num_timesteps)
  if respacing is None or respacing == '':
    return from_betas(betas)
  steps = schedules.space_timesteps(num_timesteps, respacing)
  if len(steps) < 2:
    raise ValueError(f'respacing {respacing!r} keeps {len(steps)} step(s); at least 2 are needed')
  new_betas, tmap = schedules.respace_betas(betas, steps)
  return from_betas(new_betas, tmap, original_num_steps=num_timesteps)


def extract(table: Array, t: Array, ndim: int = 4) -> Array:
  """table[t] as [B, 1, 1, 1] (broadcastable against NHWC)."""
  return take(table, t).reshape((t.shape[0],) + (1,) * (ndim - 1))


def take(table: Array, t: Array) -> Array:
  """table[t] laid out like t (also when t is sharded over an Explicit mesh axis)."""
  return table.at[t].get(out_sharding=jax.typeof(t).sharding)


def q_sample(diffusion: Diffusion, x_start: Array, t: Array, noise: Array) -> Array:
  """x_t ~ q(x_t | x_0) with the given noise."""
  return (
      extract(diffusion.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
      + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
  )


def q_posterior_mean_variance(
    diffusion: Diffusion, x_start: Array, x_t: Array, t: Array
) -> tuple[Array, Array, Array]:
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
  nd = x_t.ndim
  mean = (
      extract(diffusion.posterior_mean_coef1, t, nd) * x_start
      + extract(diffusion.posterior_mean_coef2, t, nd) * x_t
  )
  var = extract(diffusion.posterior_variance, t, nd)
  log_var = extract(diffusion.posterior_log_variance_clipped, t, nd)
  return mean, var, log_var


def predict_xstart_from_eps(diffusion: Diffusion, x_t: Array, t: Array, eps: Array) -> Array:
  nd = x_t.ndim
  return (
      extract(diffusion.sqrt_recip_alphas_cumprod, t, nd) * x_t
      - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, nd) * eps
  )


def predict_eps_from_xstart(diffusion: Diffusion, x_t: Array, t: Array, x_start: Array) -> Array:
  nd = x_t.ndim
  return (extract(diffusion.sqrt_recip_alphas_cumprod, t, nd) * x_t - x_start) / extract(
      diffusion.sqrt_recipm1_alphas_cumprod, t, nd
  )


def split_output(model_output: Array, channels: int) -> tuple[Array, Array | None]:
  """(eps, variance values or None): [B,H,W,2C] -> learned range, [B,H,W,C] -> fixed variance."""
  if model_output.shape[-1] == 2 * channels:
    return model_output[..., :channels], model_output[..., channels:]
  if model_output.shape[-1] == channels:
    return model_output, None
  raise ValueError(
      f'model output must have {channels} (fixed variance) or {2 * channels} '
      f'(learned variance) channels, got shape {tuple(model_output.shape)}'
  )


def p_mean_variance(
    diffusion: Diffusion, model_output: Array, x_t: Array, t: Array, *, clip_denoised: bool = False
) -> dict[str, Array]:
  """p(x_{t-1} | x_t) from an epsilon-prediction output (NHWC, last axis = channels).

  With 2C output channels the variance is learned-range: v in the last C channels,
  log var = frac*log(beta_t) + (1-frac)*log(posterior var, clipped), frac = (v+1)/2. With C
  channels it is the fixed-small posterior variance. Returns mean, variance, log_variance and
  pred_xstart (clipped to [-1, 1] when `clip_denoised`).
  """
  if model_output.shape[:-1] != x_t.shape[:-1]:
    raise ValueError(
        f'model output shape {tuple(model_output.shape)} does not match x_t shape '
        f'{tuple(x_t.shape)}'
    )
  nd = x_t.ndim
  eps, v = split_output(model_output, x_t.shape[-1])
  min_log = extract(diffusion.posterior_log_variance_clipped, t, nd)
  if v is None:
    log_var = jnp.broadcast_to(min_log, x_t.shape)
  else:
    frac = (v + 1.0) / 2.0
    log_var = frac * extract(diffusion.log_betas, t, nd) + (1.0 - frac) * min_log
  x0 = predict_xstart_from_eps(diffusion, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(diffusion, x0, x_t, t)
  return {
      'mean': mean,
      'variance': jnp.exp(log_var),
      'log_variance': log_var,
      'pred_xstart': x0,
      'eps': eps,
  }
