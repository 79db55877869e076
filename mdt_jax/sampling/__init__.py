"""Samplers of MDTv2: ancestral DDPM, DDIM, DPM-Solver++(2M); Euler, Heun and Euler-Maruyama for
flow models; classifier-free guidance. Each sampler is its `Steps` in one loop (harness.py)."""

from mdt_jax.sampling.guidance import Guidance, guidance_scale, guided_model
from mdt_jax.sampling.harness import Steps, run_steps, sample_loop
from mdt_jax.sampling.labels import make_labels
from mdt_jax.sampling.config import DDPM_SAMPLERS, FLOW_SAMPLERS, SAMPLERS, SamplerConfig
from mdt_jax.sampling.loops import (
    ddim_step,
    ddim_steps,
    ddpm_steps,
    dpm_solver_plan,
    dpm_solver_steps,
    p_sample_step,
    sampler_steps,
)
from mdt_jax.sampling.sampler import Sampler, build_sampler, data_mesh, generate

__all__ = [
    'Guidance',
    'guidance_scale',
    'guided_model',
    'make_labels',
    'Sampler',
    'build_sampler',
    'data_mesh',
    'generate',
    'SAMPLERS',
    'DDPM_SAMPLERS',
    'FLOW_SAMPLERS',
    'SamplerConfig',
    'Steps',
    'ddim_step',
    'ddim_steps',
    'ddpm_steps',
    'dpm_solver_plan',
    'dpm_solver_steps',
    'p_sample_step',
    'run_steps',
    'sample_loop',
    'sampler_steps',
]
