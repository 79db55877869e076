"""The original's training step in PyTorch, float32 and eager: the speed baseline of the train step.

As ``masked_diffusion/train_util.py`` runs one step (``forward_backward``, the optimizer, the EMA):
one timestep per sample shared by both branches; the plain branch and the masked branch
(``enable_mask=True``) each draw their own noise, label dropout and (masked) mask; each branch's
loss is the IDDPM hybrid loss with the min-SNR weight on the eps MSE and the VLB term on the
variance channels (eps detached), tables in float64 numpy gathered per call; the two batch means
are added and one backward pass runs; then Adan as the official package computes it on a CPU
(its multi-tensor ``foreach`` path; the fused kernel is CUDA-only) with its own global-norm
clipping, and the EMA update parameter by parameter.

Left out: what only logs (per-parameter norms and per-quartile losses read back with ``.item()``)
and the VAE encoding of the images (the baseline, like ``tools/bench.py``, starts from latents).
``StepDraws`` replays given random draws, so a step can be checked against the JAX step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from mdt_jax.diffusion import schedules
from torch_reference.model import TorchMDT, from_official_state


@dataclasses.dataclass
class BranchDraws:
  """One branch's random draws."""

  noise: torch.Tensor  # [B, C, H, W]
  drop: torch.Tensor | None = None  # [B] bool: label -> null class
  mask: tuple[torch.Tensor, int] | None = None  # (ids_shuffle [B, L], len_keep)


@dataclasses.dataclass
class StepDraws:
  t: torch.Tensor  # [B] timesteps, shared by both branches
  plain: BranchDraws
  masked: BranchDraws | None = None


class TorchDiffusion:
  """The training diffusion's tables in float64 numpy, gathered per call as the original does."""

  def __init__(self, num_timesteps: int = 1000, schedule: str = 'linear'):
    self.num_timesteps = num_timesteps
    self.tables = schedules.diffusion_tables(schedules.beta_schedule(schedule, num_timesteps))

  def extract(self, name: str, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """table[t] as float32, broadcast to `shape` (a materialised tensor, as the original)."""
    vals = torch.from_numpy(self.tables[name]).to(t.device)[t].float()
    vals = vals.reshape(-1, *([1] * (len(shape) - 1)))
    return vals + torch.zeros(shape, device=t.device)

  def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (
        self.extract('sqrt_alphas_cumprod', t, x0.shape) * x0
        + self.extract('sqrt_one_minus_alphas_cumprod', t, x0.shape) * noise
    )

  def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    mean = (
        self.extract('posterior_mean_coef1', t, x_t.shape) * x0
        + self.extract('posterior_mean_coef2', t, x_t.shape) * x_t
    )
    return mean, self.extract('posterior_log_variance_clipped', t, x_t.shape)

  def p_mean_log_var(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean and log variance of p(x_{t-1} | x_t) from [eps, v] (learned-range variance)."""
    eps, v = torch.split(out, x_t.shape[1], dim=1)
    min_log = self.extract('posterior_log_variance_clipped', t, x_t.shape)
    max_log = self.extract('log_betas', t, x_t.shape)
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = (
        self.extract('sqrt_recip_alphas_cumprod', t, x_t.shape) * x_t
        - self.extract('sqrt_recipm1_alphas_cumprod', t, x_t.shape) * eps
    )
    mean, _ = self.q_posterior(x0, x_t, t)
    return mean, log_var

  def vb_bpd(
      self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
  ) -> torch.Tensor:
    """[B] KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; the decoder NLL at t = 0."""
    true_mean, true_log_var = self.q_posterior(x0, x_t, t)
    mean, log_var = self.p_mean_log_var(out, x_t, t)
    kl = 0.5 * (
        -1.0
        + log_var
        - true_log_var
        + torch.exp(true_log_var - log_var)
        + (true_mean - mean) ** 2 * torch.exp(-log_var)
    )
    nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    return torch.where(t == 0, _mean_flat(nll), _mean_flat(kl)) / math.log(2.0)

  def training_losses(
      self,
      model: TorchMDT,
      x0: torch.Tensor,
      t: torch.Tensor,
      y: torch.Tensor,
      draws: BranchDraws | None,
      *,
      masked: bool,
      min_snr_gamma: float | None,
  ) -> torch.Tensor:
    """Per-sample loss [B]: min-SNR-weighted eps MSE + the VLB term (eps detached)."""
    noise = torch.randn_like(x0) if draws is None else draws.noise
    x_t = self.q_sample(x0, t, noise)
    alpha = self.extract('sqrt_alphas_cumprod', t, t.shape)
    sigma = self.extract('sqrt_one_minus_alphas_cumprod', t, t.shape)
    snr = (alpha / sigma) ** 2
    weight = (
        torch.ones_like(snr) if min_snr_gamma is None else torch.clamp(snr, max=min_snr_gamma) / snr
    )
    kw = {} if draws is None else {'drop': draws.drop, 'mask': draws.mask}
    out = model(x_t, t, y, masked, **kw)
    eps, v = torch.split(out, x0.shape[1], dim=1)
    vb = self.vb_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)
    return weight * _mean_flat((noise - eps) ** 2) + vb


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
  return x.mean(dim=list(range(1, x.ndim)))


def _approx_normal_cdf(x: torch.Tensor) -> torch.Tensor:
  return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
  """Elementwise log-likelihood of data in [-1, 1] under 256 bins of width 2/255."""
  inv_std = torch.exp(-log_scale)
  centered = x - mean
  cdf_plus = _approx_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_plus = torch.log(cdf_plus.clamp(min=1e-12))
  log_one_minus_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
  log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
  return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus_min, log_delta))


class Adan:
  """Adan over a list of tensors, with the official package's global-norm clipping.

  The official update (keep rates b1, b2, b3; diff = g - g_prev, 0 at the first step):
  m = b1 m + (1-b1) g; d = b2 d + (1-b2) diff; n = b3 n + (1-b3) (g + b2 diff)^2;
  p -= lr (m / (1-b1^k) + b2 d / (1-b2^k)) / (sqrt(n / (1-b3^k)) + eps); p /= 1 + lr wd.
  Clipping scales g by min(1, max_norm / (||g|| + eps)). Multi-tensor (`torch._foreach_*`)
  ops, as the package's default path on a CPU.
  """

  def __init__(
      self,
      params: list[torch.Tensor],
      lr: float,
      betas=(0.98, 0.92, 0.99),
      eps: float = 1e-8,
      weight_decay: float = 0.0,
      max_grad_norm: float = 0.0,
  ):
    self.params = params
    self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
    self.max_grad_norm = max_grad_norm
    self.k = 0
    zeros = lambda: [torch.zeros_like(p) for p in params]
    self.m, self.d, self.n = zeros(), zeros(), zeros()
    self.neg_prev = zeros()  # -g of the last step (then scratch)

  @torch.no_grad()
  def step(self) -> None:
    """One update of the parameters that have a gradient (as the package, it skips the rest)."""
    live = [i for i, p in enumerate(self.params) if p.grad is not None]
    params, grads = [self.params[i] for i in live], [self.params[i].grad for i in live]
    m, d, n, diff = ([s[i] for i in live] for s in (self.m, self.d, self.n, self.neg_prev))
    clip = 1.0
    if self.max_grad_norm > 0:
      norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
      clip = torch.clamp(self.max_grad_norm / (norm + self.eps), max=1.0).item()
    b1, b2, b3 = self.betas
    self.k += 1
    torch._foreach_mul_(grads, clip)
    if self.k == 1:  # diff = 0
      torch._foreach_add_(diff, grads, alpha=-1.0)
    torch._foreach_add_(diff, grads)  # g - g_prev
    torch._foreach_mul_(m, b1)
    torch._foreach_add_(m, grads, alpha=1 - b1)
    torch._foreach_mul_(d, b2)
    torch._foreach_add_(d, diff, alpha=1 - b2)
    torch._foreach_mul_(diff, b2)
    torch._foreach_add_(diff, grads)  # g + b2 diff
    torch._foreach_mul_(n, b3)
    torch._foreach_addcmul_(n, diff, diff, value=1 - b3)
    denom = torch._foreach_sqrt(n)
    torch._foreach_div_(denom, math.sqrt(1 - b3**self.k))
    torch._foreach_add_(denom, self.eps)
    torch._foreach_addcdiv_(params, m, denom, value=-self.lr / (1 - b1**self.k))
    torch._foreach_addcdiv_(params, d, denom, value=-self.lr * b2 / (1 - b2**self.k))
    if self.wd:
      torch._foreach_div_(params, 1 + self.lr * self.wd)
    torch._foreach_zero_(diff)
    torch._foreach_add_(diff, grads, alpha=-1.0)  # -g for next step


class TorchTrainStep:
  """One training step of the original: both branches, one backward, Adan, EMA (float32)."""

  def __init__(
      self,
      model: TorchMDT,
      *,
      learning_rate: float,
      betas=(0.98, 0.92, 0.99),
      eps: float = 1e-8,
      weight_decay: float = 0.0,
      clip_norm: float = 1.0,
      ema_decay: float = 0.9999,
      mask_branch: bool = True,
      min_snr_gamma: float | None = 5.0,
      num_timesteps: int = 1000,
      schedule: str = 'linear',
  ):
    if mask_branch and model.config.mask_ratio is None:
      raise ValueError('mask_branch=True needs model.mask_ratio (the official value is 0.3)')
    self.model = model.train()
    self.diffusion = TorchDiffusion(num_timesteps, schedule)
    self.mask_branch = mask_branch
    self.min_snr_gamma = min_snr_gamma
    self.ema_decay = ema_decay
    self.trainable = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = Adan(self.trainable, learning_rate, betas, eps, weight_decay, clip_norm or 0.0)
    self.ema = [p.detach().clone() for p in model.parameters()]

  @classmethod
  def from_config(
      cls, config, state_dict: dict, device: str = 'cpu', mask_branch: bool | None = None
  ) -> 'TorchTrainStep':
    """The step of an experiment config (its optimizer, EMA and loss settings) on official-layout
    weights; `mask_branch` defaults to the config's."""
    opt = config.optimizer
    if opt.name != 'adan':
      raise ValueError(
          f"the PyTorch train baseline runs the original's Adan; the config's "
          f'optimizer.name is {opt.name!r}'
      )
    model = from_official_state(state_dict, config.model.to_dict(), device)
    return cls(
        model,
        learning_rate=opt.learning_rate,
        betas=(opt.b1, opt.b2, opt.b3),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        clip_norm=opt.clip_norm,
        ema_decay=config.ema_decay,
        mask_branch=config.mask_branch if mask_branch is None else mask_branch,
        min_snr_gamma=config.diffusion.min_snr_gamma,
        num_timesteps=config.diffusion.num_timesteps,
        schedule=config.diffusion.schedule,
    )

  def __call__(
      self, x0: torch.Tensor, y: torch.Tensor, draws: StepDraws | None = None
  ) -> dict[str, float]:
    """One step on latents x0 [B, C, H, W] and labels y [B]; returns the branch losses."""
    self.model.zero_grad(set_to_none=False)
    if draws is None:
      t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
    else:
      t = draws.t
    loss_fn = lambda masked, d: self.diffusion.training_losses(
        self.model, x0, t, y, d, masked=masked, min_snr_gamma=self.min_snr_gamma
    )
    plain = loss_fn(False, None if draws is None else draws.plain).mean()
    loss = plain
    out = {'plain/loss': plain}
    if self.mask_branch:
      masked = loss_fn(True, None if draws is None else draws.masked).mean()
      loss = loss + masked
      out['masked/loss'] = masked
    loss.backward()
    self.optimizer.step()
    self.update_ema()
    out['loss'] = loss
    return {k: float(v.detach()) for k, v in out.items()}

  @torch.no_grad()
  def update_ema(self) -> None:
    for e, p in zip(self.ema, self.model.parameters()):
      e.mul_(self.ema_decay).add_(p, alpha=1 - self.ema_decay)

  def state_dicts(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, EMA) as official state dicts of numpy arrays (parameters only)."""
    names = [n for n, _ in self.model.named_parameters()]
    params = {n: p.detach().cpu().numpy() for n, p in self.model.named_parameters()}
    ema = {n: e.cpu().numpy() for n, e in zip(names, self.ema)}
    return params, ema
