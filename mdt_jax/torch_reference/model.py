"""MDTv2 / MDT v1 inference in PyTorch, float32 and eager, as the original runs it.

This is the baseline the JAX sampler is measured against (``tools/bench.py --torch_baseline``)
and a second, framework-independent check of the port: parameter and buffer names are the
official state-dict keys, so ``TorchMDT(config).load_state_dict(official_sd)`` is strict, and
inputs are NCHW as in the original. Only the unmasked (inference) forward is here; the masked
training pass is checked against ``tests/reference_mdt.py``.

Attention is written out (``softmax(q k^T / sqrt(d) + bias) v``), as the original's eager
attention with a relative position bias.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mdt_jax.models.layers import relative_position_index, sincos_2d
from mdt_jax.models.mdt import MDTConfig


class RelPosBias(nn.Module):
  def __init__(self, grid: int, heads: int):
    super().__init__()
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))
    index = torch.from_numpy(relative_position_index(grid).astype(np.int64))
    self.register_buffer('relative_position_index', index)

  def forward(self) -> torch.Tensor:
    n = self.relative_position_index.shape[0]
    bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
    return bias.reshape(n, n, -1).permute(2, 0, 1)                      # [heads, L, L]


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int, grid: int):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.rel_pos_bias = RelPosBias(grid, heads)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_pos_bias()[None]
    out = attn.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU(approximate='tanh')
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float, grid: int, skip: bool):
    super().__init__()
    self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(dim, heads, grid)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None):
    if self.skip_linear is not None:
      x = self.skip_linear(torch.cat([x, skip], dim=-1))
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class PatchEmbed(nn.Module):
  def __init__(self, patch: int, cin: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, kernel_size=patch, stride=patch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)                     # [B, L, D], row-major


class TimestepEmbedder(nn.Module):
  def __init__(self, dim: int, freq_dim: int = 256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                         device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes: int, dim: int, null_row: bool):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(null_row), dim)

  def forward(self, y: torch.Tensor) -> torch.Tensor:
    return self.embedding_table(y)


class FinalLayer(nn.Module):
  def __init__(self, dim: int, patch: int, cout: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(dim, patch * patch * cout)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class TorchMDT(nn.Module):
  """The official module tree for an `MDTConfig` (unmasked forward, NCHW)."""

  def __init__(self, config: MDTConfig | dict):
    super().__init__()
    cfg = config if isinstance(config, MDTConfig) else MDTConfig.from_dict(config)
    self.config = cfg
    d, g = cfg.hidden_size, cfg.grid
    block = lambda skip: Block(d, cfg.num_heads, cfg.mlp_ratio, g, skip)
    self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
    self.t_embedder = TimestepEmbedder(d)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob > 0)
    pos = torch.from_numpy(sincos_2d(d, g))[None]
    self.pos_embed = nn.Parameter(pos.clone(), requires_grad=False)
    self.decoder_pos_embed = nn.Parameter(pos.clone())
    self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
    if cfg.arch == 'mdtv2':
      self.en_inblocks = nn.ModuleList([block(False) for _ in range(cfg.half_depth)])
      self.en_outblocks = nn.ModuleList([block(True) for _ in range(cfg.half_depth)])
      self.de_blocks = nn.ModuleList([block(True) for _ in range(cfg.decode_layer)])
    else:
      self.blocks = nn.ModuleList([block(False) for _ in range(cfg.depth)])
    self.sideblocks = nn.ModuleList([block(False)])
    self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)

  def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
    cfg = self.config
    b, g, p, c = x.shape[0], cfg.grid, cfg.patch_size, cfg.out_channels
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W], t [B] original timesteps, y [B] labels -> [B, out_channels, H, W]."""
    cfg = self.config
    u = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    h = u
    if cfg.arch == 'mdtv2':
      stack = []
      for blk in self.en_inblocks:
        h = blk(h, c)
        stack.append(h)
      for blk in self.en_outblocks:
        h = blk(h, c, stack.pop())
      h = h + self.decoder_pos_embed
      for blk in self.de_blocks:
        h = blk(h, c, u)
    else:
      split = cfg.depth - cfg.decode_layer
      for blk in self.blocks[:split]:
        h = blk(h, c)
      h = h + self.decoder_pos_embed
      for blk in self.blocks[split:]:
        h = blk(h, c)
    return self.unpatchify(self.final_layer(h, c))


def from_official_state(state: dict, config: MDTConfig | dict,
                        device: str | torch.device = 'cpu') -> TorchMDT:
  """A float32 TorchMDT in eval mode holding an official state dict (numpy or torch values)."""
  model = TorchMDT(config)
  tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
  model.load_state_dict(tensors, strict=True)
  return model.to(device).eval()
