"""Flags shared by the sampling command lines (mdt_jax.sample, mdt_jax.inpaint): the model, the
output folder, the sampler and its guidance, labels, seed, batch size and VAE.

Defined once here, so both entry points can be imported in one process. Like the entry points,
this module imports jax and the package inside its functions: the flags (and --help) load fast.
"""

from __future__ import annotations

import os

from absl import app, flags

from mdt_jax import paths

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, 'Model folder, training workdir or Hub repo id.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.DEFINE_integer(
    'grid_size', 64, "Samples shown in the output folder's picture grid (0: none)."
)
flags.DEFINE_string(
    'sampler',
    'ddpm',
    'DDPM models: ddpm | ddim | dpm_solver++; flow models: euler | heun | euler_maruyama (SDE).',
)
flags.DEFINE_integer('steps', 250, 'Sampling steps (model evaluations).')
flags.DEFINE_string(
    'respacing',
    '',
    'DDPM/DDIM respacing, e.g. "ddim50" or "10,15,20" (default: the step count).',
)
flags.DEFINE_float('eta', 0.0, 'DDIM eta.')
flags.DEFINE_float('cfg_scale', 3.8, 'Classifier-free guidance scale (1: no guidance).')
flags.DEFINE_enum(
    'guidance', 'power_cosine', ['power_cosine', 'constant'], 'Guidance scale schedule.'
)
flags.DEFINE_float('scale_pow', 4.0, 'Exponent of the power-cosine schedule.')
flags.DEFINE_string(
    'guidance_interval',
    '',
    'Guide only for original timesteps lo,hi (flow models: model time, t * num_timesteps).',
)
flags.DEFINE_float(
    'time_shift', 1.0, 'Flow samplers: shift of the time grid, t -> k t / (1 + (k - 1) t).'
)
flags.DEFINE_enum(
    'sde_diffusion',
    'sigma',
    ['sigma', 'constant'],
    "euler_maruyama: diffusion coefficient w(t) (SiT's diffusion_form).",
)
flags.DEFINE_float('sde_diffusion_norm', 1.0, "euler_maruyama: its scale (SiT's diffusion_norm).")
flags.DEFINE_float('sde_last_step', 0.04, 'euler_maruyama: size of the final noise-free step.')
flags.DEFINE_enum(
    'guided_channels', 'first3', ['first3', 'all'], 'Guide eps channels 0..2 (the original) or all.'
)
flags.DEFINE_bool('clip_denoised', False, 'Clip x0 predictions to [-1, 1].')
flags.DEFINE_string(
    'labels',
    'uniform',
    'uniform | balanced | comma-separated class ids '
    "(mdt_jax.inpaint: default the images file's labels; none: no class).",
)
flags.DEFINE_integer('seed', 0, 'Random seed (sample i uses fold_in(seed key, i)).')
flags.DEFINE_integer('batch_size', 64, 'Global batch size per sampling call.')
flags.DEFINE_string('vae', None, "VAE folder for latent models (default: the model's).")

# flag name -> SamplerConfig field, for settings the model folder may recommend
_RECOMMENDABLE = {
    'sampler': 'sampler',
    'steps': 'steps',
    'respacing': 'respacing',
    'eta': 'eta',
    'cfg_scale': 'cfg_scale',
    'guidance': 'guidance_schedule',
    'scale_pow': 'scale_pow',
    'guided_channels': 'guided_channels',
    'time_shift': 'time_shift',
    'sde_diffusion': 'sde_diffusion',
    'sde_diffusion_norm': 'sde_diffusion_norm',
    'sde_last_step': 'sde_last_step',
}


def sampler_config(recommended: dict, objective: str = 'ddpm', num_train_timesteps: int = 1000):
  """SamplerConfig from the flags; flags not given take the model's recommendation."""
  from mdt_jax.sampling.config import SamplerConfig

  values = {}
  for flag, field in _RECOMMENDABLE.items():
    if not FLAGS[flag].present and field in recommended:
      values[field] = recommended[field]
    else:
      values[field] = FLAGS[flag].value
  if values['cfg_scale'] is not None and float(values['cfg_scale']) == 1.0:
    values['cfg_scale'] = None  # mathematically unguided: skip the null-label pass
  interval = None
  if FLAGS.guidance_interval:
    try:
      interval = tuple(int(v) for v in FLAGS.guidance_interval.split(','))
    except ValueError:
      raise app.UsageError(f'--guidance_interval must be "lo,hi", got {FLAGS.guidance_interval!r}')
  return SamplerConfig(
      guidance_interval=interval,
      objective=objective,
      num_train_timesteps=num_train_timesteps,
      clip_denoised=FLAGS.clip_denoised,
      **{k: (v or None) if k == 'respacing' else v for k, v in values.items()},
  )


def load_model_and_config():
  """(model path, SamplingModel, SamplerConfig) of --model and the sampler flags."""
  from mdt_jax.diffusion import objective_of
  from mdt_jax.hub.pretrained import load_for_sampling
  from mdt_jax.sampling.config import recommended_fields

  for name in ('model', 'out'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  model_path = FLAGS.model if not os.path.exists(FLAGS.model) else paths.resolve(FLAGS.model)
  sm = load_for_sampling(model_path)
  cfg = sampler_config(
      recommended_fields(sm.sampling, sm.model.config.in_channels),
      objective_of(sm.diffusion),
      int(sm.diffusion.get('num_timesteps', 1000)),
  )
  return model_path, sm, cfg
