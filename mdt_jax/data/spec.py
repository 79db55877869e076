"""`DataSpec`: what a run trains on (the training config's ``data`` section, typed)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SOURCES = ('digits', 'latents')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data of a run (see mdt_jax/configs_base.py).

  name: 'digits' (scikit-learn's digits, pixels) or 'latents' (SD-VAE latents at `path`).
  vae: the decoder VAE of a latent run (a folder or Hub id); None for pixel data.
  prefetch: batches the host readers keep ready; device_prefetch: batches already on the devices.
  split: digits only, 'all' or 'train' (the fixed 80%, data/digits.py).
  """

  name: str = 'latents'
  path: str | None = None
  image_size: int = 256
  flip: bool = True
  num_threads: int = 8
  prefetch: int = 8
  device_prefetch: int = 2
  vae: str | None = None
  split: str = 'all'

  def __post_init__(self):
    if self.name not in SOURCES:
      raise ValueError(f'data.name must be one of {SOURCES}, got {self.name!r}')

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> DataSpec:
    """A spec of a config's data section; unset (None or '') paths are None."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in section.items() if k in names}
    for k in ('path', 'vae'):
      values[k] = values.get(k) or None
    return cls(**values)

  @property
  def pixels(self) -> bool:
    return self.name == 'digits'
