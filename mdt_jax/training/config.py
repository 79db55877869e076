"""The training config: defaults of every field, and validation of a user's config against them.

Experiment files in ``configs/`` start from ``base_config()`` and change what differs.
"""

from __future__ import annotations

import ml_collections

from mdt_jax import diffusion as diff
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.presets import model_config
from mdt_jax.training.sharding import DEFAULT_RULES

METRIC_WRITERS = ('events', 'clu')


def base_config() -> ml_collections.ConfigDict:
  """MDTv2-XL/2 on ImageNet-256 latents with the official recipe (spec section 5)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config('XL/2')
  c.mask_branch = True  # False: DiT-style baseline (plain branch only)
  # objective 'ddpm': MDTv2's Gaussian diffusion (eps prediction, min-SNR weight, learned
  # variance). 'flow': flow matching, x_t = (1 - t) x_0 + t eps, velocity MSE (needs
  # model.learn_sigma=False and min_snr_gamma=None); its times are drawn 'uniform' or
  # 'logit_normal' (sigmoid of N(t_logit_mean, t_logit_scale^2)), then shifted by t_shift
  # (t -> k t / (1 + (k - 1) t)); the network sees t * num_timesteps. See mdt_jax/diffusion/flow.py.
  c.diffusion = dict(
      num_timesteps=1000,
      schedule='linear',
      min_snr_gamma=5.0,
      objective='ddpm',
      t_sampling='uniform',
      t_logit_mean=0.0,
      t_logit_scale=1.0,
      t_shift=1.0,
  )
  # prefetch: batches the host readers keep ready; device_prefetch: batches already copied to
  # the devices ahead of the step
  # split: digits only, 'all' or 'train' (holds out the fixed 20% test split, data/digits.py)
  c.data = dict(
      name='latents',
      path='',
      image_size=256,
      flip=True,
      num_threads=8,
      prefetch=8,
      device_prefetch=2,
      vae_decoder='stabilityai/sd-vae-ft-ema',
      split='all',
  )
  c.global_batch_size = 256
  c.total_steps = 400_000
  c.optimizer = dict(
      name='adan',
      learning_rate=3e-4,
      b1=0.98,
      b2=0.92,
      b3=0.99,
      eps=1e-8,
      weight_decay=0.0,
      clip_norm=1.0,
  )
  c.ema_decay = 0.9999
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = DEFAULT_RULES
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.log_every_steps = 500
  # Sample grids during training (0 = off) and the settings recommended for this model.
  c.sample_every_steps = 0
  c.sampling = dict(
      sampler='ddpm',
      steps=250,
      cfg_scale=3.8,
      scale_pow=4.0,
      guidance_channels='first3',
      grid_classes=8,
      grid_per_class=4,
      seed=0,
  )
  # Evaluation of the EMA weights (mdt_jax/training/evaluation.py): eval_num_samples guided,
  # class-balanced samples (0 = off) at the last step and every eval_every_steps (0 = last only).
  # Digits runs: classifier Frechet distance and class accuracy. Latent runs: FID, sFID,
  # precision and recall (JAX Inception at eval_inception, default ~/.cache/mdt_jax) against
  # eval_reference (python -m mdt_jax.evaluate --save_stats output, or an ADM reference batch).
  c.eval_num_samples = 0
  c.eval_every_steps = 0
  c.eval_reference = ''
  c.eval_inception = ''
  c.profile_steps = 0  # >0: capture a jax.profiler trace of that many steps
  # TensorBoard: 'events', the event writer without TensorFlow (mdt_jax/training/events.py);
  # 'clu', clu's default writer (clu.metric_writers: imports TensorFlow, several seconds)
  c.metric_writer = 'events'
  return c


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
  if config.get('metric_writer', 'events') not in METRIC_WRITERS:
    raise ValueError(f'metric_writer must be one of {METRIC_WRITERS}, got {config.metric_writer!r}')
  for k in ('total_steps', 'global_batch_size', 'checkpoint_every_steps', 'log_every_steps'):
    if int(config[k]) <= 0:
      raise ValueError(f'{k} must be positive, got {config[k]}')
  if config.mask_branch and model.mask_ratio is None:
    raise ValueError('mask_branch=True needs model.mask_ratio (the official value is 0.3)')
  check_objective(config, model)
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
