"""Token masking of MDT with static shapes.

The original draws one ratio r ~ U[mask_ratio, mask_ratio + 0.2) per forward call, keeps
floor(L * (1 - r)) tokens chosen by argsort of per-sample uniform noise, and so changes the
encoder's sequence length every step. Here the kept tokens live in a buffer of one static size,
``max_kept(L, mask_ratio)`` (the largest count the distribution can draw); slots past the drawn
count are excluded from attention by a key mask and replaced by the mask token afterwards. One
compilation serves the whole run and the result equals the unpadded computation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdt_jax.models import shards

Array = jax.Array


def max_kept(num_tokens: int, mask_ratio: float) -> int:
  """Largest kept count the ratio distribution can produce (at r = mask_ratio)."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
  return max(1, int(math.floor(num_tokens * (1.0 - mask_ratio))))


def buffer_size(num_tokens: int, mask_ratio: float, multiple: int = 1) -> int:
  """Static encoder buffer: max_kept rounded up to `multiple` (fused attention kernels may need
  sequence lengths that are multiples of 8 or 64), at most num_tokens."""
  if multiple < 1:
    raise ValueError(f'buffer multiple must be >= 1, got {multiple}')
  k = max_kept(num_tokens, mask_ratio)
  return min(num_tokens, -(-k // multiple) * multiple)


def draw_mask(
    key: Array, batch: int, num_tokens: int, mask_ratio: float, span: float = 0.2
) -> tuple[Array, Array]:
  """One ratio r ~ U[mask_ratio, mask_ratio + span) for the whole batch, a random order per sample.

  Returns ids_shuffle [B, L] int32 (kept tokens first) and len_keep, a scalar int32.
  """
  k_ratio, k_noise = jax.random.split(key)
  # float64 would match the original's Python float exactly; float32 differs only when
  # L * (1 - r) lands within float32 rounding of an integer, which has probability ~0.
  ratio = mask_ratio + span * jax.random.uniform(k_ratio, (), jnp.float32)
  len_keep = jnp.floor(num_tokens * (1.0 - ratio)).astype(jnp.int32)
  len_keep = jnp.clip(len_keep, 1, max_kept(num_tokens, mask_ratio))
  noise = shards.rows(lambda n: jax.random.uniform(k_noise, (n, num_tokens)), batch)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  return ids_shuffle, len_keep


def restore_order(ids_shuffle: Array) -> Array:
  """ids_restore = argsort(ids_shuffle): position of each original token in shuffled order."""
  return jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)


def check_cudnn_lengths(config) -> None:
  """Refuses an MDTConfig whose cuDNN attention would see an odd sequence length: cuDNN's fused
  attention trains with a bias only on even lengths (JAX checks it when the step is traced; here
  it fails before any work)."""
  lengths = {}
  if config.attention_impl == 'cudnn':
    lengths['tokens'] = config.num_tokens
  if config.masked_impl == 'cudnn' and config.mask_ratio is not None:
    lengths['masked encoder buffer'] = buffer_size(
        config.num_tokens, config.mask_ratio, config.mask_buffer_multiple
    )
  odd = {k: v for k, v in lengths.items() if v % 2}
  if odd:
    raise ValueError(
        f'cuDNN attention needs even sequence lengths (cuDNN trains with a '
        f'relative position bias only then), got {odd}; set '
        'model.mask_buffer_multiple=8 to pad the masked buffer (the padding slots '
        'are masked out: results are unchanged), or '
        'model.masked_attention_impl=xla'
    )
