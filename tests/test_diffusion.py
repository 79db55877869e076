"""Gaussian diffusion against an independent float64 numpy implementation of the IDDPM formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import diffusion as gd
from reference_diffusion import T, ref_losses, ref_tables

# ----------------------------------------------------------------- tables and respacing


def test_linear_betas_and_tables():
  d = gd.create_diffusion()
  betas = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
  np.testing.assert_allclose(np.asarray(d.betas), betas, rtol=1e-6)
  assert d.betas.dtype == jnp.float32 and d.num_timesteps == T
  for name, want in ref_tables(betas).items():
    got = np.asarray(getattr(d, name))
    assert got.dtype == np.float32, name
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0, err_msg=name)
  np.testing.assert_array_equal(np.asarray(d.timestep_map), np.arange(T))
  # Well-known value of the linear schedule: abar_999 ~ 4.04e-5.
  assert abs(float(d.alphas_cumprod[-1]) - 4.0358e-5) < 1e-8


def test_space_timesteps_250_and_respaced_betas():
  steps = gd.space_timesteps(T, '250')
  assert steps == [round(k * 999 / 249) for k in range(250)]
  assert steps[:3] == [0, 4, 8] and steps[-2:] == [995, 999]
  d = gd.create_diffusion('250')
  assert d.num_timesteps == 250 and d.original_num_steps == T
  np.testing.assert_array_equal(np.asarray(d.timestep_map), steps)
  ac = ref_tables(np.linspace(1e-4, 0.02, T))['alphas_cumprod']
  kept = ac[steps]
  want = 1 - kept / np.concatenate([[1.0], kept[:-1]])
  np.testing.assert_allclose(np.asarray(d.betas), want, rtol=2e-6)
  # The respaced process has the very same alphas_cumprod at the kept steps.
  np.testing.assert_allclose(np.asarray(d.alphas_cumprod), kept, rtol=2e-6)
  for name, ref in ref_tables(want).items():
    np.testing.assert_allclose(np.asarray(getattr(d, name)), ref, rtol=5e-6, err_msg=name)


def test_space_timesteps_sections_and_ddim():
  # IDDPM's docstring example: 300 steps, sections of 100 strided to 10, 15 and 20 steps.
  steps = gd.space_timesteps(300, '10,15,20')
  assert len(steps) == 45
  assert steps[:10] == [round(k * 99 / 9) for k in range(10)]
  assert steps[25:] == [200 + round(k * 99 / 19) for k in range(20)]
  # The original rounds a running float sum of the stride, not k * stride: at k=7 the sum is
  # 49.4999... (-> 149) where 7 * 99 / 14 = 49.5 exactly would round to 150.
  running, want = 0.0, []
  for _ in range(15):
    want.append(100 + round(running))
    running += 99 / 14
  assert steps[10:25] == want and steps[17] == 149
  assert gd.space_timesteps(T, 'ddim50') == list(range(0, T, 20))
  assert gd.space_timesteps(T, T) == list(range(T))
  # Uneven sections: the first T % n sections are one step longer.
  assert gd.space_timesteps(10, '2,2,2') == [0, 3, 4, 6, 7, 9]


@pytest.mark.parametrize(
    'bad, message',
    [
        ('1001', 'cannot respace a section of 1000 steps into 1001 steps'),
        ('ddim999', 'cannot respace 1000 steps to exactly 999 steps with an integer stride'),
        ('abc', "cannot parse step counts 'abc'; expected comma-separated integers"),
        ('0', "step counts must be positive integers, got '0'"),
        ('10,x', "cannot parse step counts '10,x'"),
        ('ddimfoo', 'cannot parse \'ddimfoo\'; expected "ddimN" with an integer N'),
        ('1', "respacing '1' keeps 1 step\\(s\\); at least 2 are needed"),
    ],
)
def test_bad_respacing(bad, message):
  """Each bad value is named with what was expected (the message, not just any error)."""
  with pytest.raises(ValueError, match=message):
    gd.create_diffusion(bad)


# ----------------------------------------------------------------- q / p distributions


def test_q_sample_posterior_and_p_mean_variance():
  d = gd.create_diffusion()
  tb = ref_tables(np.linspace(1e-4, 0.02, T))
  rng = np.random.default_rng(0)
  b, c = 5, 3
  x0, noise = rng.normal(size=(2, b, 4, 4, c))
  t = np.array([0, 1, 17, 500, 999])
  g = lambda name: tb[name][t][:, None, None, None]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  xt = np.asarray(gd.q_sample(d, f32(x0), jnp.asarray(t), f32(noise)))
  np.testing.assert_allclose(
      xt,
      g('sqrt_alphas_cumprod') * x0 + g('sqrt_one_minus_alphas_cumprod') * noise,
      rtol=1e-5,
      atol=1e-6,
  )
  out = rng.normal(size=(b, 4, 4, 2 * c))
  res = gd.p_mean_variance(d, jnp.asarray(out, jnp.float32), jnp.asarray(xt), jnp.asarray(t))
  eps, v = out[..., :c], out[..., c:]
  x0_hat = (xt - g('sqrt_one_minus_alphas_cumprod') * eps) / g('sqrt_alphas_cumprod')
  np.testing.assert_allclose(np.asarray(res['pred_xstart']), x0_hat, rtol=1e-4, atol=2e-4)
  # Posterior mean by Bayes on Gaussians: precision-weighted combination.
  ab, ab_prev = g('alphas_cumprod'), g('alphas_cumprod_prev')
  beta = 1 - ab / ab_prev
  mean = (np.sqrt(ab_prev) * beta * x0_hat + np.sqrt(1 - beta) * (1 - ab_prev) * xt) / (1 - ab)
  np.testing.assert_allclose(np.asarray(res['mean']), mean, rtol=1e-4, atol=2e-4)
  frac = (v + 1) / 2
  logvar = frac * np.log(beta) + (1 - frac) * g('posterior_log_variance_clipped')
  np.testing.assert_allclose(np.asarray(res['log_variance']), logvar, rtol=1e-5, atol=1e-5)
  clipped = gd.p_mean_variance(
      d, jnp.asarray(out, jnp.float32), jnp.asarray(xt), jnp.asarray(t), clip_denoised=True
  )['pred_xstart']
  np.testing.assert_allclose(np.asarray(clipped), np.clip(x0_hat, -1, 1), rtol=1e-4, atol=2e-4)
  # Fixed (small) variance when the model outputs only C channels.
  fixed = gd.p_mean_variance(d, jnp.asarray(eps, jnp.float32), jnp.asarray(xt), jnp.asarray(t))
  np.testing.assert_allclose(
      np.asarray(fixed['log_variance']),
      np.broadcast_to(g('posterior_log_variance_clipped'), xt.shape),
      rtol=1e-5,
  )
  with pytest.raises(ValueError, match='channels'):
    gd.p_mean_variance(d, jnp.zeros((b, 4, 4, 5)), jnp.asarray(xt), jnp.asarray(t))


# ----------------------------------------------------------------- losses


@pytest.mark.parametrize('gamma', [5.0, None])
def test_training_losses_match_reference(gamma):
  d = gd.create_diffusion()
  rng = np.random.default_rng(1)
  b, c = 8, 4
  t = np.array([0, 0, 1, 2, 40, 300, 700, 999])
  # Data with values beyond +-0.999 so both edge bins of the decoder likelihood are used.
  x0 = np.clip(rng.normal(scale=0.8, size=(b, 4, 4, c)), -1, 1)
  noise = rng.normal(size=x0.shape)
  tb = ref_tables(np.linspace(1e-4, 0.02, T))
  xt = (
      tb['sqrt_alphas_cumprod'][t][:, None, None, None] * x0
      + tb['sqrt_one_minus_alphas_cumprod'][t][:, None, None, None] * noise
  )
  out = np.concatenate(
      [noise + 0.3 * rng.normal(size=x0.shape), rng.uniform(-1, 1, size=x0.shape)], axis=-1
  )
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = jax.jit(gd.training_losses, static_argnames='min_snr_gamma')(
      d, f32(out), f32(x0), f32(xt), jnp.asarray(t), f32(noise), min_snr_gamma=gamma
  )
  loss, mse, vb = ref_losses(np.linspace(1e-4, 0.02, T), out, x0, xt, t, noise, gamma)
  assert set(got) == {'loss', 'mse', 'vb'}
  np.testing.assert_allclose(np.asarray(got['mse']), mse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got['vb']), vb, rtol=5e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got['loss']), loss, rtol=5e-5, atol=1e-7)
  assert np.all(np.asarray(got['vb'])[:2] > 1.0)  # t=0: the decoder NLL, several bits/dim


def test_fixed_variance_has_no_vb():
  d = gd.create_diffusion()
  rng = np.random.default_rng(2)
  x0, noise, eps = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(3, 4, 2, 2, 3)))
  t = jnp.array([0, 5, 50, 900])
  xt = gd.q_sample(d, x0, t, noise)
  got = gd.training_losses(d, eps, x0, xt, t, noise, min_snr_gamma=None)
  np.testing.assert_array_equal(np.asarray(got['vb']), 0.0)
  np.testing.assert_allclose(
      np.asarray(got['loss']), np.mean((noise - eps) ** 2, axis=(1, 2, 3)), rtol=1e-6
  )


def test_vb_gradient_reaches_only_variance_channels():
  d = gd.create_diffusion()
  rng = np.random.default_rng(3)
  b, c = 4, 2
  x0, noise = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, b, 2, 2, c)))
  t = jnp.array([0, 3, 250, 999])
  xt = gd.q_sample(d, x0, t, noise)
  out = jnp.asarray(rng.normal(size=(b, 2, 2, 2 * c)), jnp.float32)
  term = lambda name: jax.grad(lambda o: gd.training_losses(d, o, x0, xt, t, noise)[name].sum())(
      out
  )
  g_vb, g_mse = term('vb'), term('mse')
  np.testing.assert_array_equal(np.asarray(g_vb[..., :c]), 0.0)
  assert np.all(np.abs(np.asarray(g_vb[..., c:])).sum(axis=(1, 2, 3)) > 0)
  np.testing.assert_array_equal(np.asarray(g_mse[..., c:]), 0.0)
  # Without the stop-gradient the VLB would also pull on the mean: check the test can tell.
  g_raw = jax.grad(lambda o: gd.vb_terms_bpd(d, o, x0, xt, t).sum())(out)
  assert np.abs(np.asarray(g_raw[..., :c])).max() > 0


def test_min_snr_weights():
  d = gd.create_diffusion()
  t = jnp.arange(T)
  w = np.asarray(gd.min_snr_weight(d, t, 5.0))
  ac = ref_tables(np.linspace(1e-4, 0.02, T))['alphas_cumprod']
  snr = ac / (1 - ac)
  np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)
  # SNR falls through 5 between t where abar = 5/6: below it the weight is 5/SNR < 1, above it 1.
  cross = int(np.argmax(snr < 5.0))
  assert np.all(w[cross:] == 1.0) and np.all(w[:cross] < 1.0)
  assert abs(w[0] - 5.0 * (1e-4) / (1 - 1e-4)) < 1e-8
  np.testing.assert_array_equal(np.asarray(gd.min_snr_weight(d, t, None)), 1.0)


def test_losses_are_jittable_with_sharded_batch():
  d = gd.create_diffusion()
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rng = np.random.default_rng(4)
  x0, noise = (
      jax.device_put(jnp.asarray(a, jnp.float32), sh) for a in rng.normal(size=(2, 8, 2, 2, 4))
  )
  out = jax.device_put(jnp.asarray(rng.normal(size=(8, 2, 2, 8)), jnp.float32), sh)
  t = jax.device_put(jnp.arange(0, 800, 100), sh)

  @jax.jit
  def f(d, x0, noise, out, t):
    xt = gd.q_sample(d, x0, t, noise)
    return gd.training_losses(d, out, x0, xt, t, noise)['loss']

  got = f(d, x0, noise, out, t)
  want = f(d, *(np.asarray(a) for a in (x0, noise, out, t)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  assert math.isfinite(float(got.sum()))
