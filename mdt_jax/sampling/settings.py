"""Recommended sampler settings (a model folder's or a training config's `sampling` section) and
the `SamplerConfig` they make."""
from __future__ import annotations

from mdt_jax.sampling.samplers import SamplerConfig


def recommended_sampling(sampling: dict, in_channels: int) -> dict:
  """A folder's or training config's `sampling` settings in the form every loader reads.

  guidance_channels becomes 'first3' or 'all' (with 3 or fewer channels both guide every channel,
  so any value means 'all'); scale_pow <= 0 makes the power-cosine weight 1 at every step, i.e.
  constant guidance, and becomes guidance_schedule='constant'.
  """
  keys = ('sampler', 'steps', 'respacing', 'eta', 'cfg_scale', 'scale_pow', 'guidance_schedule',
          'guidance_channels', 'time_shift', 'sde_diffusion', 'sde_diffusion_norm',
          'sde_last_step')
  out = {k: sampling[k] for k in keys if sampling.get(k) is not None}
  ch = out.get('guidance_channels', sampling.get('guided_channels'))
  if ch is not None:
    if in_channels <= 3 or ch in ('all', in_channels):
      out['guidance_channels'] = 'all'
    elif ch in ('first3', 3):
      out['guidance_channels'] = 'first3'
    else:
      raise ValueError(f'sampling.guidance_channels {ch!r} is not 3, "first3", "all" or '
                       f'{in_channels} (the model\'s channels)')
  if out.get('scale_pow') is not None and out['scale_pow'] <= 0:
    del out['scale_pow']
    out['guidance_schedule'] = 'constant'
  return out


def recommended_fields(sampling: dict, in_channels: int) -> dict:
  """`recommended_sampling` under `SamplerConfig`'s field names (guidance_channels ->
  guided_channels)."""
  fields = recommended_sampling(sampling, in_channels)
  if 'guidance_channels' in fields:
    fields['guided_channels'] = fields.pop('guidance_channels')
  return fields


def make_sampler_config(sampling: dict, in_channels: int, num_timesteps: int,
                        objective: str = 'ddpm', **overrides):
  """`SamplerConfig` from `sampling` settings (see recommended_sampling) and overrides, for a
  model of the given training objective."""
  values = recommended_fields(sampling, in_channels)
  values['num_train_timesteps'] = num_timesteps
  values['objective'] = objective
  values.update(overrides)
  return SamplerConfig(**values)
