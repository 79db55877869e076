"""Encode ImageNet (TFDS or an image folder) with the SD VAE into ArrayRecord latent shards.

    python tools/extract_latents.py --vae VAE_DIR --source tfds --tfds_data_dir DIR --out OUT
    python tools/extract_latents.py --vae VAE_DIR --source folder --image_dir train/ --out OUT

Each image and its horizontal flip are encoded (ADM centre crop to --image_size). With
--align_encoder=DIR (a DINOv2 folder, tools/convert_dinov2.py) the teacher's patch tokens of the
image and of its flip (resized to --align_resolution) are stored in the same record, float16, for
REPA on latents (docs/alignment.md says what that costs on disk). A restarted run
skips finished shards; unreadable images are listed in OUT/skipped.txt; OUT/manifest.json holds
the summary. See mdt_jax/data/extract.py (the writing) and image_sources.py (the images).
"""

import jax
import jax.numpy as jnp
from absl import app, flags, logging

import mdt_jax.vae
from mdt_jax import errors, paths
from mdt_jax.data import extract, image_sources
from mdt_jax.models import dinov2

flags.DEFINE_string(
    'vae', None, 'VAE folder written by tools/convert_vae.py (sd-vae-ft-mse)', required=True
)
flags.DEFINE_string('out', None, 'output folder for the shards and manifest.json', required=True)
flags.DEFINE_enum('source', 'tfds', ['tfds', 'folder'], 'where the images come from')
flags.DEFINE_string('tfds_name', 'imagenet2012', 'TFDS dataset name (--source=tfds)')
flags.DEFINE_string('tfds_split', 'train', 'TFDS split (--source=tfds)')
flags.DEFINE_string('tfds_data_dir', None, 'TFDS data_dir (--source=tfds)')
flags.DEFINE_string('image_dir', None, 'root of the image folder (--source=folder)')
flags.DEFINE_enum(
    'label_from',
    'folder',
    ['folder', 'prefix'],
    'class of a folder image: its sub-folder under --image_dir, or its file-name '
    "prefix before the first '_' (as the ADM loader)",
)
flags.DEFINE_integer('image_size', 256, 'centre-crop size')
flags.DEFINE_integer('batch_size', 64, 'images per step (a multiple of the device count)')
flags.DEFINE_integer('images_per_shard', 10_000, 'images per ArrayRecord shard')
flags.DEFINE_integer('num_workers', 16, 'threads that read and resize images')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'VAE compute dtype')
flags.DEFINE_enum(
    'precision',
    'default',
    ['default', 'high', 'highest'],
    'matmul/conv precision of float32 compute. On GPUs "default" is TF32 (moments '
    'within ~1e-3 relative of full float32, as PyTorch cuDNN convolutions); '
    '"highest" is full float32 and was ~11x slower on an H200',
)
flags.DEFINE_string(
    'align_encoder',
    None,
    'a DINOv2 folder (tools/convert_dinov2.py): store its patch tokens of each image and of the '
    "flip beside the latents (REPA's teacher features)",
)
flags.DEFINE_integer(
    'align_resolution', 224, "the teacher's input size in pixels (224: a 16 x 16 grid at /14)"
)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # up front, before the images are listed or the VAE is loaded
  out = paths.require_local(FLAGS.out, '--out', extract.LOCAL_OUT_REASON)
  if FLAGS.source == 'folder':
    if not FLAGS.image_dir:
      raise app.UsageError('--source=folder needs --image_dir')
    image_dir = paths.require_local(
        FLAGS.image_dir, '--image_dir', 'the image folder is walked on a local disk'
    )
    source = image_sources.folder_source(image_dir, FLAGS.label_from)
  else:
    source = image_sources.tfds_source(
        FLAGS.tfds_name, FLAGS.tfds_split, paths.resolve_optional(FLAGS.tfds_data_dir)
    )
  logging.info(
      '%d images in %d classes from %s', len(source), len(source.class_names), source.description
  )
  teacher = None
  if FLAGS.align_encoder:
    teacher = dinov2.load(paths.resolve(FLAGS.align_encoder))
    grid, rem = divmod(FLAGS.align_resolution, teacher.config.patch_size)
    if rem or grid < 1:
      raise app.UsageError(
          f"--align_resolution={FLAGS.align_resolution} is not a multiple of the teacher's "
          f'patch size {teacher.config.patch_size}'
      )
  vae = mdt_jax.vae.load(paths.resolve(FLAGS.vae), dtype=jnp.dtype(FLAGS.dtype))
  precision = None if FLAGS.precision == 'default' else FLAGS.precision
  with jax.default_matmul_precision(precision):
    extract.extract(
        source,
        vae,
        out,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        images_per_shard=FLAGS.images_per_shard,
        num_workers=FLAGS.num_workers,
        align_encoder=teacher,
        align_resolution=FLAGS.align_resolution,
    )


if __name__ == '__main__':
  errors.run(main)
