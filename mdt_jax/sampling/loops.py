"""The DDPM-family samplers as `Steps` of the one loop (harness.py): ancestral DDPM, DDIM,
DPM-Solver++(2M); the flow samplers are in flow_loops.py; `sampler_steps` picks a config's.

Randomness is per sample: sample i of a run owns key_i = fold_in(noise_key(seed), i); its
starting noise is normal(fold_in(key_i, 0)) and the noise of step j is normal(fold_in(key_i,
j + 1)). A sample therefore does not depend on the batch it is drawn in or on the number of
devices.

DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): the model is evaluated at the N
original timesteps round(k*(T-1)/N), k = N..1 (the IDDPM spacing of N+1 steps without step 0);
the solver works in log-SNR lambda = log(alpha/sigma) of the discrete training schedule at those
steps, and the last step goes to clean data (sigma = 0) with the first-order update, i.e. it
returns the x_0 prediction at the last timestep (as diffusers' final_sigmas_type='zero').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import diffusion
from mdt_jax.diffusion import schedules
from mdt_jax.sampling import flow_loops
from mdt_jax.sampling.config import SamplerConfig
from mdt_jax.sampling.harness import EvalFn, NoiseFn, Steps, sample_loop

Array = jax.Array

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
    d: diffusion.Diffusion,
    out: Array,
    x: Array,
    t: Array,
    noise: Array,
    clip_denoised: bool = False,
) -> Array:
  """Ancestral step x_t -> x_{t-1} (t: respaced index); no noise where t == 0."""
  pm = diffusion.p_mean_variance(d, out, x, t, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return pm['mean'] + nonzero * jnp.exp(0.5 * pm['log_variance']) * noise


def ddim_step(
    d: diffusion.Diffusion,
    out: Array,
    x: Array,
    t: Array,
    noise: Array | None,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> Array:
  """DDIM step (Song et al. eq. 12) on the respaced process; eta = 0 is deterministic."""
  pm = diffusion.p_mean_variance(d, out, x, t, clip_denoised=clip_denoised)
  x0 = pm['pred_xstart']
  eps = diffusion.predict_eps_from_xstart(d, x, t, x0)  # re-derived so clipping is respected
  ab = diffusion.extract(d.alphas_cumprod, t, x.ndim)
  ab_prev = diffusion.extract(d.alphas_cumprod_prev, t, x.ndim)
  mean = x0 * jnp.sqrt(ab_prev)
  if eta == 0.0 or noise is None:
    return mean + jnp.sqrt(1.0 - ab_prev) * eps
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
  mean = mean + jnp.sqrt(1.0 - ab_prev - sigma**2) * eps
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return mean + nonzero * sigma * noise


def noise_fn(keys: Array, shape: tuple[int, ...]) -> NoiseFn:
  """The per-sample draws of a batch: stream -> [B, *shape] normals (`per_sample_normal`)."""
  return lambda stream: per_sample_normal(keys, stream, shape)


# ------------------------------------------------------------------ steps


def _respaced_steps(process: diffusion.Diffusion, update, noisy: bool) -> Steps:
  """Steps over the respaced process: step i at respaced t = n - 1 - i; `update(out, x, t,
  noise)` is the sampler's step x_t -> x_{t-1}."""
  n = process.num_timesteps

  def t_of(x, i):
    return _full(x.shape[0], n - 1 - i)

  def step(eval_fn, x, i, state, noise):
    t = t_of(x, i)
    out = eval_fn(x, diffusion.take(process.timestep_map, t))
    return update(out, x, t, noise), state

  def noised(x0, i, noise):
    ab = diffusion.extract(process.alphas_cumprod_prev, t_of(x0, i), x0.ndim)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise

  def back(x, i, noise):
    t = t_of(x, i)
    a = diffusion.extract(process.alphas_cumprod, t, x.ndim) / diffusion.extract(
        process.alphas_cumprod_prev, t, x.ndim
    )
    return jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * noise

  return Steps(n, step, noisy, noised=noised, back=back)


def ddpm_steps(process: diffusion.Diffusion, clip_denoised: bool = False) -> Steps:
  """The original p_sample_loop over the (respaced) process."""
  update = lambda out, x, t, noise: p_sample_step(process, out, x, t, noise, clip_denoised)
  return _respaced_steps(process, update, noisy=True)


def ddim_steps(
    process: diffusion.Diffusion, eta: float = 0.0, clip_denoised: bool = False
) -> Steps:
  update = lambda out, x, t, noise: ddim_step(process, out, x, t, noise, eta, clip_denoised)
  return _respaced_steps(process, update, noisy=eta > 0)


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


def dpm_solver_steps(plan: dict[str, np.ndarray], clip_denoised: bool = False) -> Steps:
  """DPM-Solver++(2M) over `dpm_solver_plan`; its state is the last x0 prediction."""
  p = {k: jnp.asarray(v, jnp.int32 if k == 'timesteps' else jnp.float32) for k, v in plan.items()}

  def step(eval_fn, x, i, x0_prev, noise):
    out = eval_fn(x, _full(x.shape[0], p['timesteps'][i]))
    eps = diffusion.split_output(out, x.shape[-1])[0]
    x0 = (x - p['sigma'][i] * eps) / p['alpha'][i]
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    data = p['a'][i] * x0 + p['b'][i] * x0_prev
    return p['ratio'][i] * x + p['coef'][i] * data, x0

  return Steps(len(plan['timesteps']), step, noisy=False, init_state=jnp.zeros_like)


def sampler_steps(cfg: SamplerConfig) -> Steps:
  """The `Steps` of `cfg.sampler`."""
  if cfg.objective == 'flow':
    return flow_loops.flow_steps(cfg)
  if cfg.sampler == 'ddpm':
    return ddpm_steps(cfg.diffusion(), cfg.clip_denoised)
  if cfg.sampler == 'ddim':
    return ddim_steps(cfg.diffusion(), cfg.eta, cfg.clip_denoised)
  return dpm_solver_steps(dpm_solver_plan(cfg.steps, cfg.num_train_timesteps), cfg.clip_denoised)


def run_loop(cfg: SamplerConfig, eval_fn: EvalFn, x: Array, keys: Array) -> Array:
  """The sampler of `cfg` from x = x_T (keys: the batch's per-sample keys)."""
  return sample_loop(sampler_steps(cfg), eval_fn, x, noise_fn(keys, x.shape[1:]))
