"""Flow matching: the linear interpolant with velocity prediction (as SiT, SD3, REPA).

Time runs from data to noise: x_t = (1 - t) x_0 + t eps for t in [0, 1], so t = 0 is data and
t = 1 is pure noise (the direction of the DDPM timesteps). The model predicts the velocity
u = dx_t/dt = eps - x_0 and is trained with its plain MSE. Training times are drawn uniformly or
logit-normally (t = sigmoid(m + s n), n ~ N(0, 1); SD3's density, which puts more weight on the
middle times) and optionally shifted, t -> k t / (1 + (k - 1) t) (k > 1 moves times towards
noise). The network's timestep embedder was built for the DDPM's integer timesteps in [0, T):
it is given t * time_scale (time_scale = T, 1000 by default).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array

T_SAMPLINGS = ('uniform', 'logit_normal')


@dataclasses.dataclass(frozen=True)
class FlowMatching:
  """Settings of the flow objective (hashable: closed over by jitted train steps)."""

  t_sampling: str = 'uniform'
  t_logit_mean: float = 0.0
  t_logit_scale: float = 1.0
  t_shift: float = 1.0
  time_scale: float = 1000.0

  def __post_init__(self):
    if self.t_sampling not in T_SAMPLINGS:
      raise ValueError(
          f'diffusion.t_sampling must be one of {T_SAMPLINGS}, got {self.t_sampling!r}'
      )
    if not math.isfinite(self.t_logit_mean):
      raise ValueError(f'diffusion.t_logit_mean must be a finite number, got {self.t_logit_mean}')
    if not (math.isfinite(self.t_logit_scale) and self.t_logit_scale > 0):
      raise ValueError(f'diffusion.t_logit_scale must be > 0, got {self.t_logit_scale}')
    if not (math.isfinite(self.t_shift) and self.t_shift > 0):
      raise ValueError(f'diffusion.t_shift must be > 0 (1: no shift), got {self.t_shift}')
    if not (math.isfinite(self.time_scale) and self.time_scale > 0):
      raise ValueError(f'the flow time scale must be > 0, got {self.time_scale}')


def shift_time(t: Array, shift: float) -> Array:
  """t -> k t / (1 + (k - 1) t): a monotone map of [0, 1] onto itself (identity for k = 1)."""
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(fm: FlowMatching, key: Array, n: int) -> Array:
  """Training times [n] in [0, 1] (float32), drawn as ``fm`` says."""
  if fm.t_sampling == 'uniform':
    t = jax.random.uniform(key, (n,), jnp.float32)
  else:
    z = jax.random.normal(key, (n,), jnp.float32)
    t = jax.nn.sigmoid(fm.t_logit_mean + fm.t_logit_scale * z)
  return shift_time(t, fm.t_shift)


def _bcast(t: Array, ndim: int) -> Array:
  return t.astype(jnp.float32).reshape((t.shape[0],) + (1,) * (ndim - 1))


def interpolate(x0: Array, noise: Array, t: Array) -> Array:
  """x_t = (1 - t) x_0 + t eps (t [B] broadcast over the other axes)."""
  tb = _bcast(t, x0.ndim)
  return (1.0 - tb) * x0 + tb * noise


def velocity_target(x0: Array, noise: Array) -> Array:
  """d x_t / dt = eps - x_0."""
  return noise - x0


def model_time(fm_or_scale: FlowMatching | float, t: Array) -> Array:
  """What the network is given for time t: t * time_scale (float32)."""
  scale = fm_or_scale.time_scale if isinstance(fm_or_scale, FlowMatching) else fm_or_scale
  return t.astype(jnp.float32) * jnp.float32(scale)


def predict_x0(x_t: Array, t: Array, velocity: Array) -> Array:
  """x_0 = x_t - t u."""
  return x_t - _bcast(t, x_t.ndim) * velocity


def predict_noise(x_t: Array, t: Array, velocity: Array) -> Array:
  """eps = x_t + (1 - t) u."""
  return x_t + (1.0 - _bcast(t, x_t.ndim)) * velocity


def training_losses(model_output: Array, x0: Array, noise: Array) -> dict[str, Array]:
  """Per-sample loss terms [B]: the velocity MSE (unweighted, as SiT), as 'loss' and 'mse'."""
  if x0.shape != noise.shape:
    raise ValueError(
        f'x_0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape'
    )
  if model_output.shape != x0.shape:
    raise ValueError(
        f"the flow objective needs a velocity output of the input's shape "
        f'{tuple(x0.shape)} (learn_sigma off), got {tuple(model_output.shape)}'
    )
  err = model_output.astype(jnp.float32) - velocity_target(x0, noise)
  mse = jnp.mean(err**2, axis=tuple(range(1, err.ndim)))
  return {'loss': mse, 'mse': mse}
