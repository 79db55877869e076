"""MDTv2-L/2 on ImageNet 256 (SD-VAE latents), the official recipe (spec section 5).

decode_layer 4 and learning rate 3e-4 as the official scripts use them for this size (the
repository's defaults where its scripts are silent: spec section 1.1 and 5).
"""

from mdt_jax.configs_base import base_config, model_config


def get_config():
  c = base_config()
  c.model = model_config('L/2', decode_layer=4)
  c.optimizer.learning_rate = 3e-4
  return c
