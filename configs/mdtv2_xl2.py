"""MDTv2-XL/2 on ImageNet 256 (SD-VAE latents), the official recipe (spec section 5).

  python -m mdt_jax.main --config=configs/mdtv2_xl2.py --workdir=DIR --config.data.path=LATENTS

Global batch 256, Adan (0.98, 0.92, 0.99) lr 3e-4 constant, grad clip 1.0, EMA 0.9999,
mask ratio U[0.3, 0.5), decode_layer 4, class dropout 0.1. The original trains in float32;
bfloat16 compute (float32 master weights) is the fast option: --config.model.dtype=bfloat16.
"""

from mdt_jax.configs_base import base_config, model_config


def get_config():
  c = base_config()
  c.model = model_config('XL/2', decode_layer=4)
  c.optimizer.learning_rate = 3e-4
  return c
