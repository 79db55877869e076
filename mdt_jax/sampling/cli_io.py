"""What the sampling CLI needs around the sampler: loading a model, decoding, image files."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from mdt_jax import paths
from mdt_jax.atomic import atomic_file

LATENT_SCALE = 0.18215


@dataclasses.dataclass
class SamplingModel:
  """A model ready to sample from and how its samples become images."""
  model: Any                      # mdt_jax.MDT
  space: str                      # 'latent' or 'pixel'
  vae_dir: str | None = None      # VAE folder (mdt_jax.vae.load) for latent models
  latent_scale: float = LATENT_SCALE
  sampling: dict = dataclasses.field(default_factory=dict)   # recommended sampler settings
  diffusion: dict = dataclasses.field(default_factory=dict)  # objective, num_timesteps, ...


def load_for_sampling(path: str) -> SamplingModel:
  """Load a model folder, training workdir or Hub id through `mdt_jax.hub.pretrained.load`."""
  from mdt_jax.hub import pretrained as hub
  loaded = hub.load(path)
  data = getattr(loaded, 'data', None) or {}
  space = getattr(loaded, 'space', None) or data.get('space', 'latent')
  if space not in ('latent', 'pixel'):
    raise ValueError(f'{path}: data space must be "latent" or "pixel", got {space!r}')
  vae = getattr(loaded, 'vae_dir', None) or data.get('vae')
  return SamplingModel(model=loaded.model, space=space, vae_dir=vae,
                       latent_scale=float(data.get('latent_scale', LATENT_SCALE)),
                       sampling=dict(getattr(loaded, 'sampling', None) or {}),
                       diffusion=dict(getattr(loaded, 'diffusion', None) or {}))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float NHWC -> uint8 NHWC with 3 channels ((x+1)*127.5, clamped, truncated)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be NHWC with 1 or 3 channels, got shape {images.shape}')
  out = np.clip((images + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def make_postprocess(sm: SamplingModel, vae_dir: str | None = None
                     ) -> Callable[[np.ndarray], np.ndarray]:
  """Samples -> uint8 images: VAE decode of latents / latent_scale, or pixels directly.

  Loads the VAE now, so a missing decoder fails before sampling starts.
  """
  if sm.space == 'pixel':
    return to_uint8
  vae_dir = vae_dir or sm.vae_dir
  if not vae_dir:
    raise ValueError('this is a latent model but no VAE is known: pass --vae=DIR (a VAE folder '
                     'written by tools/convert_vae.py)')
  if not paths.path(vae_dir).is_dir():
    raise FileNotFoundError(f'VAE folder {vae_dir!r} not found; convert the decoder first '
                            '(tools/convert_vae.py) and pass --vae=DIR')
  try:
    from mdt_jax import vae as vae_lib
    vae = vae_lib.load(paths.resolve(vae_dir))
  except ImportError as e:
    raise ImportError(f'decoding latents needs mdt_jax.vae, which is not available: {e}') from e
  scale = sm.latent_scale
  return lambda latents: to_uint8(np.asarray(vae.decode(np.asarray(latents) / scale)))


def grid_image(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one [rows*H, cols*W, 3] image (2-pixel white gutters)."""
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  gap = 2
  grid = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = img
  return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
  """A grid image file (format from the suffix, e.g. .png), local or on object storage."""
  from PIL import Image
  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ValueError(f'{path}: unknown image file suffix (expected e.g. .png)')
  with atomic_file(path) as f:
    Image.fromarray(grid_image(images, ncols)).save(f, format=fmt)
  return path


def save_npz_atomic(path: str, **arrays) -> None:
  """np.savez written whole or not at all (a killed run leaves no partial file)."""
  with atomic_file(path) as f:
    np.savez(f, **arrays)
