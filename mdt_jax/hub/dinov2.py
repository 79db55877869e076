"""Import a Hugging Face transformers DINOv2 folder (``Dinov2Model`` or
``Dinov2WithRegistersModel``: config.json + model.safetensors) as a DINOv2 folder; no torch or
transformers needed (the safetensors are read with numpy).

Conv weights [D, C, p, p] become [p, p, C, D], linear weights [O, I] become [I, O], LayerNorm
``weight`` becomes ``scale``; ``mask_token`` (used only in pre-training) is dropped.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors.numpy import load_file

from mdt_jax.models import dinov2
from mdt_jax.models.params import key_mismatches

HF_WEIGHTS = 'model.safetensors'
# model_type -> the architecture it is
ARCHITECTURES = {'dinov2': 'Dinov2Model', 'dinov2_with_registers': 'Dinov2WithRegistersModel'}
_IGNORED = ('embeddings.mask_token',)
# transformers' in-memory attention names (a file normally holds the released ones)
_ALIASES = {
    'attention.q_proj': 'attention.attention.query',
    'attention.k_proj': 'attention.attention.key',
    'attention.v_proj': 'attention.attention.value',
    'attention.o_proj': 'attention.output.dense',
}
_TOP = {
    'cls_token': 'embeddings.cls_token',
    'register_tokens': 'embeddings.register_tokens',
    'position_embeddings': 'embeddings.position_embeddings',
    'patch_embed': 'embeddings.patch_embeddings.projection',
}
_LAYER = {
    'attention.query': 'attention.attention.query',
    'attention.key': 'attention.attention.key',
    'attention.value': 'attention.attention.value',
    'attention.out': 'attention.output.dense',
    'layer_scale1': 'layer_scale1.lambda1',
    'layer_scale2': 'layer_scale2.lambda1',
}
_SWIGLU = {'mlp.fc1': 'mlp.weights_in', 'mlp.fc2': 'mlp.weights_out'}


def hf_name(name: str, swiglu: bool = False) -> str:
  """transformers' key of our parameter `name` ('layers.3.attention.query.kernel' ->
  'encoder.layer.3.attention.attention.query.weight')."""
  leaf = {'kernel': 'weight', 'scale': 'weight'}
  m = re.fullmatch(r'layers\.(\d+)\.(.+)', name)
  if m is None:
    module, _, last = name.rpartition('.')
    if not module:  # a parameter directly on the model
      return _TOP[name]
    return f'{_TOP.get(module, module)}.{leaf.get(last, last)}'
  i, rest = m.groups()
  if rest in _LAYER:
    return f'encoder.layer.{i}.{_LAYER[rest]}'
  module, _, last = rest.rpartition('.')
  table = {**_LAYER, **(_SWIGLU if swiglu else {})}
  return f'encoder.layer.{i}.{table.get(module, module)}.{leaf.get(last, last)}'


def _square(value, what: str, cfg_path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'{cfg_path}: {what} {value} is not square (only square grids are read)')
    value = value[0]
  return int(value)


def config_from_hf(hf: dict, cfg_path: str = 'config.json') -> dinov2.Dinov2Config:
  """Our Dinov2Config from a transformers config.json's fields; other architectures refused."""
  kind = hf.get('model_type')
  if kind not in ARCHITECTURES:
    raise ValueError(
        f'{cfg_path}: model_type {kind!r} (architectures {hf.get("architectures")}) is not a '
        f'DINOv2 model; expected one of {sorted(ARCHITECTURES)} ({sorted(ARCHITECTURES.values())})'
    )
  archs = hf.get('architectures') or [ARCHITECTURES[kind]]
  if ARCHITECTURES[kind] not in archs:
    raise ValueError(
        f'{cfg_path}: architectures {archs}: only the bare {ARCHITECTURES[kind]} is read (its '
        'keys without a head or prefix); save the backbone with save_pretrained'
    )
  swiglu = bool(hf.get('use_swiglu_ffn', False))
  if not swiglu and hf.get('hidden_act', 'gelu') != 'gelu':
    raise ValueError(f'{cfg_path}: hidden_act {hf.get("hidden_act")!r} is not read (only gelu)')
  return dinov2.Dinov2Config(
      hidden_size=int(hf.get('hidden_size', 768)),
      num_hidden_layers=int(hf.get('num_hidden_layers', 12)),
      num_attention_heads=int(hf.get('num_attention_heads', 12)),
      mlp_ratio=float(hf.get('mlp_ratio', 4)),
      image_size=_square(hf.get('image_size', 224), 'image_size', cfg_path),
      patch_size=_square(hf.get('patch_size', 14), 'patch_size', cfg_path),
      num_channels=int(hf.get('num_channels', 3)),
      qkv_bias=bool(hf.get('qkv_bias', True)),
      layer_norm_eps=float(hf.get('layer_norm_eps', 1e-6)),
      use_swiglu_ffn=swiglu,
      num_register_tokens=int(hf.get('num_register_tokens', 0)) if kind != 'dinov2' else 0,
      antialias_positions=kind == 'dinov2_with_registers',
  )


def _to_ours(name: str, w: np.ndarray) -> np.ndarray:
  w = np.asarray(w, np.float32)
  if name.endswith('kernel') and w.ndim == 4:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  if name.endswith('kernel') and w.ndim == 2:
    return np.ascontiguousarray(w.T)
  return w


def read_hf(hf_dir: str) -> tuple[dinov2.Dinov2Config, dict[str, np.ndarray]]:
  """(config, parameters under our names) of a transformers DINOv2 folder; every missing,
  unexpected and mis-shaped key named."""
  cfg_path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'--hf_dir {hf_dir!r} is not a folder')
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f'{hf_dir!r} is not a transformers folder: config.json is missing')
  with open(cfg_path) as f:
    config = config_from_hf(json.load(f), cfg_path)
  path = os.path.join(hf_dir, HF_WEIGHTS)
  if not os.path.isfile(path):
    found = sorted(f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.safetensors', '.json')))
    raise FileNotFoundError(
        f'no {HF_WEIGHTS} in {hf_dir!r} (found {found}); only a single safetensors file is read '
        '(not torch .bin files or sharded checkpoints)'
    )
  try:
    raw = load_file(path)
  except Exception as e:  # e.g. bfloat16 tensors, which numpy cannot hold
    raise ValueError(f'{path} is not readable as float safetensors with numpy: {e}') from e
  tensors = {}
  for k, v in raw.items():
    for old, new in _ALIASES.items():
      k = k.replace(old, new)
    tensors[k] = v
  _, expected = dinov2.param_shapes(config)
  by_hf = {hf_name(n, config.use_swiglu_ffn): n for n in expected}
  params = {by_hf[k]: _to_ours(by_hf[k], tensors[k]) for k in by_hf if k in tensors}
  lines = key_mismatches(
      {k: tuple(v.shape) for k, v in tensors.items()},
      {k: _hf_shape(tuple(expected[n].shape)) for k, n in by_hf.items()},
      allowed_extra=_IGNORED,
  )
  if lines:
    raise ValueError(
        f'{path} does not match its config.json as a {ARCHITECTURES[_kind(config)]}:\n  '
        + '\n  '.join(lines)
    )
  return config, params


def _kind(config: dinov2.Dinov2Config) -> str:
  return 'dinov2_with_registers' if config.antialias_positions else 'dinov2'


def _hf_shape(shape: tuple) -> tuple:
  """transformers' layout of one of our shapes (conv OIHW, linear [O, I])."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def convert(hf_dir: str, out_dir: str, overwrite: bool = False) -> str:
  """Convert a transformers DINOv2 folder into a DINOv2 folder; nothing is written unless every
  key maps."""
  config, params = read_hf(hf_dir)
  return dinov2.save(
      out_dir,
      config,
      params,
      source=f'converted from {os.path.basename(os.path.normpath(hf_dir))}',
      overwrite=overwrite,
  )
