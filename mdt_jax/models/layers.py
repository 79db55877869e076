"""Building blocks of MDT: embeddings, relative position bias, attention, MLP, adaLN blocks.

Every parameter carries logical axis names (``sharding_names``) that the training mesh rules
map onto mesh axes; the names are listed in ``mdt_jax.training.sharding``.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdt_jax.models import platform, shards
from mdt_jax.models.attention import QKNorm, attend

Array = jax.Array

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def normal(std: float):
  return nnx.initializers.normal(stddev=std)


def clipped_normal(std: float, limit: float):
  """N(0, std) cut at +-limit (absolute), as timm's trunc_normal_(std, a=-limit, b=limit)."""

  def init(key, shape, dtype=jnp.float32):
    return jnp.clip(std * jax.random.normal(key, shape, dtype), -limit, limit)

  return init


class Dense(nnx.Linear):
  """`nnx.Linear`; on XLA:CPU it multiplies [rows, features] operands (`mdt_jax.models.platform`:
  there the weight gradient of a [batch, tokens, features] product costs a fused transpose)."""

  def __call__(self, inputs: Array, out_sharding=None) -> Array:
    if inputs.ndim <= 2 or out_sharding is not None:
      return super().__call__(inputs, out_sharding)
    return platform.by_backend(inputs, cpu=self._flat, default=super().__call__)

  def _flat(self, inputs: Array) -> Array:
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*inputs.shape[:-1], y.shape[-1])


def dense(
    din: int,
    dout: int,
    axes: tuple,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    kernel_init=xavier,
    zero: bool = False,
) -> Dense:
  """A Linear layer with float32 parameters, `dtype` compute and logical axis names."""
  kinit = zeros if zero else kernel_init
  return Dense(
      din,
      dout,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(kinit, axes),
      bias_init=nnx.with_partitioning(zeros, (axes[1],)),
      rngs=rngs,
  )


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """MAE 2-D sin-cos table [grid*grid, dim]: first half encodes the column, second the row."""
  if dim % 4:
    raise ValueError(f'hidden_size must be divisible by 4 for 2-D sin-cos embeddings, got {dim}')
  rows, cols = np.meshgrid(
      np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij'
  )
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def one_axis(pos):
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT index [L, L]: (dr + G - 1) * (2G - 1) + (dc + G - 1) for tokens in row-major order."""
  r, c = np.divmod(np.arange(grid * grid), grid)
  dr = r[:, None] - r[None, :] + grid - 1
  dc = c[:, None] - c[None, :] + grid - 1
  return (dr * (2 * grid - 1) + dc).astype(np.int32)


def timestep_embedding(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep features, cosine half first (as the original)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
  """LayerNorm without affine parameters; statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nnx.Module):
  """Conv(kernel p, stride p) on NHWC input, flattened to row-major tokens."""

  def __init__(self, patch: int, cin: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    # xavier on the [D, C*p*p] view of the kernel: fan_in = p*p*C, fan_out = D.
    init = jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
    self.proj = nnx.Conv(
        cin,
        dim,
        kernel_size=(patch, patch),
        strides=(patch, patch),
        padding='VALID',
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(init, (None, None, None, 'embed')),
        bias_init=nnx.with_partitioning(zeros, ('embed',)),
        rngs=rngs,
    )

  def __call__(self, x: Array) -> Array:
    return einops.rearrange(self.proj(x), 'b gh gw d -> b (gh gw) d')


class TimestepEmbedder(nnx.Module):

  def __init__(self, dim: int, freq_dim: int = 256, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.freq_dim = freq_dim
    self.mlp_0 = dense(
        freq_dim, dim, (None, 'embed'), rngs=rngs, dtype=dtype, kernel_init=normal(0.02)
    )
    self.mlp_2 = dense(
        dim, dim, ('embed', 'embed_out'), rngs=rngs, dtype=dtype, kernel_init=normal(0.02)
    )

  def __call__(self, t: Array) -> Array:
    h = self.mlp_0(timestep_embedding(t, self.freq_dim))
    return self.mlp_2(jax.nn.silu(h))


class LabelEmbedder(nnx.Module):
  """Class table with one extra row (index num_classes) for the null label used by CFG."""

  def __init__(self, num_classes: int, dim: int, dropout_prob: float, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob
    extra = 1 if dropout_prob > 0 else 0
    self.embedding_table = nnx.Embed(
        num_classes + extra,
        dim,
        param_dtype=jnp.float32,
        embedding_init=nnx.with_partitioning(normal(0.02), ('vocab', 'embed')),
        rngs=rngs,
    )

  def __call__(self, y: Array, drop_key: Array | None = None) -> Array:
    if drop_key is not None and self.dropout_prob > 0:
      # one draw per row of the whole batch (mdt_jax/models/shards.py)
      u = shards.rows(lambda n: jax.random.uniform(drop_key, (n,) + y.shape[1:]), y.shape[0])
      drop = u < self.dropout_prob
      y = jnp.where(drop, self.num_classes, y)
    return self.embedding_table(y)


REL_POS_BIAS_IMPLS = (None, 'gather', 'onehot')  # None: one-hot on a TPU, gather elsewhere


def _one_hot_offsets(grid: int) -> np.ndarray:
  """[G, G, 2G-1] one-hot of the offset a - b + G - 1 between rows (or columns) a and b."""
  a = np.arange(grid)
  return (a[:, None, None] - a[None, :, None] + grid - 1 == np.arange(2 * grid - 1)).astype(
      np.float32
  )


class RelativePositionBias(nnx.Module):
  """BEiT relative position bias, one table per attention module ((2G-1)^2 + 3 rows, h columns).

  Two computations of the same values (`impl`): 'gather' indexes the table (the BEiT code);
  'onehot' contracts it with one-hot matrices, which run on the matrix units: gathers, and the
  scatter-adds of their gradients, are while loops on a TPU, and on the masked encoder's
  per-sample [B, H, K, K] bias they grew with depth to 26.5 GB of the XL/2 step's traffic per
  chip (BENCHMARKS.md, "TPU, compiled without hardware"). None: one-hot on a TPU, the gather
  elsewhere (`mdt_jax.models.platform`).
  """

  def __init__(self, grid: int, heads: int, *, rngs: nnx.Rngs):
    self.grid = grid
    rows = (2 * grid - 1) ** 2 + 3  # the +3 rows are BEiT's cls-token rows, never indexed
    init = nnx.with_partitioning(clipped_normal(0.02, 2.0), (None, 'heads'))
    self.relative_position_bias_table = nnx.Param(init(rngs.params(), (rows, heads)))

  def __call__(self, ids: Array | None, impl: str | None = None, dtype=jnp.float32) -> Array:
    """Bias among the tokens `ids` [B, K] (grid positions; None: all, in order) -> [B, H, K, K]
    in `dtype` (attention rounds it to that anyway), or [H, L, L] in float32."""
    table = self.relative_position_bias_table[...]
    gather = lambda t, i: self._gather(t, i, dtype)
    onehot = lambda t, i: self._onehot(t, i, dtype)
    if impl == 'gather':
      return gather(table, ids)
    if impl == 'onehot':
      return onehot(table, ids)
    if impl is not None:
      raise ValueError(
          f'relative position bias impl {impl!r}: expected one of {REL_POS_BIAS_IMPLS}'
      )
    return platform.by_backend(table, ids, tpu=onehot, default=gather)

  def _gather(self, table: Array, ids: Array | None, dtype) -> Array:
    index = jnp.asarray(relative_position_index(self.grid))
    if ids is None:
      return einops.rearrange(table[index], 'q k h -> h q k')
    index = index[ids[:, :, None], ids[:, None, :]]  # [B, K, K]
    return einops.rearrange(table[index], 'b q k h -> b h q k').astype(dtype)

  def _onehot(self, table: Array, ids: Array | None, dtype) -> Array:
    g = self.grid
    span = 2 * g - 1
    offsets = jnp.asarray(_one_hot_offsets(g))
    # [H, L, L] from the table by two small contractions (rows, then columns), in float32 at
    # full precision: exactly the table's values, its gradient summed in float32
    t = einops.rearrange(table[: span * span], '(r c) h -> r c h', r=span)
    hp = jax.lax.Precision.HIGHEST
    rows = jnp.einsum('ard,deh->areh', offsets, t, precision=hp)  # [G, G, 2G-1, H]
    full = jnp.einsum('areh,cse->hacrs', rows, offsets, precision=hp)  # [H, G, G, G, G]
    full = einops.rearrange(full, 'h a c r s -> h (a c) (r s)')
    if ids is None:
      return full
    # per sample, rows and columns of the kept tokens: [B, K, L] one-hot products. Exact in
    # any dtype (one nonzero term per sum); float32 at full precision, else in `dtype`.
    prec = hp if dtype == jnp.float32 else None
    sel = jax.nn.one_hot(ids, g * g, dtype=dtype)
    part = jnp.einsum('bil,hlm->bhim', sel, full.astype(dtype), precision=prec)
    return jnp.einsum('bhim,bjm->bhij', part, sel, precision=prec)


class Attention(nnx.Module):

  def __init__(
      self,
      dim: int,
      heads: int,
      grid: int,
      *,
      rngs: nnx.Rngs,
      dtype=jnp.float32,
      attention_impl: str | None = None,
      masked_attention_impl: str | None = None,
      rel_pos_bias_impl: str | None = None,
      qk_norm: str | None = None,
  ):
    if dim % heads:
      raise ValueError(f'hidden_size {dim} is not divisible by num_heads {heads}')
    self.heads = heads
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.masked_attention_impl = masked_attention_impl  # for calls with a key mask
    self.rel_pos_bias_impl = rel_pos_bias_impl
    self.qkv = dense(dim, 3 * dim, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.proj = dense(dim, dim, ('heads', 'embed'), rngs=rngs, dtype=dtype)
    self.rel_pos_bias = RelativePositionBias(grid, heads, rngs=rngs)
    self.qk_norm = None if qk_norm is None else QKNorm(qk_norm, heads, dim // heads)

  def __call__(self, x: Array, ids: Array | None, key_mask: Array | None = None) -> Array:
    """x [B, N, D]; ids [B, N] grid positions of x's tokens (None: all, in grid order); key_mask
    [B, N] True for real tokens."""
    impl = self.attention_impl if key_mask is None else self.masked_attention_impl
    bias = self.rel_pos_bias(ids, self.rel_pos_bias_impl, self.dtype)
    qkv = self.qkv(x)
    if self.qk_norm is not None:
      qkv = self.qk_norm(qkv)
    out = attend(qkv, bias, key_mask, self.heads, impl)
    return self.proj(out)


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = dense(dim, hidden, ('embed', 'mlp'), rngs=rngs, dtype=dtype)
    self.fc2 = dense(hidden, dim, ('mlp', 'embed'), rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Projector(nnx.Module):
  """Three linear layers with SiLU between (REPA's projector): an encoder block's tokens ->
  the alignment target's width."""

  def __init__(self, dim: int, hidden: int, out: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = dense(dim, hidden, ('embed', 'mlp'), rngs=rngs, dtype=dtype)
    self.fc2 = dense(hidden, hidden, ('mlp', None), rngs=rngs, dtype=dtype)
    self.fc3 = dense(hidden, out, (None, None), rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x)))))


class MDTBlock(nnx.Module):
  """adaLN-Zero DiT block with relative position bias and an optional skip fusion (x first)."""

  def __init__(
      self,
      dim: int,
      heads: int,
      mlp_ratio: float,
      grid: int,
      *,
      skip: bool,
      rngs: nnx.Rngs,
      dtype=jnp.float32,
      attention_impl: str | None = None,
      masked_attention_impl: str | None = None,
      stream_dtype=jnp.float32,
      rel_pos_bias_impl: str | None = None,
      qk_norm: str | None = None,
  ):
    self.stream_dtype = stream_dtype  # the residual stream's dtype, in and out of the block
    self.skip_linear = (
        dense(2 * dim, dim, ('embed2', 'embed'), rngs=rngs, dtype=dtype) if skip else None
    )
    self.attn = Attention(
        dim,
        heads,
        grid,
        rngs=rngs,
        dtype=dtype,
        attention_impl=attention_impl,
        masked_attention_impl=masked_attention_impl,
        rel_pos_bias_impl=rel_pos_bias_impl,
        qk_norm=qk_norm,
    )
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
    self.adaLN_modulation_1 = dense(
        dim, 6 * dim, ('embed', 'ada'), rngs=rngs, dtype=dtype, zero=True
    )

  def __call__(
      self,
      x: Array,
      c: Array,
      ids: Array | None,
      key_mask: Array | None = None,
      skip: Array | None = None,
  ) -> Array:
    """x [B, N, D]; ids [B, N] grid positions of x's tokens (None: all, in grid order)."""
    if self.skip_linear is not None:
      if skip is None:
        raise ValueError('this block fuses a skip connection but none was given')
      x = self.skip_linear(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))
    x = x.astype(self.stream_dtype)
    mod = self.adaLN_modulation_1(jax.nn.silu(c))
    sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(layer_norm(x), sh_msa, sc_msa)
    x = x + (g_msa[:, None] * self.attn(h, ids, key_mask)).astype(x.dtype)
    h = modulate(layer_norm(x), sh_mlp, sc_mlp)
    return x + (g_mlp[:, None] * self.mlp(h)).astype(x.dtype)


class FinalLayer(nnx.Module):

  def __init__(self, dim: int, patch: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.adaLN_modulation_1 = dense(
        dim, 2 * dim, ('embed', 'ada'), rngs=rngs, dtype=dtype, zero=True
    )
    self.linear = dense(
        dim, patch * patch * cout, ('embed', None), rngs=rngs, dtype=dtype, zero=True
    )

  def __call__(self, x: Array, c: Array) -> Array:
    shift, scale = jnp.split(self.adaLN_modulation_1(jax.nn.silu(c)), 2, axis=-1)
    return self.linear(modulate(layer_norm(x), shift, scale))
