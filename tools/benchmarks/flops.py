"""FLOPs of the MDTv2 train step, counted from the model's shapes, and device peaks.

The analytic count is matmuls only (2 FLOPs per multiply-add); MFU uses the *useful* FLOPs (the
masked encoder at the mean kept count) over the device's dense bf16 peak.
"""

from __future__ import annotations

import jax
import numpy as np

from mdt_jax.models import masking
from mdt_jax.models.mdt import MDTConfig

# Dense bf16 peak TFLOP/s (no sparsity), by device kind substring.
PEAK_BF16_TFLOPS = {
    'H200': 989.0,
    'H100': 989.0,
    'A100': 312.0,
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5p': 459.0,
    'TPU v6': 918.0,
}


def peak_tflops(device: jax.Device) -> float | None:
  kind = device.device_kind
  for k, v in PEAK_BF16_TFLOPS.items():
    if k.lower() in kind.lower():
      return v
  return None


def block_flops(n: int, d: int, mlp_ratio: float, skip: bool) -> float:
  """Forward FLOPs (2 per multiply-add) of one MDTBlock on n tokens, per sample."""
  f = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, attention, proj
  f += 2 * 2 * n * d * int(d * mlp_ratio)  # fc1, fc2
  f += 2 * d * 6 * d  # adaLN (per sample)
  if skip:
    f += 2 * n * 2 * d * d
  return float(f)


def forward_flops(cfg: MDTConfig, kept: float | None = None) -> float:
  """Forward FLOPs per sample; ``kept`` tokens in the encoder for the masked pass."""
  d, n, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
  f = 2 * n * cfg.in_channels * p * p * d  # patch embed
  f += 2 * 256 * d + 2 * d * d  # timestep MLP
  f += 2 * d * 2 * d + 2 * n * d * p * p * cfg.out_channels  # final layer
  enc_n = n if kept is None else kept
  if cfg.arch == 'mdtv2':
    f += cfg.half_depth * (
        block_flops(enc_n, d, cfg.mlp_ratio, False) + block_flops(enc_n, d, cfg.mlp_ratio, True)
    )
    f += cfg.decode_layer * block_flops(n, d, cfg.mlp_ratio, True)
  else:
    f += (cfg.depth - cfg.decode_layer) * block_flops(enc_n, d, cfg.mlp_ratio, False)
    f += cfg.decode_layer * block_flops(n, d, cfg.mlp_ratio, False)
  if kept is not None:
    f += block_flops(n, d, cfg.mlp_ratio, False)  # side-interpolater
  return float(f)


def mean_kept(cfg: MDTConfig) -> float:
  """E[floor(L (1 - r))], r ~ U[mask_ratio, mask_ratio + span)."""
  r = np.linspace(cfg.mask_ratio, cfg.mask_ratio + cfg.mask_ratio_span, 20001)[:-1]
  return float(np.floor(cfg.num_tokens * (1 - r)).mean())


def train_step_flops(
    cfg: MDTConfig, batch: int, mask_branch: bool, executed: bool = False
) -> float:
  """Model FLOPs of one train step (forward + backward = 3x forward), whole global batch.

  ``executed=True`` counts the masked encoder at the static buffer size (what runs).
  """
  f = forward_flops(cfg)
  if mask_branch:
    k = masking.max_kept(cfg.num_tokens, cfg.mask_ratio) if executed else mean_kept(cfg)
    f += forward_flops(cfg, kept=k)
  return 3.0 * f * batch
