"""Representation alignment: an encoder block's tokens, through the model's projector, pulled
toward a teacher's tokens by negative cosine similarity per token (averaged over the tokens).

- REPA (Yu et al., 2025): the teacher is a frozen DINOv2's patch tokens of the clean image
  (``mdt_jax.models.dinov2``), resized to 224 px by default and pooled onto the student's grid.
- SRA (Jiang et al., 2026): no external encoder; the teacher is the EMA model's (or the current
  weights', without gradient) deeper block ``teacher_depth`` at lower noise: the same clean input
  and noise at time t - noise_offset * u (u ~ U[0, 1), a fraction of the time range).

In the plain branch every token is aligned; in the masked branch only the kept tokens, each with
the teacher's token at its grid position (the masked encoder's static-shape buffer: its ids and
valid slots, ``mdt_jax.models.mdt.Features``). The projector lives in the model
(``MDTConfig.align_dim``) so that the optimizer, EMA, sharding and checkpoints carry it; with
``method='none'`` the model has none and nothing here runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mdt_jax import paths
from mdt_jax.diffusion import flow, q_sample
from mdt_jax.diffusion.flow import FlowMatching
from mdt_jax.models import dinov2
from mdt_jax.models.mdt import Features, MDTConfig

Array = jax.Array
METHODS = ('none', 'repa', 'sra')
BRANCHES = ('plain', 'masked', 'both')
EMA_SOURCES = ('ema', 'model')
# REPA aligns block 8 of SiT-XL/2's 28
REPA_BLOCK, REPA_DEPTH = 8, 28


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """``config.align``: which alignment, where, how strong and until when."""

  method: str = 'none'
  depth: int = 0  # the aligned encoder block (1-based); 0: REPA's 8 of 28 scaled to the model
  weight: float = 0.5  # lambda: the alignment loss is added times this
  projector_dim: int = 2048
  stop_step: int = 0  # from this step on the alignment is off (HASTE); 0: never
  branches: str = 'plain'  # which MDT branches are aligned: plain, masked or both
  teacher: str = ''  # repa: a DINOv2 folder (tools/convert_dinov2.py)
  resolution: int = dinov2.RESOLUTION  # repa: the teacher's input size in pixels
  teacher_depth: int = 0  # sra: the teacher's encoder block; 0: twice depth (SRA: 4 -> 8)
  noise_offset: float = 0.2  # sra: the teacher's time t - noise_offset * u, u ~ U[0, 1)
  ema_source: str = 'ema'  # sra: the teacher's weights, 'ema' or 'model' (no gradient)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'align.method must be one of {METHODS}, got {self.method!r}')
    if self.branches not in BRANCHES:
      raise ValueError(f'align.branches must be one of {BRANCHES}, got {self.branches!r}')
    if self.ema_source not in EMA_SOURCES:
      raise ValueError(f'align.ema_source must be one of {EMA_SOURCES}, got {self.ema_source!r}')
    for name in ('depth', 'stop_step', 'teacher_depth'):
      if getattr(self, name) < 0:
        raise ValueError(f'align.{name} must be >= 0, got {getattr(self, name)}')
    if self.projector_dim < 1 or self.resolution < 1:
      raise ValueError(
          f'align.projector_dim and align.resolution must be >= 1, got {self.projector_dim}, '
          f'{self.resolution}'
      )
    if not self.weight >= 0:
      raise ValueError(f'align.weight must be >= 0, got {self.weight}')
    if not 0.0 <= self.noise_offset <= 1.0:
      raise ValueError(f'align.noise_offset must be in [0, 1], got {self.noise_offset}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'AlignConfig':
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown align config keys {unknown}; expected a subset of {sorted(known)}')
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def enabled(self) -> bool:
    return self.method != 'none'

  def aligns(self, branch: str) -> bool:
    """Whether the 'plain' or 'masked' branch is aligned."""
    return self.enabled and self.branches in (branch, 'both')

  def student_block(self, model: MDTConfig) -> int:
    if self.depth:
      return self.depth
    return min(model.encoder_depth, max(1, round(model.depth * REPA_BLOCK / REPA_DEPTH)))

  def teacher_block(self, model: MDTConfig) -> int:
    return self.teacher_depth or min(model.encoder_depth, 2 * self.student_block(model))

  def check(self, model: MDTConfig, *, mask_branch: bool) -> None:
    """Refuse what cannot train, before any work: a block past the encoder, a missing teacher
    folder, a masked-branch alignment without the masked branch."""
    if not self.enabled:
      return
    if model.encoder_depth < 1:
      raise ValueError(
          f'align.method={self.method!r} needs an encoder block to align, but model.depth '
          f'{model.depth} with decode_layer {model.decode_layer} leaves the encoder no blocks'
      )
    student = self.student_block(model)
    if student > model.encoder_depth:
      raise ValueError(
          f'align.depth={student} exceeds the encoder depth {model.encoder_depth} (model.depth '
          f'{model.depth} - decode_layer {model.decode_layer}): only encoder blocks are aligned'
      )
    if self.aligns('masked') and not mask_branch:
      raise ValueError(
          f'align.branches={self.branches!r} aligns the masked branch, but mask_branch=False'
      )
    if self.method == 'sra':
      teacher = self.teacher_block(model)
      if not student < teacher <= model.encoder_depth:
        raise ValueError(
            f'align.teacher_depth={teacher}: the SRA teacher block must be deeper than the '
            f'student block {student} and at most the encoder depth {model.encoder_depth}'
        )
    if self.method == 'repa':
      if not self.teacher:
        raise ValueError('align.method=repa needs align.teacher, a DINOv2 folder')
      if not paths.path(self.teacher).is_dir():
        raise FileNotFoundError(
            f'align.teacher={self.teacher!r} does not exist (a DINOv2 folder written by '
            'tools/convert_dinov2.py)'
        )
      dinov2.read_config(self.teacher)  # a DINOv2 folder, or a clear error

  def model_config(self, model: MDTConfig) -> MDTConfig:
    """The model with the projector this alignment trains (unchanged for 'none')."""
    if not self.enabled:
      return model
    width = model.hidden_size
    if self.method == 'repa':
      width = dinov2.read_config(self.teacher).hidden_size
    return dataclasses.replace(model, align_dim=width, projector_dim=self.projector_dim)


# ------------------------------------------------------------------------------ the loss


def cosine_terms(student: Array, teacher: Array, valid: Array | None = None) -> dict[str, Array]:
  """{'loss': -mean cosine, 'cos': mean cosine} over the tokens of [B, T, D] pairs (float32);
  `valid` [B, T] (True: counted) restricts the mean to those tokens."""
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  unit = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))  # noqa
  cos = jnp.sum(unit(s) * unit(t), axis=-1)
  if valid is None:
    mean = cos.mean()
  else:
    w = valid.astype(jnp.float32)
    mean = jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1.0)
  return {'loss': -mean, 'cos': mean}


def at_positions(features: Features, tokens: Array) -> Array:
  """The teacher's tokens [B, L, D] (grid order) at the student's tokens' positions."""
  if features.ids is None:
    return tokens
  return jnp.take_along_axis(tokens, features.ids[:, :, None], axis=1)


def align_terms(model, features: Features, teacher_tokens: Array) -> dict[str, Array]:
  """The projected student tokens against the teacher's at the same grid positions."""
  target = jax.lax.stop_gradient(at_positions(features, teacher_tokens))
  return cosine_terms(model.projector(features.tokens), target, features.valid)


def active_weight(align: AlignConfig, step: Array) -> Array:
  """align.weight, or 0 from align.stop_step on."""
  w = jnp.asarray(align.weight, jnp.float32)
  if not align.stop_step:
    return w
  return jnp.where(step < align.stop_step, w, 0.0)


# ------------------------------------------------------------------------------ teachers


def repa_targets(teacher: dinov2.Dinov2, images: Array, grid: int, resolution: int) -> Array:
  """DINOv2 patch tokens of images NHWC in [-1, 1] (grey images repeated to RGB), resized to
  `resolution` as REPA does and pooled onto the student's grid -> [B, grid^2, D]."""
  if images.shape[-1] == 1 and teacher.config.num_channels == 3:
    images = jnp.repeat(images, 3, axis=-1)
  pixels = dinov2.normalize(images, resolution)
  tokens = dinov2.pool_tokens(teacher.patch_tokens(pixels), grid)
  return jax.lax.stop_gradient(tokens)


def sra_time(process, t: Array, key: Array, offset: float) -> Array:
  """The teacher's time: t - offset * u of the time range (u ~ U[0, 1)), at least 0."""
  u = jax.random.uniform(key, t.shape)
  if isinstance(process, FlowMatching):
    return jnp.clip(t - offset * u, 0.0, 1.0)
  lower = jnp.floor(offset * process.num_timesteps * u).astype(t.dtype)
  return jnp.maximum(t - lower, 0)


def sra_targets(teacher_model, process, x0, noise, t_teacher, y, model_key, block: int) -> Array:
  """The teacher model's block `block` tokens [B, L, D] (its plain pass) at the teacher's time,
  with the student's noise and label dropout (the same model key)."""
  if isinstance(process, FlowMatching):
    x_t = flow.interpolate(x0, noise, t_teacher)
    t_model = flow.model_time(process, t_teacher)
  else:
    x_t, t_model = q_sample(process, x0, t_teacher, noise), t_teacher
  _, features = teacher_model(x_t, t_model, y, rng=model_key, train=True, features_at=block)
  return jax.lax.stop_gradient(features.tokens)


# ------------------------------------------------------------------------------ the train step

# folded into a branch's model key for the SRA teacher's time: no draw of the step changes
_SRA_TIME_SALT = 0x5A


@dataclasses.dataclass(frozen=True)
class BranchAligner:
  """One branch's alignment: the student block and its terms, called as ``terms(model, features,
  x0, noise, t, y, model_key)`` -> {'loss', 'cos'}."""

  block: int
  terms: Callable[..., dict[str, Array]]


class Alignment:
  """The train step's view of ``config.align``: the blocks, the REPA teacher (loaded once)."""

  def __init__(self, config: AlignConfig, model: MDTConfig, stored: bool = False):
    """``stored``: REPA's teacher features come with the batch ('align', extracted beside the
    latents) instead of from the teacher run on the images."""
    self.config = config
    self.block = config.student_block(model)
    self.teacher_block = config.teacher_block(model)
    self.grid = model.grid
    self.stored = stored and config.method == 'repa'
    online = config.method == 'repa' and not self.stored
    self.teacher = dinov2.load(config.teacher) if online else None

  def weight(self, step: Array) -> Array:
    return active_weight(self.config, step)

  def aligners(
      self, graphdef, teacher_params, dif, x0: Array, batch: Mapping[str, Array] | None = None
  ) -> dict[str, BranchAligner]:
    """{'plain' / 'masked': BranchAligner} of the aligned branches. REPA's targets are the clean
    images' (once for both branches; stored: the batch's 'align' features); SRA's come from
    `teacher_params` (the EMA or current weights, without gradient) per branch, at the branch's
    noise and label dropout."""
    cfg = self.config
    if cfg.method == 'repa':
      if self.stored:
        if batch is None or 'align' not in batch:
          raise ValueError("stored teacher features: the batch has no 'align' entry")
        targets = jax.lax.stop_gradient(dinov2.pool_tokens(batch['align'], self.grid))
      else:
        targets = repa_targets(self.teacher, x0, self.grid, cfg.resolution)

      def terms(model, features, *unused):
        return align_terms(model, features, targets)

    else:
      teacher_model = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))

      def terms(model, features, x0, noise, t, y, model_key):
        t_teacher = sra_time(
            dif, t, jax.random.fold_in(model_key, _SRA_TIME_SALT), cfg.noise_offset
        )
        tokens = sra_targets(
            teacher_model, dif, x0, noise, t_teacher, y, model_key, self.teacher_block
        )
        return align_terms(model, features, tokens)

    aligner = BranchAligner(self.block, terms)
    return {b: aligner for b in ('plain', 'masked') if cfg.aligns(b)}


def _settings(align: Mapping[str, Any] | None) -> dict:
  d = dict(align or {})
  if d.get('teacher') is None:  # an unset placeholder
    d.pop('teacher', None)
  return d


def config_of(align: Mapping[str, Any] | None) -> AlignConfig:
  """``config.align`` (a ConfigDict section, or None: absent) as an AlignConfig."""
  return AlignConfig.from_dict(_settings(align))
