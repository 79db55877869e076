"""The training objective of a config's ``diffusion`` section: 'ddpm' (default) or 'flow'.

One place reads the section for training (``make_process``) and writes what a model folder or
checkpoint records of it (``folder_record``); ``objective_of`` reads either back (a section
without 'objective' is a DDPM one: every folder written before the flow objective existed).
"""

from __future__ import annotations

from typing import Any, Mapping

from mdt_jax.diffusion.flow import FlowMatching
from mdt_jax.diffusion.gaussian import Diffusion, create_diffusion

OBJECTIVES = ('ddpm', 'flow')
FLOW_KEYS = ('t_sampling', 't_logit_mean', 't_logit_scale', 't_shift')


def objective_of(diffusion: Mapping[str, Any] | None) -> str:
  """'ddpm' or 'flow' of a config's or a folder's diffusion section (missing: 'ddpm')."""
  objective = (diffusion or {}).get('objective') or 'ddpm'
  if objective not in OBJECTIVES:
    raise ValueError(f'diffusion.objective must be one of {OBJECTIVES}, got {objective!r}')
  return objective


def flow_matching(diffusion: Mapping[str, Any]) -> FlowMatching:
  """The flow settings of a diffusion section (its num_timesteps is the model's time scale)."""
  defaults = FlowMatching()
  values = {
      k: diffusion.get(k) if diffusion.get(k) is not None else getattr(defaults, k)
      for k in FLOW_KEYS
  }
  return FlowMatching(
      **{k: v if k == 't_sampling' else float(v) for k, v in values.items()},
      time_scale=float(diffusion.get('num_timesteps', 1000)),
  )


def make_process(diffusion: Mapping[str, Any]) -> Diffusion | FlowMatching:
  """The training process: the Gaussian diffusion's tables, or the flow settings."""
  if objective_of(diffusion) == 'flow':
    return flow_matching(diffusion)
  return create_diffusion(num_timesteps=diffusion['num_timesteps'], schedule=diffusion['schedule'])


def folder_record(diffusion: Mapping[str, Any]) -> dict:
  """A model folder's / loaded checkpoint's ``diffusion`` section for a training config's.

  DDPM: {num_timesteps, schedule} (folders of version 1 wrote beta_schedule); flow: the objective, the time
  scale (num_timesteps) and the training-time settings.
  """
  if objective_of(diffusion) == 'ddpm':
    return dict(num_timesteps=int(diffusion['num_timesteps']), schedule=str(diffusion['schedule']))
  fm = flow_matching(diffusion)
  return dict(
      objective='flow',
      num_timesteps=int(diffusion['num_timesteps']),
      **{k: getattr(fm, k) for k in FLOW_KEYS},
  )
