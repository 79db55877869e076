"""DINOv2 (ViT-S/B/L/G /14, optional register tokens) in Flax NNX: the frozen teacher of REPA.

Called on normalised NHWC float32 pixels, the model returns what ``transformers``'
``Dinov2Model(...).last_hidden_state`` (or ``Dinov2WithRegistersModel``'s) returns: the CLS token,
the register tokens if any, then the patch tokens in row-major order, after the final layer norm.
The position table (trained at 518 px: a 37 x 37 grid) is resized to the input's patch grid by
bicubic interpolation as PyTorch computes it (``resize_matrix``; with antialiasing for the
register models, as theirs).

A DINOv2 folder holds ``config.json`` (format ``mdt_jax.dinov2``, the `Dinov2Config` fields) and
``model.safetensors`` (float32, our parameter names: the nnx path joined by dots), written by
``tools/convert_dinov2.py`` from a Hugging Face folder and read by ``load``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mdt_jax import paths
from mdt_jax.atomic import atomic_folder, require_complete
from mdt_jax.models.params import InitKeys, key_mismatches, param_name

Array = jax.Array
FORMAT = 'mdt_jax.dinov2'
VERSION = 1
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
# ImageNet statistics the DINOv2 models are trained with (pixels in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESOLUTION = 224  # REPA's input size at 256 px: a 16 x 16 patch grid
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """The architecture, named as transformers' Dinov2Config names it."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4.0
  image_size: int = 518  # the position table's grid is image_size // patch_size
  patch_size: int = 14
  num_channels: int = 3
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  use_swiglu_ffn: bool = False
  num_register_tokens: int = 0
  # the position table is resized with antialiasing (transformers' register models do)
  antialias_positions: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f'hidden_size {self.hidden_size} is not divisible by num_attention_heads '
          f'{self.num_attention_heads}'
      )
    if self.image_size % self.patch_size:
      raise ValueError(
          f'image_size {self.image_size} is not divisible by patch_size {self.patch_size}'
      )
    if self.num_register_tokens < 0:
      raise ValueError(f'num_register_tokens must be >= 0, got {self.num_register_tokens}')

  @classmethod
  def from_dict(cls, d: dict) -> 'Dinov2Config':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(
          f'unknown DINOv2 config keys {unknown}; expected a subset of {sorted(known)}'
      )
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def grid(self) -> int:
    """The position table's patch grid."""
    return self.image_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:  # two thirds of it, rounded up to a multiple of 8
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden

  @property
  def prefix_tokens(self) -> int:
    """CLS and register tokens before the patch tokens."""
    return 1 + self.num_register_tokens


# name -> (hidden_size, num_hidden_layers, num_attention_heads, use_swiglu_ffn)
SIZES = {
    'S': (384, 12, 6, False),
    'B': (768, 12, 12, False),
    'L': (1024, 24, 16, False),
    'G': (1536, 40, 24, True),
}


def preset(name: str, registers: int = 0, **overrides) -> Dinov2Config:
  """The released ViT-S/B/L/G /14 architectures ('B/14'), with `registers` register tokens."""
  size, _, patch = name.partition('/')
  if size not in SIZES or patch not in ('', '14'):
    raise ValueError(f'unknown DINOv2 size {name!r}; expected one of {[s + "/14" for s in SIZES]}')
  d, layers, heads, swiglu = SIZES[size]
  fields = dict(
      hidden_size=d,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      use_swiglu_ffn=swiglu,
      num_register_tokens=registers,
      antialias_positions=registers > 0,
  )
  return Dinov2Config(**{**fields, **overrides})


# ------------------------------------------------------------------------------ resizing


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's 1-D bicubic resize (``F.interpolate(mode='bicubic',
  align_corners=False)``, a = -0.75, edge samples repeated; with ``antialias=True`` its
  antialiased form: a = -0.5, the kernel widened by the downscale factor, weights normalised)."""
  if n_in < 1 or n_out < 1:
    raise ValueError(f'resize sizes must be >= 1, got {n_in} -> {n_out}')
  scale = n_in / n_out
  out = np.zeros((n_out, n_in), np.float64)
  if not antialias:
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    for tap in range(-1, 3):
      index = np.clip(base + tap, 0, n_in - 1).astype(int)
      np.add.at(out, (np.arange(n_out), index), _cubic(t - tap, -0.75))
    return out
  support = 2.0 * scale if scale >= 1 else 2.0
  inv = 1.0 / scale if scale >= 1 else 1.0
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    out[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  return out


def resize_grid(x: Array, height: int, width: int, antialias: bool = False) -> Array:
  """Bicubic resize of [B, H, W, C] (PyTorch's ``resize_matrix``), in float32."""
  rows = jnp.asarray(resize_matrix(x.shape[1], height, antialias), jnp.float32)
  cols = jnp.asarray(resize_matrix(x.shape[2], width, antialias), jnp.float32)
  x = x.astype(jnp.float32)
  return jnp.einsum('hi,wj,bijc->bhwc', rows, cols, x, precision=_HIGHEST)


def normalize(images: Array, size: int | None = RESOLUTION) -> Array:
  """Images NHWC in [-1, 1] -> the teacher's input: ImageNet-normalised, then resized to
  ``size`` x ``size`` by bicubic interpolation (as REPA prepares them; None: kept)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'the DINOv2 teacher takes RGB images NHWC, got shape {tuple(images.shape)}')
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  if size is None or (x.shape[1], x.shape[2]) == (size, size):
    return x
  return resize_grid(x, size, size)


def pool_tokens(tokens: Array, grid: int) -> Array:
  """Patch tokens [B, G*G, D] (row-major) -> [B, grid*grid, D] by averaging each
  (G / grid)^2 block (area interpolation): the teacher's grid onto the student's."""
  n = tokens.shape[1]
  g = int(round(n**0.5))
  if g * g != n:
    raise ValueError(f'{n} patch tokens are not a square grid')
  if grid < 1 or g % grid:
    raise ValueError(
        f"the teacher's {g}x{g} patch grid cannot match the student's {grid}x{grid} tokens: "
        f'it must be a multiple of it (resize the images to patch_size x {grid} x k pixels)'
    )
  f = g // grid
  b, _, d = tokens.shape
  x = tokens.reshape(b, grid, f, grid, f, d)
  return x.mean(axis=(2, 4)).reshape(b, grid * grid, d)


# ------------------------------------------------------------------------------ the model


def _linear(din: int, dout: int, rngs, bias: bool = True) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=bias, param_dtype=jnp.float32, rngs=rngs)


def _norm(d: int, eps: float, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(d, epsilon=eps, param_dtype=jnp.float32, rngs=rngs)


class SelfAttention(nnx.Module):

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    d, bias = config.hidden_size, config.qkv_bias
    self.heads = config.num_attention_heads
    self.query = _linear(d, d, rngs, bias)
    self.key = _linear(d, d, rngs, bias)
    self.value = _linear(d, d, rngs, bias)
    self.out = _linear(d, d, rngs)

  def __call__(self, x: Array) -> Array:
    b, n, d = x.shape
    split = lambda t: t.reshape(b, n, self.heads, d // self.heads)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * (d // self.heads) ** -0.5, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return self.out(jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2, or (ViT-G) SwiGLU: one [D, 2H] input projection, gate first."""

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    d, h = config.hidden_size, config.mlp_hidden
    self.swiglu = config.use_swiglu_ffn
    self.fc1 = _linear(d, 2 * h if self.swiglu else h, rngs)
    self.fc2 = _linear(h, d, rngs)

  def __call__(self, x: Array) -> Array:
    h = self.fc1(x)
    if self.swiglu:
      gate, up = jnp.split(h, 2, axis=-1)
      return self.fc2(jax.nn.silu(gate) * up)
    return self.fc2(jax.nn.gelu(h, approximate=False))


class Layer(nnx.Module):
  """Pre-norm block with a learned per-channel scale on each residual branch (layer scale)."""

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    d, eps = config.hidden_size, config.layer_norm_eps
    self.norm1 = _norm(d, eps, rngs)
    self.attention = SelfAttention(config, rngs=rngs)
    self.layer_scale1 = nnx.Param(jnp.ones((d,), jnp.float32))
    self.norm2 = _norm(d, eps, rngs)
    self.mlp = Mlp(config, rngs=rngs)
    self.layer_scale2 = nnx.Param(jnp.ones((d,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    x = x + self.attention(self.norm1(x)) * self.layer_scale1[...]
    return x + self.mlp(self.norm2(x)) * self.layer_scale2[...]


class Dinov2(nnx.Module):
  """DINOv2 ViT: [B, H, W, C] normalised pixels (H, W multiples of patch_size) ->
  [B, 1 + registers + (H/p)(W/p), D] tokens after the final layer norm."""

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    self.config = config
    d, p, g = config.hidden_size, config.patch_size, config.grid
    self.patch_embed = nnx.Conv(
        config.num_channels,
        d,
        kernel_size=(p, p),
        strides=(p, p),
        padding='VALID',
        param_dtype=jnp.float32,
        rngs=rngs,
    )
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
    self.register_tokens = (
        nnx.Param(jnp.zeros((1, config.num_register_tokens, d), jnp.float32))
        if config.num_register_tokens
        else None
    )
    self.position_embeddings = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, 1 + g * g, d))
    )
    self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.layernorm = _norm(d, config.layer_norm_eps, rngs)

  def positions(self, gh: int, gw: int) -> Array:
    """[1, 1 + gh*gw, D]: the CLS position, then the table resized to a gh x gw grid."""
    table = self.position_embeddings[...]
    g = self.config.grid
    if (gh, gw) == (g, g):
      return table
    patch = table[:, 1:].reshape(1, g, g, -1)
    patch = resize_grid(patch, gh, gw, self.config.antialias_positions)
    return jnp.concatenate([table[:, :1], patch.reshape(1, gh * gw, -1)], axis=1)

  def __call__(self, pixels: Array) -> Array:
    cfg = self.config
    if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
      raise ValueError(
          f'DINOv2 takes normalised pixels NHWC with {cfg.num_channels} channels, got shape '
          f'{tuple(pixels.shape)}'
      )
    b, h, w, _ = pixels.shape
    if h % cfg.patch_size or w % cfg.patch_size:
      raise ValueError(f'image size {h}x{w} is not a multiple of patch_size {cfg.patch_size}')
    x = self.patch_embed(pixels.astype(jnp.float32))
    gh, gw = x.shape[1], x.shape[2]
    pos = self.positions(gh, gw)
    x = x.reshape(b, gh * gw, -1) + pos[:, 1:]
    parts = [jnp.broadcast_to(self.cls_token[...] + pos[:, :1], (b, 1, x.shape[-1]))]
    if self.register_tokens is not None:
      parts.append(
          jnp.broadcast_to(self.register_tokens[...], (b,) + self.register_tokens.shape[1:])
      )
    x = jnp.concatenate(parts + [x], axis=1)
    for layer in self.layers:
      x = layer(x)
    return self.layernorm(x)

  def patch_tokens(self, pixels: Array) -> Array:
    """The patch tokens alone ([B, (H/p)(W/p), D]): what REPA aligns with."""
    return self(pixels)[:, self.config.prefix_tokens :]


# ------------------------------------------------------------------------------ the folder


def param_shapes(config: Dinov2Config) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """GraphDef and {name: abstract Variable} of an unallocated model."""
  abstract = nnx.eval_shape(lambda: Dinov2(config, rngs=InitKeys(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, {param_name(p): v for p, v in nnx.to_flat_state(state)}


def check_params(config: Dinov2Config, params: dict[str, np.ndarray], where: str) -> None:
  """Raise ValueError naming every missing, unexpected and mis-shaped parameter."""
  _, expected = param_shapes(config)
  lines = key_mismatches(
      {k: tuple(v.shape) for k, v in params.items()},
      {k: tuple(v.shape) for k, v in expected.items()},
  )
  if lines:
    raise ValueError(f'{where} do not match the DINOv2 config:\n  ' + '\n  '.join(lines))


def from_params(config: Dinov2Config, params: dict[str, np.ndarray]) -> Dinov2:
  """A Dinov2 holding `params` (our names); every name and shape must match."""
  check_params(config, params, 'parameters')
  graphdef, expected = param_shapes(config)
  state = nnx.from_flat_state(
      [
          (
              tuple(int(p) if p.isdigit() else p for p in k.split('.')),
              v.replace(jnp.asarray(params[k], jnp.float32)),
          )
          for k, v in expected.items()
      ]
  )
  return nnx.merge(graphdef, state)


def save(
    out_dir: str,
    config: Dinov2Config,
    params: dict[str, np.ndarray],
    *,
    source: str = '',
    overwrite: bool = False,
) -> str:
  """Write a DINOv2 folder atomically (checked first: nothing is written on a mismatch)."""
  check_params(config, params, 'parameters to save')
  with atomic_folder(out_dir, overwrite) as tmp:
    meta = dict(format=FORMAT, version=VERSION, model=config.to_dict(), source=source)
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
        os.path.join(tmp, WEIGHTS_FILE),
        metadata={'format': FORMAT},
    )
  return paths.resolve(out_dir)


def read_config(folder: str) -> Dinov2Config:
  """A DINOv2 folder's architecture, refused unless the folder is one."""
  cfg_path = paths.path(folder) / CONFIG_FILE
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{folder} is not a DINOv2 folder: {CONFIG_FILE} is missing')
  meta = json.loads(cfg_path.read_text())
  if meta.get('format') != FORMAT:
    hint = (
        ' (a Hugging Face folder must first go through tools/convert_dinov2.py)'
        if 'model_type' in meta
        else ''
    )
    raise ValueError(f'{cfg_path}: format is {meta.get("format")!r}, expected {FORMAT!r}{hint}')
  if meta.get('version', 0) > VERSION:
    raise ValueError(f'{cfg_path}: version {meta["version"]} is newer than this code ({VERSION})')
  return Dinov2Config.from_dict(meta['model'])


def load(folder: str) -> Dinov2:
  """The Dinov2 module stored in `folder` (written by tools/convert_dinov2.py or ``save``)."""
  config = read_config(folder)
  weights = paths.path(folder) / WEIGHTS_FILE
  if not weights.is_file():
    raise FileNotFoundError(f'{folder} has no weights: {WEIGHTS_FILE} is missing')
  require_complete(folder, 'DINOv2 folder')
  try:
    params = paths.load_safetensors(weights)
  except Exception as e:
    raise ValueError(f'{weights} is not a readable safetensors file: {e}') from e
  check_params(config, params, str(weights))
  return from_params(config, params)
