"""The latent dataset record: VAE posterior moments of an image and of its horizontal flip.

One ArrayRecord record per image, msgpack-encoded::

    {'moments': float [h, w, 2C]  (posterior mean ++ log-variance on the channel axis, NHWC),
     'moments_flip': same for the horizontally flipped image,
     'label': int}

Training samples z = (mean + exp(logvar / 2) * eps) * LATENT_SCALE (``mdt_jax.vae.model``) on the
fly, as the original does with the VAE encoder in the loop (see ``mdt_jax.data.pipeline``).
"""

from __future__ import annotations

import numpy as np
from flax import serialization

RECORD_KEYS = ('label', 'moments', 'moments_flip')


def encode_latent_record(moments: np.ndarray, moments_flip: np.ndarray, label: int) -> bytes:
  moments, moments_flip = np.asarray(moments), np.asarray(moments_flip)
  if moments.ndim != 3 or moments.shape[-1] % 2:
    raise ValueError(f'moments must be [h, w, 2C] (mean ++ logvar), got shape {moments.shape}')
  if moments_flip.shape != moments.shape:
    raise ValueError(f'moments_flip shape {moments_flip.shape} != moments shape {moments.shape}')
  if int(label) < 0:
    raise ValueError(f'label must be a non-negative class id, got {label}')
  return serialization.msgpack_serialize(
      {'moments': moments, 'moments_flip': moments_flip, 'label': int(label)}
  )


def decode_latent_record(data: bytes) -> dict:
  try:
    rec = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on corrupt input
    raise ValueError(f'corrupt latent record ({len(data)} bytes): {e}') from e
  if not isinstance(rec, dict) or tuple(sorted(rec)) != RECORD_KEYS:
    got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise ValueError(f'latent record must hold keys {list(RECORD_KEYS)}, got {got}')
  return rec
