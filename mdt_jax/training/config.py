"""Validation of a user's training config against the fields of ``mdt_jax.configs_base``."""

from __future__ import annotations

import ml_collections

from mdt_jax import diffusion as diff
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.configs_base import base_config
from mdt_jax.training import align


def _unknown_keys(cfg, ref, prefix='') -> list[str]:
  out = []
  for k in cfg.keys():
    if k not in ref:
      out.append(prefix + k)
    elif isinstance(ref[k], ml_collections.ConfigDict) and k != 'model':
      out += _unknown_keys(cfg[k], ref[k], prefix + k + '.')
  return out


def validate(config: ml_collections.ConfigDict) -> MDTConfig:
  """Refuse unknown keys and impossible values before any work starts; return the model config."""
  unknown = _unknown_keys(config, base_config())
  if unknown:
    raise ValueError(
        f'unknown config keys {unknown}; see mdt_jax/training/config.py for the '
        'fields a config may set'
    )
  model = MDTConfig.from_dict(config.model.to_dict())
  for k in ('total_steps', 'global_batch_size', 'checkpoint_every_steps', 'log_every_steps'):
    if int(config[k]) <= 0:
      raise ValueError(f'{k} must be positive, got {config[k]}')
  if config.mask_branch and model.mask_ratio is None:
    raise ValueError('mask_branch=True needs model.mask_ratio (the official value is 0.3)')
  check_objective(config, model)
  model = _check_align(config, model)
  # Imported here, not above: every configs/*.py imports base_config, and loading a config should
  # not load grain and the evaluation stack (about 1 s).
  from mdt_jax.training.evaluation import check_config

  check_config(config)
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}')
  from mdt_jax.data.pipeline import element_spec, manifest_classes

  size, channels = element_spec(config.data)
  if (model.input_size, model.in_channels) != (size, channels):
    raise ValueError(
        f'data {config.data.name!r} gives {size}x{size}x{channels} inputs but '
        f'model expects input_size={model.input_size}, '
        f'in_channels={model.in_channels}'
    )
  classes = manifest_classes(config.data.path) if config.data.get('path') else None
  if classes is not None and classes > model.num_classes:
    raise ValueError(
        f'the latents at {config.data.path} hold {classes} classes (manifest.json) '
        f'but model.num_classes={model.num_classes}'
    )
  return model


def _check_align(config: ml_collections.ConfigDict, model: MDTConfig) -> MDTConfig:
  """config.align refused when it cannot train; the model with its projector."""
  choice = align.config_of(config.get('align'))
  choice.check(model, mask_branch=config.mask_branch)
  if choice.method == 'repa' and config.data.name != 'digits':
    raise ValueError(
        f'align.method=repa needs the images for its teacher; data {config.data.name!r} holds '
        'latents only (pixel data: the digits)'
    )
  return choice.model_config(model)


def check_objective(config: ml_collections.ConfigDict, model: MDTConfig) -> None:
  """The diffusion section fits the model and the sampler settings fit the objective."""
  objective = diff.objective_of(config.diffusion)
  if objective == 'flow':
    if model.learn_sigma:
      raise ValueError(
          "diffusion.objective='flow' trains a velocity of the input's channels: "
          'set model.learn_sigma=False (a learned variance has no meaning there)'
      )
    if config.diffusion.min_snr_gamma is not None:
      raise ValueError(
          f'diffusion.min_snr_gamma={config.diffusion.min_snr_gamma} weights the '
          "DDPM objective's eps MSE; the flow objective trains the unweighted "
          'velocity MSE and shapes its time density with diffusion.t_sampling: set '
          'diffusion.min_snr_gamma=None'
      )
  diff.make_process(config.diffusion)  # raises for bad flow settings
  if (
      objective == 'flow'
      or config.sample_every_steps
      or config.eval_num_samples
      or config.get('eval_every_steps')
  ):
    from mdt_jax.training.samples import sampler_config  # light configs: see validate

    sampler_config(config)  # raises for a sampler that does not fit
