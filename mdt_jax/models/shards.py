"""Random draws per batch row that do not depend on how the batch is split.

Code that runs on one shard of the batch under ``jax.shard_map`` (the train step's per-chip
gradients, ``mdt_jax/training/strategies.py``) enters ``batch_split``; inside it, ``rows`` draws
the whole batch's rows and keeps this shard's, so every row gets the value it gets when the step
runs on the whole batch at once.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import jax

_SPLIT = threading.local()


@contextlib.contextmanager
def batch_split(axes: Sequence[str], count: int):
  """Within: the batch is split into `count` equal shards over the mesh `axes` (major first)."""
  previous = getattr(_SPLIT, 'value', None)
  _SPLIT.value = (tuple(axes), int(count))
  try:
    yield
  finally:
    _SPLIT.value = previous


def rows(draw: Callable[[int], jax.Array], n: int) -> jax.Array:
  """`draw(m)` gives m rows (leading axis); this shard's `n` of the whole batch's draw."""
  split = getattr(_SPLIT, 'value', None)
  if split is None or split[1] == 1:
    return draw(n)
  axes, count = split
  start = jax.lax.axis_index(axes) * n
  return jax.lax.dynamic_slice_in_dim(draw(n * count), start, n, axis=0)
