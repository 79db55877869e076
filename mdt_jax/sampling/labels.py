"""Class labels of a sampling run: uniform random, class-balanced, or given."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

MODES = ('uniform', 'balanced')


def check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f'labels must be a 1-D list of integer class ids, got {labels.dtype} '
        f'shape {labels.shape}'
    )
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(
        f'class ids must be in [0, {num_classes}), got {sorted(set(bad.tolist()))[:10]}'
    )
  return labels.astype(np.int32)


def make_labels(
    spec: str | Sequence[int] | np.ndarray, num_samples: int, num_classes: int, seed: int = 0
) -> np.ndarray:
  """int32 [num_samples] labels.

  'uniform': label i = randint(fold_in(label_key(seed), i)) in [0, num_classes) (the original's
    FID protocol draws classes uniformly at random); a prefix of a run does not depend on its
    length. 'balanced': i % num_classes. A sequence of ids is repeated cyclically to the length.
  """
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if isinstance(spec, str):
    if spec == 'uniform':
      return _uniform(label_key(seed), num_samples, num_classes)
    if spec == 'balanced':
      return (np.arange(num_samples) % num_classes).astype(np.int32)
    raise ValueError(f'labels must be one of {MODES} or a list of class ids, got {spec!r}')
  given = check_labels(
      np.asarray(list(spec) if not isinstance(spec, np.ndarray) else spec), num_classes
  )
  if given.size == 0:
    raise ValueError('the given label list is empty')
  return np.resize(given, num_samples).astype(np.int32)


_CHUNK = 4096


@functools.partial(jax.jit, static_argnums=2)
def _uniform_chunk(key: jax.Array, indices: jax.Array, num_classes: int) -> jax.Array:
  draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)
  return jax.vmap(draw)(indices)


def _uniform(key: jax.Array, num_samples: int, num_classes: int) -> np.ndarray:
  # Fixed-size chunks: one compilation whatever the run length.
  out = [
      np.asarray(_uniform_chunk(key, np.arange(lo, lo + _CHUNK), num_classes))
      for lo in range(0, num_samples, _CHUNK)
  ]
  return np.concatenate(out)[:num_samples].astype(np.int32)


def parse_labels(text: str) -> str | list[int]:
  """'uniform', 'balanced' or '3,7,7' -> mode name or list of ids."""
  text = text.strip()
  if text in MODES:
    return text
  try:
    return [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise ValueError(
        f'labels must be one of {MODES} or comma-separated class ids, got {text!r}'
    ) from None


def noise_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), 0)


def label_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), 1)
