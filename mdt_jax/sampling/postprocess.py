"""How samples become images: a model's data space, its VAE, decoding to uint8."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from mdt_jax import paths, vae as vae_lib
from mdt_jax.images import to_uint8
from mdt_jax.vae.model import LATENT_SCALE


@dataclasses.dataclass
class SamplingModel:
  """A model ready to sample from and how its samples become images."""

  model: Any  # mdt_jax.MDT
  space: str  # 'latent' or 'pixel'
  vae_dir: str | None = None  # VAE folder (mdt_jax.vae.load) for latent models
  latent_scale: float = LATENT_SCALE
  sampling: dict = dataclasses.field(default_factory=dict)  # recommended sampler settings
  diffusion: dict = dataclasses.field(default_factory=dict)  # objective, num_timesteps, ...


def load_vae(sm: SamplingModel, vae_dir: str | None = None):
  """The VAE (mdt_jax.vae.VAE) of a latent model: `vae_dir`, else the model's own."""
  vae_dir = vae_dir or sm.vae_dir
  if not vae_dir:
    raise ValueError(
        'this is a latent model but no VAE is known: pass --vae=DIR (a VAE folder '
        'written by tools/convert_vae.py)'
    )
  if not paths.path(vae_dir).is_dir():
    raise FileNotFoundError(
        f'VAE folder {vae_dir!r} not found; convert the decoder first '
        '(tools/convert_vae.py) and pass --vae=DIR'
    )
  return vae_lib.load(paths.resolve(vae_dir))


def make_postprocess(
    sm: SamplingModel, vae_dir: str | None = None, vae: Any = None
) -> Callable[[np.ndarray], np.ndarray]:
  """Samples -> uint8 images: VAE decode of latents / latent_scale, or pixels directly.

  Loads the VAE now (unless a loaded `vae` is given), so a missing decoder fails before
  sampling starts.
  """
  if sm.space == 'pixel':
    return to_uint8
  vae = vae or load_vae(sm, vae_dir)
  scale = sm.latent_scale
  return lambda latents: to_uint8(np.asarray(vae.decode(np.asarray(latents) / scale)))
