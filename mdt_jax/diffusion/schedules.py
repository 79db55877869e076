"""Noise schedules, their derived tables (float64 numpy) and timestep respacing (IDDPM rules)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

SCHEDULES = ('linear',)


def beta_schedule(name: str = 'linear', num_timesteps: int = 1000) -> np.ndarray:
  """Betas in float64. 'linear': Ho et al.'s 1e-4..0.02, stretched by 1000/T for other T."""
  if name not in SCHEDULES:
    raise ValueError(f'unknown beta schedule {name!r}; expected one of {SCHEDULES}')
  if int(num_timesteps) != num_timesteps or num_timesteps < 2:
    raise ValueError(f'num_timesteps must be an integer >= 2, got {num_timesteps!r}')
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, int(num_timesteps), dtype=np.float64)


def diffusion_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """All per-timestep quantities of the Gaussian diffusion, in float64."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must be 1-D with at least 2 entries, got shape {betas.shape}')
  if not np.all((betas > 0) & (betas <= 1)):
    raise ValueError('betas must lie in (0, 1]')
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # The posterior variance is 0 at t=0; its log is clipped by reusing the t=1 value there.
  post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
  return {
      'betas': betas,
      'log_betas': np.log(betas),
      'alphas_cumprod': ac,
      'alphas_cumprod_prev': ac_prev,
      'sqrt_alphas_cumprod': np.sqrt(ac),
      'sqrt_one_minus_alphas_cumprod': np.sqrt(1.0 - ac),
      'sqrt_recip_alphas_cumprod': np.sqrt(1.0 / ac),
      'sqrt_recipm1_alphas_cumprod': np.sqrt(1.0 / ac - 1.0),
      'posterior_variance': post_var,
      'posterior_log_variance_clipped': post_log_var,
      'posterior_mean_coef1': betas * np.sqrt(ac_prev) / (1.0 - ac),
      'posterior_mean_coef2': (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      'snr': ac / (1.0 - ac),
  }


def _parse_counts(section_counts: str | int | Sequence[int]) -> list[int]:
  if isinstance(section_counts, (int, np.integer)):
    return [int(section_counts)]
  if isinstance(section_counts, str):
    parts = [p.strip() for p in section_counts.split(',')]
    try:
      return [int(p) for p in parts]
    except ValueError:
      raise ValueError(
          f'cannot parse step counts {section_counts!r}; expected comma-separated '
          'integers like "250" or "10,15,20", or "ddimN"'
      ) from None
  return [int(c) for c in section_counts]


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """Original timesteps kept when respacing (sorted), by the rules of IDDPM's `space_timesteps`.

  The T steps are cut into len(counts) nearly equal sections (the first T % n one step longer);
  section i keeps counts[i] steps at a fractional stride (size-1)/(count-1), rounded. "ddimN"
  instead takes range(0, T, s) for the first integer stride s giving exactly N steps.
  """
  if isinstance(section_counts, str) and section_counts.strip().startswith('ddim'):
    text = section_counts.strip()[4:]
    try:
      want = int(text)
    except ValueError:
      raise ValueError(
          f'cannot parse {section_counts!r}; expected "ddimN" with an integer N'
      ) from None
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == want:
        return list(range(0, num_timesteps, stride))
    raise ValueError(
        f'cannot respace {num_timesteps} steps to exactly {want} steps with an '
        f'integer stride ({section_counts!r}); pick another count or use "{want}"'
    )
  counts = _parse_counts(section_counts)
  if not counts or any(c < 1 for c in counts):
    raise ValueError(f'step counts must be positive integers, got {section_counts!r}')
  size_per, extra = divmod(num_timesteps, len(counts))
  start, kept = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ValueError(
          f'cannot respace a section of {size} steps into {count} steps '
          f'(step counts {section_counts!r} for {num_timesteps} steps)'
      )
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    # Accumulate the stride the way the original does (round of a running float sum), so the
    # kept steps are the very same set.
    pos = 0.0
    for _ in range(count):
      kept.append(start + round(pos))
      pos += stride
    start += size
  return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(new betas, timestep_map) for a process that keeps only `use_timesteps` of `betas`.

  The new betas reproduce the kept alphas_cumprod exactly: beta_k = 1 - abar[tau_k]/abar[tau_{k-1}].
  """
  ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  steps = np.array(sorted(set(int(s) for s in use_timesteps)), dtype=np.int64)
  if steps.size == 0 or steps[0] < 0 or steps[-1] >= ac.shape[0]:
    raise ValueError(
        f'use_timesteps must be non-empty and within [0, {ac.shape[0]}), got '
        f'{list(use_timesteps)[:8]}...'
    )
  kept = ac[steps]
  prev = np.concatenate([[1.0], kept[:-1]])
  return 1.0 - kept / prev, steps
