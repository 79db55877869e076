"""One training run, checked once and typed once: ``validate(config) -> RunConfig``.

A config (``mdt_jax.configs_base`` and ``configs/*.py``) is plain data. ``validate`` refuses
unknown keys and impossible values before any work starts and returns the frozen record every
part of training reads: the model config, the diffusion settings and the process built from
them, the sampler of the run's grids and evaluations, the optimizer, data, mesh, loop and
evaluation settings, and the plain config itself (what the workdir's config.json holds).
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Mapping

import ml_collections

from mdt_jax.diffusion import Diffusion, FlowMatching, make_process, objective_of
from mdt_jax.configs_base import base_config, model_of
from mdt_jax.data.pipeline import align_features, element_spec, manifest_classes
from mdt_jax.data.spec import DataSpec
from mdt_jax.models import dinov2
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.sampling.config import SamplerConfig, make_sampler_config
from mdt_jax.training.align import AlignConfig, config_of

EVAL_NUM_SAMPLES_MIN = 2  # a Frechet distance needs 2 images
# the digits classifier's input size, and the dataset's own 8x8 (upsampled to it)
DIGITS_EVAL_SIZES = (16, 8)
METRIC_WRITERS = ('events', 'clu')  # config.metric_writer (mdt_jax/training/logdir.py)


def _section(cls, values: Mapping[str, Any]):
  """A record of `cls` from a config section (its keys were checked against base_config)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in names})


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """``config.diffusion``: the objective and its process (see configs_base.base_config)."""

  num_timesteps: int = 1000
  schedule: str = 'linear'
  min_snr_gamma: float | None = 5.0
  objective: str = 'ddpm'
  t_sampling: str = 'uniform'
  t_logit_mean: float = 0.0
  t_logit_scale: float = 1.0
  t_shift: float = 1.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """``config.optimizer`` (mdt_jax/training/state.py: make_optimizer)."""

  name: str = 'adan'
  learning_rate: float = 3e-4
  b1: float = 0.98
  b2: float = 0.92
  b3: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """``config.mesh`` (axis sizes, one may be -1) and ``config.sharding_rules``."""

  shape: Mapping[str, int]
  rules: tuple[tuple[str, str | None], ...]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The training loop's schedule: steps, batch, EMA, checkpoints, logs, grids, profile."""

  seed: int
  global_batch_size: int
  total_steps: int
  mask_branch: bool
  ema_decay: float
  checkpoint_every_steps: int
  keep_checkpoints: int
  async_checkpointing: bool
  log_every_steps: int
  sample_every_steps: int
  profile_steps: int
  metric_writer: str  # METRIC_WRITERS


@dataclasses.dataclass(frozen=True)
class GridSettings:
  """The sample grids of a run: classes, images per class, noise seed (``config.sampling``)."""

  classes: int
  per_class: int
  seed: int


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Evaluation of the EMA weights during training (mdt_jax/training/evaluation.py)."""

  num_samples: int = 0
  every_steps: int = 0
  reference: str | None = None
  inception: str | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A checked training run (see the module doc); made by `validate`, read by every part."""

  model: MDTConfig
  diffusion: DiffusionSettings
  process: Diffusion | FlowMatching
  # the sampler of grids and evaluations; None when the run samples nothing
  sampler: SamplerConfig | None
  sampling: Mapping[str, Any]  # the recommended sampler settings (config.sampling) as given
  optimizer: OptimizerSettings
  data: DataSpec
  mesh: MeshSettings
  loop: LoopSettings
  grid: GridSettings
  evaluation: EvalSettings
  config_json: str  # the plain config, as the workdir's config.json holds it
  # representation alignment (mdt_jax/training/align.py); with it on, `model` has the projector
  align: AlignConfig = AlignConfig()

  def config(self) -> ml_collections.ConfigDict:
    """A fresh (mutable) copy of the plain config."""
    return ml_collections.ConfigDict(json.loads(self.config_json))

  @property
  def objective(self) -> str:
    return self.diffusion.objective

  @property
  def samples_anything(self) -> bool:
    return bool(self.loop.sample_every_steps or self.evaluation.num_samples)


def _unknown_keys(cfg, ref, prefix='') -> list[str]:
  out = []
  for k in cfg.keys():
    if k not in ref:
      out.append(prefix + k)
    elif isinstance(ref[k], ml_collections.ConfigDict) and k != 'model':
      out += _unknown_keys(cfg[k], ref[k], prefix + k + '.')
  return out


def training_sampler(
    sampling: Mapping[str, Any],
    model: MDTConfig,
    diffusion: DiffusionSettings | Mapping[str, Any],
) -> SamplerConfig:
  """The `SamplerConfig` of a training config's `sampling` section, for its model and its
  `diffusion` section's objective (the one route from a training config to a sampler)."""
  if isinstance(diffusion, DiffusionSettings):
    diffusion = diffusion.as_dict()
  return make_sampler_config(
      dict(sampling),
      model.in_channels,
      int(diffusion['num_timesteps']),
      objective=objective_of(diffusion),
  )


def validate(config: ml_collections.ConfigDict, *, check_data: bool = True) -> RunConfig:
  """Refuse unknown keys and impossible values before any work starts; return the run.

  ``check_data=False`` leaves out whether the data fits the model (its shape, its classes): for
  tools that build a step or a sampler of a config on synthetic inputs."""
  unknown = _unknown_keys(config, base_config())
  if unknown:
    raise ValueError(
        f'unknown config keys {unknown}; see mdt_jax/configs_base.py for the '
        'fields a config may set'
    )
  model = model_of(config.model.to_dict())
  for k in ('total_steps', 'global_batch_size', 'checkpoint_every_steps', 'log_every_steps'):
    if int(config[k]) <= 0:
      raise ValueError(f'{k} must be positive, got {config[k]}')
  if config.metric_writer not in METRIC_WRITERS:
    raise ValueError(f'metric_writer must be one of {METRIC_WRITERS}, got {config.metric_writer!r}')
  if config.mask_branch and model.mask_ratio is None:
    raise ValueError('mask_branch=True needs model.mask_ratio (the official value is 0.3)')
  diffusion = _section(DiffusionSettings, config.diffusion.to_dict())
  process = _check_objective(diffusion, model)
  align = config_of(config.get('align'))
  sampling = config.sampling.to_dict()
  sampler = None
  if (
      diffusion.objective == 'flow'
      or config.sample_every_steps
      or config.eval_num_samples
      or config.eval_every_steps
  ):
    sampler = training_sampler(sampling, model, diffusion)  # raises for one that does not fit
  data = DataSpec.from_config(config.data.to_dict())
  evaluation = EvalSettings(
      num_samples=int(config.eval_num_samples),
      every_steps=int(config.eval_every_steps),
      reference=config.eval_reference or None,
      inception=config.eval_inception or None,
  )
  check_evaluation(evaluation, data)
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}')
  model = _check_align(align, model, data, config.mask_branch)
  if check_data:
    _check_align_data(align, model, data)
    _check_data(data, model)
  return RunConfig(
      model=model,
      diffusion=diffusion,
      process=process,
      sampler=sampler,
      sampling=types.MappingProxyType(sampling),
      optimizer=_section(OptimizerSettings, config.optimizer.to_dict()),
      data=data,
      mesh=MeshSettings(
          shape=types.MappingProxyType(config.mesh.to_dict()),
          rules=tuple((str(k), None if v is None else str(v)) for k, v in config.sharding_rules),
      ),
      loop=LoopSettings(**{f.name: config[f.name] for f in dataclasses.fields(LoopSettings)}),
      grid=GridSettings(
          classes=int(sampling['grid_classes']),
          per_class=int(sampling['grid_per_class']),
          seed=int(sampling['seed']),
      ),
      evaluation=evaluation,
      config_json=config.to_json_best_effort(indent=2),
      align=align,
  )


def as_run(config: RunConfig | ml_collections.ConfigDict, check_data: bool = False) -> RunConfig:
  """The run itself, or the run of a config (`validate`; by default without the data check: for
  the tools that build a step or a sampler on synthetic inputs)."""
  return config if isinstance(config, RunConfig) else validate(config, check_data=check_data)


def _check_objective(diffusion: DiffusionSettings, model: MDTConfig) -> Diffusion | FlowMatching:
  """The diffusion section fits the model; returns its process."""
  if objective_of(diffusion.as_dict()) == 'flow':
    if model.learn_sigma:
      raise ValueError(
          "diffusion.objective='flow' trains a velocity of the input's channels: "
          'set model.learn_sigma=False (a learned variance has no meaning there)'
      )
    if diffusion.min_snr_gamma is not None:
      raise ValueError(
          f'diffusion.min_snr_gamma={diffusion.min_snr_gamma} weights the '
          "DDPM objective's eps MSE; the flow objective trains the unweighted "
          'velocity MSE and shapes its time density with diffusion.t_sampling: set '
          'diffusion.min_snr_gamma=None'
      )
  return make_process(diffusion.as_dict())  # raises for bad flow settings


def check_evaluation(evaluation: EvalSettings, data: DataSpec) -> None:
  """Values of the evaluation settings (files are checked by `evaluation.Evaluator`)."""
  every, n = evaluation.every_steps, evaluation.num_samples
  if every < 0 or n < 0:
    raise ValueError(f'eval_every_steps and eval_num_samples must be >= 0, got {every}, {n}')
  if every and not n:
    raise ValueError(f'eval_every_steps={every} needs eval_num_samples > 0')
  if n and n < EVAL_NUM_SAMPLES_MIN:
    raise ValueError('eval_num_samples must be >= 2 (a Frechet distance needs 2 images)')
  if n and data.name == 'digits' and data.image_size not in DIGITS_EVAL_SIZES:
    raise ValueError(
        'the digits evaluation (eval_num_samples > 0) scores 16x16 images with the '
        "digits classifier (8x8 ones, the dataset's own, upsampled as the dataset does); "
        f'data.image_size is {data.image_size}'
    )
  if n and data.name != 'digits' and not evaluation.reference:
    raise ValueError(
        'eval_num_samples > 0 on a latent run needs eval_reference: reference '
        'statistics (python -m mdt_jax.evaluate --save_stats) or an ADM batch'
    )


def _check_align(align: AlignConfig, model: MDTConfig, data: DataSpec, mask_branch: bool):
  """config.align refused when it cannot train; the model with its projector."""
  align.check(model, mask_branch=mask_branch)
  return align.model_config(model)


def _check_align_data(align: AlignConfig, model: MDTConfig, data: DataSpec) -> None:
  """REPA on latents reads its teacher's features from the records: they must be there, of the
  teacher's width, on a grid the student's can be pooled from."""
  if align.method != 'repa' or data.pixels:
    return
  stored = align_features(data.path) if data.path else None
  if stored is None:
    raise ValueError(
        f'align.method=repa on latents needs the teacher features stored beside them; '
        f'{data.path or "data.path (unset)"} holds latents only: extract them with '
        'tools/extract_latents.py '
        '--align_encoder=DIR (the same DINOv2 folder as align.teacher)'
    )
  tokens, dim = stored
  width = dinov2.read_config(align.teacher).hidden_size
  if dim != width:
    raise ValueError(
        f'the teacher features in {data.path} are {dim} wide, the align.teacher '
        f'{align.teacher} is {width} wide: extract with the same DINOv2 folder'
    )
  grid = int(round(tokens**0.5))
  if grid * grid != tokens or grid % model.grid:
    raise ValueError(
        f'the {tokens} stored teacher tokens of {data.path} cannot be pooled onto the '
        f"student's {model.grid}x{model.grid} tokens (a square grid, a multiple of it, is needed)"
    )


def _check_data(data: DataSpec, model: MDTConfig) -> None:
  size, channels = element_spec(data)
  if (model.input_size, model.in_channels) != (size, channels):
    raise ValueError(
        f'data {data.name!r} gives {size}x{size}x{channels} inputs but '
        f'model expects input_size={model.input_size}, '
        f'in_channels={model.in_channels}'
    )
  classes = manifest_classes(data.path) if data.path else None
  if classes is not None and classes > model.num_classes:
    raise ValueError(
        f'the latents at {data.path} hold {classes} classes (manifest.json) '
        f'but model.num_classes={model.num_classes}'
    )


def stored_features(run: RunConfig) -> bool:
  """Whether REPA's teacher features come with the batches (stored beside latents by
  tools/extract_latents.py --align_encoder) rather than from the teacher run on the images."""
  return run.align.method == 'repa' and not run.data.pixels
