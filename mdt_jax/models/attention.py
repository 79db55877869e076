"""Attention with an additive (relative position) bias: XLA's computation or a fused TPU kernel.

`attend` is the one place that picks the computation (by backend through
`mdt_jax.models.platform.by_backend`): on XLA:CPU the einsums of `_einsum`, on a TPU the kernel
below (XLA's attention on TPU v2-v4, whose VMEM is too small for it: `SMALL_VMEM_TPUS`),
elsewhere ``jax.nn.dot_product_attention``. XLA's (``jax.nn.dot_product_attention``)
writes the [B, H, N, N] logits, probabilities and their gradients to HBM, several float32 passes
per attention; on a TPU that traffic, not the FLOPs, bounds the train step. The Pallas kernel
below takes the qkv projection as it comes out of the matmul ([B, N, 3D]: no head transposes),
runs one sample per grid step with every head's whole [N, N] block in on-chip memory (N is at
most 256 here: no tiling over keys is needed), reads its inputs once and writes the output once;
its backward pass recomputes the probabilities instead of storing them. A bias shared by the
batch ([H, N, N]) is read once, and its gradient summed over the batch on chip.

The kernel computes what XLA's path computes, in the same precisions: matmul operands in the
input dtype with float32 accumulation; logits, bias, mask and softmax in float32; the
probabilities rounded to the value dtype before the product with v; in the backward pass the
gradient of the probabilities rounded likewise, and the logits' gradient rounded for the
matmuls with q and k (tests compare both on the CPU, the kernel in Pallas interpret mode).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from flax import nnx
from jax.sharding import PartitionSpec as P

from mdt_jax.models import platform

Array = jax.Array
IMPLEMENTATIONS = (None, 'xla', 'cudnn', 'pallas')  # None: chosen by backend (`attend`)
QK_NORMS = (None, 'rms', 'layer')  # None: queries and keys as projected


class QKNorm(nnx.Module):
  """RMS or layer norm of each head's query and key (not the value) in the packed qkv projection
  [B, N, 3D], a learned scale per head dimension (one for queries, one for keys), statistics in
  float32. The result is packed as it came, so every implementation of `attend` takes it."""

  def __init__(self, kind: str, heads: int, head_dim: int, eps: float = 1e-6):
    if kind not in QK_NORMS[1:]:
      raise ValueError(f'qk_norm must be one of {QK_NORMS}, got {kind!r}')
    self.kind, self.heads, self.eps = kind, heads, eps
    self.q_scale = nnx.Param(jnp.ones((head_dim,), jnp.float32), out_sharding=(None,))
    self.k_scale = nnx.Param(jnp.ones((head_dim,), jnp.float32), out_sharding=(None,))

  def _norm(self, x: Array, scale: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.kind == 'layer':
      x32 = x32 - x32.mean(-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(x.dtype)

  def __call__(self, qkv: Array) -> Array:
    b, n, d3 = qkv.shape
    q, k, v = jnp.unstack(qkv.reshape(b, n, 3, self.heads, -1), axis=2)
    q, k = self._norm(q, self.q_scale[...]), self._norm(k, self.k_scale[...])
    return jnp.stack([q, k, v], axis=2).reshape(b, n, d3)


def attend(
    qkv: Array, bias: Array, key_mask: Array | None, heads: int, implementation: str | None = None
) -> Array:
  """Multi-head attention of the qkv projection [B, N, 3D] (q, k, v, each heads x head_dim)
  -> [B, N, D]. bias: [H, N, N] (shared by the batch) or [B, H, N, N], added to the scaled
  logits; key_mask: [B, N] (True: attend to this key) or None."""
  bias = bias.astype(qkv.dtype)
  if implementation == 'pallas':
    return _kernel(qkv, bias, key_mask, heads)
  if implementation is not None:
    return _xla(qkv, bias, key_mask, heads, implementation)
  return platform.by_backend(
      qkv,
      bias,
      key_mask,
      cpu=lambda *a: _einsum(*a, heads),
      tpu=lambda *a: _tpu(*a, heads),
      default=lambda *a: _xla(*a, heads, None),
  )


# TPU generations whose 16 MiB of VMEM per core cannot hold the kernel's blocks at MDTv2-XL/2's
# size: compiled for v4 its backward pass asks for 18.7 MiB (8 MiB of it one sample's [H, N, N]
# float32 bias gradient, double-buffered; docs/benchmarks/tpu_v4_8_xl2w_depth4_pallas_vmem_error.txt).
# There the automatic choice is XLA's attention; model.attention_impl=pallas still asks for the
# kernel.
SMALL_VMEM_TPUS = ('TPU v2', 'TPU v3', 'TPU v4')


def _tpu(qkv: Array, bias: Array, key_mask: Array | None, heads: int) -> Array:
  kind = platform.device_kind()
  if kind is not None and kind.startswith(SMALL_VMEM_TPUS):
    return _xla(qkv, bias, key_mask, heads, None)
  return _kernel(qkv, bias, key_mask, heads)


_SHARDING = threading.local()
_INTERPRET = threading.local()


@contextlib.contextmanager
def interpret_kernels():
  """Within this context the kernel runs in Pallas interpret mode, on any backend (its results,
  not its speed: tests, and `tools/bench.py --parity` on a CPU)."""
  previous = getattr(_INTERPRET, 'value', False)
  _INTERPRET.value = True
  try:
    yield
  finally:
    _INTERPRET.value = previous


@contextlib.contextmanager
def batch_sharded(mesh: jax.sharding.Mesh, axes):
  """Within this context the kernel runs on each shard of the batch (split over mesh `axes`),
  under shard_map: XLA cannot partition a Mosaic kernel by itself. The train step enters it
  while it is traced; code already inside a shard_map (the sampler, the per-shard gradients of
  mdt_jax/training/strategies.py) needs none: `mesh` None."""
  previous = getattr(_SHARDING, 'value', None)
  _SHARDING.value = None if mesh is None else (mesh, axes)
  try:
    yield
  finally:
    _SHARDING.value = previous


def _kernel(qkv, bias, key_mask, heads):
  context = getattr(_SHARDING, 'value', None)
  if context is None:
    return fused_attention(qkv, bias, key_mask, heads)
  mesh, axes = context
  batch = P(axes)
  args = (qkv, bias) + (() if key_mask is None else (key_mask,))
  specs = (batch, batch if bias.ndim == 4 else P()) + (() if key_mask is None else (batch,))
  local = lambda q, b, *m: fused_attention(q, b, m[0] if m else None, heads)  # noqa: E731
  # check_vma=False: pallas_call states no varying axes; the shared bias's gradient is still
  # summed over the shards (tested against XLA's on 8 CPU devices)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=batch, check_vma=False)(*args)


def _split(qkv, bias, key_mask, heads):
  """q, k, v [B, N, H, Dh]; bias [B or 1, H, N, N]; mask [B, 1, 1, N] or None."""
  qkv = einops.rearrange(qkv, 'b n (qkv h d) -> b n qkv h d', qkv=3, h=heads)
  mask = None if key_mask is None else einops.rearrange(key_mask, 'b n -> b 1 1 n')
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias[None] if bias.ndim == 3 else bias, mask


def _xla(qkv, bias, key_mask, heads, implementation):
  q, k, v, bias, mask = _split(qkv, bias, key_mask, heads)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation)
  return einops.rearrange(out, 'b n h d -> b n (h d)')


def _einsum(qkv, bias, key_mask, heads):
  """What `_xla` computes (jax's XLA path), in the form XLA:CPU runs fastest: no vmapped group
  axis, the scale applied to q ([N, Dh]) rather than to the logits ([N, N])."""
  q, k, v, bias, mask = _split(qkv, bias, key_mask, heads)
  logits = (
      jnp.einsum(
          'btnh,bsnh->bnts', q * (q.shape[-1] ** -0.5), k, preferred_element_type=jnp.float32
      )
      + bias
  )
  if mask is not None:  # as jax.nn.dot_product_attention masks
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(logits.dtype).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return einops.rearrange(jnp.einsum('bnts,bsnh->btnh', probs, v), 'b n h d -> b n (h d)')


# ------------------------------------------------------------------------------ Pallas kernel

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a^T @ b
VMEM_LIMIT = 48 << 20  # the backward pass holds ~22 MB at N = 256


def _probs(q, k, bias, valid, scale):
  """Softmax probabilities (float32 [N, N]) of one head of one sample."""
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
  s = s * scale + bias.astype(jnp.float32)
  if valid is not None:  # as jax.nn.dot_product_attention masks
    s = jnp.where(valid > 0, s, -0.7 * float(jnp.finfo(jnp.float32).max))
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _columns(d: int, heads: int, part: int, h: int) -> slice:
  """Head h's columns of q (part 0), k (1) or v (2) in the packed [N, 3D] block."""
  dh = d // heads
  return slice(part * d + h * dh, part * d + (h + 1) * dh)


def _fwd_kernel(*refs, heads, scale, masked):
  qkv_ref, bias_ref = refs[:2]
  valid = refs[2][...] if masked else None
  o_ref = refs[-1]
  d = o_ref.shape[-1]
  for h in range(heads):
    q, k, v = (qkv_ref[:, _columns(d, heads, part, h)] for part in range(3))
    p = _probs(q, k, bias_ref[h], valid, scale)
    o = jax.lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    o_ref[:, _columns(d, heads, 0, h)] = o.astype(o_ref.dtype)


def _bwd_kernel(*refs, heads, scale, masked, shared):
  qkv_ref, bias_ref = refs[:2]
  valid = refs[2][...] if masked else None
  do_ref, dqkv_ref, dbias_ref = refs[2 + masked :]
  d = do_ref.shape[-1]
  f32 = jnp.float32
  if shared:  # this chunk's sum over its samples

    @pl.when(pl.program_id(1) == 0)
    def _():
      dbias_ref[...] = jnp.zeros_like(dbias_ref)

  for h in range(heads):
    cols = [_columns(d, heads, part, h) for part in range(3)]
    q, k, v = (qkv_ref[:, c] for c in cols)
    do = do_ref[:, cols[0]]
    p = _probs(q, k, bias_ref[h], valid, scale)
    dv = jax.lax.dot_general(p.astype(v.dtype), do, _TN, preferred_element_type=f32)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=f32)
    dp = dp.astype(v.dtype).astype(f32)
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))  # d(logits)
    if masked:  # masked logits are constants (as in XLA's)
      ds = jnp.where(valid > 0, ds, 0.0)
    ds_low = (ds * scale).astype(q.dtype)
    dq = jax.lax.dot_general(ds_low, k, _NN, preferred_element_type=f32)
    dk = jax.lax.dot_general(ds_low, q, _TN, preferred_element_type=f32)
    for c, g in zip(cols, (dq, dk, dv)):
      dqkv_ref[:, c] = g.astype(dqkv_ref.dtype)
    if shared:
      dbias_ref[0, h] += ds
    else:
      dbias_ref[h] = ds.astype(dbias_ref.dtype)


def _like(x, shape, dtype) -> jax.ShapeDtypeStruct:
  """An output varying over the same manual mesh axes as x (inside a shard_map)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).manual_axis_type)


def _nbytes(*arrays) -> int:
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays))


def _layout(qkv: Array, bias: Array, masked: bool):
  """Grid (chunk, sample) and block specs. Two chunks of the batch let the two TensorCores of
  a v4 / v5p chip share the work while a shared bias's gradient is summed within each."""
  b, n, d3 = qkv.shape
  chunks = 2 if b % 2 == 0 else 1
  per = b // chunks
  sample = lambda c, i: c * per + i  # noqa: E731
  rows = lambda w: pl.BlockSpec((None, n, w), lambda c, i: (sample(c, i), 0, 0))  # noqa: E731
  if bias.ndim == 3:  # same block every step: fetched once
    bias_spec = pl.BlockSpec(bias.shape, lambda c, i: (0, 0, 0))
  else:
    bias_spec = pl.BlockSpec((None,) + bias.shape[1:], lambda c, i: (sample(c, i), 0, 0, 0))
  specs = [rows(d3), bias_spec]
  if masked:
    specs.append(pl.BlockSpec((None, 1, n), lambda c, i: (sample(c, i), 0, 0)))
  return (chunks, per), rows, bias_spec, specs


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT)


def _forward(qkv, bias, valid, heads, interpret):
  b, n, d3 = qkv.shape
  masked = valid is not None
  grid, rows, _, specs = _layout(qkv, bias, masked)
  args = (qkv, bias) + ((valid,) if masked else ())
  out = _like(qkv, (b, n, d3 // 3), qkv.dtype)
  # what the kernel moves: each input block read once, the output written once
  cost = pl.CostEstimate(
      flops=4 * b * n * n * (d3 // 3),
      transcendentals=b * heads * n * n,
      bytes_accessed=_nbytes(*args, out),
  )
  kernel = functools.partial(
      _fwd_kernel, heads=heads, scale=(d3 // 3 // heads) ** -0.5, masked=masked
  )
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=specs,
      out_specs=rows(d3 // 3),
      out_shape=out,
      compiler_params=_params(('parallel', 'parallel')),
      cost_estimate=cost,
      interpret=interpret,
  )(*args)


def _backward(qkv, bias, valid, do, heads, interpret):
  b, n, d3 = qkv.shape
  masked, shared = valid is not None, bias.ndim == 3
  grid, rows, bias_spec, specs = _layout(qkv, bias, masked)
  args = (qkv, bias) + ((valid,) if masked else ()) + (do,)
  if shared:  # float32 partial sums, one per chunk
    dbias = _like(qkv, (grid[0],) + bias.shape, jnp.float32)
    dbias_spec = pl.BlockSpec((1,) + bias.shape, lambda c, i: (c, 0, 0, 0))
  else:
    dbias, dbias_spec = _like(qkv, bias.shape, bias.dtype), bias_spec
  outs = (_like(qkv, qkv.shape, qkv.dtype), dbias)
  cost = pl.CostEstimate(
      flops=8 * b * n * n * (d3 // 3),
      transcendentals=b * heads * n * n,
      bytes_accessed=_nbytes(*args, *outs),
  )
  kernel = functools.partial(
      _bwd_kernel, heads=heads, scale=(d3 // 3 // heads) ** -0.5, masked=masked, shared=shared
  )
  dqkv, dbias = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=specs + [rows(d3 // 3)],
      out_specs=(rows(d3), dbias_spec),
      out_shape=outs,
      compiler_params=_params(('parallel', 'arbitrary' if shared else 'parallel')),
      cost_estimate=cost,
      interpret=interpret,
  )(*args)
  if shared:
    dbias = dbias.sum(0)
  return dqkv, dbias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(qkv, bias, valid, heads, interpret):
  return _forward(qkv, bias, valid, heads, interpret)


def _fused_fwd(qkv, bias, valid, heads, interpret):
  return _forward(qkv, bias, valid, heads, interpret), (qkv, bias, valid)


def _fused_bwd(heads, interpret, residuals, do):
  qkv, bias, valid = residuals
  dqkv, dbias = _backward(qkv, bias, valid, do, heads, interpret)
  return dqkv, dbias, None if valid is None else jnp.zeros_like(valid)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(
    qkv: Array, bias: Array, key_mask: Array | None, heads: int, *, interpret: bool | None = None
) -> Array:
  """`attend`'s computation as Pallas TPU kernels (``interpret=True``, or within
  `interpret_kernels`: on any backend)."""
  if qkv.shape[-1] % (3 * heads):
    raise ValueError(f'qkv width {qkv.shape[-1]} is not 3 x heads ({heads}) x head_dim')
  if interpret is None:
    interpret = getattr(_INTERPRET, 'value', False)
  valid = (
      None if key_mask is None else einops.rearrange(key_mask.astype(jnp.float32), 'b n -> b 1 n')
  )
  return _fused(qkv, bias.astype(qkv.dtype), valid, heads, interpret)
