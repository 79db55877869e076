"""The flow-matching objective and its samplers, against NumPy and closed-form references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdt_jax
from mdt_jax.diffusion import flow
from mdt_jax.diffusion.objectives import folder_record, make_process, objective_of
from mdt_jax.sampling import flow_loops, labels as labels_lib
from mdt_jax.sampling import loops as smp
from mdt_jax.sampling.config import SamplerConfig
from mdt_jax.sampling.sampler import build_sampler, data_mesh, generate
from mdt_jax.training import step as step_lib
from micro_config import random_mdt

T = 1000
# Gaussian data, independent per channel: x_0 ~ N(MU, S^2). Its exact flow is known.
MU = np.array([0.5, -1.0])
S = np.array([0.3, 1.5])
SHAPE = (4, 4, 2)


def exact_velocity(x, t_model, y):
  """E[eps - x_0 | x_t = x] for the Gaussian data (t_model = t * T)."""
  del y
  t = (t_model / T)[:, None, None, None]
  m, v = (1 - t) * MU, (1 - t) ** 2 * S**2 + t**2
  return (x - m) * (t - (1 - t) * S**2) / v - MU


def start_noise(n, seed=0):
  """x_1 of samples 0..n-1: the sampler's documented per-sample stream 0."""
  keys = smp.sample_keys(labels_lib.noise_key(seed), jnp.arange(n))
  return np.asarray(smp.per_sample_normal(keys, 0, SHAPE), np.float64)


def flow_sample(cfg, n=64, seed=0, model=exact_velocity, labels=None):
  s = build_sampler(model, cfg, image_shape=SHAPE, num_classes=3)
  y = np.zeros(n, np.int32) if labels is None else labels
  return generate(s, y, seed=seed, batch_size=n, log_every=0).astype(np.float64)


# ----------------------------------------------------------------- the objective


def test_interpolant_velocity_and_loss_match_numpy():
  rng = np.random.default_rng(0)
  x0, eps, out = (rng.normal(size=(5, 4, 4, 3)).astype(np.float32) for _ in range(3))
  t = rng.uniform(size=5).astype(np.float32)
  tb = t[:, None, None, None].astype(np.float64)
  want_xt = (1 - tb) * x0 + tb * eps
  np.testing.assert_allclose(flow.interpolate(x0, eps, t), want_xt, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      flow.velocity_target(x0, eps), eps - x0.astype(np.float64), rtol=1e-6, atol=1e-6
  )
  terms = flow.training_losses(jnp.asarray(out), x0, eps)
  want = ((out.astype(np.float64) - (eps - x0)) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(terms['loss'], want, rtol=1e-5)
  np.testing.assert_array_equal(terms['mse'], terms['loss'])
  # The velocity target is what turns x_t into x_0 and eps (the samplers' predictions).
  u = eps - x0
  np.testing.assert_allclose(flow.predict_x0(want_xt, t, u), x0, atol=1e-5)
  np.testing.assert_allclose(flow.predict_noise(want_xt, t, u), eps, atol=1e-5)
  with pytest.raises(ValueError, match='learn_sigma off'):
    flow.training_losses(jnp.zeros((5, 4, 4, 6)), x0, eps)


def test_time_draws_and_shift():
  key = jax.random.key(0)
  u = np.asarray(flow.sample_time(flow.FlowMatching(), key, 20000))
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
  ln = np.asarray(flow.sample_time(flow.FlowMatching('logit_normal', -0.5, 0.7), key, 20000))
  logit = np.log(ln / (1 - ln))
  assert abs(logit.mean() + 0.5) < 0.02 and abs(logit.std() - 0.7) < 0.02
  shifted = np.asarray(flow.sample_time(flow.FlowMatching(t_shift=3.0), key, 20000))
  np.testing.assert_allclose(shifted, 3 * u / (1 + 2 * u), rtol=1e-5)  # same draws, shifted
  np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1])
  for kwargs, match in [
      (dict(t_sampling='beta'), 't_sampling'),
      (dict(t_shift=0.0), 't_shift'),
      (dict(t_logit_scale=-1.0), 't_logit_scale'),
  ]:
    with pytest.raises(ValueError, match=match):
      flow.FlowMatching(**kwargs)


def test_flow_branch_loss_matches_numpy():
  """The train step's flow branch: its noise draw, x_t, the model's time input, the MSE."""
  fm = flow.FlowMatching(time_scale=T)
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(4, 4, 4, 2)).astype(np.float32)
  y = np.arange(4, dtype=np.int32)
  t = np.array([0.0, 0.25, 0.6, 0.99], np.float32)
  seen = {}

  def model(x_t, t_in, y, *, rng, train, enable_mask):
    seen.update(t=np.asarray(t_in), train=train, masked=enable_mask, rng=rng)
    return 0.5 * x_t + 0.001 * t_in[:, None, None, None]

  key = jax.random.key(7)
  got = step_lib.flow_branch_loss(model, fm, x0, y, t, key, masked=True)
  noise = np.asarray(jax.random.normal(jax.random.split(key)[0], x0.shape, jnp.float32))
  tb = t[:, None, None, None].astype(np.float64)
  x_t = (1 - tb) * x0 + tb * noise
  out = 0.5 * x_t + 0.001 * T * tb
  want = ((out - (noise - x0)) ** 2).mean()
  np.testing.assert_allclose(got['loss'], want, rtol=1e-5)
  np.testing.assert_allclose(seen['t'], t * T, rtol=1e-6)  # the embedder's range
  assert seen['train'] and seen['masked']
  with pytest.raises(ValueError, match='DDPM setting'):
    step_lib.flow_branch_loss(model, fm, x0, y, t, key, masked=False, min_snr_gamma=5.0)


def test_objective_records():
  ddpm = dict(num_timesteps=1000, schedule='linear', min_snr_gamma=5.0)
  assert objective_of(ddpm) == 'ddpm' and objective_of(None) == 'ddpm'
  # DDPM folders keep the section they always had; flow ones name the objective.
  assert folder_record(ddpm) == {'num_timesteps': 1000, 'schedule': 'linear'}
  fl = dict(ddpm, objective='flow', min_snr_gamma=None, t_sampling='logit_normal', t_shift=2.0)
  rec = folder_record(fl)
  assert rec == {
      'objective': 'flow',
      'num_timesteps': 1000,
      't_sampling': 'logit_normal',
      't_logit_mean': 0.0,
      't_logit_scale': 1.0,
      't_shift': 2.0,
  }
  assert make_process(rec) == flow.FlowMatching('logit_normal', 0.0, 1.0, 2.0, 1000.0)
  assert isinstance(make_process(ddpm), mdt_jax.diffusion.Diffusion)
  with pytest.raises(ValueError, match='objective must be one of'):
    objective_of({'objective': 'edm'})


def test_config_refusals():
  from micro_config import get_config
  from mdt_jax.training.run import validate

  c = get_config()
  c.diffusion.objective = 'flow'
  with pytest.raises(ValueError, match='learn_sigma=False'):
    validate(c)
  c.model.learn_sigma = False
  with pytest.raises(ValueError, match='min_snr_gamma=None'):
    validate(c)
  c.diffusion.min_snr_gamma = None
  with pytest.raises(ValueError, match='samplers that fit: euler, heun, euler_maruyama'):
    validate(c)  # the base config's sampler is DDPM's
  c.sampling.sampler, c.sampling.steps = 'heun', 4
  validate(c)
  c.diffusion.t_sampling = 'cosine'
  with pytest.raises(ValueError, match='t_sampling'):
    validate(c)
  c = get_config()  # 12x12 digits: the classifier takes 16x16 (and the dataset's own 8x8)
  c.eval_num_samples = 10
  c.data.image_size = c.model.input_size = 12
  with pytest.raises(ValueError, match='data.image_size is 12'):
    validate(c)


# ----------------------------------------------------------------- samplers: closed form


def test_ode_samplers_reach_the_exact_flow_map():
  """The exact flow maps x_1 = z to x_0 = MU + S z; Euler converges at first order, Heun at
  second, both with `steps` model evaluations."""
  z = start_noise(64)
  exact = MU + S * z
  err = {}
  for sampler, steps in [('euler', 8), ('euler', 32), ('heun', 8), ('heun', 32)]:
    x = flow_sample(SamplerConfig(sampler=sampler, steps=steps, objective='flow'))
    err[sampler, steps] = np.abs(x - exact).max()
  assert err['heun', 32] < 0.01 and err['heun', 8] < err['euler', 8] / 4
  assert 3 < err['euler', 8] / err['euler', 32] < 5.5  # first order: 4x for 4x steps
  assert err['heun', 8] / err['heun', 32] > 12  # second order: 16x


def test_time_grids():
  np.testing.assert_allclose(flow_loops.time_grid(5), [1, 0.75, 0.5, 0.25, 0])
  np.testing.assert_allclose(flow_loops.time_grid(3, 3.0), [1, 0.75, 0])
  np.testing.assert_allclose(flow_loops.time_grid(3, end=0.04), [1, 0.52, 0.04])


def test_euler_maruyama_without_noise_is_euler_on_its_grid():
  """diffusion 0: SiT's SDE sampler is the ODE's Euler steps from 1 to the last step, then one
  Euler step to 0 (the score term vanishes with w)."""
  cfg = SamplerConfig(
      sampler='euler_maruyama',
      steps=6,
      objective='flow',
      sde_diffusion='constant',
      sde_diffusion_norm=0.0,
      sde_last_step=0.1,
  )
  sde = flow_sample(cfg, n=8)
  grid = np.append(flow_loops.time_grid(6, end=0.1), 0.0)
  vel = lambda x, t: exact_velocity(x, t, None)
  want = flow_loops.euler_loop(vel, grid, jnp.asarray(start_noise(8), jnp.float32), T)
  np.testing.assert_allclose(sde, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form, norm', [('sigma', 1.0), ('constant', 0.2)])
def test_euler_maruyama_samples_the_data_distribution(form, norm):
  """Stochastic paths, but the marginal at t = 0 is the data's: N(MU, S^2) per channel."""
  cfg = SamplerConfig(
      sampler='euler_maruyama',
      steps=100,
      objective='flow',
      sde_diffusion=form,
      sde_diffusion_norm=norm,
      sde_last_step=0.01,
  )
  x = flow_sample(cfg, n=256, seed=3)
  z = start_noise(256, seed=3)
  assert np.abs(x - (MU + S * z)).mean() > 0.1  # not the ODE's map
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), MU, atol=0.05)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), S, rtol=0.04)


def test_guidance_schedules_and_interval_on_flow_time():
  """Constant velocities per class: Euler sums them exactly, so the guided result is closed
  form; the interval is read in model time (t * T)."""
  vel = lambda x, t, y: jnp.broadcast_to(
      (y.astype(jnp.float32) - 1.0)[:, None, None, None], x.shape
  )
  y = np.full(4, 2, np.int32)  # class 2: +1; the null label (3): +2
  z = start_noise(4)
  for kwargs, weights in [
      (dict(guidance_schedule='constant'), np.full(4, 3.0)),
      (dict(guidance_schedule='constant', guidance_interval=(0, 500)), [1, 1, 3, 3]),
      (
          dict(guidance_schedule='power_cosine', scale_pow=1.0),
          [1 + 2 * 0.5 * (1 - np.cos(np.pi * (1 - t))) for t in (1, 0.75, 0.5, 0.25)],
      ),
  ]:
    cfg = SamplerConfig(
        sampler='euler', steps=4, objective='flow', cfg_scale=3.0, guidance_channels='all', **kwargs
    )
    x = flow_sample(cfg, n=4, model=vel, labels=y)
    # guided velocity at step k: 2 + s_k (1 - 2), each step of size 1/4 towards t = 0
    want = z - sum(0.25 * (2.0 - w) for w in weights)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- an MDT: devices, refusals


def test_flow_sampling_is_the_same_on_eight_devices_and_one():
  """The SDE sampler (per-sample noise at every step) on 8 devices and on 1, other batches."""
  model = random_mdt(label_std=0.1, input_size=4, in_channels=2, num_classes=3, learn_sigma=False)
  cfg = SamplerConfig(
      sampler='euler_maruyama',
      steps=4,
      objective='flow',
      cfg_scale=2.0,
      guidance_schedule='constant',
  )
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  a = build_sampler(model, cfg)(np.arange(8), y, 5)
  s1 = build_sampler(model, cfg, mesh=data_mesh(jax.devices()[:1]))
  b = generate(s1, y, seed=5, batch_size=3, log_every=0)
  assert np.isfinite(a).all() and a.std() > 0.1
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(sampler='ddpm', objective='flow'), 'samplers that fit: euler, heun, euler_maruyama'),
        (dict(sampler='dpm_solver++', objective='flow'), 'for ddpm-objective models'),
        (dict(sampler='heun'), 'samplers that fit: ddpm, ddim, dpm_solver\\+\\+'),
        (dict(sampler='heun', steps=5, objective='flow'), 'steps must be even'),
        (dict(sampler='euler', objective='flow', respacing='ddim5'), 'DDPM-sampler setting'),
        (dict(sampler='euler', objective='flow', time_shift=-1.0), 'time_shift'),
        (dict(sampler='euler_maruyama', objective='flow', sde_diffusion='SBDM'), 'sde_diffusion'),
        (dict(sampler='ddim', time_shift=2.0), 'flow-sampler setting'),
        (dict(sampler='euler', objective='edm'), 'objective must be one of'),
    ],
)
def test_bad_flow_sampler_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplerConfig(**kwargs)


def test_flow_sampler_refuses_a_learned_variance_model():
  two_c = lambda x, t, y: jnp.concatenate([x, x], axis=-1)
  with pytest.raises(ValueError, match='not trained with the flow objective'):
    build_sampler(
        two_c,
        SamplerConfig(sampler='euler', steps=2, objective='flow'),
        image_shape=SHAPE,
        num_classes=3,
    )
  # A DDPM run's record is what it was before the flow fields existed.
  assert 'time_shift' not in SamplerConfig().record()
  assert 'eta' not in SamplerConfig(sampler='heun', steps=2, objective='flow').record()
