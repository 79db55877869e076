"""mdt_jax.vae: the Stable Diffusion VAE (AutoencoderKL) in Flax NNX, and its weight import.

vae = mdt_jax.vae.load(VAE_DIR)          # folder written by tools/convert_vae.py
mean, logvar = vae.encode(images)        # images NHWC in [-1, 1]
z = (mean + exp(logvar / 2) * eps) * vae.scaling_factor      # diffusion-model latents
images = vae.decode(z / vae.scaling_factor)                  # decode takes UNSCALED latents
"""

from mdt_jax.vae.convert import convert, read_diffusers
from mdt_jax.vae import io
from mdt_jax.vae.io import VAE, decode_fn, encode_fn, load, load_model, random_params, save
from mdt_jax.vae.model import AutoencoderKL, VAEConfig

__all__ = [
    'AutoencoderKL',
    'VAE',
    'VAEConfig',
    'convert',
    'decode_fn',
    'encode_fn',
    'io',
    'load',
    'load_model',
    'random_params',
    'read_diffusers',
    'save',
]
