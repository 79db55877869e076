"""Model folders, official checkpoint import/export and ``load_pretrained``."""

from mdt_jax.hub.folder import Pretrained, load_model_folder, save_model_folder
from mdt_jax.hub.pretrained import load, load_pretrained
from mdt_jax.hub.workdir import load_workdir

__all__ = [
    'Pretrained',
    'load',
    'load_model_folder',
    'load_pretrained',
    'load_workdir',
    'save_model_folder',
]
