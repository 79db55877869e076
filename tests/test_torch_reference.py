"""The PyTorch float32 eager reference (the speed baseline) against the JAX model and sampler."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_mdt as ref
from mdt_jax import MDTConfig
from mdt_jax.hub import official
from mdt_jax.sampling import SamplerConfig, build_sampler
from mdt_jax.sampling import labels as labels_lib
from mdt_jax.sampling.loops import per_sample_normal, sample_keys
from torch_reference import TorchMDT, from_official_state, sample_ddpm

TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=6,
    num_heads=4,
    decode_layer=2,
    num_classes=10,
    mask_ratio=0.3,
)


def _weights(cfg, scale, seed=1):
  return ref.random_state_dict(
      official.layout(cfg), official.index_buffers(cfg), cfg.grid, seed=seed, scale=scale
  )


def test_module_tree_has_exactly_the_official_keys_and_shapes():
  cfg = MDTConfig(**TINY)
  torch_sd = TorchMDT(cfg).state_dict()
  want = {k: e.shape for k, e in official.layout(cfg).items()}
  want.update({b: (cfg.num_tokens, cfg.num_tokens) for b in official.index_buffers(cfg)})
  assert {k: tuple(v.shape) for k, v in torch_sd.items()} == want
  with pytest.raises(RuntimeError, match='Missing key'):
    bad = _weights(cfg, 0.1)
    del bad['final_layer.linear.bias']
    from_official_state(bad, cfg)


@pytest.mark.parametrize('arch', ['mdtv2', 'mdt_v1'])
def test_forward_matches_the_jax_model(arch):
  cfg = MDTConfig(**TINY, arch=arch)
  sd = _weights(cfg, 0.2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  t, y = np.array([0, 500, 999]), np.array([1, 10, 3])  # 10 = the null label
  want = np.asarray(
      official.model_from_state(sd, cfg)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  )
  with torch.no_grad():
    got = from_official_state(sd, cfg)(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y)
    )
  got = got.numpy().transpose(0, 2, 3, 1)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_guided_ddpm_matches_the_jax_sampler_on_the_same_noise():
  cfg = MDTConfig(**TINY)
  sd = _weights(cfg, 0.05)
  jax_model, torch_model = official.model_from_state(sd, cfg), from_official_state(sd, cfg)
  idx, labels, seed = np.arange(4), np.array([1, 2, 3, 9]), 7
  want = build_sampler(jax_model, SamplerConfig(sampler='ddpm', steps=6, cfg_scale=4.0))(
      idx, labels, seed
  )
  keys = sample_keys(labels_lib.noise_key(seed), jnp.asarray(idx, jnp.int32))

  def replay(j, shape):  # the JAX sampler's per-sample noise streams, NCHW
    z = np.asarray(per_sample_normal(keys, j, (8, 8, 4))).transpose(0, 3, 1, 2)
    assert z.shape == shape
    return torch.from_numpy(z.copy())

  got = sample_ddpm(torch_model, labels, steps=6, cfg_scale=4.0, noise_fn=replay)
  got = got.numpy().transpose(0, 2, 3, 1)
  assert np.isfinite(want).all() and np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)
  # Guidance is on: another scale gives other samples.
  other = sample_ddpm(torch_model, labels, steps=6, cfg_scale=1.0, noise_fn=replay).numpy()
  assert np.abs(other.transpose(0, 2, 3, 1) - want).max() > 1e-2


def test_sampler_refuses_a_fixed_variance_model():
  cfg = MDTConfig(**{**TINY, 'learn_sigma': False})
  with pytest.raises(ValueError, match='learned-variance'):
    sample_ddpm(TorchMDT(cfg), [1], steps=2)


# ------------------------------------------------------------------------------ train step


def _train_config():
  from mdt_jax.configs_base import base_config

  c = base_config()
  # Small enough to compile in seconds: one block of each kind (encoder in/out, decoder, side).
  c.model.update(TINY, depth=3, decode_layer=1, class_dropout_prob=0.3)
  c.optimizer.learning_rate = 1e-3
  c.ema_decay = 0.9
  return c


def _jax_draws(state, x, cfg, process):
  """The JAX step's draws (mdt_jax.training.step.loss_fn, MDT.__call__), as torch tensors."""
  import jax
  from mdt_jax.models import masking
  from torch_reference.train import BranchDraws, StepDraws

  b = x.shape[0]
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  t_key, plain_key, mask_key = jax.random.split(key, 3)
  t = jax.random.randint(t_key, (b,), 0, process.num_timesteps)

  def branch(k, masked):
    noise_key, model_key = jax.random.split(k)
    noise = np.asarray(jax.random.normal(noise_key, x.shape, jnp.float32)).transpose(0, 3, 1, 2)
    drop_key, m_key = jax.random.split(model_key)
    drop = np.asarray(jax.random.uniform(drop_key, (b,)) < cfg.class_dropout_prob)
    mask = None
    if masked:
      ids, keep = masking.draw_mask(m_key, b, cfg.num_tokens, cfg.mask_ratio, cfg.mask_ratio_span)
      mask = (torch.from_numpy(np.asarray(ids, np.int64)), int(keep))
    return BranchDraws(torch.from_numpy(noise.copy()), torch.from_numpy(drop.copy()), mask)

  return StepDraws(
      torch.from_numpy(np.asarray(t, np.int64)), branch(plain_key, False), branch(mask_key, True)
  )


def _close_but_for_noise_grads(got, want, lr, steps, what):
  """Adan divides by the gradient's scale, so an element whose gradient is rounding noise (e.g.
  the key bias of attention, to which softmax is blind) moves by up to lr per step in either
  framework: such elements (a few in a thousand) may differ by that; the rest agree closely."""
  diff = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in want])
  assert np.mean(diff <= 2e-6) > 0.99, what
  assert diff.max() <= 2 * lr * steps, what


def test_train_step_matches_the_jax_step_on_the_same_draws():
  """Two steps on equal weights, batch and draws: equal losses (both branches), equal Adan
  moments (clipping, gradient difference), parameters and EMA."""
  import functools
  import jax
  from flax import nnx
  from mdt_jax.models import masking
  from torch_reference.train import TorchTrainStep
  from mdt_jax.training import step as step_lib
  from mdt_jax.models.params import abstract_model
  from mdt_jax.training.state import TrainState, make_optimizer

  config = _train_config()
  cfg = MDTConfig.from_dict(config.model.to_dict())
  lr = config.optimizer.learning_rate
  sd = _weights(cfg, 0.2, seed=3)
  params = nnx.to_pure_dict(official.to_flax_params(sd, cfg))
  opt = make_optimizer(config.optimizer)
  graphdef, _ = nnx.split(abstract_model(cfg))
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=opt.init(params),
      rng=jax.random.key_data(jax.random.key(5)),
  )
  settings = step_lib.loss_settings(config)
  jax_step = jax.jit(
      functools.partial(
          step_lib.train_step,
          graphdef=graphdef,
          optimizer=opt,
          ema_decay=config.ema_decay,
          learning_rate=lr,
          **settings,
      )
  )
  torch_step = TorchTrainStep.from_config(config, sd)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 9, 5])
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
  dropped, steps = 0, 2
  for _ in range(steps):
    draws = _jax_draws(state, x, cfg, settings['process'])
    dropped += int(draws.plain.drop.sum()) + int(draws.masked.drop.sum())
    # fewer kept tokens than the JAX buffer holds: its padding slots are in play
    assert draws.masked.mask[1] < masking.buffer_size(cfg.num_tokens, cfg.mask_ratio)
    state, metrics = jax_step(state, {'x': jnp.asarray(x), 'y': jnp.asarray(y)})
    got = torch_step(xt, yt, draws)
    for k in ('loss', 'plain/loss', 'masked/loss'):
      np.testing.assert_allclose(got[k], float(metrics[k]), rtol=2e-5, err_msg=k)
  assert dropped > 0  # label dropout is in play
  as_official = lambda tree: official.from_flax_params(nnx.State(tree), cfg, with_buffers=False)
  adan_state = state.opt_state[-1]
  names = [n for n, p in torch_step.model.named_parameters() if p.requires_grad]
  for moment in ('m', 'd', 'n'):
    want = as_official(getattr(adan_state, moment))
    got = dict(zip(names, (v.numpy() for v in getattr(torch_step.optimizer, moment))))
    scale = max(np.abs(v).max() for v in want.values())
    for k in want:
      np.testing.assert_allclose(
          got[k], want[k], rtol=1e-4, atol=1e-5 * scale, err_msg=f'{moment} {k}'
      )
  want_params, want_ema = as_official(state.params), as_official(state.ema_params)
  got_params, got_ema = torch_step.state_dicts()
  assert max(np.abs(want_params[k] - sd[k]).max() for k in sd if k in want_params) > lr
  assert set(got_params) == set(want_params) and set(got_ema) == set(want_ema)
  _close_but_for_noise_grads(got_params, want_params, lr, steps, 'params')
  _close_but_for_noise_grads(got_ema, want_ema, lr, steps, 'EMA')
