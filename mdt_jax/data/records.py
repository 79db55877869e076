"""The latent dataset record: VAE posterior moments of an image and of its horizontal flip.

One ArrayRecord record per image, msgpack-encoded::

    {'moments': float [h, w, 2C]  (posterior mean ++ log-variance on the channel axis, NHWC),
     'moments_flip': same for the horizontally flipped image,
     'label': int}

and, written with ``tools/extract_latents.py --align_encoder=DIR``, the REPA teacher's patch
tokens of the image and of its flip (float16 [T, D], the teacher's grid row-major)::

    {'align': float16 [T, D], 'align_flip': float16 [T, D]}

Training samples z = (mean + exp(logvar / 2) * eps) * LATENT_SCALE (``mdt_jax.vae.model``) on the
fly, as the original does with the VAE encoder in the loop (see ``mdt_jax.data.pipeline``).
"""

from __future__ import annotations

import numpy as np
from flax import serialization

RECORD_KEYS = ('label', 'moments', 'moments_flip')
ALIGN_KEYS = ('align', 'align_flip')
ALIGN_DTYPE = np.float16  # the stored teacher features


def encode_latent_record(
    moments: np.ndarray,
    moments_flip: np.ndarray,
    label: int,
    align: np.ndarray | None = None,
    align_flip: np.ndarray | None = None,
) -> bytes:
  moments, moments_flip = np.asarray(moments), np.asarray(moments_flip)
  if moments.ndim != 3 or moments.shape[-1] % 2:
    raise ValueError(f'moments must be [h, w, 2C] (mean ++ logvar), got shape {moments.shape}')
  if moments_flip.shape != moments.shape:
    raise ValueError(f'moments_flip shape {moments_flip.shape} != moments shape {moments.shape}')
  if int(label) < 0:
    raise ValueError(f'label must be a non-negative class id, got {label}')
  rec = {'moments': moments, 'moments_flip': moments_flip, 'label': int(label)}
  if (align is None) != (align_flip is None):
    raise ValueError('align and align_flip (the teacher features of the flip) go together')
  if align is not None:
    align, align_flip = np.asarray(align), np.asarray(align_flip)
    if align.ndim != 2 or align_flip.shape != align.shape:
      raise ValueError(
          f'align and align_flip must be [tokens, dim] of one shape, got {align.shape} and '
          f'{align_flip.shape}'
      )
    rec.update(align=align.astype(ALIGN_DTYPE), align_flip=align_flip.astype(ALIGN_DTYPE))
  return serialization.msgpack_serialize(rec)


def decode_latent_record(data: bytes) -> dict:
  try:
    rec = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on corrupt input
    raise ValueError(f'corrupt latent record ({len(data)} bytes): {e}') from e
  keys = tuple(sorted(rec)) if isinstance(rec, dict) else None
  if keys not in (RECORD_KEYS, tuple(sorted(RECORD_KEYS + ALIGN_KEYS))):
    got = list(keys) if keys is not None else type(rec).__name__
    raise ValueError(
        f'latent record must hold keys {list(RECORD_KEYS)} (and optionally '
        f'{list(ALIGN_KEYS)}), got {got}'
    )
  return rec
