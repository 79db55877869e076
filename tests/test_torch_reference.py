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
from mdt_jax.sampling.samplers import per_sample_normal, sample_keys
from mdt_jax.torch_reference import TorchMDT, from_official_state, sample_ddpm

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4,
            decode_layer=2, num_classes=10, mask_ratio=0.3)


def _weights(cfg, scale, seed=1):
  return ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid,
                               seed=seed, scale=scale)


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
  t, y = np.array([0, 500, 999]), np.array([1, 10, 3])        # 10 = the null label
  want = np.asarray(official.model_from_state(sd, cfg)(jnp.asarray(x), jnp.asarray(t),
                                                         jnp.asarray(y)))
  with torch.no_grad():
    got = from_official_state(sd, cfg)(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                        torch.from_numpy(t), torch.from_numpy(y))
  got = got.numpy().transpose(0, 2, 3, 1)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_guided_ddpm_matches_the_jax_sampler_on_the_same_noise():
  cfg = MDTConfig(**TINY)
  sd = _weights(cfg, 0.05)
  jax_model, torch_model = official.model_from_state(sd, cfg), from_official_state(sd, cfg)
  idx, labels, seed = np.arange(4), np.array([1, 2, 3, 9]), 7
  want = build_sampler(jax_model, SamplerConfig(sampler='ddpm', steps=6, cfg_scale=4.0))(
      idx, labels, seed)
  keys = sample_keys(labels_lib.noise_key(seed), jnp.asarray(idx, jnp.int32))

  def replay(j, shape):      # the JAX sampler's per-sample noise streams, NCHW
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
