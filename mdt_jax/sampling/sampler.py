"""A jitted, sharded batch sampler over a model, and `generate` for whole runs.

The model is an `mdt_jax.MDT` (split into graphdef + state, merged inside the jitted function) or
any callable model_fn(x [B,H,W,C], t [B] original timesteps, y [B]) -> [B,H,W,2C] / [B,H,W,C].
The batch is split over the 'data' axis of a 1-D mesh with shard_map (sampling is per sample by
nature: no communication); each device runs the whole fori_loop on its slice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mdt_jax.models import platform
from mdt_jax.sampling import labels as labels_lib
from mdt_jax.sampling.guidance import guided_model
from mdt_jax.sampling.config import SamplerConfig
from mdt_jax.sampling.loops import per_sample_normal, run_loop, sample_keys

Array = jax.Array


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D mesh ('data',) over `devices` (default: every device)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(
      (len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
  )


def functional_model(model: Any) -> tuple[Callable, Any]:
  """(apply(params, x, t, y), params) for an nnx.Module or a plain callable (params None)."""
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return (lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y)), state
  if callable(model):
    return (lambda _, x, t, y: model(x, t, y)), None
  raise TypeError(f'model must be an nnx.Module or a callable model_fn, got {type(model)}')


@dataclasses.dataclass
class Sampler:
  """Draws samples for given global indices and labels: `sampler(indices, labels, seed)`."""

  config: SamplerConfig
  image_shape: tuple[int, int, int]
  num_classes: int
  learn_sigma: bool
  mesh: jax.sharding.Mesh
  params: Any
  fn: Callable

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def __call__(self, indices, labels, seed: int = 0) -> np.ndarray:
    """float32 [B, H, W, C] samples; B is padded to a multiple of the device count inside."""
    indices = np.asarray(indices, np.int64)
    labels = labels_lib.check_labels(labels, self.num_classes)
    if indices.shape != labels.shape or indices.ndim != 1:
      raise ValueError(
          f'indices {indices.shape} and labels {labels.shape} must be 1-D and of equal length'
      )
    check_indices(indices)
    return call_sharded(
        self.mesh,
        self.fn,
        (self.params, labels_lib.noise_key(seed)),
        (indices.astype(np.int32), labels),
    )


def check_indices(indices: np.ndarray) -> None:
  """Global sample indices lie in [0, 2**31) (they are int32 on the devices)."""
  if indices.size and (indices.min() < 0 or indices.max() >= 2**31):
    raise ValueError('sample indices must lie in [0, 2**31)')


def call_sharded(
    mesh: jax.sharding.Mesh, fn: Callable, replicated: tuple, per_sample: tuple[np.ndarray, ...]
) -> np.ndarray:
  """fn(*replicated, *per_sample) with the per-sample arrays split over the mesh's 'data' axis:
  rows are padded (repeating the last) to a multiple of the device count, the result gathered
  from every process and cut back to the given rows."""
  n = len(per_sample[0])
  pad = (-n) % mesh.devices.size
  rows = np.concatenate([np.arange(n), np.repeat(n - 1, pad)]).astype(np.int64)
  sharding = NamedSharding(mesh, P('data'))
  put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])
  out = fn(*replicated, *(put(np.asarray(a)[rows]) for a in per_sample))
  if jax.process_count() > 1:
    out = multihost_utils.process_allgather(out, tiled=True)
  return np.asarray(out)[:n]


def in_batches(
    n: int,
    batch_size: int,
    num_devices: int,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    start: int = 0,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    log_every: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
  """fn(indices, rows) for global indices start .. start + n - 1, in batches of one padded size
  (`batch_size` rounded up to the device count: the whole run compiles once); rows are the
  positions in the run (padding rows repeat the batch's), indices continue past the end.
  `on_batch(k)` is called after each batch with its k samples (e.g. a progress bar's update);
  `log_every` logs a line every that many batches (0: none)."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  batch_size += (-batch_size) % num_devices
  outs, t0 = [], time.time()
  num_batches = -(-n // batch_size)
  for b, lo in enumerate(range(0, n, batch_size)):
    hi = min(n, lo + batch_size)
    rows = np.resize(np.arange(lo, hi), batch_size)  # padding rows repeat; dropped below
    out = fn(np.arange(start + lo, start + lo + batch_size), rows)[: hi - lo]
    outs.append(postprocess(out) if postprocess else out)
    if on_batch is not None:
      on_batch(hi - lo)
    if log_every and ((b + 1) % log_every == 0 or b + 1 == num_batches):
      dt = time.time() - t0
      logging.info('sampled %d/%d (%.2f samples/s, ETA %.0f s)', hi, n, hi / dt, (n - hi) * dt / hi)
  return np.concatenate(outs)


def draw_samples(
    model_fn: Callable,
    config: SamplerConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    key: Array,
    idx: Array,
    y: Array,
) -> Array:
  """Samples [B, H, W, C] for global indices idx [B] and labels y [B]: per-sample starting
  noise, guidance (with `config.guidance`) and the sampler's loop. `build_sampler` jits and
  shards this; run under `jax.disable_jit()` it is the same sampler, op by op."""
  g = config.guidance
  if g is not None:
    model_fn = guided_model(model_fn, g, null_label=num_classes, channels=image_shape[-1])
  keys = sample_keys(key, idx)
  x = per_sample_normal(keys, 0, image_shape)
  return run_loop(config, lambda x, t: model_fn(x, t, y), x, keys)


def sharded_model(
    model: Any,
    mesh: jax.sharding.Mesh | None,
    image_shape: tuple[int, int, int] | None,
    num_classes: int | None,
) -> tuple[tuple[int, int, int], int, jax.sharding.Mesh, Callable, Any]:
  """(image shape, classes, 'data' mesh, apply, weights replicated on the mesh) of an MDT (shape
  and classes from model.config) or of a model_fn (give both)."""
  cfg = getattr(model, 'config', None)
  if image_shape is None:
    if cfg is None:
      raise ValueError('image_shape (H, W, C) is needed for a plain model_fn')
    image_shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
  if num_classes is None:
    if cfg is None:
      raise ValueError('num_classes is needed for a plain model_fn')
    num_classes = cfg.num_classes
  mesh = mesh or data_mesh()
  if mesh.axis_names != ('data',):
    raise ValueError(f'the sampling mesh must be 1-D with axis "data", got {mesh.axis_names}')
  apply, params = functional_model(model)
  # Replicate the weights once, not on every call.
  params = jax.device_put(params, NamedSharding(mesh, P()))
  return tuple(int(s) for s in image_shape), num_classes, mesh, apply, params


def build_sampler(
    model: Any,
    config: SamplerConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> Sampler:
  """A `Sampler` for an MDT (shape and classes from model.config) or a model_fn (give both).

  Checks the model output channels with an abstract evaluation (nothing runs) and compiles once
  per batch shape.
  """
  image_shape, num_classes, mesh, apply, params = sharded_model(
      model, mesh, image_shape, num_classes
  )
  c = image_shape[-1]
  one = jnp.zeros((1,), jnp.int32)
  probe = jax.eval_shape(lambda p: apply(p, jnp.zeros((1,) + image_shape), one, one), params)
  if probe.shape[-1] not in (c, 2 * c) or probe.shape[:-1] != (1,) + image_shape[:-1]:
    raise ValueError(
        f'model output {probe.shape} does not fit images {image_shape}: expected '
        f'[B, H, W, {c}] (fixed variance) or [B, H, W, {2 * c}] (learned variance)'
    )
  learn_sigma = probe.shape[-1] == 2 * c
  if config.objective == 'flow' and learn_sigma:
    raise ValueError(
        f'a flow model predicts a velocity of {c} channels, but this model outputs '
        f'{2 * c} (learned variance): it was not trained with the flow objective'
    )

  def local(params, key, idx, y):
    return draw_samples(
        lambda x, t, yy: apply(params, x, t, yy), config, image_shape, num_classes, key, idx, y
    )

  sharded = jax.shard_map(
      platform.traced_for(mesh.devices.flat, local),
      mesh=mesh,
      in_specs=(P(), P(), P('data'), P('data')),
      out_specs=P('data'),
  )
  return Sampler(
      config=config,
      image_shape=image_shape,
      num_classes=num_classes,
      learn_sigma=learn_sigma,
      mesh=mesh,
      params=params,
      fn=jax.jit(sharded),
  )


def generate(
    sampler: Sampler,
    labels: np.ndarray,
    *,
    seed: int = 0,
    batch_size: int = 64,
    start: int = 0,
    log_every: int = 1,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
  """Samples for global indices start .. start+len(labels)-1, in batches of `batch_size`.

  Every batch is padded to the same size so the whole run compiles once. `postprocess` maps each
  batch of samples (e.g. VAE decoding to uint8) before it is collected; `on_batch(k)` is told
  each batch's k samples (a progress bar's update), and `log_every` logs a line every that many
  batches (0: none, as when a progress bar shows the same).
  """
  labels = labels_lib.check_labels(labels, sampler.num_classes)
  return in_batches(
      labels.size,
      batch_size,
      sampler.num_devices,
      lambda idx, rows: sampler(idx, labels[rows], seed),
      start=start,
      postprocess=postprocess,
      log_every=log_every,
      on_batch=on_batch,
  )
