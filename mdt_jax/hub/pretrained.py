"""``load_pretrained``: a model folder, a training workdir, or a Hugging Face Hub repo id."""
from __future__ import annotations

import os

from mdt_jax import paths
from mdt_jax.diffusion import objective_of
from mdt_jax.hub.folder import Pretrained, is_model_folder, load_model_folder
from mdt_jax.models.mdt import MDT


def _is_workdir(path: str) -> bool:
  return (paths.path(path) / 'checkpoints').is_dir()


# Only what loading needs: a repo may also hold official-layout copies of the weights.
HUB_FILES = ['config.json', 'model.safetensors', 'README.md']


def _hub_download(repo_id: str) -> str:
  from huggingface_hub import snapshot_download
  try:   # the cache first: works offline once downloaded
    path = snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_FILES)
    if is_model_folder(path):
      return path
  except Exception:  # not cached: ask the Hub
    pass
  try:
    path = snapshot_download(repo_id, allow_patterns=HUB_FILES)
  except Exception as e:
    raise FileNotFoundError(
        f'{repo_id!r} is neither a local model folder or training workdir nor a Hub repo that '
        f'could be downloaded or found in the Hub cache ({type(e).__name__}: {e})') from e
  if not is_model_folder(path):
    raise FileNotFoundError(f'Hub repo {repo_id!r} (at {path}) is not an mdt_jax model folder: '
                            'config.json and model.safetensors are expected')
  return path


def load(path_or_repo_id: str, **model_overrides) -> Pretrained:
  """Model and metadata (data space, diffusion and recommended sampling settings)."""
  typed = os.fspath(path_or_repo_id)
  # A local folder (relative to the current one) first; what is not on disk is a Hub id.
  p = paths.resolve(typed)
  if is_model_folder(p):
    return load_model_folder(p, **model_overrides)
  if _is_workdir(p):
    from mdt_jax.training.checkpoints import load_workdir
    return load_workdir(p, **model_overrides)
  if paths.is_remote(p) or paths.path(p).exists():
    raise FileNotFoundError(f'{p} is neither a model folder (config.json + model.safetensors) '
                            f'nor a training workdir (checkpoints/)')
  return load_model_folder(_hub_download(typed), **model_overrides)


def load_pretrained(path_or_repo_id: str, **model_overrides) -> MDT:
  """The ready MDT model (EMA weights for a training workdir)."""
  return load(path_or_repo_id, **model_overrides).model


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


def sampler_config(pretrained: Pretrained, **overrides):
  """The recommended `SamplerConfig` of a loaded model; keyword arguments (its fields) win."""
  diffusion = pretrained.diffusion or {}
  return make_sampler_config(pretrained.sampling or {}, pretrained.config.in_channels,
                             int(diffusion.get('num_timesteps', 1000)),
                             objective=objective_of(diffusion), **overrides)


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
  from mdt_jax.sampling.samplers import SamplerConfig
  values = recommended_fields(sampling, in_channels)
  values['num_train_timesteps'] = num_timesteps
  values['objective'] = objective
  values.update(overrides)
  return SamplerConfig(**values)
