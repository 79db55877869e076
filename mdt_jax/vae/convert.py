"""Import a diffusers AutoencoderKL folder (no torch needed) into an mdt_jax VAE folder.

A diffusers folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (as published
for stabilityai/sd-vae-ft-ema and sd-vae-ft-mse). Conv weights [O, I, kh, kw] become NHWC kernels
[kh, kw, I, O], linear weights [O, I] become [I, O], GroupNorm ``weight`` becomes ``scale``.
Both the old attention names (query/key/value/proj_attn) and the new ones
(to_q/to_k/to_v/to_out.0) are read.
"""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import load_file

from mdt_jax.vae import io
from mdt_jax.vae.model import VAEConfig

DIFFUSERS_WEIGHTS = 'diffusion_pytorch_model.safetensors'
# Our module name -> diffusers' (one path component each).
_MODULES = {
    'norm_out': 'conv_norm_out',
    'downsample': 'downsamplers.0.conv',
    'upsample': 'upsamplers.0.conv',
    'attention': 'attentions.0',
    'norm': 'group_norm',
    'q': 'to_q',
    'k': 'to_k',
    'v': 'to_v',
    'out': 'to_out.0',
}
_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def diffusers_name(name: str) -> str:
  """diffusers' state-dict key of our parameter `name`."""
  *mods, leaf = name.split('.')
  mods = [_MODULES.get(m, m) for m in mods]
  return '.'.join(mods + ['bias' if leaf == 'bias' else 'weight'])


def _new_attention_names(key: str) -> str:
  """Rename the pre-0.14 diffusers attention keys (query/key/value/proj_attn) to the new ones."""
  parts = key.split('.')
  for i in range(2, len(parts) - 1):
    if parts[i - 2] == 'attentions' and parts[i] in _OLD_ATTENTION:
      parts[i] = _OLD_ATTENTION[parts[i]]
  return '.'.join(parts)


def _to_flax(name: str, w: np.ndarray, want_ndim: int) -> np.ndarray:
  w = np.asarray(w, np.float32)
  if name.endswith('kernel'):
    if want_ndim == 2 and w.ndim == 4 and w.shape[2:] == (1, 1):
      w = w[:, :, 0, 0]  # attention projections stored as 1x1 convs
    if w.ndim == 4:
      return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if w.ndim == 2:
      return np.ascontiguousarray(w.T)
  return w


def read_diffusers(diffusers_dir: str) -> tuple[VAEConfig, dict[str, np.ndarray]]:
  """(config, params in our naming) of a diffusers AutoencoderKL folder.

  Raises ValueError naming every missing, unexpected and mis-shaped key (diffusers' names).
  """
  config = VAEConfig.from_dict(io.read_vae_config(diffusers_dir))
  path = os.path.join(diffusers_dir, DIFFUSERS_WEIGHTS)
  if not os.path.isfile(path):
    others = sorted(f for f in os.listdir(diffusers_dir) if 'diffusion_pytorch_model' in f)
    raise FileNotFoundError(
        f'no {DIFFUSERS_WEIGHTS} in {diffusers_dir!r} (found {others}); only '
        'the safetensors format is read (torch .bin files are not)'
    )
  try:
    raw = load_file(path)
  except Exception as e:  # safetensors' numpy backend refuses e.g. bfloat16
    raise ValueError(f'cannot read {path} with safetensors numpy loading: {e}') from e
  tensors = {_new_attention_names(k): v for k, v in raw.items()}

  _, expected = io.param_shapes(config)
  by_diffusers = {diffusers_name(n): n for n in expected}
  missing = sorted(set(by_diffusers) - set(tensors))
  unexpected = sorted(set(tensors) - set(by_diffusers))
  params, mismatched = {}, []
  for dk in sorted(set(by_diffusers) & set(tensors)):
    ours = by_diffusers[dk]
    want = tuple(expected[ours].shape)
    w = _to_flax(ours, tensors[dk], len(want))
    if w.shape != want:
      mismatched.append(f'{dk}: {tuple(tensors[dk].shape)} does not give expected {want}')
    params[ours] = w
  if missing or unexpected or mismatched:
    raise ValueError(
        f'{path} does not match its config.json as an AutoencoderKL: '
        f'missing keys {missing}, unexpected keys {unexpected}, '
        f'mismatched shapes {mismatched}'
    )
  return config, params


def convert(diffusers_dir: str, out_dir: str, overwrite: bool = False) -> str:
  """Convert a diffusers AutoencoderKL folder into `out_dir` (config.json + model.safetensors).

  Everything is checked before anything is written; the folder appears only when complete.
  """
  config, params = read_diffusers(diffusers_dir)
  return io.write_folder(out_dir, config, params, overwrite=overwrite)
