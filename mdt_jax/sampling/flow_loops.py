"""Samplers of flow models (velocity prediction, x_t = (1 - t) x_0 + t eps) as `Steps` of the one
loop (harness.py).

Time runs from t = 1 (noise) to t = 0 (data) on a grid that is uniform before the optional
shift t -> k t / (1 + (k - 1) t) (k > 1 spends more steps near the noise). The model is called
with t * time_scale, the range its timestep embedder was trained on. ``steps`` always counts
model evaluations:

* euler: ``steps`` Euler steps of the ODE dx/dt = u(x, t).
* heun: ``steps / 2`` steps of Heun's method (the explicit trapezoid: an Euler predictor, then
  the mean of the velocities at both ends), 2 evaluations each, the last ending at t = 0.
* euler_maruyama: SiT's SDE sampler. In tau = 1 - t (noise to data) it integrates
  dx = [-u + w(t) s(x, t)] dtau + sqrt(2 w(t)) dW with the score s = -(x + (1 - t) u) / t, which
  keeps the marginals of the flow for any diffusion coefficient w >= 0. ``steps - 1``
  Euler-Maruyama steps go from t = 1 to t = last_step (SiT's ``last_step_size``, 0.04), then one
  noise-free step of the drift to t = 0 (SiT's ``last_step='Mean'``). Diffusion coefficients
  (SiT's ``diffusion_form`` with ``diffusion_norm`` n): 'sigma', w = n * sigma_t = n * t (SiT's
  sampling default), and 'constant', w = n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax.diffusion import flow
from mdt_jax.sampling.harness import EvalFn, Steps, sample_loop

Array = jax.Array

FLOW_SAMPLERS = ('euler', 'heun', 'euler_maruyama')
SDE_DIFFUSIONS = ('sigma', 'constant')


def time_grid(num_points: int, shift: float = 1.0, end: float = 0.0) -> np.ndarray:
  """Descending times (float64): linspace(1, end, num_points), then shifted."""
  t = np.linspace(1.0, end, num_points, dtype=np.float64)
  return shift * t / (1.0 + (shift - 1.0) * t)


def velocity(eval_fn: EvalFn, x: Array, t: Array, time_scale: float) -> Array:
  """The model's velocity at flow time t (the model sees t * time_scale)."""
  tb = jnp.full((x.shape[0],), t, jnp.float32)
  return eval_fn(x, flow.model_time(time_scale, tb)).astype(jnp.float32)


def sde_diffusion(form: str, norm: float, t: Array) -> Array:
  """The SDE's diffusion coefficient w(t) (SiT's diffusion_form / diffusion_norm)."""
  if form == 'sigma':
    return norm * t
  if form == 'constant':
    return jnp.full_like(t, norm)
  raise ValueError(f'unknown SDE diffusion coefficient {form!r}; expected one of {SDE_DIFFUSIONS}')


def sde_drift(u: Array, x: Array, t: Array, w: Array) -> Array:
  """-u + w * score in tau = 1 - t, the score taken from the velocity: -(x + (1 - t) u) / t."""
  return -u - w * (x + (1.0 - t) * u) / t


def _grid_steps(ts: np.ndarray, update, noisy: bool) -> Steps:
  """Steps over the descending grid ``ts`` (len(ts) - 1 of them); `update(eval_fn, x, i, t,
  noise)` is the sampler's step from t[i] to t[i + 1]."""
  t = jnp.asarray(ts, jnp.float32)

  def step(eval_fn, x, i, state, noise):
    return update(eval_fn, x, i, t, noise), state

  def noised(x0, i, noise):
    return (1.0 - t[i + 1]) * x0 + t[i + 1] * noise

  def back(x, i, noise):
    a = (1.0 - t[i]) / (1.0 - t[i + 1])
    return a * x + jnp.sqrt(jnp.maximum(t[i] * t[i] - (a * t[i + 1]) ** 2, 0.0)) * noise

  return Steps(len(ts) - 1, step, noisy, noised=noised, back=back)


def euler_steps(ts: np.ndarray, time_scale: float) -> Steps:
  """Euler steps over the descending grid ``ts`` (len(ts) - 1 evaluations)."""

  def update(eval_fn, x, i, t, noise):
    return x + (t[i + 1] - t[i]) * velocity(eval_fn, x, t[i], time_scale)

  return _grid_steps(ts, update, noisy=False)


def heun_steps(ts: np.ndarray, time_scale: float) -> Steps:
  """Heun steps over the descending grid ``ts`` (2 (len(ts) - 1) evaluations)."""

  def update(eval_fn, x, i, t, noise):
    h = t[i + 1] - t[i]
    u0 = velocity(eval_fn, x, t[i], time_scale)
    u1 = velocity(eval_fn, x + h * u0, t[i + 1], time_scale)
    return x + 0.5 * h * (u0 + u1)

  return _grid_steps(ts, update, noisy=False)


def euler_maruyama_steps(
    ts: np.ndarray, time_scale: float, form: str = 'sigma', norm: float = 1.0
) -> Steps:
  """SiT's Euler-Maruyama sampler over the descending grid ``ts`` (ts[-1] > 0: the size of the
  final, noise-free step to t = 0); len(ts) evaluations."""
  last = len(ts) - 1  # the index of the noise-free step

  def update(eval_fn, x, i, t, noise):
    h = t[i] - t[i + 1]
    w = sde_diffusion(form, norm, t[i])
    drift = sde_drift(velocity(eval_fn, x, t[i], time_scale), x, t[i], w)
    return x + h * drift + jnp.where(i < last, jnp.sqrt(2.0 * w * h), 0.0) * noise

  return _grid_steps(np.append(ts, 0.0), update, noisy=True)


def flow_steps(cfg) -> Steps:
  """The `Steps` of a flow sampler's config (an `mdt_jax.sampling.config.SamplerConfig`); the
  model sees t * num_train_timesteps."""
  scale = float(cfg.num_train_timesteps)
  if cfg.sampler == 'euler':
    return euler_steps(time_grid(cfg.steps + 1, cfg.time_shift), scale)
  if cfg.sampler == 'heun':
    return heun_steps(time_grid(cfg.steps // 2 + 1, cfg.time_shift), scale)
  ts = time_grid(cfg.steps, cfg.time_shift, end=cfg.sde_last_step)
  return euler_maruyama_steps(ts, scale, cfg.sde_diffusion, cfg.sde_diffusion_norm)


def euler_loop(eval_fn: EvalFn, ts: np.ndarray, x: Array, time_scale: float) -> Array:
  """Euler's method over the descending grid ``ts`` from x at ts[0] (no noise is drawn)."""
  return sample_loop(euler_steps(ts, time_scale), eval_fn, x, noise=None)
