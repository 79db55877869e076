"""Samplers of MDTv2: ancestral DDPM, DDIM, DPM-Solver++(2M); Euler, Heun and Euler-Maruyama for
flow models; classifier-free guidance."""

from mdt_jax.sampling.guidance import Guidance, guidance_scale, guided_model
from mdt_jax.sampling.labels import make_labels
from mdt_jax.sampling.config import DDPM_SAMPLERS, FLOW_SAMPLERS, SAMPLERS, SamplerConfig
from mdt_jax.sampling.loops import (
    ddim_loop,
    ddim_step,
    ddpm_loop,
    dpm_solver_loop,
    dpm_solver_plan,
    p_sample_step,
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
    'ddim_loop',
    'ddim_step',
    'ddpm_loop',
    'dpm_solver_loop',
    'dpm_solver_plan',
    'p_sample_step',
]
