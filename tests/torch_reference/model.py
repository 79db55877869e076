"""MDTv2 / MDT v1 in PyTorch, float32 and eager, as the original runs it.

This is the baseline the JAX sampler and train step are measured against (``tools/bench.py
--torch_baseline`` and ``--torch_train_baseline``) and a second, framework-independent check of
the port: parameter and buffer names are the official state-dict keys, so
``TorchMDT(config).load_state_dict(official_sd)`` is strict, and inputs are NCHW as in the
original. The masked training pass is the original's too: the kept tokens gathered (no padding,
the encoder runs on exactly ``len_keep`` tokens), the relative position bias repeated per sample
and gathered on both axes at the kept ids, the side-interpolater with its masked shortcut.

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
    return bias.reshape(n, n, -1).permute(2, 0, 1)  # [heads, L, L]

  def masked(self, ids_keep: torch.Tensor) -> torch.Tensor:
    """[B, heads, K, K]: the bias repeated per sample, gathered at the kept ids on both axes."""
    bias = self()
    b, k = ids_keep.shape
    h, n = bias.shape[0], bias.shape[1]
    bias = bias[None].repeat(b, 1, 1, 1)
    rows = ids_keep[:, None, :, None].expand(b, h, k, n)
    bias = torch.gather(bias, 2, rows)
    cols = ids_keep[:, None, None, :].expand(b, h, k, k)
    return torch.gather(bias, 3, cols)


class Attention(nn.Module):

  def __init__(self, dim: int, heads: int, grid: int):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.rel_pos_bias = RelPosBias(grid, heads)

  def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = self.rel_pos_bias()[None] if ids_keep is None else self.rel_pos_bias.masked(ids_keep)
    attn = (q * self.scale) @ k.transpose(-2, -1) + bias
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

  def forward(
      self,
      x: torch.Tensor,
      c: torch.Tensor,
      skip: torch.Tensor | None = None,
      ids_keep: torch.Tensor | None = None,
  ):
    if self.skip_linear is not None:
      x = self.skip_linear(torch.cat([x, skip], dim=-1))
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1), ids_keep)
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class PatchEmbed(nn.Module):

  def __init__(self, patch: int, cin: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, kernel_size=patch, stride=patch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, D], row-major


class TimestepEmbedder(nn.Module):

  def __init__(self, dim: int, freq_dim: int = 256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    half = self.freq_dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):

  def __init__(self, num_classes: int, dim: int, dropout_prob: float):
    super().__init__()
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

  def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """`drop` [B] bool replaces those labels by the null class (training's label dropout)."""
    if drop is not None:
      y = torch.where(drop, self.num_classes, y)
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
    cfg = MDTConfig.of(config)
    self.config = cfg
    d, g = cfg.hidden_size, cfg.grid
    block = lambda skip: Block(d, cfg.num_heads, cfg.mlp_ratio, g, skip)
    self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
    self.t_embedder = TimestepEmbedder(d)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
    pos = torch.from_numpy(sincos_2d(d, g))[None]
    self.pos_embed = nn.Parameter(pos.clone())  # learnable in MDTv2 (unlike DiT)
    self.decoder_pos_embed = nn.Parameter(pos.clone())
    # learnable only when the model masks (as the original)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, d), requires_grad=cfg.mask_ratio is not None)
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

  def draw_mask(self, batch: int, device) -> tuple[torch.Tensor, int]:
    """The original's draw: one ratio r ~ U[mask_ratio, mask_ratio + span) for the batch,
    len_keep = floor(L (1 - r)), a per-sample order by argsort of uniform noise."""
    cfg = self.config
    ratio = cfg.mask_ratio + cfg.mask_ratio_span * torch.rand(1, device=device)
    len_keep = int(cfg.num_tokens * (1 - ratio))
    noise = torch.rand(batch, cfg.num_tokens, device=device)
    return torch.argsort(noise, dim=1), len_keep

  def side_interpolater(
      self, x: torch.Tensor, c: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int
  ) -> torch.Tensor:
    """Mask tokens appended, original order restored, decoder_pos_embed added, the side block
    on the full sequence, and the masked shortcut (kept tokens bypass the side block)."""
    b, n = ids_shuffle.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    tokens = self.mask_token.repeat(b, n - len_keep, 1)
    full = torch.cat([x, tokens], dim=1)
    full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, full.shape[2]))
    q = full + self.decoder_pos_embed
    side = q
    for blk in self.sideblocks:
      side = blk(side, c)
    mask = torch.ones(b, n, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)[..., None]  # 1 = masked token
    return side * mask + (1 - mask) * q

  def forward(
      self,
      x: torch.Tensor,
      t: torch.Tensor,
      y: torch.Tensor,
      enable_mask: bool = False,
      *,
      drop: torch.Tensor | None = None,
      mask: tuple[torch.Tensor, int] | None = None,
  ) -> torch.Tensor:
    """x [B, C, H, W], t [B] original timesteps, y [B] labels -> [B, out_channels, H, W].

    In training mode labels are dropped with `class_dropout_prob` (or where `drop` [B] says);
    `enable_mask` runs the masked pass with the original's mask draw, or with `mask` =
    (ids_shuffle [B, L], len_keep) when given.
    """
    cfg = self.config
    b = x.shape[0]
    u = self.x_embedder(x) + self.pos_embed
    if drop is None and self.training and cfg.class_dropout_prob > 0:
      drop = torch.rand(b, device=x.device) < cfg.class_dropout_prob
    c = self.t_embedder(t) + self.y_embedder(y, drop)
    ids_keep = None
    if enable_mask:
      if cfg.mask_ratio is None:
        raise ValueError('enable_mask=True but model.mask_ratio is None')
      ids_shuffle, len_keep = mask if mask is not None else self.draw_mask(b, x.device)
      ids_keep = ids_shuffle[:, :len_keep]
      h = torch.gather(u, 1, ids_keep[..., None].expand(-1, -1, u.shape[2]))
    else:
      h = u
    if cfg.arch == 'mdtv2':
      stack = []
      for blk in self.en_inblocks:
        h = blk(h, c, None, ids_keep)
        stack.append(h)
      for blk in self.en_outblocks:
        h = blk(h, c, stack.pop(), ids_keep)
      decoder = [(blk, u) for blk in self.de_blocks]
    else:
      split = cfg.depth - cfg.decode_layer
      for blk in self.blocks[:split]:
        h = blk(h, c, None, ids_keep)
      decoder = [(blk, None) for blk in self.blocks[split:]]
    if enable_mask:
      h = self.side_interpolater(h, c, ids_shuffle, len_keep)
    else:
      h = h + self.decoder_pos_embed
    for blk, skip in decoder:
      h = blk(h, c, skip)
    return self.unpatchify(self.final_layer(h, c))


def from_official_state(
    state: dict, config: MDTConfig | dict, device: str | torch.device = 'cpu'
) -> TorchMDT:
  """A float32 TorchMDT in eval mode holding an official state dict (numpy or torch values)."""
  model = TorchMDT(config)
  tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
  model.load_state_dict(tensors, strict=True)
  return model.to(device).eval()
