"""Sampling loops (ancestral DDPM, DDIM, DPM-Solver++(2M); flow models: flow_loops.py), each
one lax.fori_loop.

Randomness is per sample: sample i of a run owns key_i = fold_in(noise_key(seed), i); its
starting noise is normal(fold_in(key_i, 0)) and the noise of loop iteration j is
normal(fold_in(key_i, j + 1)). A sample therefore does not depend on the batch it is drawn in or
on the number of devices.

DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): the model is evaluated at the N
original timesteps round(k*(T-1)/N), k = N..1 (the IDDPM spacing of N+1 steps without step 0);
the solver works in log-SNR lambda = log(alpha/sigma) of the discrete training schedule at those
steps, and the last step goes to clean data (sigma = 0) with the first-order update, i.e. it
returns the x_0 prediction at the last timestep (as diffusers' final_sigmas_type='zero').
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import diffusion as gd
from mdt_jax.diffusion import schedules
from mdt_jax.sampling import flow_loops
from mdt_jax.sampling.config import SamplerConfig

Array = jax.Array
EvalFn = Callable[[Array, Array], Array]  # (x, original t) -> model output (guided)

# ------------------------------------------------------------------ per-sample randomness


def sample_keys(noise_key: Array, indices: Array) -> Array:
  """Per-sample keys [B] from the run's noise key and global sample indices [B]."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(noise_key, indices)


def per_sample_normal(keys: Array, stream: int | Array, shape: tuple[int, ...]) -> Array:
  """[B, *shape] standard normals; row b drawn from fold_in(keys[b], stream) alone."""
  draw = lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, jnp.float32)
  return jax.vmap(draw)(keys)


def _full(b: int, value: Array) -> Array:
  return jnp.full((b,), value, jnp.int32)


# ------------------------------------------------------------------ single steps


def p_sample_step(
    d: gd.Diffusion, out: Array, x: Array, t: Array, noise: Array, clip_denoised: bool = False
) -> Array:
  """Ancestral step x_t -> x_{t-1} (t: respaced index); no noise where t == 0."""
  pm = gd.p_mean_variance(d, out, x, t, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return pm['mean'] + nonzero * jnp.exp(0.5 * pm['log_variance']) * noise


def ddim_step(
    d: gd.Diffusion,
    out: Array,
    x: Array,
    t: Array,
    noise: Array | None,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> Array:
  """DDIM step (Song et al. eq. 12) on the respaced process; eta = 0 is deterministic."""
  pm = gd.p_mean_variance(d, out, x, t, clip_denoised=clip_denoised)
  x0 = pm['pred_xstart']
  eps = gd.predict_eps_from_xstart(d, x, t, x0)  # re-derived so clipping is respected
  ab = gd.extract(d.alphas_cumprod, t, x.ndim)
  ab_prev = gd.extract(d.alphas_cumprod_prev, t, x.ndim)
  mean = x0 * jnp.sqrt(ab_prev)
  if eta == 0.0 or noise is None:
    return mean + jnp.sqrt(1.0 - ab_prev) * eps
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
  mean = mean + jnp.sqrt(1.0 - ab_prev - sigma**2) * eps
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return mean + nonzero * sigma * noise


# ------------------------------------------------------------------ loops


def ddpm_loop(
    eval_fn: EvalFn, d: gd.Diffusion, x: Array, keys: Array, clip_denoised: bool = False
) -> Array:
  """The original p_sample_loop over the (respaced) process d, from x = x_T."""
  n, b = d.num_timesteps, x.shape[0]

  def body(i, x):
    t = _full(b, n - 1 - i)
    out = eval_fn(x, gd.take(d.timestep_map, t))
    noise = per_sample_normal(keys, i + 1, x.shape[1:])
    return p_sample_step(d, out, x, t, noise, clip_denoised)

  return jax.lax.fori_loop(0, n, body, x)


def ddim_loop(
    eval_fn: EvalFn,
    d: gd.Diffusion,
    x: Array,
    keys: Array,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> Array:
  n, b = d.num_timesteps, x.shape[0]

  def body(i, x):
    t = _full(b, n - 1 - i)
    out = eval_fn(x, gd.take(d.timestep_map, t))
    noise = per_sample_normal(keys, i + 1, x.shape[1:]) if eta > 0 else None
    return ddim_step(d, out, x, t, noise, eta, clip_denoised)

  return jax.lax.fori_loop(0, n, body, x)


def dpm_solver_plan(steps: int, num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
  """Timesteps and update coefficients of DPM-Solver++(2M), computed in float64.

  Step i (model at timesteps[i]) does x <- ratio[i] * x + coef[i] * (a[i] * x0_i + b[i] * x0_{i-1}).
  """
  ac = schedules.diffusion_tables(schedules.beta_schedule('linear', num_train_timesteps))[
      'alphas_cumprod'
  ]
  kept = schedules.space_timesteps(num_train_timesteps, str(steps + 1))
  ts = np.array(kept[1:][::-1], dtype=np.int64)  # descending, no step 0
  alpha, sigma = np.sqrt(ac[ts]), np.sqrt(1.0 - ac[ts])
  lam = np.log(alpha) - np.log(sigma)
  ratio, coef = np.zeros(steps), np.ones(steps)  # the last step returns x0 (sigma -> 0)
  a, b = np.ones(steps), np.zeros(steps)
  h = lam[1:] - lam[:-1]
  for i in range(steps - 1):
    ratio[i] = sigma[i + 1] / sigma[i]
    coef[i] = -alpha[i + 1] * np.expm1(-h[i])
    if i > 0:
      r = h[i - 1] / h[i]
      a[i], b[i] = 1.0 + 0.5 / r, -0.5 / r
  return dict(timesteps=ts, alpha=alpha, sigma=sigma, ratio=ratio, coef=coef, a=a, b=b)


def dpm_solver_loop(
    eval_fn: EvalFn, plan: dict[str, np.ndarray], x: Array, clip_denoised: bool = False
) -> Array:
  b, c = x.shape[0], x.shape[-1]
  p = {k: jnp.asarray(v, jnp.int32 if k == 'timesteps' else jnp.float32) for k, v in plan.items()}

  def body(i, carry):
    x, x0_prev = carry
    out = eval_fn(x, _full(b, p['timesteps'][i]))
    eps = gd.split_output(out, c)[0]
    x0 = (x - p['sigma'][i] * eps) / p['alpha'][i]
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    data = p['a'][i] * x0 + p['b'][i] * x0_prev
    return p['ratio'][i] * x + p['coef'][i] * data, x0

  return jax.lax.fori_loop(0, len(plan['timesteps']), body, (x, jnp.zeros_like(x)))[0]


def run_flow_loop(cfg: SamplerConfig, eval_fn: EvalFn, x: Array, keys: Array) -> Array:
  """The flow sampler's loop: eval_fn gets the model time t * num_train_timesteps."""
  scale = float(cfg.num_train_timesteps)
  if cfg.sampler == 'euler':
    return flow_loops.euler_loop(
        eval_fn, flow_loops.time_grid(cfg.steps + 1, cfg.time_shift), x, scale
    )
  if cfg.sampler == 'heun':
    return flow_loops.heun_loop(
        eval_fn, flow_loops.time_grid(cfg.steps // 2 + 1, cfg.time_shift), x, scale
    )
  ts = flow_loops.time_grid(cfg.steps, cfg.time_shift, end=cfg.sde_last_step)
  noise = lambda i: per_sample_normal(keys, i + 1, x.shape[1:])
  return flow_loops.euler_maruyama_loop(
      eval_fn, ts, x, noise, scale, cfg.sde_diffusion, cfg.sde_diffusion_norm
  )


def run_loop(cfg: SamplerConfig, eval_fn: EvalFn, x: Array, keys: Array) -> Array:
  """Dispatch to the loop of `cfg.sampler` (x = x_T, keys = per-sample keys)."""
  if cfg.objective == 'flow':
    return run_flow_loop(cfg, eval_fn, x, keys)
  if cfg.sampler == 'ddpm':
    return ddpm_loop(eval_fn, cfg.diffusion(), x, keys, cfg.clip_denoised)
  if cfg.sampler == 'ddim':
    return ddim_loop(eval_fn, cfg.diffusion(), x, keys, cfg.eta, cfg.clip_denoised)
  return dpm_solver_loop(
      eval_fn, dpm_solver_plan(cfg.steps, cfg.num_train_timesteps), x, cfg.clip_denoised
  )
