"""What the inpainting study is run on and scored by, shared by its run and its report: the
three masks, the held-out digits, the two conditions, the metrics and the example encoding."""

from __future__ import annotations

import base64

import numpy as np

from mdt_jax.data.digits import load_digits_images, select_split
from mdt_jax.images import to_uint8

MASKS = ('lower_half', 'right_half', 'random_tokens')
# 'class': conditioned on the true class (guided as the model recommends); 'none': the null class,
# unguided, so the class must come from the known pixels (the accuracy then measures that).
CONDITIONS = ('class', 'none')
MASK_TITLES = {
    'lower_half': 'lower half unknown',
    'right_half': 'right half unknown',
    'random_tokens': 'random 50% of tokens unknown',
}
METRICS = {'class_accuracy': 'higher', 'fd': 'lower', 'known_mae': 'lower', 'unknown_rmse': 'lower'}
MASK_SEED = 1234


def study_masks(kind: str, n: int, size: int, patch: int) -> np.ndarray:
  """bool [n, size, size], True = known."""
  m = np.ones((n, size, size), bool)
  if kind == 'lower_half':
    m[:, size // 2 :] = False
  elif kind == 'right_half':
    m[:, :, size // 2 :] = False
  elif kind == 'random_tokens':
    g = size // patch
    rng = np.random.default_rng(MASK_SEED)
    order = np.argsort(rng.random((n, g * g)), axis=1)
    tokens = np.ones((n, g * g), bool)
    np.put_along_axis(tokens, order[:, : g * g // 2], False, axis=1)
    m = np.repeat(np.repeat(tokens.reshape(n, g, g), patch, 1), patch, 2)
  else:
    raise ValueError(f'mask must be one of {MASKS}, got {kind!r}')
  return m


def held_out(num_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The held-out digits (images [-1, 1] [N, 16, 16, 1], labels), the first num_images."""
  images, labels = select_split(*load_digits_images(16), 'test')
  return images[:num_images], labels[:num_images]


EXAMPLES = 8


def encode_examples(x: np.ndarray) -> str:
  """Example completions [n, 16, 16, 1] as base64 of their uint8 pixels (compact JSON)."""
  return base64.b64encode(to_uint8(x)[..., 0].tobytes()).decode('ascii')


def decode_examples(text: str) -> np.ndarray:
  """uint8 [n, 16, 16, 3] from encode_examples."""
  g = np.frombuffer(base64.b64decode(text), np.uint8).reshape(-1, 16, 16, 1)
  return np.repeat(g, 3, axis=-1)
