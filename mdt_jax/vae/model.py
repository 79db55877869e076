"""AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, NHWC.

The architecture follows diffusers' ``AutoencoderKL`` with ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks: ResNet blocks with GroupNorm (eps 1e-6) and SiLU, a mid block of
resnet -> single-head self-attention -> resnet, stride-2 downsampling with a (0, 1, 0, 1) zero pad,
nearest-neighbour x2 upsampling, and 1x1 ``quant_conv`` / ``post_quant_conv``.

Parameters are float32; ``dtype`` sets the compute dtype of convolutions and projections.
GroupNorm statistics and the attention softmax are computed in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

DOWN_BLOCK = 'DownEncoderBlock2D'
UP_BLOCK = 'UpDecoderBlock2D'
# Config keys that do not change encode/decode (diffusers bookkeeping, pipeline hints).
IGNORED_KEYS = frozenset({'force_upcast', 'shift_factor', 'latents_mean', 'latents_std'})
LOGVAR_RANGE = (-30.0, 20.0)
# SD-VAE's latent scale: diffusion models see latents * LATENT_SCALE (about unit variance).
LATENT_SCALE = 0.18215


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL hyper-parameters, named and defaulted as diffusers' ``AutoencoderKL``."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = LATENT_SCALE
  act_fn: str = 'silu'
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, 'block_out_channels', tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError('block_out_channels must name at least one block, got ()')
    if self.act_fn != 'silu':
      raise ValueError(f"act_fn must be 'silu' (the SD VAE), got {self.act_fn!r}")
    if self.layers_per_block < 1:
      raise ValueError(f'layers_per_block must be >= 1, got {self.layers_per_block}')
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
            f'every block_out_channels entry must be divisible by norm_num_groups='
            f'{self.norm_num_groups}, got {self.block_out_channels}'
        )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
    """From a diffusers-style ``config.json`` dict (missing keys take diffusers' defaults).

    Keys starting with ``_`` and pipeline hints (``force_upcast``, ``shift_factor``, ...) are
    ignored; any other unknown key, or a block type other than the SD VAE's, is an error.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    n = len(d.get('block_out_channels', cls.block_out_channels))
    for key, want in (('down_block_types', DOWN_BLOCK), ('up_block_types', UP_BLOCK)):
      got = list(d.get(key, [want] * n))
      if got != [want] * n:
        raise ValueError(
            f'{key} must be {n} x {want!r} (one per block_out_channels entry), got {got}'
        )
    unknown = sorted(
        k
        for k in d
        if k not in fields
        and not k.startswith('_')
        and k not in IGNORED_KEYS
        and k not in ('down_block_types', 'up_block_types')
    )
    if unknown:
      raise ValueError(f'unknown AutoencoderKL config keys {unknown}; known: {sorted(fields)}')
    kwargs = {k: v for k, v in d.items() if k in fields}
    if isinstance(kwargs.get('sample_size'), (list, tuple)):
      kwargs['sample_size'] = int(kwargs['sample_size'][0])
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    """The diffusers-style dict (with block types), as written to ``config.json``."""
    d = dataclasses.asdict(self)
    d['block_out_channels'] = list(self.block_out_channels)
    n = len(self.block_out_channels)
    d['down_block_types'] = [DOWN_BLOCK] * n
    d['up_block_types'] = [UP_BLOCK] * n
    return d


def _conv(
    cin: int, cout: int, k: int, *, rngs: nnx.Rngs, dtype, stride: int = 1, padding: Any = 'SAME'
) -> nnx.Conv:
  return nnx.Conv(
      cin,
      cout,
      kernel_size=(k, k),
      strides=(stride, stride),
      padding=padding,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
  )


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC with float32 statistics (biased variance, as torch)."""

  def __init__(self, channels: int, groups: int, eps: float = 1e-6):
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    g = einops.rearrange(x.astype(jnp.float32), 'b h w (g c) -> b h w g c', g=self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = einops.rearrange((g - mean) * jax.lax.rsqrt(var + self.eps), 'b h w g c -> b h w (g c)')
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, dtype):
    self.norm1 = GroupNorm(cin, groups)
    self.conv1 = _conv(cin, cout, 3, rngs=rngs, dtype=dtype)
    self.norm2 = GroupNorm(cout, groups)
    self.conv2 = _conv(cout, cout, 3, rngs=rngs, dtype=dtype)
    self.conv_shortcut = _conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None

  def __call__(self, x: Array) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return skip + h


class Attention(nnx.Module):
  """Single-head self-attention over all positions, GroupNorm in front, residual added."""

  def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs, dtype):
    def lin():
      return nnx.Linear(c, c, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    self.norm = GroupNorm(c, groups)
    self.q, self.k, self.v, self.out = lin(), lin(), lin(), lin()

  def __call__(self, x: Array) -> Array:
    t = einops.rearrange(self.norm(x), 'b h w c -> b (h w) 1 c')  # heads=1
    o = jax.nn.dot_product_attention(self.q(t), self.k(t), self.v(t))
    o = einops.rearrange(o, 'b (h w) 1 c -> b h w c', h=x.shape[1])
    return x + self.out(o).astype(x.dtype)


class MidBlock(nnx.Module):

  def __init__(self, c: int, groups: int, attention: bool, *, rngs: nnx.Rngs, dtype):
    self.resnets = nnx.List([ResnetBlock(c, c, groups, rngs=rngs, dtype=dtype) for _ in range(2)])
    self.attention = Attention(c, groups, rngs=rngs, dtype=dtype) if attention else None

  def __call__(self, x: Array) -> Array:
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):

  def __init__(
      self, cin: int, cout: int, n: int, groups: int, downsample: bool, *, rngs: nnx.Rngs, dtype
  ):
    self.resnets = nnx.List(
        [
            ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype)
            for i in range(n)
        ]
    )
    # Asymmetric zero pad (right/bottom only) then a VALID stride-2 conv, as the SD VAE.
    self.downsample = (
        _conv(cout, cout, 3, rngs=rngs, dtype=dtype, stride=2, padding=((0, 1), (0, 1)))
        if downsample
        else None
    )

  def __call__(self, x: Array) -> Array:
    for r in self.resnets:
      x = r(x)
    return self.downsample(x) if self.downsample is not None else x


class UpBlock(nnx.Module):

  def __init__(
      self, cin: int, cout: int, n: int, groups: int, upsample: bool, *, rngs: nnx.Rngs, dtype
  ):
    self.resnets = nnx.List(
        [
            ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype)
            for i in range(n)
        ]
    )
    self.upsample = _conv(cout, cout, 3, rngs=rngs, dtype=dtype) if upsample else None

  def __call__(self, x: Array) -> Array:
    for r in self.resnets:
      x = r(x)
    if self.upsample is not None:
      x = self.upsample(einops.repeat(x, 'b h w c -> b (h 2) (w 2) c'))  # nearest, 2x
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype):
    ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
    self.conv_in = _conv(cfg.in_channels, ch[0], 3, rngs=rngs, dtype=dtype)
    self.down_blocks = nnx.List(
        [
            DownBlock(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1, rngs=rngs, dtype=dtype
            )
            for i in range(n)
        ]
    )
    self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, rngs=rngs, dtype=dtype)
    self.norm_out = GroupNorm(ch[-1], g)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    x = self.conv_in(x)
    for blk in self.down_blocks:
      x = blk(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype):
    ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
    self.conv_in = _conv(cfg.latent_channels, ch[0], 3, rngs=rngs, dtype=dtype)
    self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, rngs=rngs, dtype=dtype)
    self.up_blocks = nnx.List(
        [
            UpBlock(
                ch[max(i - 1, 0)],
                ch[i],
                cfg.layers_per_block + 1,
                g,
                i < n - 1,
                rngs=rngs,
                dtype=dtype,
            )
            for i in range(n)
        ]
    )
    self.norm_out = GroupNorm(ch[-1], g)
    self.conv_out = _conv(ch[-1], cfg.out_channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, z: Array) -> Array:
    x = self.mid_block(self.conv_in(z))
    for blk in self.up_blocks:
      x = blk(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The SD VAE. ``encode`` gives the posterior (mean, logvar); ``decode`` maps latents to images.

  Images are NHWC in [-1, 1]. Latents are *unscaled*: a diffusion model's latents must be divided
  by ``config.scaling_factor`` (0.18215) before ``decode``, and ``encode``'s mean/sample multiplied
  by it before training.
  """

  def __init__(self, config: VAEConfig | dict, *, rngs: nnx.Rngs, dtype=jnp.float32):
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
    self.config, self.dtype = cfg, dtype
    lc = cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype)
    self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)
    self.quant_conv = (
        _conv(2 * lc, 2 * lc, 1, rngs=rngs, dtype=dtype) if cfg.use_quant_conv else None
    )
    self.post_quant_conv = (
        _conv(lc, lc, 1, rngs=rngs, dtype=dtype) if cfg.use_post_quant_conv else None
    )

  def _check(self, x: Array, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f'{what} must be NHWC [B, H, W, {channels}], got shape {x.shape}')

  def encode(self, images: Array) -> tuple[Array, Array]:
    """Posterior moments (mean, logvar), float32 [B, H/f, W/f, latent_channels].

    logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    self._check(images, self.config.in_channels, 'images')
    h = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: Array) -> Array:
    """Images (float32, NHWC, nominally [-1, 1], not clipped) from unscaled latents."""
    self._check(latents, self.config.latent_channels, 'latents')
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)
