"""How samples become images: a model's data (`ModelData`: its space and VAE), decoding to uint8."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from mdt_jax import paths, vae as vae_lib
from mdt_jax.images import to_uint8
from mdt_jax.vae.model import LATENT_SCALE

SPACES = ('latent', 'pixel')


@dataclasses.dataclass(frozen=True)
class ModelData:
  """What a model generates: a model folder's config.json ``data`` section, typed.

  space: 'latent' (VAE latents, scaled by latent_scale) or 'pixel' (images in [-1, 1]).
  vae: the VAE folder or Hub id that decodes a latent model's samples (None: not known).
  """

  space: str = 'latent'
  image_size: int | None = None
  image_channels: int | None = None
  latent_scale: float = LATENT_SCALE
  vae: str | None = None

  def __post_init__(self):
    if self.space not in SPACES:
      raise ValueError(f'data space must be one of {SPACES}, got {self.space!r}')

  @classmethod
  def from_record(cls, record: Mapping[str, Any] | None, where: str = '') -> ModelData:
    """The data of a config.json ``data`` section (missing keys take the defaults)."""
    record = dict(record or {})
    values = {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}
    if values.get('latent_scale') is None:
      values.pop('latent_scale', None)
    try:
      return cls(**values)
    except ValueError as e:
      raise ValueError(f'{where}: {e}' if where else str(e)) from None

  def record(self) -> dict[str, Any]:
    """The config.json ``data`` section (a pixel model's has no latent_scale)."""
    out = dataclasses.asdict(self)
    if self.space == 'pixel':
      del out['latent_scale']
    return out


def load_vae(data: ModelData, vae: str | None = None) -> vae_lib.VAE:
  """The VAE (mdt_jax.vae.VAE) of a latent model: `vae` (a folder), else the model's own."""
  vae = vae or data.vae
  if not vae:
    raise ValueError(
        'this is a latent model but no VAE is known: pass --vae=DIR (a VAE folder '
        'written by tools/convert_vae.py)'
    )
  if not paths.path(vae).is_dir():
    raise FileNotFoundError(
        f'VAE folder {vae!r} not found; convert the decoder first '
        '(tools/convert_vae.py) and pass --vae=DIR'
    )
  return vae_lib.load(paths.resolve(vae))


def make_postprocess(
    data: ModelData, vae: str | None = None, *, loaded: vae_lib.VAE | None = None
) -> Callable[[np.ndarray], np.ndarray]:
  """Samples -> uint8 images: VAE decode of latents / latent_scale, or pixels directly.

  Loads the VAE (`vae`, else the model's) now unless a `loaded` one is given, so a missing
  decoder fails before sampling starts.
  """
  if data.space == 'pixel':
    return to_uint8
  decoder = loaded or load_vae(data, vae)
  scale = data.latent_scale
  return lambda latents: to_uint8(np.asarray(decoder.decode(np.asarray(latents) / scale)))
