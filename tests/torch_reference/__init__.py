"""PyTorch float32 eager reference of MDT inference and the original guided DDPM sampler.

Imports torch (a test / benchmark dependency, not a runtime one of mdt_jax).
"""

from torch_reference.model import TorchMDT, from_official_state
from torch_reference.sampler import forward_with_cfg, sample_ddpm

__all__ = ['TorchMDT', 'from_official_state', 'forward_with_cfg', 'sample_ddpm']
