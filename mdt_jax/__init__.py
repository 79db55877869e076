"""mdt_jax: MDTv2 (Masked Diffusion Transformer v2) in JAX / Flax NNX."""

from mdt_jax.models import MDT, MDTConfig, MDTv2, count_params, model_config

__version__ = '0.1.0'


def load_pretrained(path_or_repo_id: str, **kwargs):
  """Model from a model folder, a training workdir or a Hub repo id (see mdt_jax.hub)."""
  # imported here: `import mdt_jax` stays light (loading pulls in orbax and the training stack)
  from mdt_jax.hub.pretrained import load_pretrained as _load

  return _load(path_or_repo_id, **kwargs)


__all__ = ['MDT', 'MDTv2', 'MDTConfig', 'count_params', 'model_config', 'load_pretrained']
