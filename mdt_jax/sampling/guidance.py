"""Classifier-free guidance: scale schedules and the batched conditional/unconditional pass."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# model(x [B,H,W,C], t [B] original timesteps, y [B]) -> [B,H,W,2C] (or C without learned variance)
ModelFn = Callable[[Array, Array, Array], Array]

SCHEDULES = ('constant', 'power_cosine')
CHANNELS = ('first3', 'all')


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance settings.

  scale: s; the guided eps is eps_u + s_eff(t) * (eps_c - eps_u).
  schedule: 'constant' (s_eff = s) or 'power_cosine' (the original: s_eff = 1 + (s-1)*w(t),
    w(t) = (1 - cos(pi * (1 - t/T)^scale_pow)) / 2, t the original timestep).
  interval: (lo, hi) original timesteps; guidance is on only for lo <= t <= hi (s_eff = 1 outside).
  channels: 'first3' guides eps channels 0..2 only (the original's DiT quirk), 'all' every eps
    channel. Unguided channels and the variance channels come from the conditional half.
  """

  scale: float
  schedule: str = 'power_cosine'
  scale_pow: float = 4.0
  interval: tuple[int, int] | None = None
  channels: str = 'first3'
  num_train_timesteps: int = 1000

  def __post_init__(self):
    if not math.isfinite(self.scale):
      raise ValueError(f'cfg scale must be a finite number, got {self.scale!r}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'guidance schedule must be one of {SCHEDULES}, got {self.schedule!r}')
    if self.schedule == 'power_cosine' and not self.scale_pow > 0:
      raise ValueError(f'scale_pow must be > 0 for the power-cosine schedule, got {self.scale_pow}')
    if self.channels not in CHANNELS:
      raise ValueError(f'guidance channels must be one of {CHANNELS}, got {self.channels!r}')
    if self.interval is not None:
      if len(self.interval) != 2 or not 0 <= self.interval[0] <= self.interval[1]:
        raise ValueError(
            f'guidance interval must be (lo, hi) with 0 <= lo <= hi, got {self.interval!r}'
        )
      object.__setattr__(self, 'interval', (int(self.interval[0]), int(self.interval[1])))


def guidance_scale(g: Guidance, t: Array) -> Array:
  """s_eff [B] (float32) at original timesteps t [B]."""
  tf = t.astype(jnp.float32)
  if g.schedule == 'power_cosine':
    w = 0.5 * (1.0 - jnp.cos(jnp.pi * (1.0 - tf / g.num_train_timesteps) ** g.scale_pow))
    s = 1.0 + (g.scale - 1.0) * w
  else:
    s = jnp.full(tf.shape, g.scale, jnp.float32)
  if g.interval is not None:
    lo, hi = g.interval
    s = jnp.where((t >= lo) & (t <= hi), s, 1.0)
  return s


def guided_model(model_fn: ModelFn, g: Guidance, null_label: int, channels: int) -> ModelFn:
  """A model_fn that runs `model_fn` once on [x; x] with labels [y; null] and guides eps."""

  def fn(x: Array, t: Array, y: Array) -> Array:
    b = x.shape[0]
    out = model_fn(
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([y, jnp.full_like(y, null_label)]),
    )
    out = out.astype(jnp.float32)
    cond, uncond = out[:b], out[b:]
    n = min(3, channels) if g.channels == 'first3' else channels
    s = guidance_scale(g, t)[:, None, None, None]
    guided = uncond[..., :n] + s * (cond[..., :n] - uncond[..., :n])
    return jnp.concatenate([guided, cond[..., n:]], axis=-1)

  return fn
