"""The sampler settings: `SamplerConfig` (which sampler, its steps and guidance, checked when
made), and the recommended settings of a model folder's or training config's `sampling` section
that make one."""

from __future__ import annotations

import dataclasses
import math

from mdt_jax.diffusion import Diffusion, create_diffusion, schedules
from mdt_jax.diffusion.objectives import OBJECTIVES
from mdt_jax.sampling.flow_loops import FLOW_SAMPLERS, SDE_DIFFUSIONS
from mdt_jax.sampling.guidance import Guidance

DDPM_SAMPLERS = ('ddpm', 'ddim', 'dpm_solver++')
SAMPLERS = DDPM_SAMPLERS + FLOW_SAMPLERS
SAMPLERS_OF = {'ddpm': DDPM_SAMPLERS, 'flow': FLOW_SAMPLERS}
# Fields that only one family of samplers reads (left out of a run's record for the other).
DDPM_FIELDS = ('respacing', 'eta', 'clip_denoised')
FLOW_FIELDS = ('objective', 'time_shift', 'sde_diffusion', 'sde_diffusion_norm', 'sde_last_step')


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Which sampler, how many steps and how it is guided.

  steps: number of model evaluations. DDPM/DDIM respace the T training steps with
    `space_timesteps(T, respacing or str(steps))` ("250", "10,15,20", "ddim50"); heun takes an
    even number (2 per step).
  cfg_scale: None samples without guidance (one forward pass per step); any number, 1.0
    included, runs the batched conditional + null pass with the scale schedule below.
  objective: the model's training objective ('ddpm' or 'flow'); only its samplers are accepted.
  time_shift, sde_*: flow samplers only (see flow_loops.py). The guidance schedule and
    interval of a flow model are read in its model time, t * num_train_timesteps.
  """

  sampler: str = 'ddpm'
  steps: int = 250
  respacing: str | None = None
  eta: float = 0.0
  clip_denoised: bool = False
  cfg_scale: float | None = None
  guidance_schedule: str = 'power_cosine'
  scale_pow: float = 4.0
  guidance_interval: tuple[int, int] | None = None
  guidance_channels: str = 'first3'
  num_train_timesteps: int = 1000
  objective: str = 'ddpm'
  time_shift: float = 1.0
  sde_diffusion: str = 'sigma'
  sde_diffusion_norm: float = 1.0
  sde_last_step: float = 0.04

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f'objective must be one of {OBJECTIVES}, got {self.objective!r}')
    if self.sampler not in SAMPLERS:
      raise ValueError(
          f'unknown sampler {self.sampler!r}; expected one of '
          f'{SAMPLERS_OF[self.objective]} for a {self.objective} model'
      )
    fit = SAMPLERS_OF[self.objective]
    if self.sampler not in fit:
      other = 'flow' if self.objective == 'ddpm' else 'ddpm'
      raise ValueError(
          f'sampler {self.sampler!r} is for {other}-objective models, but this model '
          f'was trained with the {self.objective!r} objective; samplers that fit: '
          f'{", ".join(fit)}'
      )
    if isinstance(self.steps, bool) or int(self.steps) != self.steps or not 1 <= self.steps:
      raise ValueError(f'steps must be a positive integer, got {self.steps!r}')
    if self.objective == 'flow':
      self._check_flow()
    else:
      self._check_ddpm()
    self.guidance  # validates the guidance fields

  def _check_ddpm(self):
    defaults = SamplerConfig.__dataclass_fields__
    for name in FLOW_FIELDS[1:]:
      if getattr(self, name) != defaults[name].default:
        raise ValueError(
            f'{name} is a flow-sampler setting; got {name}={getattr(self, name)!r} '
            f'with the DDPM sampler {self.sampler!r}'
        )
    t = self.num_train_timesteps
    if self.sampler == 'dpm_solver++':
      if self.respacing:
        raise ValueError(
            'dpm_solver++ picks its own timesteps; respacing must be empty, got '
            f'{self.respacing!r}'
        )
      if self.steps > t - 1:
        raise ValueError(f'dpm_solver++ needs steps <= {t - 1}, got {self.steps}')
    else:
      kept = schedules.space_timesteps(t, self.respacing or str(self.steps))  # raises if bad
      if len(kept) < 2:
        raise ValueError(
            f'{self.sampler} needs at least 2 steps, got {len(kept)} from '
            f'{self.respacing or self.steps!r}'
        )
    if self.sampler == 'ddim' and not 0.0 <= self.eta:
      raise ValueError(f'eta must be >= 0, got {self.eta}')
    if self.sampler != 'ddim' and self.eta != 0.0:
      raise ValueError(f'eta is a DDIM setting; got eta={self.eta} with sampler {self.sampler!r}')

  def _check_flow(self):
    for name, default in (('respacing', None), ('eta', 0.0), ('clip_denoised', False)):
      if getattr(self, name) not in (default, ''):
        raise ValueError(
            f'{name} is a DDPM-sampler setting; got {name}={getattr(self, name)!r} '
            f'with the flow sampler {self.sampler!r}'
        )
    if self.sampler == 'heun' and self.steps % 2:
      raise ValueError(
          f'heun evaluates the model twice per step: steps must be even, got {self.steps}'
      )
    if self.sampler == 'euler_maruyama' and self.steps < 2:
      raise ValueError(
          f'euler_maruyama needs steps >= 2 (SDE steps and the last step), got {self.steps}'
      )
    if not (math.isfinite(self.time_shift) and self.time_shift > 0):
      raise ValueError(f'time_shift must be > 0 (1: no shift), got {self.time_shift}')
    if self.sde_diffusion not in SDE_DIFFUSIONS:
      raise ValueError(f'sde_diffusion must be one of {SDE_DIFFUSIONS}, got {self.sde_diffusion!r}')
    if not (math.isfinite(self.sde_diffusion_norm) and self.sde_diffusion_norm >= 0):
      raise ValueError(f'sde_diffusion_norm must be >= 0, got {self.sde_diffusion_norm}')
    if not 0.0 < self.sde_last_step < 1.0:
      raise ValueError(f'sde_last_step must be in (0, 1), got {self.sde_last_step}')

  def record(self) -> dict:
    """The settings a run depends on (the other family's fields left out), as JSON values."""
    skip = FLOW_FIELDS if self.objective == 'ddpm' else DDPM_FIELDS
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

  @property
  def guidance(self) -> Guidance | None:
    if self.cfg_scale is None:
      return None
    return Guidance(
        scale=float(self.cfg_scale),
        schedule=self.guidance_schedule,
        scale_pow=self.scale_pow,
        interval=self.guidance_interval,
        channels=self.guidance_channels,
        num_train_timesteps=self.num_train_timesteps,
    )

  def diffusion(self) -> Diffusion:
    """The respaced process of DDPM / DDIM."""
    return create_diffusion(
        self.respacing or str(self.steps), num_timesteps=self.num_train_timesteps
    )


def recommended_sampling(sampling: dict, in_channels: int) -> dict:
  """A folder's or training config's `sampling` settings in the form every loader reads.

  guidance_channels becomes 'first3' or 'all' (with 3 or fewer channels both guide every channel,
  so any value means 'all'); scale_pow <= 0 makes the power-cosine weight 1 at every step, i.e.
  constant guidance, and becomes guidance_schedule='constant'.
  """
  keys = (
      'sampler',
      'steps',
      'respacing',
      'eta',
      'cfg_scale',
      'scale_pow',
      'guidance_schedule',
      'guidance_channels',
      'time_shift',
      'sde_diffusion',
      'sde_diffusion_norm',
      'sde_last_step',
  )
  out = {k: sampling[k] for k in keys if sampling.get(k) is not None}
  ch = out.get('guidance_channels', sampling.get('guided_channels'))  # an older key
  if ch is not None:
    if in_channels <= 3 or ch in ('all', in_channels):
      out['guidance_channels'] = 'all'
    elif ch in ('first3', 3):
      out['guidance_channels'] = 'first3'
    else:
      raise ValueError(
          f'sampling.guidance_channels {ch!r} is not 3, "first3", "all" or '
          f"{in_channels} (the model's channels)"
      )
  if out.get('scale_pow') is not None and out['scale_pow'] <= 0:
    del out['scale_pow']
    out['guidance_schedule'] = 'constant'
  return out


def make_sampler_config(
    sampling: dict, in_channels: int, num_timesteps: int, objective: str = 'ddpm', **overrides
) -> SamplerConfig:
  """The `SamplerConfig` of a model's recommended `sampling` settings (a model folder's, a
  training config's: see recommended_sampling) and overrides (its fields), for a model of
  `in_channels` channels, `num_timesteps` training steps and the given objective. Every part of
  the package (training grids, the Hub loader, the command lines, export) makes its sampler here."""
  values = recommended_sampling(sampling, in_channels)
  values['num_train_timesteps'] = num_timesteps
  values['objective'] = objective
  values.update(overrides)
  return SamplerConfig(**values)
