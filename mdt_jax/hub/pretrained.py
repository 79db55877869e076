"""``load_pretrained``: a model folder, a training workdir, or a Hugging Face Hub repo id."""

from __future__ import annotations

import json
import os

from flax import nnx

from mdt_jax import paths
from mdt_jax.diffusion import objective_of
from mdt_jax.hub.folder import Pretrained, is_model_folder, load_model_folder
from mdt_jax.hub.workdir import is_workdir, load_workdir
from mdt_jax.models.mdt import MDT
from mdt_jax.models.params import parameter_table
from mdt_jax.sampling.config import SamplerConfig, make_sampler_config
from mdt_jax.sampling.postprocess import SamplingModel
from mdt_jax.vae.model import LATENT_SCALE

# Only what loading needs: a repo may also hold official-layout copies of the weights.
HUB_FILES = ['config.json', 'model.safetensors', 'README.md']


def _hub_download(repo_id: str) -> str:
  from huggingface_hub import snapshot_download

  try:  # the cache first: works offline once downloaded
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
        f'could be downloaded or found in the Hub cache ({type(e).__name__}: {e})'
    ) from e
  if not is_model_folder(path):
    raise FileNotFoundError(
        f'Hub repo {repo_id!r} (at {path}) is not an mdt_jax model folder: '
        'config.json and model.safetensors are expected'
    )
  return path


def load(path_or_repo_id: str, **model_overrides) -> Pretrained:
  """Model and metadata (data space, diffusion and recommended sampling settings)."""
  typed = os.fspath(path_or_repo_id)
  # A local folder (relative to the current one) first; what is not on disk is a Hub id.
  p = paths.resolve(typed)
  if is_model_folder(p):
    return load_model_folder(p, **model_overrides)
  if is_workdir(p):
    return load_workdir(p, **model_overrides)
  if paths.is_remote(p) or paths.path(p).exists():
    raise FileNotFoundError(
        f'{p} is neither a model folder (config.json + model.safetensors) '
        f'nor a training workdir (checkpoints/)'
    )
  return load_model_folder(_hub_download(typed), **model_overrides)


def load_pretrained(path_or_repo_id: str, **model_overrides) -> MDT:
  """The ready MDT model (EMA weights for a training workdir)."""
  return load(path_or_repo_id, **model_overrides).model


def sampler_config(pretrained: Pretrained, **overrides) -> SamplerConfig:
  """The recommended `SamplerConfig` of a loaded model; keyword arguments (its fields) win."""
  diffusion = pretrained.diffusion or {}
  return make_sampler_config(
      pretrained.sampling or {},
      pretrained.config.in_channels,
      int(diffusion.get('num_timesteps', 1000)),
      objective=objective_of(diffusion),
      **overrides,
  )


def load_for_sampling(path: str) -> SamplingModel:
  """Load a model folder, training workdir or Hub id through `mdt_jax.hub.pretrained.load`."""
  loaded = load(path)
  data = getattr(loaded, 'data', None) or {}
  space = getattr(loaded, 'space', None) or data.get('space', 'latent')
  if space not in ('latent', 'pixel'):
    raise ValueError(f'{path}: data space must be "latent" or "pixel", got {space!r}')
  vae = getattr(loaded, 'vae_dir', None) or data.get('vae')
  return SamplingModel(
      model=loaded.model,
      space=space,
      vae_dir=vae,
      latent_scale=float(data.get('latent_scale', LATENT_SCALE)),
      sampling=dict(getattr(loaded, 'sampling', None) or {}),
      diffusion=dict(getattr(loaded, 'diffusion', None) or {}),
  )


def describe(path_or_repo_id: str) -> str:
  """A model's settings (model, data, diffusion, recommended sampling) and clu's parameter
  table with each parameter's mean and std (``python -m mdt_jax.sample --model=DIR --info``)."""
  loaded = load(path_or_repo_id)
  sections = {'model': loaded.model.config.to_dict()}
  for name in ('data', 'diffusion', 'sampling'):
    sections[name] = dict(getattr(loaded, name, None) or {})
  text = [f'{path_or_repo_id}:']
  text += [
      f'{name}: {json.dumps(value, sort_keys=True, default=str)}'
      for name, value in sections.items()
  ]
  text.append(parameter_table(nnx.state(loaded.model, nnx.Param), stats=True))
  return '\n'.join(text)
