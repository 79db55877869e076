"""Samplers of flow models (velocity prediction, x_t = (1 - t) x_0 + t eps): each a fori_loop.

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

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax.diffusion import flow

Array = jax.Array
EvalFn = Callable[[Array, Array], Array]  # (x, model time t * time_scale [B]) -> velocity
NoiseFn = Callable[[Array], Array]  # loop iteration i -> per-sample normals like x

FLOW_SAMPLERS = ('euler', 'heun', 'euler_maruyama')
SDE_DIFFUSIONS = ('sigma', 'constant')


def time_grid(num_points: int, shift: float = 1.0, end: float = 0.0) -> np.ndarray:
  """Descending times (float64): linspace(1, end, num_points), then shifted."""
  t = np.linspace(1.0, end, num_points, dtype=np.float64)
  return shift * t / (1.0 + (shift - 1.0) * t)


def _velocity(eval_fn: EvalFn, x: Array, t: Array, time_scale: float) -> Array:
  tb = jnp.full((x.shape[0],), t, jnp.float32)
  return eval_fn(x, flow.model_time(time_scale, tb)).astype(jnp.float32)


def euler_loop(eval_fn: EvalFn, ts: np.ndarray, x: Array, time_scale: float) -> Array:
  """Euler steps over the descending grid ``ts`` (len(ts) - 1 evaluations)."""
  t = jnp.asarray(ts, jnp.float32)

  def body(i, x):
    return x + (t[i + 1] - t[i]) * _velocity(eval_fn, x, t[i], time_scale)

  return jax.lax.fori_loop(0, len(ts) - 1, body, x)


def heun_loop(eval_fn: EvalFn, ts: np.ndarray, x: Array, time_scale: float) -> Array:
  """Heun steps over the descending grid ``ts`` (2 (len(ts) - 1) evaluations)."""
  t = jnp.asarray(ts, jnp.float32)

  def body(i, x):
    h = t[i + 1] - t[i]
    u0 = _velocity(eval_fn, x, t[i], time_scale)
    u1 = _velocity(eval_fn, x + h * u0, t[i + 1], time_scale)
    return x + 0.5 * h * (u0 + u1)

  return jax.lax.fori_loop(0, len(ts) - 1, body, x)


def sde_diffusion(form: str, norm: float, t: Array) -> Array:
  """The SDE's diffusion coefficient w(t) (SiT's diffusion_form / diffusion_norm)."""
  if form == 'sigma':
    return norm * t
  if form == 'constant':
    return jnp.full_like(t, norm)
  raise ValueError(f'unknown SDE diffusion coefficient {form!r}; expected one of {SDE_DIFFUSIONS}')


def _sde_drift(u: Array, x: Array, t: Array, w: Array) -> Array:
  """-u + w * score in tau = 1 - t, the score taken from the velocity: -(x + (1 - t) u) / t."""
  return -u - w * (x + (1.0 - t) * u) / t


def euler_maruyama_loop(
    eval_fn: EvalFn,
    ts: np.ndarray,
    x: Array,
    noise: NoiseFn,
    time_scale: float,
    form: str = 'sigma',
    norm: float = 1.0,
) -> Array:
  """SiT's Euler-Maruyama sampler over the descending grid ``ts`` (ts[-1] > 0: the size of the
  final, noise-free step); len(ts) evaluations."""
  t = jnp.asarray(ts, jnp.float32)

  def drift(x, ti):
    return _sde_drift(_velocity(eval_fn, x, ti, time_scale), x, ti, sde_diffusion(form, norm, ti))

  def body(i, x):
    h = t[i] - t[i + 1]
    w = sde_diffusion(form, norm, t[i])
    return x + h * drift(x, t[i]) + jnp.sqrt(2.0 * w * h) * noise(i)

  x = jax.lax.fori_loop(0, len(ts) - 1, body, x)
  return x + t[-1] * drift(x, t[-1])
