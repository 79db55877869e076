"""The model folder: ``config.json`` + ``model.safetensors`` (+ ``README.md`` when exported).

``model.safetensors`` holds float32 parameters under this port's names (the nnx parameter path
joined by dots, e.g. ``en_inblocks.0.attn.qkv.kernel``). ``config.json``::

    {"format": "mdt_jax.model", "version": 1,
     "model": {...MDTConfig...},
     "data": {"space": "latent" | "pixel", "image_size": 256, "image_channels": 3,
              "latent_scale": 0.18215, "vae": "<folder or hub id of the decoder VAE>" | null},
     "diffusion": {"num_timesteps": 1000, "schedule": "linear"},
     "sampling": {recommended settings: sampler, steps, cfg_scale, scale_pow, guidance_channels},
     "source": "<where the weights came from>"}

A flow-matching model's diffusion section says so (a section without "objective" is DDPM)::

     "diffusion": {"objective": "flow", "num_timesteps": 1000 (the model's time scale),
                   "t_sampling": "uniform", "t_logit_mean": 0.0, "t_logit_scale": 1.0,
                   "t_shift": 1.0}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from flax import nnx
from safetensors.numpy import save_file

from mdt_jax import errors, paths
from mdt_jax.atomic import atomic_folder, require_complete
from mdt_jax.configs_base import model_of, upgrade
from mdt_jax.diffusion import objective_of
from mdt_jax.models.mdt import MDT, MDTConfig
from mdt_jax.models.params import flat_params, model_from_flat
from mdt_jax.vae.model import LATENT_SCALE

FORMAT = 'mdt_jax.model'
VERSION = 2  # 2: diffusion.schedule (1 wrote beta_schedule; read through configs_base.upgrade)
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'

# The original's FID setting (scripts/image_sample.py defaults; spec section 4).
OFFICIAL_SAMPLING = dict(
    sampler='ddpm', steps=250, cfg_scale=3.8, scale_pow=4.0, guidance_channels=3
)
IMAGENET_LATENT_DATA = dict(
    space='latent',
    image_size=256,
    image_channels=3,
    latent_scale=LATENT_SCALE,
    vae='stabilityai/sd-vae-ft-ema',
)


@dataclasses.dataclass
class Pretrained:
  """A loaded model folder: the ready model and what is needed to sample from it."""

  model: MDT
  config: MDTConfig
  data: dict
  diffusion: dict
  sampling: dict
  meta: dict


def write_model_files(
    folder: str,
    params: nnx.State | dict,
    config: MDTConfig,
    *,
    data: dict | None = None,
    diffusion: dict | None = None,
    sampling: dict | None = None,
    source: str = '',
    extra_files: dict[str, str] | None = None,
) -> None:
  """config.json + model.safetensors (+ extra text files) into an existing folder."""
  flat = params if isinstance(params, dict) else flat_params(params)
  model_from_flat(flat, config, where='parameters to save')  # validate before writing
  cfg = dict(
      format=FORMAT,
      version=VERSION,
      model=config.to_dict(),
      data=dict(data or IMAGENET_LATENT_DATA),
      diffusion=dict(diffusion or dict(num_timesteps=1000, schedule='linear')),
      sampling=dict(sampling or OFFICIAL_SAMPLING),
      source=source,
  )
  save_file(flat, os.path.join(folder, WEIGHTS_FILE), metadata={'format': FORMAT})
  with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
    json.dump(cfg, f, indent=2)
  for name, text in (extra_files or {}).items():
    with open(os.path.join(folder, name), 'w') as f:
      f.write(text)


def save_model_folder(
    out_dir: str, params: nnx.State | dict, config: MDTConfig, *, overwrite: bool = False, **meta
) -> str:
  """Write a model folder atomically (see ``write_model_files`` for ``meta``)."""
  with atomic_folder(out_dir, overwrite) as tmp:
    write_model_files(tmp, params, config, **meta)
  return out_dir


def read_folder_config(path: str) -> dict[str, Any]:
  """A model folder's config.json (format mdt_jax.model), checked for format and version, under
  today's key names (`configs_base.upgrade`)."""
  cfg_path = paths.path(path) / CONFIG_FILE
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{path} is not a model folder: {CONFIG_FILE} is missing')
  cfg = paths.read_json(
      cfg_path,
      f'the model folder config ({FORMAT}) that an export writes',
      'copy or export the model folder again',
  )
  if cfg.get('format') != FORMAT:
    raise ValueError(f'{cfg_path}: format is {cfg.get("format")!r}, expected {FORMAT!r}')
  if cfg.get('version', 0) > VERSION:
    raise ValueError(f'{cfg_path}: version {cfg["version"]} is newer than this code ({VERSION})')
  return upgrade(cfg)


def check_objective(diffusion: dict, config: MDTConfig, cfg_path: str = '') -> str:
  """The folder's objective ('ddpm' or 'flow'), refused when the model cannot have it."""
  try:
    objective = objective_of(diffusion)
  except ValueError as e:
    raise ValueError(f'{cfg_path}: {e}') from None
  if objective == 'flow' and config.learn_sigma:
    raise ValueError(
        f'{cfg_path}: diffusion.objective is "flow" but the model has '
        'learn_sigma=True (a flow model predicts a velocity, C output channels)'
    )
  return objective


def is_model_folder(path: str) -> bool:
  """A folder with a config.json that is not a training workdir's (no checkpoints/ beside it):
  one whose weights file is missing is a model folder too, so that loading it says so."""
  p = paths.path(path)
  return (p / CONFIG_FILE).is_file() and (
      (p / WEIGHTS_FILE).is_file() or not (p / 'checkpoints').is_dir()
  )


def load_model_folder(path: str, **model_overrides) -> Pretrained:
  """Load a model folder (local or on object storage). ``model_overrides`` change port options
  (e.g. dtype='bfloat16')."""
  cfg = read_folder_config(path)
  weights = os.fspath(paths.path(path) / WEIGHTS_FILE)
  if not paths.path(weights).is_file():
    raise errors.BadFile(
        f'{path} has no weights: {WEIGHTS_FILE} is missing (a model folder holds '
        f'{CONFIG_FILE} and {WEIGHTS_FILE}); copy or export the model folder again'
    )
  require_complete(path, 'model folder')
  config = model_of(cfg['model'], **model_overrides)
  check_objective(cfg.get('diffusion', {}), config, cfg_path=path)
  try:
    flat = paths.load_safetensors(weights)
  except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
    size = paths.path(weights).stat().length
    raise errors.BadFile(
        f'{weights} is not a readable safetensors file ({size} bytes: {e}): expected the '
        'weights an export writes (cut short in a copy?); copy or export the model folder again'
    ) from e
  model = model_from_flat(flat, config, where=weights)
  return Pretrained(
      model=model,
      config=config,
      data=cfg.get('data', {}),
      diffusion=cfg.get('diffusion', {}),
      sampling=cfg.get('sampling', {}),
      meta=cfg,
  )
