"""Official model sizes as config dicts (names and defaults of the official factory functions)."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import FieldReference

from mdt_jax.models.mdt import MDTConfig

# name -> (depth, hidden_size, num_heads)
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
PATCHES = (2, 4, 8)
# The official factory functions' mask ratio (MDTv2_XL_2(..., mask_ratio=0.3)).
MASK_RATIO = 0.3


def _field_value(value, annotation: str):
  """`value`; for a field that may be None a reference typed as the annotation's first word, so
  that the command line can set it also where a config set it to None."""
  if 'None' not in annotation:
    return value
  return FieldReference(value, field_type={'str': str, 'float': float}[annotation.split()[0]])


def model_config(name: str = 'XL/2', **overrides) -> ml_collections.ConfigDict:
  """`config.model` for e.g. 'XL/2', 'S/4': MDTConfig's defaults (decode_layer=4, ...) with the
  size's depth, width, heads and patch and the official mask ratio."""
  try:
    size, patch = name.split('/')
    depth, hidden, heads = SIZES[size]
    patch = int(patch)
    if patch not in PATCHES:
      raise KeyError(patch)
  except (ValueError, KeyError):
    raise ValueError(
        f'unknown model size {name!r}; expected one of '
        f'{[f"{s}/{p}" for s in SIZES for p in PATCHES]}'
    ) from None
  preset = MDTConfig(
      patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, mask_ratio=MASK_RATIO
  )
  # A ConfigDict types a field by its value: a field that may be None is a typed reference.
  cfg = ml_collections.ConfigDict(
      {f.name: _field_value(getattr(preset, f.name), f.type) for f in dataclasses.fields(preset)}
  )
  for k, v in overrides.items():
    if k not in cfg:
      raise ValueError(f'unknown model config key {k!r}')
    cfg[k] = v
  return cfg
