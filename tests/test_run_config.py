"""The run record (`mdt_jax.training.run.validate`) and the one reader of older config.json keys
(`mdt_jax.configs_base.upgrade`)."""

import dataclasses
import json
import os

import pytest

from micro_config import get_config
from mdt_jax.configs_base import model_of, upgrade
from mdt_jax.training.run import RunConfig, validate

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'legacy_95ae3d1')


def test_validate_returns_one_frozen_typed_record():
  c = get_config()
  c.sample_every_steps = 3
  run = validate(c)
  assert isinstance(run, RunConfig)
  assert run.model.hidden_size == c.model.hidden_size and run.model.mask_ratio == 0.3
  assert run.process.num_timesteps == c.diffusion.num_timesteps
  assert run.sampler.sampler == c.sampling.sampler and run.sampler.steps == c.sampling.steps
  assert run.loop.total_steps == c.total_steps and run.optimizer.learning_rate == 1e-3
  assert run.data.name == 'digits' and run.data.vae is None and run.data.path is None
  assert run.mesh.rules == tuple(tuple(r) for r in c.sharding_rules)
  assert run.evaluation.reference is None and run.grid.per_class == c.sampling.grid_per_class
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.model = None
  with pytest.raises(TypeError):
    run.sampling['steps'] = 1  # a read-only view
  # the plain config, as config.json holds it
  assert run.config().to_dict() == json.loads(json.dumps(c.to_dict()))
  c.sample_every_steps = 0
  assert validate(c).sampler is None  # a run that samples nothing builds no sampler


def test_old_workdir_keys_are_read_under_todays_names():
  with open(os.path.join(LEGACY, 'workdir', 'config.json')) as f:
    old = json.load(f)
  assert old['data']['vae_decoder'] == '' and old['model']['attention_impl'] == ''
  new = upgrade(old)
  assert 'vae_decoder' not in new['data'] and new['data']['vae'] is None
  assert new['data']['path'] is None and new['eval_reference'] is None
  assert new['model']['attention_impl'] is None and new['model']['rel_pos_bias_impl'] is None
  assert old['data']['vae_decoder'] == ''  # the input is left as it was
  # today's config reads the same after the round trip: the upgrade of a new file changes nothing
  c = get_config().to_dict()
  assert upgrade(json.loads(json.dumps(c))) == json.loads(json.dumps(c))
  assert model_of(new['model']).hidden_size == 8


def test_old_model_folder_keys_are_read_under_todays_names():
  with open(os.path.join(LEGACY, 'model', 'config.json')) as f:
    old = json.load(f)
  new = upgrade(old)
  assert old['diffusion'] == {'num_timesteps': 1000, 'beta_schedule': 'linear'}
  assert new['diffusion'] == {'num_timesteps': 1000, 'schedule': 'linear'}
  assert new['data'] == old['data']  # a folder's data section always named the VAE 'vae'


def test_an_empty_string_for_an_unset_model_field_is_refused():
  with pytest.raises(ValueError, match=r"model.attention_impl is '' \(unset is None"):
    model_of({'attention_impl': ''})
  c = get_config()
  c.model.rel_pos_bias_impl = ''
  with pytest.raises(ValueError, match="model.rel_pos_bias_impl is ''"):
    validate(c)
