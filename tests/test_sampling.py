"""Samplers, guidance, labels, sharding and the sampling CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdt_jax
from mdt_jax.images import to_uint8
from mdt_jax.models.params import count_params
from mdt_jax.sampling import guidance as guidance_lib, labels as labels_lib, postprocess
from mdt_jax.sampling import loops as smp
from mdt_jax.sampling.config import SamplerConfig
from mdt_jax.sampling.run import run_sampling
from mdt_jax.sampling.sampler import build_sampler, data_mesh, generate
import launch
from micro_config import random_mdt, save_pixel_folder

T = 1000
NUM_CLASSES = 10
SHAPE = (4, 4, 4)  # analytic-model images (H, W, C)


def ref_alphas_cumprod():
  betas = np.linspace(1e-4, 0.02, T)
  return np.cumprod(1.0 - betas)


def analytic_np(x, t, y, fixed_variance=False):
  """A smooth model of x, t and y (numpy); eps channels then variance values in (-1, 1)."""
  tt = (np.asarray(t, np.float64) / T)[:, None, None, None]
  yy = np.asarray(y, np.float64)[:, None, None, None]
  eps = 0.5 * np.tanh(x) + 0.3 * np.sin(3 * tt + yy + np.arange(x.shape[-1]))
  if fixed_variance:
    return eps
  return np.concatenate([eps, np.tanh(0.3 * x + tt - 0.5)], axis=-1)


def analytic_jax(x, t, y, fixed_variance=False):
  tt = (t.astype(jnp.float32) / T)[:, None, None, None]
  yy = y.astype(jnp.float32)[:, None, None, None]
  eps = 0.5 * jnp.tanh(x) + 0.3 * jnp.sin(3 * tt + yy + jnp.arange(x.shape[-1]))
  if fixed_variance:
    return eps
  return jnp.concatenate([eps, jnp.tanh(0.3 * x + tt - 0.5)], axis=-1)


def fixed_jax(x, t, y):
  return analytic_jax(x, t, y, fixed_variance=True)


@pytest.fixture(scope='module')
def mdt():
  return random_mdt(in_channels=4)


def sample_noise(seed, i, stream, shape):
  """The documented per-sample stream: normal(fold_in(fold_in(noise_key(seed), i), stream))."""
  key = jax.random.fold_in(jax.random.key(seed), 0)
  key = jax.random.fold_in(jax.random.fold_in(key, i), stream)
  return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)


# ----------------------------------------------------------------- guidance


def test_power_cosine_scale_matches_formula():
  t = np.arange(T)
  g = guidance_lib.Guidance(scale=3.8, schedule='power_cosine', scale_pow=4.0)
  got = np.asarray(guidance_lib.guidance_scale(g, jnp.asarray(t)))
  w = 0.5 * (1 - np.cos(np.pi * (1 - t / T) ** 4))
  np.testing.assert_allclose(got, 1 + 2.8 * w, rtol=1e-5, atol=1e-6)
  assert abs(got[0] - 3.8) < 1e-4 and abs(got[999] - 1.0) < 1e-6
  assert abs(got[500] - 1.0 - 2.8 * 0.5 * (1 - np.cos(np.pi / 16))) < 1e-5  # ~1.034
  const = guidance_lib.Guidance(scale=2.5, schedule='constant')
  np.testing.assert_allclose(np.asarray(guidance_lib.guidance_scale(const, jnp.asarray(t))), 2.5)
  interval = guidance_lib.Guidance(scale=2.5, schedule='constant', interval=(100, 600))
  got = np.asarray(guidance_lib.guidance_scale(interval, jnp.asarray(t)))
  np.testing.assert_allclose(got, np.where((t >= 100) & (t <= 600), 2.5, 1.0))


@pytest.mark.parametrize('channels', ['first3', 'all'])
def test_guided_model_single_batched_pass(channels):
  calls = []

  def model_fn(x, t, y):
    calls.append((x.shape[0], np.asarray(y)))
    return analytic_jax(x, t, y)

  g = guidance_lib.Guidance(scale=3.0, schedule='power_cosine', scale_pow=1.0, channels=channels)
  fn = guidance_lib.guided_model(model_fn, g, null_label=NUM_CLASSES, channels=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3,) + SHAPE).astype(np.float32)
  t, y = np.array([0, 400, 999]), np.array([1, 5, 9])
  got = np.asarray(fn(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert len(calls) == 1 and calls[0][0] == 6
  np.testing.assert_array_equal(calls[0][1], [1, 5, 9, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES])
  cond, uncond = analytic_np(x, t, y), analytic_np(x, t, np.full(3, NUM_CLASSES))
  s = (1 + 2.0 * 0.5 * (1 - np.cos(np.pi * (1 - t / T))))[:, None, None, None]
  n = 3 if channels == 'first3' else 4
  np.testing.assert_allclose(
      got[..., :n], uncond[..., :n] + s * (cond[..., :n] - uncond[..., :n]), rtol=1e-5, atol=1e-5
  )
  # Unguided eps channels and the variance channels: the conditional half.
  np.testing.assert_allclose(got[..., n:], cond[..., n:], rtol=1e-5, atol=1e-6)


def test_cfg_scale_one_equals_unguided():
  kw = dict(image_shape=SHAPE, num_classes=NUM_CLASSES)
  base = dict(sampler='ddpm', steps=10)
  unguided = build_sampler(analytic_jax, SamplerConfig(**base), **kw)
  one = build_sampler(
      analytic_jax, SamplerConfig(cfg_scale=1.0, guidance_schedule='constant', **base), **kw
  )
  guided = build_sampler(analytic_jax, SamplerConfig(cfg_scale=4.0, **base), **kw)
  idx, y = np.arange(8), np.arange(8) % NUM_CLASSES
  a, b, c = unguided(idx, y, 3), one(idx, y, 3), guided(idx, y, 3)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  assert np.abs(c - a).max() > 1e-2  # guidance does change the samples


# ----------------------------------------------------------------- single steps and loops


def test_one_ddpm_step_is_the_closed_form_posterior():
  d = mdt_jax.diffusion.create_diffusion()
  ac = ref_alphas_cumprod()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4,) + SHAPE)
  t = np.array([0, 1, 300, 999])
  y = np.array([0, 3, 4, 9])
  out = analytic_np(x, t, y)
  noise = rng.normal(size=x.shape)
  got = np.asarray(
      smp.p_sample_step(
          d,
          jnp.asarray(out, jnp.float32),
          jnp.asarray(x, jnp.float32),
          jnp.asarray(t),
          jnp.asarray(noise, jnp.float32),
      )
  )
  a_t, a_prev = ac[t], np.where(t > 0, ac[np.maximum(t - 1, 0)], 1.0)
  beta = 1 - a_t / a_prev
  b4 = lambda v: v[:, None, None, None]
  eps, v = out[..., :4], out[..., 4:]
  x0 = (x - b4(np.sqrt(1 - a_t)) * eps) / b4(np.sqrt(a_t))
  # Gaussian posterior q(x_{t-1} | x_t, x0): precision-weighted means.
  mean = (
      b4(np.sqrt(a_prev) * beta / (1 - a_t)) * x0
      + b4(np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
  )
  post_var = beta * (1 - a_prev) / (1 - a_t)
  post_var[t == 0] = (lambda k: (1 - ac[k] / ac[k - 1]) * (1 - ac[k - 1]) / (1 - ac[k]))(1)
  frac = (v + 1) / 2
  std = np.exp(0.5 * (frac * b4(np.log(beta)) + (1 - frac) * b4(np.log(post_var))))
  want = mean + b4((t != 0).astype(float)) * std * noise
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[0], x0[0], rtol=1e-4, atol=1e-4)  # t=0: the x0 prediction


def _respaced(steps):
  ac = ref_alphas_cumprod()
  kept = [round(k * 999 / (steps - 1)) for k in range(steps)]
  return np.array(kept), ac[kept]


def test_ddpm_loop_matches_numpy():
  """Three respaced steps (original 999, 500, 0) through the jitted loop vs a numpy loop."""
  cfg = SamplerConfig(sampler='ddpm', steps=3)
  sampler = build_sampler(analytic_jax, cfg, image_shape=SHAPE, num_classes=NUM_CLASSES)
  idx, y = np.array([0, 5, 11]), np.array([2, 7, 1])
  got = sampler(idx, y, seed=4)
  kept, ac = _respaced(3)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  beta = 1 - ac / ac_prev
  post_var = beta * (1 - ac_prev) / (1 - ac)
  log_post = np.log(np.where(np.arange(3) == 0, post_var[1], post_var))
  want = []
  for i, label in zip(idx, y):
    x = sample_noise(4, i, 0, SHAPE)[None]
    for j, k in enumerate([2, 1, 0]):
      out = analytic_np(x, np.array([kept[k]]), np.array([label]))
      x0 = (x - np.sqrt(1 - ac[k]) * out[..., :4]) / np.sqrt(ac[k])
      mean = (np.sqrt(ac_prev[k]) * beta[k] * x0 + np.sqrt(1 - beta[k]) * (1 - ac_prev[k]) * x) / (
          1 - ac[k]
      )
      frac = (out[..., 4:] + 1) / 2
      logvar = frac * np.log(beta[k]) + (1 - frac) * log_post[k]
      x = mean + (k > 0) * np.exp(0.5 * logvar) * sample_noise(4, i, j + 1, SHAPE)[None]
    want.append(x[0])
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-4)


def test_ddim_eta0_deterministic_and_matches_numpy():
  cfg = SamplerConfig(sampler='ddim', steps=4, eta=0.0)
  sampler = build_sampler(analytic_jax, cfg, image_shape=SHAPE, num_classes=NUM_CLASSES)
  idx, y = np.arange(4), np.array([1, 2, 3, 4])
  a, b = sampler(idx, y, 7), sampler(idx, y, 7)
  np.testing.assert_array_equal(a, b)
  kept, ac = _respaced(4)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  want = []
  for i, label in zip(idx, y):
    x = sample_noise(7, i, 0, SHAPE)[None]
    for k in [3, 2, 1, 0]:
      eps = analytic_np(x, np.array([kept[k]]), np.array([label]))[..., :4]
      x0 = (x - np.sqrt(1 - ac[k]) * eps) / np.sqrt(ac[k])
      x = np.sqrt(ac_prev[k]) * x0 + np.sqrt(1 - ac_prev[k]) * eps
    want.append(x[0])
  np.testing.assert_allclose(a, np.stack(want), rtol=1e-4, atol=1e-4)


def test_ddim_eta1_equals_ddpm_with_fixed_small_variance():
  """DDIM with eta=1 is the ancestral sampler with the posterior variance (same noise streams)."""
  kw = dict(image_shape=SHAPE, num_classes=NUM_CLASSES)
  ddim = build_sampler(fixed_jax, SamplerConfig(sampler='ddim', steps=6, eta=1.0), **kw)
  ddpm = build_sampler(fixed_jax, SamplerConfig(sampler='ddpm', steps=6), **kw)
  assert not ddpm.learn_sigma
  idx, y = np.arange(8), np.arange(8)
  a, b = ddim(idx, y, 2), ddpm(idx, y, 2)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  c = build_sampler(fixed_jax, SamplerConfig(sampler='ddim', steps=6), **kw)(idx, y, 2)
  assert np.abs(c - a).max() > 0.1  # eta matters


def test_dpm_solver_solves_the_gaussian_ode():
  """With the exact eps of Gaussian data N(m, s^2) the probability-flow ODE is known in closed
  form: x_t = alpha_t m + sqrt(alpha_t^2 s^2 + sigma_t^2) z along a trajectory."""
  m, s = 0.5, 0.3
  ac = jnp.asarray(ref_alphas_cumprod(), jnp.float32)

  def exact(x, t, y):
    a = jnp.sqrt(ac[t])[:, None, None, None]
    sig = jnp.sqrt(1 - ac[t])[:, None, None, None]
    return sig * (x - a * m) / (a**2 * s**2 + sig**2)

  kw = dict(image_shape=SHAPE, num_classes=NUM_CLASSES)
  idx, y = np.arange(16), np.zeros(16, int)
  a_T = np.sqrt(ref_alphas_cumprod()[999])
  x_T = np.stack([sample_noise(0, i, 0, SHAPE) for i in idx])
  want = m + s * (x_T - a_T * m) / np.sqrt(a_T**2 * s**2 + 1 - a_T**2)
  err = {}
  for name, steps in [('dpm_solver++', 50), ('dpm_solver++', 200), ('ddim', 50), ('ddim', 200)]:
    got = build_sampler(exact, SamplerConfig(sampler=name, steps=steps), **kw)(idx, y, 0)
    err[name, steps] = np.abs(got - want).max()
  # Time-uniform steps: 4x the steps cut the error ~16x (second order) vs ~4x for DDIM.
  assert err['dpm_solver++', 200] < 5e-3, err
  assert err['dpm_solver++', 50] / err['dpm_solver++', 200] > 9, err
  assert err['ddim', 50] / err['ddim', 200] < 6, err
  assert err['dpm_solver++', 200] < 0.25 * err['ddim', 200], err


def class_gaussian_eps(x, t, y, xp=np):
  """eps of Gaussian data N(m_y, 0.3^2) per class (exact), plus a small nonlinear term: a
  denoiser whose samples stay in the data range (numpy or jax.numpy via xp)."""
  ac = xp.asarray(ref_alphas_cumprod())[t][:, None, None, None]
  a, sig = xp.sqrt(ac), xp.sqrt(1 - ac)
  m = 0.1 * xp.asarray(y)[:, None, None, None] - 0.4
  return sig * (x - a * m) / (a**2 * 0.09 + sig**2) + 0.05 * xp.tanh(2 * x)


def diffusers_dpm_solver(steps: int, order: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """diffusers' DPMSolverMultistepScheduler (DPM-Solver++, midpoint) on class_gaussian_eps,
  float64, with the last step first-order to sigma = 0 (lower_order_final off: short runs stay
  second-order to the end, as this port's plan does)."""
  import torch
  from diffusers import DPMSolverMultistepScheduler

  sched = DPMSolverMultistepScheduler(
      num_train_timesteps=T,
      beta_start=1e-4,
      beta_end=0.02,
      beta_schedule='linear',
      algorithm_type='dpmsolver++',
      solver_order=order,
      solver_type='midpoint',
      prediction_type='epsilon',
      timestep_spacing='linspace',
      final_sigmas_type='zero',
      lower_order_final=False,
  )
  sched.set_timesteps(steps)
  np.testing.assert_array_equal(sched.timesteps.numpy(), smp.dpm_solver_plan(steps)['timesteps'])
  x = torch.from_numpy(x)
  for t in sched.timesteps:
    eps = class_gaussian_eps(x.numpy(), np.full(len(y), int(t)), y)
    x = sched.step(torch.from_numpy(eps), t, x).prev_sample
  return x.numpy()


# 5 and 25 steps: k * 999 / N never ends in .5, where diffusers' linspace rounds half to even and
# the IDDPM spacing (a running float sum) may round the other way (N=20: 500 vs 499)
@pytest.mark.filterwarnings('ignore:__array__ implementation')  # diffusers' own np.array call
@pytest.mark.parametrize('steps', [5, 25])
def test_dpm_solver_matches_diffusers_scheduler(steps):
  """The same model function and starting noise through both: equal timesteps and samples."""
  idx, y = np.arange(6), np.array([0, 3, 9, 1, 4, 7])
  x_T = np.stack([sample_noise(1, i, 0, SHAPE) for i in idx])
  want = diffusers_dpm_solver(steps, 2, x_T, y)
  model = lambda x, t, y: class_gaussian_eps(x, t, y, jnp).astype(jnp.float32)
  got = build_sampler(
      model,
      SamplerConfig(sampler='dpm_solver++', steps=steps),
      image_shape=SHAPE,
      num_classes=NUM_CLASSES,
  )(idx, y, 1)
  assert 0.3 < np.abs(want).max() < 3  # samples in the data range
  # float32 vs float64: seen within 3.2e-7
  atol = 2e-6
  np.testing.assert_allclose(got, want, atol=atol, rtol=0)
  # the tolerance tells the second-order solver from the first-order one on the same steps
  assert np.abs(diffusers_dpm_solver(steps, 1, x_T, y) - want).max() > 100 * atol


def test_dpm_solver_plan():
  plan = smp.dpm_solver_plan(5)
  np.testing.assert_array_equal(plan['timesteps'], [999, 799, 599, 400, 200])
  assert plan['ratio'][-1] == 0 and plan['coef'][-1] == 1  # last step returns x0
  assert plan['b'][0] == 0 and np.all(plan['b'][1:-1] < 0)
  one = smp.dpm_solver_plan(1)
  np.testing.assert_array_equal(one['timesteps'], [999])


# ----------------------------------------------------------------- sharding and batch size


def test_eight_devices_equal_one_device(mdt):
  cfg = SamplerConfig(sampler='ddpm', steps=8, cfg_scale=4.0, scale_pow=1.0)
  y = labels_lib.make_labels('uniform', 8, NUM_CLASSES, seed=0)
  s8 = build_sampler(mdt, cfg)
  assert s8.num_devices == 8 and s8.learn_sigma
  a = s8(np.arange(8), y, 5)
  s1 = build_sampler(mdt, cfg, mesh=data_mesh(jax.devices()[:1]))
  b = generate(s1, y, seed=5, batch_size=3, log_every=0)  # other device count AND batch size
  assert np.isfinite(a).all() and a.std() > 0.1
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
  # A sample depends on its global index, not its place in the batch.
  c = s8(np.arange(8)[::-1], y[::-1], 5)
  np.testing.assert_allclose(c[::-1], a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


# ----------------------------------------------------------------- labels


def test_label_modes():
  u = labels_lib.make_labels('uniform', 500, 7, seed=3)
  assert u.dtype == np.int32 and u.min() >= 0 and u.max() < 7 and len(set(u.tolist())) == 7
  np.testing.assert_array_equal(labels_lib.make_labels('uniform', 50, 7, seed=3), u[:50])
  assert not np.array_equal(labels_lib.make_labels('uniform', 500, 7, seed=4), u)
  bal = labels_lib.make_labels('balanced', 70, 7)
  np.testing.assert_array_equal(np.bincount(bal), [10] * 7)
  np.testing.assert_array_equal(labels_lib.make_labels([3, 1], 5, 7), [3, 1, 3, 1, 3])
  assert labels_lib.parse_labels('2, 5') == [2, 5]
  assert labels_lib.parse_labels('balanced') == 'balanced'
  with pytest.raises(ValueError, match=r'\[0, 7\).*\[-1, 7\]'):
    labels_lib.make_labels([1, 7, -1], 4, 7)
  with pytest.raises(ValueError, match='uniform'):
    labels_lib.make_labels('random', 4, 7)
  with pytest.raises(ValueError, match='comma-separated'):
    labels_lib.parse_labels('cats')


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(sampler='plms'), 'unknown sampler'),
        (dict(steps=0), 'positive integer'),
        (dict(steps=1001), 'cannot respace'),
        (dict(sampler='ddim', respacing='ddim999'), 'integer stride'),
        (dict(sampler='dpm_solver++', steps=1000), 'steps <= 999'),
        (dict(sampler='dpm_solver++', respacing='50'), 'respacing must be empty'),
        (dict(eta=0.5), 'DDIM setting'),
        (dict(cfg_scale=2.0, guided_channels='some'), 'guided channels'),
        (dict(cfg_scale=2.0, guidance_schedule='linear'), 'guidance schedule'),
        (dict(cfg_scale=2.0, guidance_interval=(600, 100)), 'interval'),
        (dict(cfg_scale=float('nan')), 'finite'),
    ],
)
def test_bad_sampler_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplerConfig(**kwargs)


def test_bad_model_and_labels_fail_before_sampling():
  def never(x, t, y):
    raise AssertionError('the model must not run')

  with pytest.raises(ValueError, match='image_shape'):
    build_sampler(analytic_jax, SamplerConfig())
  bad_out = lambda x, t, y: jnp.zeros(x.shape[:-1] + (3,))
  with pytest.raises(ValueError, match='does not fit'):
    build_sampler(bad_out, SamplerConfig(), image_shape=SHAPE, num_classes=NUM_CLASSES)
  sampler = build_sampler(
      analytic_jax, SamplerConfig(steps=2), image_shape=SHAPE, num_classes=NUM_CLASSES
  )
  sampler.fn = never
  with pytest.raises(ValueError, match=r'class ids must be in \[0, 10\)'):
    sampler(np.arange(2), np.array([3, 10]))
  with pytest.raises(ValueError, match=r'class ids'):
    generate(sampler, np.array([-2]), log_every=0)


# ----------------------------------------------------------------- the run and the CLI


@pytest.fixture(scope='module')
def pixel_sampler():
  model = random_mdt(seed=3, in_channels=1)
  return model, build_sampler(model, SamplerConfig(sampler='ddim', steps=3, cfg_scale=2.0))


def test_run_sampling_shards_resume_and_npz(tmp_path, pixel_sampler):
  _, sampler = pixel_sampler
  out = str(tmp_path / 'run')
  path = run_sampling(
      sampler,
      out_dir=out,
      num_samples=5,
      labels='balanced',
      seed=1,
      batch_size=4,
      shard_size=3,
      grid_size=4,
  )
  with np.load(path) as f:
    images, ys = f['arr_0'], f['arr_1']
  assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # 1 channel -> 3
  np.testing.assert_array_equal(ys, [0, 1, 2, 3, 4])
  assert images.std() > 0 and os.path.isfile(os.path.join(out, 'samples_grid.png'))
  raw = generate(sampler, ys, seed=1, batch_size=8, log_every=0)
  np.testing.assert_array_equal(to_uint8(raw), images)
  # A restart skips finished shards: a sampler that cannot run must not be called.
  real_fn = sampler.fn
  try:
    sampler.fn = lambda *a: (_ for _ in ()).throw(AssertionError('shard resampled'))
    os.remove(path)
    run_sampling(
        sampler,
        out_dir=out,
        num_samples=5,
        labels='balanced',
        seed=1,
        batch_size=4,
        shard_size=3,
        grid_size=4,
    )
  finally:
    sampler.fn = real_fn
  with np.load(path) as f:
    np.testing.assert_array_equal(f['arr_0'], images)
  # A missing shard is sampled again, identically.
  os.remove(os.path.join(out, 'shards', 'shard_00001.npz'))
  run_sampling(
      sampler,
      out_dir=out,
      num_samples=5,
      labels='balanced',
      seed=1,
      batch_size=2,
      shard_size=3,
      grid_size=0,
  )
  with np.load(path) as f:
    np.testing.assert_array_equal(f['arr_0'], images)
  with pytest.raises(ValueError, match='other settings'):
    run_sampling(sampler, out_dir=out, num_samples=5, labels='balanced', seed=2, shard_size=3)


def test_cli_end_to_end_with_model_folder(tmp_path, pixel_sampler, monkeypatch, capsys):
  from mdt_jax import sample

  model, _ = pixel_sampler
  save_pixel_folder(
      tmp_path / 'model',
      model,
      sampler='ddim',
      steps=3,
      cfg_scale=2.0,
      scale_pow=4.0,
      guidance_channels=3,
  )
  monkeypatch.chdir(tmp_path)  # every path relative, as typed in that folder

  def run(*argv):
    launch.run_main(sample, *argv)

  args = [
      '--model=model',
      '--out=out',
      '--num_samples=3',
      '--batch_size=8',
      '--seed=0',
      '--labels=4,5',
      '--steps=2',
      '--shard_size=2',
  ]
  run('--model=model', '--info')  # the folder's settings and parameter table, no sampling
  info_text = capsys.readouterr().out
  assert '"sampler": "ddim"' in info_text and 'x_embedder.proj.kernel' in info_text
  assert '| Mean ' in info_text and f'Total: {count_params(model.config):,}' in info_text
  assert not (tmp_path / 'out').exists()
  run(*args)
  out = tmp_path / 'out'
  with open(out / 'run.json') as f:
    info = json.load(f)
  assert info['sampler']['sampler'] == 'ddim'  # recommended by the folder
  assert info['sampler']['steps'] == 2  # given on the command line
  assert info['sampler']['cfg_scale'] == 2.0 and info['sampler']['guided_channels'] == 'all'
  with np.load(out / 'samples.npz') as f:
    np.testing.assert_array_equal(f['arr_1'], [4, 5, 4])
    assert f['arr_0'].shape == (3, 8, 8, 3)
    images = f['arr_0']
  # A restart (same command, same folder) samples only the missing shard, identically.
  kept = out / 'shards' / 'shard_00000.npz'
  stamp = kept.stat().st_mtime_ns
  os.remove(out / 'shards' / 'shard_00001.npz')
  os.remove(out / 'samples.npz')
  run(*args)
  assert kept.stat().st_mtime_ns == stamp
  with np.load(out / 'samples.npz') as f:
    np.testing.assert_array_equal(f['arr_0'], images)
  # Bad input is refused before any sampling.
  with pytest.raises(ValueError, match='samplers that fit: ddpm, ddim, dpm_solver'):
    run('--model=model', '--out=bad', '--sampler=euler')
  assert not os.path.exists(tmp_path / 'bad')


def test_latent_model_needs_a_vae(tmp_path, mdt):
  sm = postprocess.SamplingModel(model=mdt, space='latent', vae_dir=None)
  with pytest.raises(ValueError, match='--vae'):
    postprocess.make_postprocess(sm)
  with pytest.raises(FileNotFoundError, match='not found'):
    postprocess.make_postprocess(sm, str(tmp_path / 'missing'))
