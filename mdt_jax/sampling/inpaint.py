"""Inpainting: complete the unknown region of images (or latents) with a trained model.

Two methods, for DDPM models (samplers ddpm, ddim) and flow models (euler, heun,
euler_maruyama), with classifier-free guidance as the sampler has it:

* ``repaint``, for any model (Lugmayr et al. 2022): after every reverse step the known region of x
  is replaced by the original, forward-noised to the new noise level. ``resample`` = r > 1 is
  RePaint's resampling with jump length 1: the step is taken r times, x being noised back by one
  step between the passes, so the unknown region can adapt to the known one.
* ``mdt``, MDT's side-interpolater (the paper's inpainting; its authors describe their demo in
  sail-sg/MDT #7 and #8): the same replacement, but for the first ``mdt_fraction`` of the reverse
  steps the model runs its masked pass, in which the encoder sees only the known tokens and the
  side-interpolater predicts the unknown ones; plain passes after the switch.

Masks are per pixel, 1 = known, 0 = unknown (bool or 0/1 numbers), [N, H, W] or [N, H, W, 1] at
the model's resolution. The masked pass needs token masks: a token is known when every pixel of
its patch is known. A partially known patch is unknown to the encoder (its unknown pixels would
show it the current sample, not the image); its known pixels are still replaced at every step.
A sample without one fully known patch runs the plain pass (its masked pass would see nothing).

Randomness is the sampler's (loops.py): sample i owns key_i, its starting noise is stream 0
and the step noise of loop iteration j stream j + 1, so an all-unknown mask draws exactly the
plain sample. The noise of the known region, of resampling passes and of noising back use
streams of their own (``_stream``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mdt_jax import diffusion as gd
from mdt_jax.models import platform
from mdt_jax.sampling import flow_loops
from mdt_jax.sampling import labels as labels_lib
from mdt_jax.sampling.guidance import guided_model
from mdt_jax.sampling.sampler import sharded_model
from mdt_jax.sampling.config import SamplerConfig
from mdt_jax.sampling.loops import ddim_step, p_sample_step, per_sample_normal, sample_keys

Array = jax.Array

METHODS = ('repaint', 'mdt')
INPAINT_SAMPLERS = ('ddpm', 'ddim', 'euler', 'heun', 'euler_maruyama')
MAX_RESAMPLE = 64
_PASS_STRIDE = 1 << 20  # > any step count: stream offset of resampling pass r
_KNOWN_STREAMS = 1 << 28  # noise of the forward-noised known region
_BACK_STREAMS = 1 << 29  # noise of noising back between resampling passes


@dataclasses.dataclass(frozen=True)
class InpaintConfig:
  """method: 'repaint' or 'mdt'. resample: passes per reverse step (1: none, RePaint used 10).
  mdt_fraction: the share of the reverse steps, from the noise end, that run the masked pass
  (method 'mdt' only; 0 gives the repaint method, 1 masks every step)."""

  method: str = 'repaint'
  resample: int = 1
  mdt_fraction: float = 0.5

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'inpainting method must be one of {METHODS}, got {self.method!r}')
    if (
        isinstance(self.resample, bool)
        or int(self.resample) != self.resample
        or not (1 <= self.resample <= MAX_RESAMPLE)
    ):
      raise ValueError(f'resample must be an integer in [1, {MAX_RESAMPLE}], got {self.resample!r}')
    if not 0.0 <= self.mdt_fraction <= 1.0:
      raise ValueError(f'mdt_fraction must be in [0, 1], got {self.mdt_fraction}')

  def masked_steps(self, num_steps: int) -> int:
    """How many of the first reverse steps run the masked pass."""
    return int(round(self.mdt_fraction * num_steps)) if self.method == 'mdt' else 0


# ------------------------------------------------------------------ masks


def check_masks(masks, image_shape: tuple[int, ...], what: str = 'masks') -> np.ndarray:
  """bool [N, H, W] from masks [N, H, W] or [N, H, W, 1] of 0/1 (1 = known) for images of
  image_shape [N, H, W, C], or a ValueError naming what is wrong."""
  m = np.asarray(masks)
  if len(image_shape) != 4:
    raise ValueError(f'images must be NHWC [N, H, W, C], got shape {tuple(image_shape)}')
  n, h, w = image_shape[:3]
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.shape != (n, h, w):
    raise ValueError(
        f'{what} must have shape [N, H, W] = {(n, h, w)} (or [N, H, W, 1]) to fit '
        f'images {tuple(image_shape)}, got {np.asarray(masks).shape}'
    )
  if m.dtype != bool:
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
      raise ValueError(f'{what} must be bool or 0/1 numbers, got dtype {m.dtype}')
    bad = m[(m != 0) & (m != 1)]
    if bad.size:
      raise ValueError(
          f'{what} must be binary (1 = known, 0 = unknown), got other values such '
          f'as {np.unique(bad)[:5].tolist()}'
      )
  return m.astype(bool)


def token_masks(masks: np.ndarray | Array, patch_size: int) -> Array:
  """[N, L] bool, token known when every pixel of its patch is known (row-major tokens)."""
  p = patch_size
  return einops.reduce(jnp.asarray(masks), 'n (gh p) (gw q) -> n (gh gw)', 'all', p=p, q=p)


def downsample_masks(masks: np.ndarray, factor: int) -> np.ndarray:
  """Pixel masks [N, H, W] -> [N, H/f, W/f]: a cell known when all its pixels are known (the
  latent masks of a VAE with f-fold downsampling)."""
  n, h, w = masks.shape
  if h % factor or w % factor:
    raise ValueError(f'masks of {h}x{w} pixels do not divide into {factor}x{factor} cells')
  return masks.reshape(n, h // factor, factor, w // factor, factor).all(axis=(2, 4))


def mask_order(known: Array) -> tuple[Array, Array]:
  """(ids_shuffle [N, L], len_keep [N, 1]) with the known tokens first, in their order; a sample
  with no known token keeps all (its masked pass is the plain pass)."""
  none = ~known.any(axis=1, keepdims=True)
  known = known | none
  ids = jnp.argsort(~known, axis=1, stable=True).astype(jnp.int32)
  return ids, known.sum(axis=1, keepdims=True).astype(jnp.int32)


# ------------------------------------------------------------------ noise levels


def _stream(base: int, i: Array, r: Array) -> Array:
  return base + i + r * _PASS_STRIDE


@dataclasses.dataclass(frozen=True)
class _Process:
  """One sampler as steps between noise levels: step i goes from level i to level i + 1."""

  num_steps: int
  step: Callable  # (eval_fn, x, i, noise) -> x at level i + 1
  noised: Callable  # (x0, i, noise) -> x0 forward-noised to level i + 1
  back: Callable  # (x, i, noise) -> x at level i + 1 noised back to level i


def _ddpm_process(cfg: SamplerConfig) -> _Process:
  d = cfg.diffusion()
  n = d.num_timesteps

  def t_of(x, i):
    return jnp.full((x.shape[0],), n - 1 - i, jnp.int32)

  def step(eval_fn, x, i, noise):
    t = t_of(x, i)
    out = eval_fn(x, gd.take(d.timestep_map, t))
    if cfg.sampler == 'ddpm':
      return p_sample_step(d, out, x, t, noise, cfg.clip_denoised)
    return ddim_step(d, out, x, t, noise if cfg.eta > 0 else None, cfg.eta, cfg.clip_denoised)

  def noised(x0, i, noise):
    ab = gd.extract(d.alphas_cumprod_prev, t_of(x0, i), x0.ndim)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise

  def back(x, i, noise):
    t = t_of(x, i)
    a = gd.extract(d.alphas_cumprod, t, x.ndim) / gd.extract(d.alphas_cumprod_prev, t, x.ndim)
    return jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * noise

  return _Process(n, step, noised, back)


def _flow_process(cfg: SamplerConfig) -> _Process:
  scale = float(cfg.num_train_timesteps)
  if cfg.sampler == 'euler':
    grid = flow_loops.time_grid(cfg.steps + 1, cfg.time_shift)
  elif cfg.sampler == 'heun':
    grid = flow_loops.time_grid(cfg.steps // 2 + 1, cfg.time_shift)
  else:  # SDE steps to sde_last_step, then the noise-free step to 0
    grid = np.append(flow_loops.time_grid(cfg.steps, cfg.time_shift, end=cfg.sde_last_step), 0.0)
  ts = jnp.asarray(grid, jnp.float32)
  num = len(grid) - 1
  velocity = lambda f, x, t: flow_loops._velocity(f, x, t, scale)

  def step(eval_fn, x, i, noise):
    h = ts[i + 1] - ts[i]
    u0 = velocity(eval_fn, x, ts[i])
    if cfg.sampler == 'euler':
      return x + h * u0
    if cfg.sampler == 'heun':
      return x + 0.5 * h * (u0 + velocity(eval_fn, x + h * u0, ts[i + 1]))
    w = flow_loops.sde_diffusion(cfg.sde_diffusion, cfg.sde_diffusion_norm, ts[i])
    drift = flow_loops._sde_drift(u0, x, ts[i], w)
    sde = jnp.where(i < num - 1, jnp.sqrt(2.0 * w * -h), 0.0)  # the last step is noise-free
    return x - h * drift + sde * noise

  def noised(x0, i, noise):
    return (1.0 - ts[i + 1]) * x0 + ts[i + 1] * noise

  def back(x, i, noise):
    t, s = ts[i], ts[i + 1]
    a = (1.0 - t) / (1.0 - s)
    return a * x + jnp.sqrt(jnp.maximum(t * t - (a * s) ** 2, 0.0)) * noise

  return _Process(num, step, noised, back)


def make_process(cfg: SamplerConfig) -> _Process:
  if cfg.sampler not in INPAINT_SAMPLERS:
    raise ValueError(
        f'inpainting takes the samplers {INPAINT_SAMPLERS}, got {cfg.sampler!r} '
        '(DPM-Solver++ is multistep: replacing the known region breaks its history)'
    )
  return _flow_process(cfg) if cfg.objective == 'flow' else _ddpm_process(cfg)


# ------------------------------------------------------------------ the loop


def inpaint_loop(
    proc: _Process,
    eval_fns: tuple[Callable, Callable],
    num_masked: int | Array,
    resample: int,
    x0: Array,
    known: Array,
    keys: Array,
) -> Array:
  """Reverse process from x_T (stream 0) with the known region (known [B, H, W, 1]) replaced
  after each step; eval_fns = (masked pass, plain pass), the first for num_masked steps."""
  shape = x0.shape[1:]
  x = per_sample_normal(keys, 0, shape)

  noise = lambda base, i, r: per_sample_normal(keys, _stream(base, i, r), shape)

  def one_step(eval_fn):
    def step(x, i, r):
      y = proc.step(eval_fn, x, i, noise(1, i, r))
      return jnp.where(known, proc.noised(x0, i, noise(_KNOWN_STREAMS, i, r)), y)

    def body(i, x):
      if resample == 1:
        return step(x, i, 0)

      def attempt(r, carry):
        y = step(carry[0], i, r)
        return proc.back(y, i, noise(_BACK_STREAMS, i, r)), y

      return jax.lax.fori_loop(0, resample, attempt, (x, x))[1]

    return body

  x = jax.lax.fori_loop(0, num_masked, one_step(eval_fns[0]), x)
  return jax.lax.fori_loop(num_masked, proc.num_steps, one_step(eval_fns[1]), x)


def _masked_apply(model: nnx.Module) -> Callable:
  """apply(state, x, t, y, ids_shuffle, len_keep): the model's masked pass, buffer of L."""
  graphdef, _ = nnx.split(model)
  size = model.config.num_tokens

  def apply(state, x, t, y, ids, len_keep):
    reps = x.shape[0] // ids.shape[0]  # guidance runs [x; x]: one mask per half
    return nnx.merge(graphdef, state)(
        x,
        t,
        y,
        ids_shuffle=jnp.tile(ids, (reps, 1)),
        len_keep=jnp.tile(len_keep, (reps, 1)),
        keep_buffer=size,
    )

  return apply


@dataclasses.dataclass
class Inpainter:
  """Completes images for given global indices: `inpainter(indices, labels, images, masks)`.

  A label may be `num_classes`, the null class of classifier-free guidance: the completion is
  then unconditional (guidance has nothing to push towards) and must take its class from the
  known region alone.
  """

  config: SamplerConfig
  inpaint: InpaintConfig
  image_shape: tuple[int, int, int]
  num_classes: int
  mesh: jax.sharding.Mesh
  params: Any
  fn: Callable
  num_steps: int
  has_masked_pass: bool

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def with_config(self, inpaint: InpaintConfig) -> 'Inpainter':
    """The same compiled program with another method or switch point (resample is compiled
    in: another value needs build_inpainter)."""
    if inpaint.resample != self.inpaint.resample:
      raise ValueError(
          f'resample {inpaint.resample} differs from the compiled '
          f'{self.inpaint.resample}: build another inpainter'
      )
    if inpaint.method == 'mdt' and not self.has_masked_pass:
      raise ValueError("the 'mdt' method needs an MDT model (its masked pass)")
    return dataclasses.replace(self, inpaint=inpaint)

  def __call__(self, indices, labels, images, masks, seed: int = 0) -> np.ndarray:
    """float32 [B, H, W, C]; the batch is padded to a multiple of the device count inside."""
    indices = np.asarray(indices, np.int64)
    labels = labels_lib.check_labels(labels, self.num_classes + 1)  # + the null class
    images = check_images(images, self.image_shape)
    masks = check_masks(masks, images.shape)
    n = indices.size
    if indices.shape != (n,) or labels.shape != (n,) or len(images) != n:
      raise ValueError(
          f'indices {indices.shape}, labels {labels.shape} and images '
          f'{images.shape} must hold the same number of samples'
      )
    if n and (indices.min() < 0 or indices.max() >= 2**31):
      raise ValueError('sample indices must lie in [0, 2**31)')
    pad = (-n) % self.num_devices
    rows = np.concatenate([np.arange(n), np.repeat(n - 1, pad)]).astype(np.int64)
    sharding = NamedSharding(self.mesh, P('data'))
    put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])
    num_masked = jnp.int32(self.inpaint.masked_steps(self.num_steps))
    out = self.fn(
        self.params,
        labels_lib.noise_key(seed),
        num_masked,
        put(indices[rows].astype(np.int32)),
        put(labels[rows]),
        put(images[rows]),
        put(masks[rows]),
    )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)[:n]


def check_images(images, image_shape: tuple[int, int, int], what: str = 'images') -> np.ndarray:
  """float32 [N, H, W, C] of the model's shape, finite, or a ValueError."""
  x = np.asarray(images)
  if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(
        f'{what} must have shape [N, {", ".join(map(str, image_shape))}] for this '
        f'model, got {x.shape}'
    )
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(
        f'{what} must be floats (model space: pixels in [-1, 1] or scaled '
        f'latents), got dtype {x.dtype}'
    )
  if not np.isfinite(x).all():
    raise ValueError(f'{what} contain NaN or inf')
  return x.astype(np.float32)


def build_inpainter(
    model: Any,
    config: SamplerConfig,
    inpaint: InpaintConfig = InpaintConfig(),
    *,
    mesh: jax.sharding.Mesh | None = None,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> Inpainter:
  """An `Inpainter` for an MDT (any method) or a plain model_fn (method 'repaint').

  The number of masked steps is an argument of the compiled program, so `with_config` switches
  method and switch point without compiling again.
  """
  proc = make_process(config)
  cfg = getattr(model, 'config', None)
  if inpaint.method == 'mdt' and not isinstance(model, nnx.Module):
    raise ValueError(
        "the 'mdt' method needs an MDT model (its masked pass); a plain model_fn "
        "takes the 'repaint' method"
    )
  image_shape, num_classes, mesh, apply, params = sharded_model(
      model, mesh, image_shape, num_classes
  )
  masked = _masked_apply(model) if isinstance(model, nnx.Module) else None
  patch = cfg.patch_size if cfg is not None else 1
  g = config.guidance

  def local(params, key, num_masked, idx, y, x0, masks):
    ids, len_keep = mask_order(token_masks(masks, patch))
    fns = [lambda x, t, yy: apply(params, x, t, yy)]
    if masked is not None:
      fns.insert(0, lambda x, t, yy: masked(params, x, t, yy, ids, len_keep))
    if g is not None:
      fns = [guided_model(f, g, null_label=num_classes, channels=image_shape[-1]) for f in fns]
    evals = tuple(lambda x, t, f=f: f(x, t, y) for f in fns)
    return inpaint_loop(
        proc,
        (evals[0], evals[-1]),
        num_masked,
        inpaint.resample,
        x0,
        masks[..., None],
        sample_keys(key, idx),
    )

  sharded = jax.shard_map(
      platform.traced_for(mesh.devices.flat, local),
      mesh=mesh,
      in_specs=(P(), P(), P(), P('data'), P('data'), P('data'), P('data')),
      out_specs=P('data'),
  )
  return Inpainter(
      config=config,
      inpaint=inpaint,
      image_shape=image_shape,
      num_classes=num_classes,
      mesh=mesh,
      params=params,
      fn=jax.jit(sharded),
      num_steps=proc.num_steps,
      has_masked_pass=masked is not None,
  )


def inpaint(
    inpainter: Inpainter,
    images,
    masks,
    labels,
    *,
    seed: int = 0,
    batch_size: int = 64,
    start: int = 0,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
  """Completions of images [N, H, W, C] (model space) under masks [N, H, W] (1 = known) for
  global indices start .., in batches of `batch_size` padded to one size (one compilation)."""
  labels = labels_lib.check_labels(labels, inpainter.num_classes + 1)
  images = check_images(images, inpainter.image_shape)
  masks = check_masks(masks, images.shape)
  if len(labels) != len(images):
    raise ValueError(f'{len(labels)} labels for {len(images)} images')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  batch_size += (-batch_size) % inpainter.num_devices
  outs = []
  for lo in range(0, len(images), batch_size):
    hi = min(len(images), lo + batch_size)
    rows = np.resize(np.arange(lo, hi), batch_size)  # padding rows repeat; dropped below
    out = inpainter(
        start + np.arange(lo, lo + batch_size), labels[rows], images[rows], masks[rows], seed
    )[: hi - lo]
    outs.append(postprocess(out) if postprocess else out)
  return np.concatenate(outs)
