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

from mdt_jax import paths
from mdt_jax.data import digits
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.images import save_grid, to_uint8
from mdt_jax.sampling import SamplerConfig, build_sampler, generate
from mdt_jax.training import eval_metrics
from mdt_jax.training.run import DIGITS_EVAL_SIZES, RunConfig, as_run, training_sampler


def sampler_config(config: RunConfig | ml_collections.ConfigDict) -> SamplerConfig:
  """The sampler of a run's grids and evaluations (`run.training_sampler`)."""
  run = as_run(config)
  return run.sampler or training_sampler(run.sampling, run.model, run.diffusion)


class GridSampler:
  """Builds the sampler on first use and swaps in new EMA weights afterwards."""

  def __init__(self, run: RunConfig | ml_collections.ConfigDict, graphdef):
    self.run, self.graphdef, self.sampler = as_run(run), graphdef, None

  def samples(self, ema_params, labels: np.ndarray, seed: int, start: int = 0) -> np.ndarray:
    """Samples of global indices start .. start + len(labels) - 1 (see `generate`)."""
    model = nnx.merge(self.graphdef, ema_params)
    if self.sampler is None:
      self.sampler = build_sampler(model, sampler_config(self.run))
    else:
      state = nnx.state(model)
      self.sampler = dataclasses.replace(
          self.sampler, params=jax.device_put(state, NamedSharding(self.sampler.mesh, P()))
      )
    return generate(
        self.sampler,
        labels,
        seed=seed,
        batch_size=max(8, min(len(labels), 256)),
        start=start,
        log_every=0,
    )

  def grid_labels(self) -> np.ndarray:
    g = self.run.grid
    n_cls = min(g.classes, self.run.model.num_classes)
    return np.repeat(np.arange(n_cls), g.per_class).astype(np.int32)

  def grid(self, ema_params) -> np.ndarray | None:
    """uint8 [N, H, W, 3] images (rows of one class each), or None for latent models."""
    if not self.run.data.pixels:
      logging.info(
          'sample grids during training are written for pixel-space runs only; '
          'use python -m mdt_jax.sample on the workdir for latent models'
      )
      return None
    x = self.samples(ema_params, self.grid_labels(), self.run.grid.seed)
    return to_uint8(x)


def save(images: np.ndarray, workdir: str, step: int, ncols: int) -> str:
  folder = paths.path(workdir) / 'samples'
  folder.mkdir(parents=True, exist_ok=True)
  return save_grid(images, os.fspath(folder / f'grid_{step:08d}.png'), ncols)


def evaluate_digits(grids: GridSampler, ema_params, num_samples: int, seed: int = 1) -> dict:
  """Frechet distance (digits-classifier features) and class accuracy of guided samples: 16x16
  samples as they are, 8x8 ones (the dataset's own resolution) upsampled as the dataset makes
  the classifier's 16x16 images (`digits.upsample`)."""
  data = grids.run.data
  if data.name != 'digits' or data.image_size not in DIGITS_EVAL_SIZES:
    raise ValueError(
        f'the digits evaluation needs data.name="digits" at image_size {DIGITS_EVAL_SIZES}, got '
        f'{data.name!r} at {data.image_size}'
    )
  labels = np.arange(num_samples, dtype=np.int32) % grids.run.model.num_classes
  x = np.clip(grids.samples(ema_params, labels, seed), -1.0, 1.0)
  if data.image_size != dc.TrainConfig.size:  # the dataset's 8x8: upsampled as it is to 16x16
    x = digits.upsample(x, dc.TrainConfig.size)
  return {
      **eval_metrics.digits(x, labels, dc.load_digits_classifier()),
      'eval_num_samples': int(num_samples),
  }
