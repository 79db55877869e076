"""A training run as a folder ready for the Hugging Face Hub.

The folder is a model folder (``config.json`` + ``model.safetensors``, see ``folder.py``) plus
``README.md``, the model card (``model_card.py``). With ``official_layout`` it also holds the
weights under the official PyTorch key names (``official/mdt_official.safetensors`` and/or
``official/mdt_official.pt``), relative_position_index buffers included, which the original code
loads with ``load_state_dict(strict=True)``. The upload is ``upload.py``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mdt_jax import paths
from mdt_jax.atomic import atomic_folder, check_writable
from mdt_jax.diffusion import folder_record, objective_of
from mdt_jax.hub import model_card, official
from mdt_jax.hub.folder import write_model_files
from mdt_jax.hub.upload import check_repo_id
from mdt_jax.hub.workdir import load_workdir
from mdt_jax.configs_base import model_of
from mdt_jax.models.mdt import COMPUTE_OPTIONS, MDTConfig
from mdt_jax.sampling.config import make_sampler_config, recommended_sampling
from mdt_jax.training.checkpoints import read_train_config

OFFICIAL_DIR = 'official'
OFFICIAL_FILES = {'safetensors': 'mdt_official.safetensors', 'pt': 'mdt_official.pt'}
WEIGHTS = {'ema': 'ema_params', 'raw': 'params'}


# ---------------------------------------------------------------------------- official layout


def write_official(
    folder: str, params: nnx.State, config: MDTConfig, formats: Sequence[str] = ('safetensors',)
) -> list[str]:
  """Write the official-layout state dict into folder/official/; return the relative paths."""
  state = official.from_flax_params(params, config)
  os.makedirs(os.path.join(folder, OFFICIAL_DIR), exist_ok=True)
  written = []
  for fmt in formats:
    rel = f'{OFFICIAL_DIR}/{OFFICIAL_FILES[fmt]}'
    path = os.path.join(folder, rel)
    if fmt == 'safetensors':
      save_file(
          state,
          path,
          metadata={
              'format': 'pt',
              'source': model_card.LIBRARY_NAME,
              'constructor': official.constructor_call(config),
          },
      )
    else:
      import torch

      torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    written.append(rel)
  return written


def check_official_formats(formats: Sequence[str]) -> tuple[str, ...]:
  formats = tuple(dict.fromkeys(formats))
  bad = [f for f in formats if f not in OFFICIAL_FILES]
  if bad or not formats:
    raise ValueError(
        f'official formats must be a non-empty subset of {sorted(OFFICIAL_FILES)}, '
        f'got {list(formats)}'
    )
  if 'pt' in formats:
    try:
      import torch  # noqa: F401
    except ImportError as e:
      raise ImportError(
          'the official .pt file needs PyTorch (CPU build is enough); or write '
          'only the safetensors file'
      ) from e
  return formats


# ------------------------------------------------------------------------------------- export


def checked_sampling(
    train_sampling: Mapping[str, Any], in_channels: int, num_timesteps: int, objective: str = 'ddpm'
) -> dict:
  """The folder's recommended sampler settings from the training config's `sampling` section,
  checked by building the SamplerConfig they describe."""
  out = recommended_sampling(dict(train_sampling), in_channels)
  try:
    make_sampler_config(out, in_channels, num_timesteps, objective)
  except (TypeError, ValueError) as e:
    raise ValueError(f"the training config's sampling settings {out} are not usable: {e}") from e
  return out


def export_workdir(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    weights: str = 'ema',
    eval_json: str | None = None,
    official_layout: bool = False,
    official_formats: Sequence[str] = ('safetensors',),
    license: str = 'apache-2.0',
    license_name: str | None = None,
    license_link: str | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
) -> str:
  """Write the Hub folder of a training workdir's checkpoint; return its path.

  Every input is checked before the weights are read; the folder appears only when complete.
  ``repo_id`` names the model in the card's usage code (default: the folder's name).
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {sorted(WEIGHTS)}, got {weights!r}')
  model_card.check_license(license, license_name, license_link)
  if repo_id:
    check_repo_id(repo_id)
  formats = check_official_formats(official_formats) if official_layout else ()
  check_writable(out, overwrite)
  train_cfg = read_train_config(workdir)  # raises for a folder that is not a workdir
  evaluation = model_card.read_evaluation(eval_json) if eval_json else None
  # Port options (dtype, remat, attention kernel, ...) are the loader's choice, not the folder's.
  config = model_of(train_cfg.model.to_dict(), **COMPUTE_OPTIONS)
  diffusion = folder_record(train_cfg.diffusion)
  sampling = checked_sampling(
      train_cfg.sampling.to_dict() if 'sampling' in train_cfg else {},
      config.in_channels,
      diffusion['num_timesteps'],
      objective_of(diffusion),
  )

  loaded = load_workdir(workdir, step=step, weights=WEIGHTS[weights])
  step = loaded.meta['step']
  params = nnx.state(loaded.model, nnx.Param)
  folder_name = os.path.basename(paths.resolve(out).rstrip('/'))
  name = model_name or (repo_id.split('/')[-1] if repo_id else folder_name)
  model_ref = repo_id or folder_name
  metadata = model_card.card_metadata(
      config=config,
      data_cfg=train_cfg.data.to_dict(),
      license=license,
      model_name=name,
      evaluation=evaluation,
      dataset_id=dataset_id,
      license_name=license_name,
      license_link=license_link,
  )
  official_files = [f'{OFFICIAL_DIR}/{OFFICIAL_FILES[f]}' for f in formats]
  card = model_card.card_text(
      metadata=metadata,
      config=config,
      model_ref=model_ref,
      title=name,
      data=loaded.data,
      diffusion=diffusion,
      sampling=sampling,
      training=model_card.training_summary(train_cfg, step, weights),
      evaluation=evaluation,
      official_files=official_files,
  )
  model_card.parse_card(card)  # refuse a card the Hub tools cannot read

  with atomic_folder(out, overwrite) as folder:
    write_model_files(
        folder,
        params,
        config,
        data=loaded.data,
        diffusion=diffusion,
        sampling=sampling,
        source=f'{paths.resolve(workdir)} step {step} ({WEIGHTS[weights]})',
        extra_files={model_card.CARD_FILE: card},
    )
    if formats:
      write_official(folder, params, config, formats)
  return out
