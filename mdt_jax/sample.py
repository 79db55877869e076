r"""Sample from a trained MDT into the ADM evaluator's .npz layout.

    python -m mdt_jax.sample --model=DIR --num_samples=50000 --cfg_scale=3.8 --scale_pow=4 \
        --sampler=ddpm --steps=250 --seed=0 --out=OUT
    python -m mdt_jax.sample --model=FLOW_DIR --sampler=heun --steps=50 ... --out=OUT

DDPM-objective models take ddpm | ddim | dpm_solver++, flow-objective models (the folder's
diffusion.objective) euler | heun | euler_maruyama; the other family is refused.

DIR is a model folder, a training workdir or a Hub id. Settings not given on the command line
come from the model's recommended 'sampling' settings, then from the defaults below. Writes
OUT/shards/*.npz (a restarted run skips finished shards), OUT/samples.npz (arr_0 uint8
[N, H, W, 3], arr_1 labels) and OUT/samples_grid.png. --cfg_scale=1 samples without guidance.
--grid_labels draws that grid one row per class with the class ids; --grid_scale=N enlarges it:

    python -m mdt_jax.sample --model=runs/quickstart --labels=balanced --num_samples=80 \
        --grid_size=80 --grid_labels --grid_scale=3 --out=runs/quickstart_samples
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging

from mdt_jax import errors, images, paths
from mdt_jax.cli import sampler_flags

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(sampler_flags)
flags.DEFINE_integer('num_samples', 50000, 'Number of samples.')
flags.DEFINE_integer('shard_size', 1000, 'Samples per shard file.')
flags.DEFINE_bool('grid_labels', False, 'Draw the grid one row per class, with the class ids.')
flags.DEFINE_integer('grid_scale', 1, "Draw each of the grid's pixels N x N (small images).")
flags.DEFINE_bool('info', False, "Print the model's settings and parameter table, then stop.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  from mdt_jax.sampling import labels as labels_lib, postprocess as postprocess_lib
  from mdt_jax.sampling.run import run_sampling
  from mdt_jax.sampling.sampler import build_sampler

  if FLAGS.info:
    from mdt_jax.hub.pretrained import describe

    if not FLAGS.model:
      raise app.UsageError('--model is required')

    print(describe(FLAGS.model))
    return
  if FLAGS.grid_scale < 1:
    raise app.UsageError(f'--grid_scale must be a positive integer, got {FLAGS.grid_scale}')
  labels = labels_lib.parse_labels(FLAGS.labels)
  model_path, sm, cfg = sampler_flags.load_model_and_config()
  labels_lib.make_labels(labels, FLAGS.num_samples, sm.model.config.num_classes, FLAGS.seed)
  postprocess = postprocess_lib.make_postprocess(sm, paths.resolve_optional(FLAGS.vae))
  sampler = build_sampler(sm.model, cfg)
  logging.info(
      'sampling %d images: %s on %d device(s)', FLAGS.num_samples, cfg, sampler.num_devices
  )
  out = run_sampling(
      sampler,
      out_dir=paths.resolve(FLAGS.out),
      num_samples=FLAGS.num_samples,
      labels=labels,
      seed=FLAGS.seed,
      batch_size=FLAGS.batch_size,
      shard_size=FLAGS.shard_size,
      postprocess=postprocess,
      grid_size=0 if FLAGS.grid_labels or FLAGS.grid_scale > 1 else FLAGS.grid_size,
      run_info=dict(model=model_path, space=sm.space),
  )
  if FLAGS.grid_size and (FLAGS.grid_labels or FLAGS.grid_scale > 1):
    save_scaled_grid(out, FLAGS.grid_size, FLAGS.grid_labels, FLAGS.grid_scale)


def save_scaled_grid(samples: str, grid_size: int, with_labels: bool, scale: int) -> None:
  """OUT/samples_grid.png of the first ``grid_size`` samples, by class and/or enlarged."""
  if jax.process_index() != 0:
    return
  with paths.path(samples).open('rb') as f, np.load(f) as npz:
    x, y = npz['arr_0'][:grid_size], npz['arr_1'][:grid_size]
  path = os.path.join(os.path.dirname(samples), 'samples_grid.png')
  if with_labels:
    images.save_grid(x, path, labels=y, scale=scale)
  else:
    images.save_grid(x.repeat(scale, axis=1).repeat(scale, axis=2), path)
  logging.info('wrote %s', path)


if __name__ == '__main__':
  errors.run(main)
