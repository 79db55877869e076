"""Model folders, official checkpoint import/export and ``load_pretrained``."""

from mdt_jax.hub.folder import Pretrained, load_model_folder, save_model_folder
from mdt_jax.hub.pretrained import load, load_pretrained, sampler_config
from mdt_jax.hub.workdir import load_workdir
from mdt_jax.sampling.config import recommended_sampling

__all__ = [
    'Pretrained',
    'load',
    'load_model_folder',
    'load_pretrained',
    'load_workdir',
    'recommended_sampling',
    'sampler_config',
    'save_model_folder',
]
