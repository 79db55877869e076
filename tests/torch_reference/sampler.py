"""The original's guided DDPM sampler in PyTorch (float32, eager), for speed and parity checks.

As the original sample script runs it: the batch is doubled to [z; z] with labels [y; null],
each step calls the model once on the doubled batch, guides the first three eps channels with
the power-cosine scale schedule, takes an ancestral step with the learned-range variance on
both halves (tables kept in float64 numpy and gathered per step), and the first half is returned.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from mdt_jax.diffusion import schedules

NoiseFn = Callable[[int, tuple], torch.Tensor]  # (step j, shape) -> noise; j = 0 is x_T


class RespacedDiffusion:
  """The per-step tables of the respaced process, float64 numpy as in the original."""

  def __init__(self, respacing: str, num_timesteps: int = 1000):
    betas = schedules.beta_schedule('linear', num_timesteps)
    kept = schedules.space_timesteps(num_timesteps, respacing)
    new_betas, self.timestep_map = schedules.respace_betas(betas, kept)
    self.tables = schedules.diffusion_tables(new_betas)
    self.num_timesteps = len(new_betas)
    self.original_num_steps = num_timesteps

  def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    arr = torch.from_numpy(self.tables[name]).to(like.device)[t].float()
    return arr.reshape(-1, *([1] * (like.ndim - 1))).expand(like.shape)


def forward_with_cfg(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float,
    scale_pow: float,
    num_timesteps: int = 1000,
) -> torch.Tensor:
  """The original's guided forward on a doubled batch [x; x] with labels [y; null]."""
  half = x[: len(x) // 2]
  out = model(torch.cat([half, half]), t, y)
  eps, rest = out[:, :3], out[:, 3:]
  cond, uncond = eps.chunk(2)
  w = (1 - torch.cos(math.pi * (1 - t[: len(half)].float() / num_timesteps) ** scale_pow)) / 2
  scale = ((cfg_scale - 1) * w + 1).reshape(-1, 1, 1, 1)
  guided = uncond + scale * (cond - uncond)
  return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def p_sample(
    d: RespacedDiffusion, out: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor
) -> torch.Tensor:
  """One ancestral step at respaced index i with the learned-range variance."""
  c = x.shape[1]
  t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
  eps, v = out[:, :c], out[:, c:]
  min_log = d.extract('posterior_log_variance_clipped', t, x)
  max_log = d.extract('log_betas', t, x)
  frac = (v + 1) / 2
  log_var = frac * max_log + (1 - frac) * min_log
  x0 = (
      d.extract('sqrt_recip_alphas_cumprod', t, x) * x
      - d.extract('sqrt_recipm1_alphas_cumprod', t, x) * eps
  )
  mean = d.extract('posterior_mean_coef1', t, x) * x0 + d.extract('posterior_mean_coef2', t, x) * x
  if i == 0:
    return mean
  return mean + torch.exp(0.5 * log_var) * noise


@torch.inference_mode()
def sample_ddpm(
    model,
    labels: Sequence[int],
    *,
    steps: int = 250,
    cfg_scale: float = 3.8,
    scale_pow: float = 4.0,
    num_timesteps: int = 1000,
    noise_fn: NoiseFn | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
  """Guided DDPM samples [B, C, H, W] (float32) from a TorchMDT with learned variance.

  `noise_fn(j, shape)` gives the noise of the first half: j = 0 is x_T, j = k + 1 the noise of
  loop iteration k (the JAX sampler's per-sample streams can be replayed this way); without it
  noise comes from `torch.randn` with `generator`.
  """
  cfg = model.config
  if not cfg.learn_sigma:
    raise ValueError('the original sampler is for learned-variance models (learn_sigma=True)')
  dev = next(model.parameters()).device
  d = RespacedDiffusion(str(steps), num_timesteps)
  y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=dev)
  b = y.shape[0]
  shape = (b, cfg.in_channels, cfg.input_size, cfg.input_size)

  def noise(j):
    if noise_fn is None:
      return torch.randn((2 * b,) + shape[1:], generator=generator, device=dev)
    first = noise_fn(j, shape).to(dev, torch.float32)
    return torch.cat([first, first])

  x = noise(0)
  y2 = torch.cat([y, torch.full_like(y, cfg.num_classes)])
  tmap = torch.as_tensor(np.asarray(d.timestep_map), dtype=torch.long, device=dev)
  for k in range(d.num_timesteps):
    i = d.num_timesteps - 1 - k
    t = tmap[torch.full((2 * b,), i, dtype=torch.long, device=dev)]
    out = forward_with_cfg(model, x, t, y2, cfg_scale, scale_pow, d.original_num_steps)
    x = p_sample(d, out, x, i, noise(k + 1))
  return x[:b]
