"""Training loss of MDTv2: min-SNR-weighted epsilon MSE plus the variational-bound term (IDDPM)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdt_jax.diffusion.gaussian import (
    Diffusion,
    p_mean_variance,
    take,
    q_posterior_mean_variance,
    split_output,
)

Array = jax.Array


def mean_flat(x: Array) -> Array:
  """Mean over every axis but the first."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (
      -1.0
      + logvar2
      - logvar1
      + jnp.exp(logvar1 - logvar2)
      + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: Array) -> Array:
  """Standard normal CDF by the tanh approximation used in IDDPM."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
  """Log-likelihood (nats, elementwise) of data in [-1, 1] discretised to 256 bins of width 2/255.

  The outermost bins extend to -inf / +inf (data below -0.999 / above 0.999).
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(
    diffusion: Diffusion, model_output: Array, x_start: Array, x_t: Array, t: Array
) -> Array:
  """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
  the discretised Gaussian decoder NLL at t == 0 (no clipping of the x_0 prediction)."""
  true_mean, _, true_log_var = q_posterior_mean_variance(diffusion, x_start, x_t, t)
  out = p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=False)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']))
  nll = -discretized_gaussian_log_likelihood(x_start, out['mean'], 0.5 * out['log_variance'])
  nll = mean_flat(nll)
  return jnp.where(t == 0, nll, kl) / math.log(2.0)


def min_snr_weight(diffusion: Diffusion, t: Array, gamma: float | None = 5.0) -> Array:
  """Weight of the epsilon MSE: min(SNR_t, gamma) / SNR_t (1 when gamma is None)."""
  snr = take(diffusion.snr, t)
  if gamma is None:
    return jnp.ones_like(snr)
  return jnp.minimum(snr, gamma) / snr


def training_losses(
    diffusion: Diffusion,
    model_output: Array,
    x_start: Array,
    x_t: Array,
    t: Array,
    noise: Array,
    min_snr_gamma: float | None = 5.0,
) -> dict[str, Array]:
  """Per-sample loss terms [B] for a model output on x_t = q_sample(x_start, t, noise).

  loss = w(t) * mse + vb, with mse = mean((noise - eps)^2) (unweighted), w(t) the min-SNR-gamma
  weight (gamma None -> 1: MDT v1 / DiT) and vb the VLB term in bits/dim, computed with the eps
  channels under stop_gradient so only the variance channels learn from it. With a C-channel
  (fixed variance) output vb is 0.
  """
  if x_start.shape != x_t.shape or noise.shape != x_t.shape:
    raise ValueError(
        f'x_start {tuple(x_start.shape)}, x_t {tuple(x_t.shape)} and noise '
        f'{tuple(noise.shape)} must have the same shape'
    )
  if t.shape != (x_t.shape[0],):
    raise ValueError(f't must have shape [B]=({x_t.shape[0]},), got {tuple(t.shape)}')
  model_output = model_output.astype(jnp.float32)
  eps, v = split_output(model_output, x_t.shape[-1])
  mse = mean_flat((noise - eps) ** 2)
  if v is None:
    vb = jnp.zeros_like(mse)
  else:
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = vb_terms_bpd(diffusion, frozen, x_start, x_t, t)
  loss = min_snr_weight(diffusion, t, min_snr_gamma) * mse + vb
  return {'loss': loss, 'mse': mse, 'vb': vb}
