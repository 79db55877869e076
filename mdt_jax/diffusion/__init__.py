"""Gaussian diffusion of MDTv2 (schedules, respacing, q/p distributions, training losses) and the
flow-matching objective."""

from mdt_jax.diffusion.flow import FlowMatching
from mdt_jax.diffusion.gaussian import (
    Diffusion,
    create_diffusion,
    extract,
    from_betas,
    take,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
    split_output,
)
from mdt_jax.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
    training_losses,
    vb_terms_bpd,
)
from mdt_jax.diffusion.objectives import (OBJECTIVES, folder_record, make_process, objective_of)
from mdt_jax.diffusion.schedules import (
    beta_schedule,
    diffusion_tables,
    respace_betas,
    space_timesteps,
)

__all__ = [
    'Diffusion',
    'create_diffusion',
    'from_betas',
    'extract',
    'take',
    'q_sample',
    'q_posterior_mean_variance',
    'p_mean_variance',
    'predict_xstart_from_eps',
    'predict_eps_from_xstart',
    'split_output',
    'training_losses',
    'vb_terms_bpd',
    'min_snr_weight',
    'normal_kl',
    'approx_standard_normal_cdf',
    'discretized_gaussian_log_likelihood',
    'mean_flat',
    'beta_schedule',
    'diffusion_tables',
    'space_timesteps',
    'respace_betas',
    'FlowMatching',
    'OBJECTIVES',
    'folder_record',
    'make_process',
    'objective_of',
]
