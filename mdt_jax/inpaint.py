r"""Inpaint images with a trained MDT: complete the unknown region of each image.

    python -m mdt_jax.inpaint --model=DIR --images=IMAGES.npz --masks=MASKS.npz --out=OUT \
        [--labels=3,1,4] [--method=mdt --mdt_fraction=0.5 | --method=repaint --resample=1] \
        [--sampler=ddpm --steps=250 --cfg_scale=3.8 ...]

IMAGES.npz: arr_0, the images, uint8 [N, H, W, C] (the layout mdt_jax.sample writes) or float in
[-1, 1]; arr_1, their class labels (used when --labels is not given; --labels=none completes
without a class, from the known region alone). MASKS.npz: arr_0, [N, H, W]
(or [N, H, W, 1]) of 1 (known) and 0 (unknown) at image resolution. A latent model encodes the
images with its VAE (the latent mean) and knows a latent pixel when every image pixel of its
cell is known; its known region comes back through the decoder, so it is close to the original,
not equal. The methods are described in mdt_jax/sampling/inpaint.py and docs/inpainting.md;
sampler and guidance flags are those of mdt_jax.sample (DPM-Solver++ is not offered: it is
multistep).

Writes OUT/inpainted.npz (arr_0 uint8 [N, H, W, 3] completions, arr_1 labels), OUT/run.json (the
settings) and OUT/inpaint_grid.png (rows of original, masked input and completion).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags, logging
import numpy as np

from mdt_jax import atomic, errors, images as images_lib, paths
from mdt_jax.cli import sampler_flags

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(sampler_flags)
flags.DEFINE_string(
    'images',
    None,
    '.npz with arr_0 images (uint8 or float in [-1, 1]) and optionally arr_1 labels.',
)
flags.DEFINE_string('masks', None, '.npz with arr_0 masks [N, H, W]: 1 known, 0 unknown.')
flags.DEFINE_enum(
    'method',
    'mdt',
    ['mdt', 'repaint'],
    'mdt: masked pass (side-interpolater) '
    'for the first --mdt_fraction of the steps; repaint: replacement only.',
)
flags.DEFINE_float(
    'mdt_fraction',
    0.5,
    'Share of the reverse steps (from the noise end) that run the masked pass (method mdt).',
)
flags.DEFINE_integer('resample', 1, 'RePaint resampling: passes per reverse step (1: none).')


def read_npz(path: str, what: str) -> dict[str, np.ndarray]:
  """Every array of an .npz file, local or on object storage."""
  p = paths.path(path)
  if not p.is_file():
    raise FileNotFoundError(f'--{what}: no file {path!r}')
  with p.open('rb') as f, np.load(f) as npz:
    if 'arr_0' not in npz:
      raise ValueError(f'--{what}: {path} has no arr_0 (found {sorted(npz.files)})')
    return {k: npz[k] for k in npz.files}


def to_unit_range(images: np.ndarray, channels: int | None = None) -> np.ndarray:
  """uint8 or [-1, 1] float NHWC -> float32 in [-1, 1]; 3 channels averaged to 1 if asked."""
  x = np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f'images must be NHWC [N, H, W, C], got shape {x.shape}')
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 127.5 - 1.0
  elif np.issubdtype(x.dtype, np.floating):
    if not np.isfinite(x).all() or x.min() < -1.001 or x.max() > 1.001:
      raise ValueError(
          'float images must be finite and lie in [-1, 1] (uint8 images are '
          'read as x / 127.5 - 1)'
      )
    x = np.clip(x, -1.0, 1.0).astype(np.float32)
  else:
    raise ValueError(f'images must be uint8 or float, got dtype {x.dtype}')
  if channels == 1 and x.shape[-1] == 3:
    x = x.mean(axis=-1, keepdims=True)  # a grey model given RGB (e.g. sample.py output)
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f'images have {x.shape[-1]} channels, the model takes {channels}')
  return x


def masked_view(images_u8: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """The input as the model sees it: unknown pixels grey."""
  return np.where(masks[..., None], images_u8, np.uint8(128))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  for name in ('images', 'masks'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  from mdt_jax.sampling import labels as labels_lib, postprocess as postprocess_lib
  from mdt_jax.sampling import inpaint as inp

  data = read_npz(paths.resolve(FLAGS.images), 'images')
  masks = inp.check_masks(
      read_npz(paths.resolve(FLAGS.masks), 'masks')['arr_0'], np.shape(data['arr_0'])
  )  # before the model loads
  icfg = inp.InpaintConfig(
      method=FLAGS.method, resample=FLAGS.resample, mdt_fraction=FLAGS.mdt_fraction
  )
  model_path, sm, cfg = sampler_flags.load_model_and_config()
  mc = sm.model.config
  pixel_channels = mc.in_channels if sm.space == 'pixel' else 3
  images = to_unit_range(data['arr_0'], pixel_channels)
  n = len(images)
  if FLAGS['labels'].present and FLAGS.labels == 'none':
    labels = np.full(n, mc.num_classes, np.int32)  # the null class: unconditional
  elif FLAGS['labels'].present:
    labels = labels_lib.make_labels(
        labels_lib.parse_labels(FLAGS.labels), n, mc.num_classes, FLAGS.seed
    )
  elif 'arr_1' in data:
    labels = labels_lib.check_labels(data['arr_1'], mc.num_classes)
  else:
    raise app.UsageError(f'{FLAGS.images} holds no labels (arr_1): pass --labels')
  if labels.shape != (n,):
    raise ValueError(f'{labels.size} labels for {n} images')
  if cfg.cfg_scale is not None and (labels == mc.num_classes).all():
    cfg = dataclasses.replace(cfg, cfg_scale=None)  # null vs null: guidance would change nothing
  vae = None
  if sm.space == 'latent':
    vae = postprocess_lib.load_vae(sm, paths.resolve_optional(FLAGS.vae))
  postprocess = postprocess_lib.make_postprocess(sm, vae=vae)
  x, model_masks = images, masks
  if vae is not None:
    x, model_masks = encode_latents(vae, sm.latent_scale, images, masks)
  inpainter = inp.build_inpainter(sm.model, cfg, icfg)
  logging.info('inpainting %d images: %s, %s on %d device(s)', n, icfg, cfg, inpainter.num_devices)
  out = inp.inpaint(
      inpainter,
      x,
      model_masks,
      labels,
      seed=FLAGS.seed,
      batch_size=FLAGS.batch_size,
      postprocess=postprocess,
  )
  write_outputs(
      paths.resolve(FLAGS.out),
      out,
      labels,
      images_lib.to_uint8(images),
      masks,
      dict(
          model=model_path,
          space=sm.space,
          sampler=cfg.record(),
          inpaint=dataclasses.asdict(icfg),
          seed=FLAGS.seed,
          images=FLAGS.images,
          masks=FLAGS.masks,
      ),
  )


def encode_latents(
    vae, latent_scale: float, images: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Scaled latent means of pixel images, and the masks at latent resolution."""
  from mdt_jax.sampling import inpaint as inp

  mean, _ = vae.encode(images)
  return (
      np.asarray(mean, np.float32) * latent_scale,
      inp.downsample_masks(masks, vae.config.downsample_factor),
  )


def write_outputs(
    out_dir: str,
    completions: np.ndarray,
    labels: np.ndarray,
    originals: np.ndarray,
    masks: np.ndarray,
    settings: dict,
) -> None:
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  atomic.save_npz(os.path.join(out_dir, 'inpainted.npz'), arr_0=completions, arr_1=labels)
  atomic.write_text(
      os.path.join(out_dir, 'run.json'), json.dumps(json.loads(json.dumps(settings)), indent=2)
  )
  k = min(FLAGS.grid_size, len(completions))
  if k:
    rows = np.stack([originals[:k], masked_view(originals[:k], masks[:k]), completions[:k]], 1)
    images_lib.save_grid(
        rows.reshape((-1,) + rows.shape[2:]), os.path.join(out_dir, 'inpaint_grid.png'), ncols=3
    )
  logging.info('wrote %s: %s completions', out_dir, completions.shape)


if __name__ == '__main__':
  errors.run(main)
