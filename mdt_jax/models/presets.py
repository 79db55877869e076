"""Official model sizes as config dicts (names and defaults of the official factory functions)."""
from __future__ import annotations

import ml_collections

# name -> (depth, hidden_size, num_heads)
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
PATCHES = (2, 4, 8)


def model_config(name: str = 'XL/2', **overrides) -> ml_collections.ConfigDict:
  """`config.model` for e.g. 'XL/2', 'S/4'. Defaults as MDTv2_XL_2(decode_layer=4, mask_ratio=0.3)."""
  try:
    size, patch = name.split('/')
    depth, hidden, heads = SIZES[size]
    patch = int(patch)
    if patch not in PATCHES:
      raise KeyError(patch)
  except (ValueError, KeyError):
    raise ValueError(f'unknown model size {name!r}; expected one of '
                     f'{[f"{s}/{p}" for s in SIZES for p in PATCHES]}') from None
  cfg = ml_collections.ConfigDict(dict(
      arch='mdtv2', input_size=32, patch_size=patch, in_channels=4, hidden_size=hidden,
      depth=depth, num_heads=heads, mlp_ratio=4.0, decode_layer=4, num_classes=1000,
      class_dropout_prob=0.1, learn_sigma=True, mask_ratio=0.3, mask_ratio_span=0.2,
      dtype='float32', remat=False, remat_policy='nothing_saveable', attention_impl='',
      masked_attention_impl='same', mask_buffer_multiple=1, residual_dtype='float32',
      rel_pos_bias_impl=''))
  for k, v in overrides.items():
    if k not in cfg:
      raise ValueError(f'unknown model config key {k!r}')
    cfg[k] = v
  return cfg
