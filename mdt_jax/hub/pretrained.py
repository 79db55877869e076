"""``load_pretrained``: a model folder, a training workdir, or a Hugging Face Hub repo id."""

from __future__ import annotations

import json
import os

from flax import nnx

from mdt_jax import paths
from mdt_jax.hub.folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Pretrained,
    is_model_folder,
    load_model_folder,
)
from mdt_jax.hub.workdir import is_workdir, load_workdir
from mdt_jax.models.mdt import MDT
from mdt_jax.models.params import parameter_table

# Only what loading needs: a repo may also hold official-layout copies of the weights.
HUB_FILES = ['config.json', 'model.safetensors', 'README.md']


def _has_weights(path: str) -> bool:
  """A downloaded snapshot holds both files of a model folder (a partial one is not taken)."""
  p = paths.path(path)
  return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def _hub_download(repo_id: str) -> str:
  from huggingface_hub import snapshot_download

  try:  # the cache first: works offline once downloaded
    path = snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_FILES)
    if _has_weights(path):
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
  if not _has_weights(path):
    raise FileNotFoundError(
        f'Hub repo {repo_id!r} (at {path}) is not an mdt_jax model folder: '
        'config.json and model.safetensors are expected'
    )
  return path


def load(path_or_repo_id: str, **model_overrides) -> Pretrained:
  """The loaded model record of a model folder, a training workdir (EMA weights) or a Hub repo
  id: the model, its data space and VAE, objective and recommended sampler settings."""
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


def describe(path_or_repo_id: str) -> str:
  """A model's settings (model, data, diffusion, recommended sampling) and clu's parameter
  table with each parameter's mean and std (``python -m mdt_jax.sample --model=DIR --info``)."""
  loaded = load(path_or_repo_id)
  sections = {
      'model': loaded.config.to_dict(),
      'data': loaded.data.record(),
      'diffusion': dict(loaded.diffusion),
      'sampling': dict(loaded.sampling),
  }
  text = [f'{path_or_repo_id}:']
  text += [
      f'{name}: {json.dumps(value, sort_keys=True, default=str)}'
      for name, value in sections.items()
  ]
  text.append(parameter_table(nnx.state(loaded.model, nnx.Param), stats=True))
  return '\n'.join(text)
