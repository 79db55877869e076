"""Samples during training: class-conditional grids from the EMA weights (one compilation)."""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mdt_jax.sampling import SamplerConfig, build_sampler, generate
from mdt_jax.sampling.cli_io import recommended_settings, save_grid, to_uint8


def sampler_config(config: ml_collections.ConfigDict) -> SamplerConfig:
  s = config.sampling
  fields = recommended_settings(s.to_dict(), config.model.in_channels)
  fields['num_train_timesteps'] = config.diffusion.num_timesteps
  return SamplerConfig(**fields)


class GridSampler:
  """Builds the sampler on first use and swaps in new EMA weights afterwards.

  The sampler settings are ``sampler_cfg``, or by default those of ``config.sampling``.
  """

  def __init__(self, config: ml_collections.ConfigDict, graphdef,
               sampler_cfg: SamplerConfig | None = None):
    self.config, self.graphdef, self.sampler = config, graphdef, None
    self.sampler_cfg = sampler_cfg

  def samples(self, ema_params, labels: np.ndarray, seed: int) -> np.ndarray:
    model = nnx.merge(self.graphdef, ema_params)
    if self.sampler is None:
      self.sampler = build_sampler(model, self.sampler_cfg or sampler_config(self.config))
    else:
      state = nnx.state(model)
      self.sampler = dataclasses.replace(
          self.sampler, params=jax.device_put(state, NamedSharding(self.sampler.mesh, P())))
    return generate(self.sampler, labels, seed=seed, batch_size=max(8, min(len(labels), 256)),
                    log_every=0)

  def grid_labels(self) -> np.ndarray:
    s = self.config.sampling
    n_cls = min(s.grid_classes, self.config.model.num_classes)
    return np.repeat(np.arange(n_cls), s.grid_per_class).astype(np.int32)

  def grid(self, ema_params) -> np.ndarray | None:
    """uint8 [N, H, W, 3] images (rows of one class each), or None for latent models."""
    if self.config.data.name != 'digits':
      logging.info('sample grids during training are written for pixel-space runs only; '
                   'use python -m mdt_jax.sample on the workdir for latent models')
      return None
    x = self.samples(ema_params, self.grid_labels(), self.config.sampling.seed)
    return to_uint8(x)


def save(images: np.ndarray, workdir: str, step: int, ncols: int) -> str:
  os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  return save_grid(images, os.path.join(workdir, 'samples', f'grid_{step:08d}.png'), ncols)
