"""The official PyTorch state-dict layout of MDT / MDTv2 and conversion to and from this port.

Official key -> our parameter path: ``en_outblocks.3.adaLN_modulation.1.weight`` is
``en_outblocks[3].adaLN_modulation_1.kernel`` transposed; conv weights [D, C, p, p] become
[p, p, C, D]; embeddings keep their layout. The ``relative_position_index`` buffers are not
parameters here: they are recomputed and, on import, checked against the file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from mdt_jax.models.layers import relative_position_index
from mdt_jax.models.mdt import MDT, MDTConfig
from mdt_jax.models.params import abstract_model, key_mismatches
from mdt_jax.progress import Progress

INDEX_SUFFIX = 'attn.rel_pos_bias.relative_position_index'


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # path of the parameter in nnx.state(model, nnx.Param)
  kind: str  # 'linear' (transpose), 'conv' (OIHW <-> HWIO) or 'copy'
  shape: tuple  # official (PyTorch) shape


class CheckpointMismatch(ValueError):
  """An official checkpoint that does not match the expected layout."""


def _official_name(path: tuple) -> str:
  parts = [str(p) for p in path]
  leaf = parts[-1]
  parts[-1] = {'kernel': 'weight', 'embedding': 'weight'}.get(leaf, leaf)
  name = '.'.join(parts)
  name = name.replace('adaLN_modulation_1', 'adaLN_modulation.1')
  return re.sub(r'\bmlp_(\d)\b', r'mlp.\1', name)


def _official_shape(kind: str, shape: tuple) -> tuple:
  if kind == 'linear':
    return (shape[1], shape[0])
  if kind == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def layout(config: MDTConfig | dict) -> dict[str, Entry]:
  """Official parameter keys of a model of this config (no weights are allocated)."""
  return dict(_layout(MDTConfig.of(config)))


# An XL/2's abstract init takes seconds of Python; an import asks for the layout several times
# (keys, index buffers, config inference, checks).
@functools.lru_cache(maxsize=8)
def _layout(config: MDTConfig) -> dict[str, Entry]:
  if config.qk_norm is not None:
    raise ValueError(
        f'model.qk_norm={config.qk_norm!r}: the official checkpoint layout has no QK-norm '
        'parameters (the official models are trained without it); import or export such a '
        'model with qk_norm off, or keep it as a model folder'
    )
  abstract = abstract_model(config)
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  out = {}
  for path, var in flat:
    if path[0] == 'projector':  # a training-time head (representation alignment), not exported
      continue
    shape = tuple(var.shape)
    if path[-1] == 'kernel':
      kind = 'conv' if len(shape) == 4 else 'linear'
    else:
      kind = 'copy'
    out[_official_name(path)] = Entry(tuple(path), kind, _official_shape(kind, shape))
  return out


def index_buffers(config: MDTConfig | dict) -> list[str]:
  """Names of the relative_position_index buffers the official state dict also holds."""
  keys = layout(config)
  prefixes = sorted(
      {
          k[: -len('attn.rel_pos_bias.relative_position_bias_table')]
          for k in keys
          if k.endswith('relative_position_bias_table')
      }
  )
  return [p + INDEX_SUFFIX for p in prefixes]


def infer_config(state: Mapping[str, Any], **overrides) -> MDTConfig:
  """Hyperparameters from the key names and shapes of an official state dict.

  What the keys cannot tell (``class_dropout_prob`` beyond "has a null row", ``mask_ratio``,
  v1's ``decode_layer``) takes the released checkpoints' values unless overridden.
  """

  def shape(k):
    if k not in state:
      raise CheckpointMismatch(f'not an MDT state dict: key {k!r} is missing')
    return tuple(state[k].shape)

  d, c, p, _ = shape('x_embedder.proj.weight')
  n_tokens = shape('pos_embed')[1]
  grid = int(round(math.sqrt(n_tokens)))
  if grid * grid != n_tokens:
    raise CheckpointMismatch(f'pos_embed has {n_tokens} tokens, not a square grid')
  tables = [k for k in state if k.endswith('relative_position_bias_table')]
  if not tables:
    raise CheckpointMismatch('no relative_position_bias_table keys: not an MDT checkpoint')
  heads = tuple(state[tables[0]].shape)[1]
  count = lambda prefix: len({k.split('.')[1] for k in state if k.startswith(prefix + '.')})
  if any(k.startswith('blocks.') for k in state):
    arch, depth = 'mdt_v1', count('blocks')
    decode_layer = 2
  else:
    arch = 'mdtv2'
    half, n_out, decode_layer = count('en_inblocks'), count('en_outblocks'), count('de_blocks')
    if half != n_out:
      raise CheckpointMismatch(f'{half} en_inblocks but {n_out} en_outblocks')
    depth = 2 * half + decode_layer
  hidden_mlp = shape('sideblocks.0.mlp.fc1.weight')[0]
  rows = shape('y_embedder.embedding_table.weight')[0]
  out_ch = shape('final_layer.linear.weight')[0] // (p * p)
  cfg = dict(
      arch=arch,
      input_size=grid * p,
      patch_size=p,
      in_channels=c,
      hidden_size=d,
      depth=depth,
      num_heads=heads,
      mlp_ratio=hidden_mlp / d,
      decode_layer=decode_layer,
      num_classes=rows - 1,
      class_dropout_prob=0.1,
      learn_sigma=out_ch == 2 * c,
      mask_ratio=0.3,
      mask_ratio_span=0.2 if arch == 'mdtv2' else 0.0,
  )
  cfg.update(overrides)
  if not cfg['class_dropout_prob'] > 0:
    cfg['num_classes'] = rows
  return MDTConfig.from_dict(cfg)


def check_state(state: Mapping[str, Any], config: MDTConfig | dict) -> dict[str, Entry]:
  """Raise CheckpointMismatch naming missing, unexpected and mismatched keys; return the layout."""
  keys = layout(config)
  buffers = set(index_buffers(config))
  want_index = relative_position_index(MDTConfig.of(config).grid)
  lines = key_mismatches(
      {k: tuple(v.shape) for k, v in state.items()},
      {k: e.shape for k, e in keys.items()},
      allowed_extra=buffers,
      more_mismatched=[
          f'{b}: index buffer differs from the recomputed BEiT index'
          for b in sorted(buffers & set(state))
          if not np.array_equal(np.asarray(state[b]), want_index)
      ],
  )
  if lines:
    raise CheckpointMismatch('checkpoint does not match the model layout:\n  ' + '\n  '.join(lines))
  return keys


def to_flax_params(
    state: Mapping[str, Any], config: MDTConfig | dict, progress: bool = False
) -> nnx.State:
  """Official state dict (numpy or torch tensors) -> nnx.State of float32 parameters.

  ``progress``: show the conversion's progress in parameters (on stderr).
  """
  keys = check_state(state, config)
  total = sum(math.prod(e.shape) for e in keys.values())
  flat = []
  with Progress(total, 'converting', unit='parameters', enabled=progress) as bar:
    for name, e in keys.items():
      w = np.asarray(state[name], dtype=np.float32)
      if e.kind == 'linear':
        w = w.T
      elif e.kind == 'conv':
        w = w.transpose(2, 3, 1, 0)
      flat.append((e.path, nnx.Param(np.ascontiguousarray(w))))
      bar.update(w.size)
  return nnx.from_flat_state(flat)


def from_flax_params(
    params: nnx.State, config: MDTConfig | dict, with_buffers: bool = True
) -> dict[str, np.ndarray]:
  """nnx.State of parameters -> official state dict of numpy arrays (float32, index int64)."""
  by_path = {
      tuple(p): np.asarray(v.get_value() if hasattr(v, 'get_value') else v)
      for p, v in nnx.to_flat_state(params)
  }
  out = {}
  for name, e in layout(config).items():
    w = by_path[e.path].astype(np.float32)
    if e.kind == 'linear':
      w = w.T
    elif e.kind == 'conv':
      w = w.transpose(3, 2, 0, 1)
    out[name] = np.ascontiguousarray(w)
  if with_buffers:
    index = relative_position_index(MDTConfig.of(config).grid).astype(np.int64)
    for b in index_buffers(config):
      out[b] = index.copy()
  return out


def model_from_state(state: Mapping[str, Any], config: MDTConfig | dict | None = None) -> MDT:
  """Build a ready MDT from an official state dict."""
  config = infer_config(state) if config is None else config
  params = to_flax_params(state, config)
  model = abstract_model(config)
  nnx.update(model, jax.tree.map(lambda x: jax.numpy.asarray(x), params))
  return model


def constructor_call(config: MDTConfig) -> str:
  """The original code's constructor call for this config, e.g. ``MDTv2(input_size=32, ...)``."""
  cls = 'MDTv2' if config.arch == 'mdtv2' else 'MDT'
  args = dict(
      input_size=config.input_size,
      patch_size=config.patch_size,
      in_channels=config.in_channels,
      hidden_size=config.hidden_size,
      depth=config.depth,
      num_heads=config.num_heads,
      mlp_ratio=config.mlp_ratio,
      num_classes=config.num_classes,
      learn_sigma=config.learn_sigma,
      decode_layer=config.decode_layer,
  )
  return f'{cls}(' + ', '.join(f'{k}={v!r}' for k, v in args.items()) + ')'
