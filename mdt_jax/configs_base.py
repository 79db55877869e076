"""The training config's fields and their defaults: experiment files in ``configs/`` start from
``base_config()`` and change what differs. Plain data: nothing here builds or checks a run (that is
``mdt_jax.training.run.validate``). A field that may be unset is a typed placeholder (None), never
an empty string.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.presets import model_config

__all__ = ['DEFAULT_RULES', 'base_config', 'model_config', 'model_of', 'upgrade']

# Logical axis -> mesh axis (mdt_jax/training/sharding.py): FSDP over the model width; tensor
# parallelism over heads and MLP width when the axis is > 1.
DEFAULT_RULES = (
    ('embed', 'fsdp'),
    ('embed2', 'fsdp'),
    ('embed_out', 'tensor'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('ada', 'tensor'),
    ('vocab', None),
)


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
      path=placeholder(str),
      image_size=256,
      flip=True,
      num_threads=8,
      prefetch=8,
      device_prefetch=2,
      # the decoder VAE of latent runs (folder or Hub id; None for pixel data), typed: a config
      # may set None and the command line a folder
      vae=FieldReference('stabilityai/sd-vae-ft-ema', field_type=str),
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
  # Representation alignment (mdt_jax/training/align.py): method 'none' (the original recipe),
  # 'repa' (a DINOv2 teacher folder) or 'sra' (the EMA model's deeper block at lower noise);
  # depth 0: REPA's block 8 of 28 scaled to the model; teacher_depth 0: twice depth.
  c.align = dict(
      method='none',
      depth=0,
      weight=0.5,
      projector_dim=2048,
      stop_step=0,
      branches='plain',
      teacher=placeholder(str),
      resolution=224,
      teacher_depth=0,
      noise_offset=0.2,
      ema_source='ema',
  )
  # strategy: auto, dp, fsdp, zero or hybrid (mdt_jax/training/strategies.py); auto on TPU with
  # these sizes: the cost model's choice of strategy and mesh (mdt_jax/training/cost.py)
  c.mesh = dict(strategy='auto', data=-1, fsdp=1, tensor=1, collective_dtype='float32')
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
  c.eval_reference = placeholder(str)
  c.eval_inception = placeholder(str)
  c.profile_steps = 0  # >0: capture a jax.profiler trace of that many steps
  # TensorBoard: 'events', the event writer without TensorFlow (mdt_jax/training/events.py);
  # 'clu', clu's default writer (clu.metric_writers: imports TensorFlow, several seconds)
  c.metric_writer = 'events'
  return c


# config.json files (a workdir's training config, a model folder's record) written by earlier
# versions: keys renamed since, and '' where None is written now.
RENAMED = {'data': {'vae_decoder': 'vae'}}
FOLDER_RENAMED = {'diffusion': {'beta_schedule': 'schedule'}}
UNSET_AS_EMPTY = {'data': ('path', 'vae'), '': ('eval_reference', 'eval_inception')}
_NULLABLE_MODEL_STRINGS = tuple(
    f.name for f in dataclasses.fields(MDTConfig) if f.type.replace(' ', '') == 'str|None'
)


def upgrade(cfg: Mapping[str, Any]) -> dict:
  """A workdir's or a model folder's config.json (``format`` 'mdt_jax.model') under today's key
  names: the one reader of the names earlier versions wrote."""
  out = copy.deepcopy(dict(cfg))
  model = out.get('model')
  if isinstance(model, dict):
    for k in _NULLABLE_MODEL_STRINGS:
      if model.get(k) == '':
        model[k] = None
  folder = out.get('format') == 'mdt_jax.model'
  for section, names in (FOLDER_RENAMED if folder else RENAMED).items():
    values = out.get(section)
    for old, new in names.items() if isinstance(values, dict) else ():
      if old in values:
        values.setdefault(new, values.pop(old))
  if not folder:
    for section, keys in UNSET_AS_EMPTY.items():
      values = out.get(section) if section else out
      for k in keys if isinstance(values, dict) else ():
        if values.get(k) == '':
          values[k] = None
  return out


def model_of(section: Mapping[str, Any], **overrides) -> MDTConfig:
  """The `MDTConfig` of a config's or a config.json's model section (`overrides` win): the one
  place a model section becomes a typed config."""
  values = dict(section)
  for k in _NULLABLE_MODEL_STRINGS:
    if values.get(k) == '':
      raise ValueError(f"model.{k} is '' (unset is None; config.json files go through upgrade)")
  return MDTConfig.from_dict({**values, **overrides})
