"""MDTv2 / MDT v1 in Flax NNX."""

import flax

# Parameters carry logical axis names only; the training code places them on the mesh (jit
# out_shardings from the rules), so variables are never sharded eagerly at construction.
flax.config.update('flax_always_shard_variable', False)

from mdt_jax.models.mdt import MDT, MDTConfig, MDTv2  # noqa: E402 (after the flag)
from mdt_jax.models.params import count_params  # noqa: E402
from mdt_jax.models.presets import model_config  # noqa: E402

__all__ = ['MDT', 'MDTv2', 'MDTConfig', 'count_params', 'model_config']
