"""MDTv2 (and MDT v1) in Flax NNX, NHWC in and out.

Attribute names follow the official PyTorch state-dict keys (``en_inblocks.3.attn.qkv`` ->
``en_inblocks[3].attn.qkv``; ``adaLN_modulation.1`` -> ``adaLN_modulation_1``), so checkpoint
conversion is a renaming plus transposes (see ``mdt_jax.hub.official``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from mdt_jax.models import attention, masking
from mdt_jax.models.layers import (
    REL_POS_BIAS_IMPLS,
    FinalLayer,
    LabelEmbedder,
    MDTBlock,
    PatchEmbed,
    Projector,
    TimestepEmbedder,
    normal,
    sincos_2d,
)

Array = jax.Array

ARCHS = ('mdtv2', 'mdt_v1')
ATTENTION_IMPLS = attention.IMPLEMENTATIONS  # None: the Pallas kernel on TPU, XLA elsewhere
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
RESIDUAL_DTYPES = ('float32', 'compute')  # 'compute': the stream in model.dtype
REMAT_POLICIES = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# What a field of MDTConfig is for (its `role` metadata). 'compute': how the model is computed,
# not what it computes: a run may resume, and a checkpoint be exported or loaded, with another
# value (COMPUTE_OPTIONS). 'training': a training-time regulariser a resumed run may change. Every
# other field is the model's shape.
COMPUTE, TRAINING = 'compute', 'training'


def _field(default, role: str):
  return dataclasses.field(default=default, metadata={'role': role})


@dataclasses.dataclass(frozen=True)
class MDTConfig:
  """Hyperparameters, named as the official constructor names them (plus port options)."""

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  decode_layer: int = 4
  num_classes: int = 1000
  class_dropout_prob: float = _field(0.1, TRAINING)
  learn_sigma: bool = True
  mask_ratio: float | None = _field(None, TRAINING)
  # r ~ U[mask_ratio, mask_ratio + span); v1 used a fixed 0.3
  mask_ratio_span: float = _field(0.2, TRAINING)
  arch: str = 'mdtv2'
  # compute dtype of matmuls; parameters are always float32
  dtype: str = _field('float32', COMPUTE)
  remat: bool = _field(False, COMPUTE)  # rematerialise each block in the backward pass
  remat_policy: str = _field('nothing_saveable', COMPUTE)
  # models/attention.py: None (auto), xla, cudnn or pallas
  attention_impl: str | None = _field(None, COMPUTE)
  # the masked encoder's ('same': attention_impl's)
  masked_attention_impl: str | None = _field('same', COMPUTE)
  # round the masked encoder's static buffer up (cuDNN: even)
  mask_buffer_multiple: int = _field(1, COMPUTE)
  # the residual stream between blocks: 'float32' or 'compute'
  residual_dtype: str = _field('float32', COMPUTE)
  # models/layers.py: None (auto), gather or onehot
  rel_pos_bias_impl: str | None = _field(None, COMPUTE)
  # models/attention.py: None (off, as the official models), rms or layer norm of q and k per head
  qk_norm: str | None = None
  # representation alignment (mdt_jax/training/align.py): a projector MLP from the hidden size
  # to align_dim (the teacher's width; 0: none), its hidden width projector_dim
  align_dim: int = 0
  projector_dim: int = 2048

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f'model.arch must be one of {ARCHS}, got {self.arch!r}')
    if self.dtype not in DTYPES:
      raise ValueError(f'model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f'model.remat_policy must be one of {sorted(REMAT_POLICIES)}, '
          f'got {self.remat_policy!r}'
      )
    if self.input_size % self.patch_size:
      raise ValueError(
          f'input_size {self.input_size} is not divisible by patch_size {self.patch_size}'
      )
    if not 0 <= self.decode_layer <= self.depth:
      raise ValueError(f'decode_layer must be in [0, depth={self.depth}], got {self.decode_layer}')
    if self.align_dim < 0 or self.projector_dim < 1:
      raise ValueError(
          f'align_dim must be >= 0 and projector_dim >= 1, got {self.align_dim}, '
          f'{self.projector_dim}'
      )
    if self.mask_buffer_multiple < 1:
      raise ValueError(f'mask_buffer_multiple must be >= 1, got {self.mask_buffer_multiple}')
    if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f'mask_ratio must be None or in [0, 1), got {self.mask_ratio}')
    if self.residual_dtype not in RESIDUAL_DTYPES:
      raise ValueError(
          f'model.residual_dtype must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}'
      )
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f'model.attention_impl must be one of {ATTENTION_IMPLS} (None = auto), got '
          f'{self.attention_impl!r}'
      )
    if self.masked_attention_impl not in ATTENTION_IMPLS + ('same',):
      raise ValueError(
          f'model.masked_attention_impl must be "same" or one of {ATTENTION_IMPLS} '
          f'(None = auto), got {self.masked_attention_impl!r}'
      )
    if self.rel_pos_bias_impl not in REL_POS_BIAS_IMPLS:
      raise ValueError(
          f'model.rel_pos_bias_impl must be one of {REL_POS_BIAS_IMPLS} (None = auto), '
          f'got {self.rel_pos_bias_impl!r}'
      )
    if self.qk_norm not in attention.QK_NORMS:
      raise ValueError(
          f'model.qk_norm must be one of {attention.QK_NORMS} (None = off), got {self.qk_norm!r}'
      )
    masking.check_cudnn_lengths(self)

  @property
  def masked_impl(self) -> str | None:
    """The masked encoder's attention implementation."""
    if self.masked_attention_impl == 'same':
      return self.attention_impl
    return self.masked_attention_impl

  @classmethod
  def from_dict(cls, d: Any) -> 'MDTConfig':
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model config keys {unknown}; expected a subset of {sorted(known)}')
    return cls(**d)

  @classmethod
  def of(cls, config: 'MDTConfig | Mapping[str, Any]') -> 'MDTConfig':
    """``config`` itself, or the config a dict of its fields describes."""
    return config if isinstance(config, cls) else cls.from_dict(config)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def grid(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid**2

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def half_depth(self) -> int:
    return (self.depth - self.decode_layer) // 2

  @property
  def encoder_depth(self) -> int:
    """Blocks of the encoder (the masked pass runs them on the kept tokens only)."""
    if self.arch == 'mdt_v1':
      return self.depth - self.decode_layer
    return 2 * self.half_depth

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def stream_dtype(self):
    return jnp.float32 if self.residual_dtype == 'float32' else self.compute_dtype


def field_names(*roles: str) -> tuple[str, ...]:
  """The MDTConfig fields of the given roles (COMPUTE, TRAINING; '' for the shape fields)."""
  return tuple(f.name for f in dataclasses.fields(MDTConfig) if f.metadata.get('role', '') in roles)


# The compute options at their defaults (the float32 reference): what export writes, what parity
# may vary.
COMPUTE_OPTIONS = {
    f.name: f.default for f in dataclasses.fields(MDTConfig) if f.metadata.get('role') == COMPUTE
}


class Features(NamedTuple):
  """An encoder block's output tokens [B, T, D]: all L tokens in grid order (ids None) or the
  masked pass's buffer, ids [B, K] their grid positions and valid [B, K] the kept slots."""

  tokens: Array
  ids: Array | None = None
  valid: Array | None = None


class MDT(nnx.Module):
  """Masked Diffusion Transformer. ``arch='mdtv2'`` (long skips, dense input shortcut) or
  ``arch='mdt_v1'`` (plain stack, side block before the last ``decode_layer`` blocks)."""

  def __init__(self, config: MDTConfig | dict, *, rngs: nnx.Rngs):
    cfg = MDTConfig.of(config)
    self.config = cfg
    dt, d, g = cfg.compute_dtype, cfg.hidden_size, cfg.grid
    kw = dict(
        rngs=rngs,
        dtype=dt,
        attention_impl=cfg.attention_impl,
        masked_attention_impl=cfg.masked_impl,
        stream_dtype=cfg.stream_dtype,
        rel_pos_bias_impl=cfg.rel_pos_bias_impl,
        qk_norm=cfg.qk_norm,
    )
    block = lambda skip: MDTBlock(d, cfg.num_heads, cfg.mlp_ratio, g, skip=skip, **kw)

    self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, rngs=rngs, dtype=dt)
    self.t_embedder = TimestepEmbedder(d, rngs=rngs, dtype=dt)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, rngs=rngs)
    pos = jnp.asarray(sincos_2d(d, g))[None]
    self.pos_embed = nnx.Param(pos, out_sharding=(None, None, 'embed'))
    self.decoder_pos_embed = nnx.Param(pos, out_sharding=(None, None, 'embed'))
    # Always a parameter (it is in every official state dict); zeros when masking is off.
    mask_init = normal(0.02) if cfg.mask_ratio is not None else nnx.initializers.zeros_init()
    self.mask_token = nnx.Param(
        mask_init(rngs.params(), (1, 1, d)), out_sharding=(None, None, 'embed')
    )
    if cfg.arch == 'mdtv2':
      self.en_inblocks = nnx.List([block(False) for _ in range(cfg.half_depth)])
      self.en_outblocks = nnx.List([block(True) for _ in range(cfg.half_depth)])
      self.de_blocks = nnx.List([block(True) for _ in range(cfg.decode_layer)])
    else:
      self.blocks = nnx.List([block(False) for _ in range(cfg.depth)])
    self.sideblocks = nnx.List([block(False)])
    self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels, rngs=rngs, dtype=dt)
    # last: the model's other weights are those of the same seed without it
    self.projector = (
        Projector(d, cfg.projector_dim, cfg.align_dim, rngs=rngs, dtype=dt)
        if cfg.align_dim
        else None
    )

  # ------------------------------------------------------------------ helpers

  def _run(self, blk: MDTBlock, *args):
    if not self.config.remat:
      return blk(*args)
    policy = REMAT_POLICIES[self.config.remat_policy]
    return nnx.remat(lambda m, *a: m(*a), policy=policy)(blk, *args)

  def _check_inputs(self, x: Array, t: Array, y: Array) -> None:
    cfg = self.config
    want = (cfg.input_size, cfg.input_size, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(
          f'x must be NHWC [B, {want[0]}, {want[1]}, {want[2]}], got shape {tuple(x.shape)}'
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f'x must be floating point, got dtype {x.dtype}')
    b = x.shape[0]
    if t.shape != (b,):
      raise ValueError(f't must have shape [B]=({b},), got {tuple(t.shape)}')
    if y.shape != (b,):
      raise ValueError(f'y must have shape [B]=({b},), got {tuple(y.shape)}')
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise TypeError(f'y must hold integer class ids, got dtype {y.dtype}')

  def unpatchify(self, tokens: Array) -> Array:
    """[B, L, p*p*C] with (i, j, c) order -> [B, H, W, C]."""
    cfg = self.config
    g, p, c = cfg.grid, cfg.patch_size, cfg.out_channels
    return einops.rearrange(
        tokens, 'b (gh gw) (p q c) -> b (gh p) (gw q) c', gh=g, gw=g, p=p, q=p, c=c
    )

  # ------------------------------------------------------------------ forward

  def __call__(
      self,
      x: Array,
      t: Array,
      y: Array,
      *,
      rng: Array | None = None,
      train: bool = False,
      enable_mask: bool = False,
      ids_shuffle: Array | None = None,
      len_keep: Array | int | None = None,
      keep_buffer: int | None = None,
      features_at: int | None = None,
  ) -> Array | tuple[Array, Features]:
    """x [B, H, W, C], t [B] timesteps, y [B] labels -> [B, H, W, 2C] (C without learn_sigma).

    ``train=True`` applies label dropout (needs ``rng``). The masked pass runs when
    ``ids_shuffle`` and ``len_keep`` are given, or when ``enable_mask`` is set (the mask is then
    drawn from ``rng`` with the official distribution). ``len_keep`` is a scalar or [B, 1] (a
    count per sample); ``keep_buffer`` is the static size of the masked encoder's buffer (default:
    the largest count the training distribution draws; inpainting keeps up to every token).
    ``features_at=n`` also returns the output of encoder block n (1-based) as `Features`.
    """
    cfg = self.config
    self._check_inputs(x, t, y)
    if rng is not None:
      drop_key, mask_key = jax.random.split(rng)
    else:
      drop_key = mask_key = None
    if train and cfg.class_dropout_prob > 0 and drop_key is None:
      raise ValueError('train=True with label dropout needs rng')
    if ids_shuffle is None and enable_mask:
      if cfg.mask_ratio is None:
        raise ValueError('enable_mask=True but model.mask_ratio is None')
      if mask_key is None:
        raise ValueError('enable_mask=True needs rng (or an explicit ids_shuffle/len_keep)')
      ids_shuffle, len_keep = masking.draw_mask(
          mask_key, x.shape[0], cfg.num_tokens, cfg.mask_ratio, cfg.mask_ratio_span
      )
    if (ids_shuffle is None) != (len_keep is None):
      raise ValueError('ids_shuffle and len_keep must be given together')
    if features_at is not None and not 1 <= features_at <= cfg.encoder_depth:
      raise ValueError(
          f'features_at must be an encoder block in [1, {cfg.encoder_depth}], got {features_at}'
      )
    if ids_shuffle is not None and ids_shuffle.shape != (x.shape[0], cfg.num_tokens):
      raise ValueError(
          f'ids_shuffle must have shape [B, L]=({x.shape[0]}, {cfg.num_tokens}), '
          f'got {tuple(ids_shuffle.shape)}'
      )

    u = self.x_embedder(x) + self.pos_embed[...]
    c = self.t_embedder(t) + self.y_embedder(y, drop_key if train else None)
    if ids_shuffle is None:
      out, features = self._plain(u, c, features_at)
    else:
      if keep_buffer is not None and not 1 <= keep_buffer <= cfg.num_tokens:
        raise ValueError(f'keep_buffer must be in [1, {cfg.num_tokens}], got {keep_buffer}')
      len_keep = jnp.asarray(len_keep, jnp.int32)
      out, features = self._masked(u, c, ids_shuffle, len_keep, keep_buffer, features_at)
    return out if features_at is None else (out, features)

  def _finish(self, x: Array, c: Array) -> Array:
    return self.unpatchify(self.final_layer(x, c)).astype(jnp.float32)

  def _encoder(
      self, x: Array, c: Array, ids: Array | None, key_mask: Array | None, at: int | None = None
  ) -> tuple[Array, Array | None]:
    """The encoder's output, and block `at`'s (1-based; None: none)."""
    outs = []
    if self.config.arch == 'mdt_v1':
      for blk in self.blocks[: self.config.depth - self.config.decode_layer]:
        x = self._run(blk, x, c, ids, key_mask)
        outs.append(x)
      return x, None if at is None else outs[at - 1]
    stack = []
    for blk in self.en_inblocks:
      x = self._run(blk, x, c, ids, key_mask)
      stack.append(x)
      outs.append(x)
    for blk in self.en_outblocks:
      x = self._run(blk, x, c, ids, key_mask, stack.pop())
      outs.append(x)
    return x, None if at is None else outs[at - 1]

  def _decoder(self, x: Array, c: Array, ids: Array | None, input_skip: Array) -> Array:
    if self.config.arch == 'mdt_v1':
      for blk in self.blocks[self.config.depth - self.config.decode_layer :]:
        x = self._run(blk, x, c, ids)
      return x
    for blk in self.de_blocks:
      x = self._run(blk, x, c, ids, None, input_skip)
    return x

  def _plain(self, u: Array, c: Array, at: int | None = None) -> tuple[Array, Features | None]:
    x, tokens = self._encoder(u, c, None, None, at)
    x = x + self.decoder_pos_embed[...]
    return self._finish(self._decoder(x, c, None, u), c), None if at is None else Features(tokens)

  def _masked(
      self,
      u: Array,
      c: Array,
      ids_shuffle: Array,
      len_keep: Array,
      keep_buffer: int | None = None,
      at: int | None = None,
  ) -> tuple[Array, Features | None]:
    cfg = self.config
    b, n, d = u.shape
    ratio = cfg.mask_ratio if cfg.mask_ratio is not None else 0.0
    k = keep_buffer or masking.buffer_size(n, ratio, cfg.mask_buffer_multiple)
    ids_keep = ids_shuffle[:, :k]
    slot_valid = jnp.arange(k)[None, :] < len_keep  # [1, K]
    x = jnp.take_along_axis(u, einops.rearrange(ids_keep, 'b k -> b k 1'), axis=1)  # [B, K, D]
    valid = jnp.broadcast_to(slot_valid, (b, k))
    x, tokens = self._encoder(x, c, ids_keep, valid, at)

    # Side-interpolater: mask tokens in every slot past len_keep, back to the original order.
    token = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n, d))
    x = jnp.concatenate([x, token[:, k:]], axis=1)
    kept_shuffled = jnp.arange(n)[None, :] < len_keep  # [1, L]
    x = jnp.where(kept_shuffled[..., None], x, token)
    ids_restore = masking.restore_order(ids_shuffle)
    x = jnp.take_along_axis(x, einops.rearrange(ids_restore, 'b n -> b n 1'), axis=1)
    masked = ~jnp.take_along_axis(jnp.broadcast_to(kept_shuffled, (b, n)), ids_restore, axis=1)
    q = x + self.decoder_pos_embed[...]
    side = self._run(self.sideblocks[0], q, c, None)
    x = jnp.where(masked[..., None], side, q)  # masked shortcut
    features = None if at is None else Features(tokens, ids_keep, valid)
    return self._finish(self._decoder(x, c, None, u), c), features


MDTv2 = MDT
