"""An independent NumPy reference of MDTv2 / MDT v1, written from the spec (shared/docs/mdtv2_spec.md).

It reads an official-layout state dict (PyTorch key names and shapes, NCHW input) and computes the
forward pass in float64, the masked pass on exactly the kept tokens (no padding), so it checks
both the port's model and its checkpoint mapping.
"""

from __future__ import annotations

import math

import numpy as np


def linear(sd, name, x):
  return x @ sd[name + '.weight'].T + sd[name + '.bias']


def layer_norm(x, eps=1e-6):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps)


def silu(x):
  return x / (1 + np.exp(-x))


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def rel_index(g):
  idx = np.zeros((g * g, g * g), np.int64)
  for a in range(g * g):
    for b in range(g * g):
      ra, ca, rb, cb = a // g, a % g, b // g, b % g
      idx[a, b] = (ra - rb + g - 1) * (2 * g - 1) + (ca - cb + g - 1)
  return idx


def block(sd, pre, x, c, heads, keep=None, skip=None):
  """x [B, N, D]; keep [B, N] token ids (original positions) of x's rows, for the bias gather."""
  if skip is not None:
    x = linear(sd, pre + 'skip_linear', np.concatenate([x, skip], -1))
  mod = linear(sd, pre + 'adaLN_modulation.1', silu(c))
  sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6, axis=-1)
  b, n, d = x.shape
  hd = d // heads
  h = layer_norm(x) * (1 + sc1[:, None]) + sh1[:, None]
  qkv = linear(sd, pre + 'attn.qkv', h).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  logits = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
  table = sd[pre + 'attn.rel_pos_bias.relative_position_bias_table']
  index = sd[pre + 'attn.rel_pos_bias.relative_position_index']
  bias = table[index].transpose(2, 0, 1)  # [h, L, L]
  if keep is None:
    logits = logits + bias[None]
  else:
    logits = logits + np.stack([bias[:, kb][:, :, kb] for kb in keep])
  attn = softmax(logits) @ v
  attn = attn.transpose(0, 2, 1, 3).reshape(b, n, d)
  x = x + g1[:, None] * linear(sd, pre + 'attn.proj', attn)
  h = layer_norm(x) * (1 + sc2[:, None]) + sh2[:, None]
  h = linear(sd, pre + 'mlp.fc2', gelu_tanh(linear(sd, pre + 'mlp.fc1', h)))
  return x + g2[:, None] * h


def sincos_check(d, g):
  """MAE 2-D sin-cos, written out loop by loop."""
  out = np.zeros((g * g, d))
  q = d // 4
  for r in range(g):
    for col in range(g):
      for k in range(q):
        w = 1.0 / 10000 ** (k / q)
        out[r * g + col, k] = math.sin(col * w)
        out[r * g + col, q + k] = math.cos(col * w)
        out[r * g + col, 2 * q + k] = math.sin(r * w)
        out[r * g + col, 3 * q + k] = math.cos(r * w)
  return out


def forward(
    sd, x_nchw, t, y, *, heads, decode_layer, arch='mdtv2', ids_shuffle=None, len_keep=None
):
  """Official forward; ids_shuffle [B, L] and len_keep select the masked pass. Returns NCHW."""
  sd = {
      k: np.asarray(v, np.float64) if v.dtype.kind == 'f' else np.asarray(v) for k, v in sd.items()
  }
  x_nchw = np.asarray(x_nchw, np.float64)
  w = sd['x_embedder.proj.weight']
  d, cin, p, _ = w.shape
  b, _, hgt, _ = x_nchw.shape
  g = hgt // p
  # patch embed as a strided conv, tokens row-major
  patches = x_nchw.reshape(b, cin, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
  u = patches @ w.reshape(d, -1).T + sd['x_embedder.proj.bias'] + sd['pos_embed']
  # conditioning
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  temb = np.concatenate([np.cos(args), np.sin(args)], -1)
  temb = linear(sd, 't_embedder.mlp.2', silu(linear(sd, 't_embedder.mlp.0', temb)))
  c = temb + sd['y_embedder.embedding_table.weight'][np.asarray(y)]

  masked = ids_shuffle is not None
  x = u
  keep = None
  if masked:
    keep = np.asarray(ids_shuffle)[:, :len_keep]
    x = np.stack([u[i, keep[i]] for i in range(b)])
  if arch == 'mdtv2':
    n_in = len([k for k in sd if k.startswith('en_inblocks.') and k.endswith('qkv.weight')])
    stack = []
    for i in range(n_in):
      x = block(sd, f'en_inblocks.{i}.', x, c, heads, keep)
      stack.append(x)
    for i in range(n_in):
      x = block(sd, f'en_outblocks.{i}.', x, c, heads, keep, skip=stack.pop())
  else:
    depth = len([k for k in sd if k.startswith('blocks.') and k.endswith('qkv.weight')])
    for i in range(depth - decode_layer):
      x = block(sd, f'blocks.{i}.', x, c, heads, keep)
  if masked:
    n = g * g
    full = np.repeat(sd['mask_token'], b, axis=0).repeat(n, axis=1)  # [B, L, D]
    mask = np.ones((b, n))
    for i in range(b):
      full[i, keep[i]] = x[i]
      mask[i, keep[i]] = 0
    q = full + sd['decoder_pos_embed']
    side = block(sd, 'sideblocks.0.', q, c, heads)
    x = mask[..., None] * side + (1 - mask[..., None]) * q
  else:
    x = x + sd['decoder_pos_embed']
  if arch == 'mdtv2':
    n_de = len([k for k in sd if k.startswith('de_blocks.') and k.endswith('qkv.weight')])
    for i in range(n_de):
      x = block(sd, f'de_blocks.{i}.', x, c, heads, skip=u)
  else:
    for i in range(depth - decode_layer, depth):
      x = block(sd, f'blocks.{i}.', x, c, heads)
  sh, sc = np.split(linear(sd, 'final_layer.adaLN_modulation.1', silu(c)), 2, axis=-1)
  out = linear(sd, 'final_layer.linear', layer_norm(x) * (1 + sc[:, None]) + sh[:, None])
  cout = out.shape[-1] // (p * p)
  out = out.reshape(b, g, g, p, p, cout).transpose(0, 5, 1, 3, 2, 4)
  return out.reshape(b, cout, g * p, g * p)


def random_state_dict(
    layout: dict, index_buffers: list, grid: int, seed: int = 0, scale: float = 0.1
) -> dict:
  """Random official-layout weights (every parameter nonzero) plus the index buffers."""
  rng = np.random.default_rng(seed)
  sd = {k: (scale * rng.standard_normal(e.shape)).astype(np.float32) for k, e in layout.items()}
  idx = rel_index(grid)
  for name in index_buffers:
    sd[name] = idx.copy()
  return sd
