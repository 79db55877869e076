"""An independent float64 NumPy implementation of the IDDPM formulas MDTv2 trains with (spec
section 3): the diffusion tables, q_sample and the per-sample hybrid loss. Loops and plain NumPy,
no code shared with the package."""

from __future__ import annotations

import numpy as np

T = 1000


def linear_betas() -> np.ndarray:
  """The linear schedule of T = 1000 steps, 1e-4 to 0.02 (np.linspace in float64)."""
  return np.linspace(1e-4, 0.02, T)


def ref_tables(betas):
  """Tables from the formulas, written out step by step (loops, no shared code with the package)."""
  n = len(betas)
  ac = np.empty(n)
  prod = 1.0
  for i, b in enumerate(betas):
    prod *= 1.0 - b
    ac[i] = prod
  ac_prev = np.array([1.0] + list(ac[:-1]))
  pv = np.array([betas[i] * (1 - ac_prev[i]) / (1 - ac[i]) for i in range(n)])
  return dict(
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac),
      sqrt_recip_alphas_cumprod=1 / np.sqrt(ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt((1 - ac) / ac),
      posterior_variance=pv,
      posterior_log_variance_clipped=np.log(np.where(np.arange(n) == 0, pv[1], pv)),
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1 - ac),
      posterior_mean_coef2=(1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
      log_betas=np.log(betas),
      snr=ac / (1 - ac),
  )


def q_sample(betas, x0, t, noise):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, NHWC, float64."""
  tb = ref_tables(betas)
  g = lambda name: tb[name][t][:, None, None, None]
  return g('sqrt_alphas_cumprod') * x0 + g('sqrt_one_minus_alphas_cumprod') * noise


def ref_losses(betas, out, x0, xt, t, noise, gamma, frozen_eps=None):
  """Per-sample (loss, mse, vb) for NHWC model output [B,H,W,2C], in float64 numpy.

  ``frozen_eps``: the epsilon the VLB term sees (the training loss stops its gradient, so a
  finite-difference derivative holds it at the unperturbed model's value); default the output's.
  """
  tb = ref_tables(betas)
  c = x0.shape[-1]
  eps, v = out[..., :c], out[..., c:]
  eps_vb = eps if frozen_eps is None else frozen_eps
  g = lambda name: tb[name][t][:, None, None, None]
  x0_hat = g('sqrt_recip_alphas_cumprod') * xt - g('sqrt_recipm1_alphas_cumprod') * eps_vb
  mu = g('posterior_mean_coef1') * x0_hat + g('posterior_mean_coef2') * xt
  frac = (v + 1) / 2
  logvar = frac * g('log_betas') + (1 - frac) * g('posterior_log_variance_clipped')
  mu_q = g('posterior_mean_coef1') * x0 + g('posterior_mean_coef2') * xt
  logvar_q = g('posterior_log_variance_clipped')
  kl = 0.5 * (
      -1 + logvar - logvar_q + np.exp(logvar_q - logvar) + (mu_q - mu) ** 2 / np.exp(logvar)
  )
  cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  sd = np.exp(0.5 * logvar)
  hi, lo = cdf((x0 - mu + 1 / 255) / sd), cdf((x0 - mu - 1 / 255) / sd)
  logp = np.log(np.maximum(hi - lo, 1e-12))
  logp = np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)), logp)
  logp = np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), logp)
  per = lambda a: a.reshape(a.shape[0], -1).mean(1)
  vb = np.where(t == 0, per(-logp), per(kl)) / np.log(2)
  mse = per((noise - eps) ** 2)
  snr = tb['snr'][t]
  w = np.ones_like(snr) if gamma is None else np.minimum(snr, gamma) / snr
  return w * mse + vb, mse, vb
