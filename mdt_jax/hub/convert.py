"""Official PyTorch state dict (``.pt`` or ``.safetensors``, v1 or v2) -> model folder."""

from __future__ import annotations

import os

from mdt_jax.hub import official
from mdt_jax.hub.folder import IMAGENET_LATENT_DATA, OFFICIAL_SAMPLING, save_model_folder


def read_torch_state_dict(path: str) -> dict:
  """The tensors of a ``torch.save``d state dict as numpy arrays (CPU; needs torch)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        'reading an official .pt checkpoint needs PyTorch (CPU build is enough): '
        'pip install torch'
    ) from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise ValueError(f'{path} is not a readable PyTorch checkpoint: {e}') from e
  for key in ('ema', 'model', 'state_dict'):  # tolerate wrapped dicts
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f'{path} does not hold a state dict (got {type(obj).__name__})')
  obj = {k[len('module.') :] if k.startswith('module.') else k: v for k, v in obj.items()}
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, 'detach')}


def read_safetensors_state_dict(path: str) -> dict:
  """The tensors of an official-layout ``.safetensors`` file as numpy arrays (no torch needed)."""
  from safetensors.numpy import load_file

  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  try:
    state = load_file(path)
  except Exception as e:
    raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
  if not state:
    raise ValueError(f'{path} holds no tensors')
  return state


def read_state_dict(path: str) -> dict:
  """An official state dict from ``.safetensors`` (numpy) or any torch.save file (``.pt``)."""
  if path.endswith('.safetensors'):
    return read_safetensors_state_dict(path)
  return read_torch_state_dict(path)


def convert_official(
    checkpoint: str, out_dir: str, overwrite: bool = False, **config_overrides
) -> str:
  """Convert and write; nothing is written unless every key maps."""
  state = read_state_dict(checkpoint)
  config = official.infer_config(state, **config_overrides)
  params = official.to_flax_params(state, config, progress=True)
  return save_model_folder(
      out_dir,
      params,
      config,
      data=IMAGENET_LATENT_DATA,
      sampling=OFFICIAL_SAMPLING,
      source=f'converted from {os.path.basename(checkpoint)}',
      overwrite=overwrite,
  )
