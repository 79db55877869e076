"""Train MDTv2.

  python -m mdt_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  python -m mdt_jax.main --config=configs/mdtv2_xl2.py --workdir=gs://bucket/run1 \
      --config.data.path=gs://bucket/latents

Every config value can be overridden as --config.a.b=value. On several processes (a TPU pod slice
or multi-node GPUs) run the same command on every host; jax.distributed is initialised from the
environment, or from --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mdt_jax import errors, paths
from mdt_jax.training import checkpoints, lock, xla_flags
from mdt_jax.training.logs import quiet_orbax

config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string(
    'workdir', None, 'directory for checkpoints, TensorBoard, samples', required=True
)
flags.DEFINE_bool(
    'multiprocess', False, 'call jax.distributed.initialize() (implied by the flags below)'
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
flags.DEFINE_integer('num_processes', None, 'number of processes')
flags.DEFINE_integer('process_id', None, 'index of this process')
flags.DEFINE_string('cpu_collectives', None, "CPU collectives for multi-process CPU runs: 'gloo'")
flags.DEFINE_bool('profile', False, 'capture a jax.profiler trace of a few steps (TensorBoard)')
flags.DEFINE_bool('force_unlock', False, "take the workdir's lock even from a run that looks alive")
flags.DEFINE_float(
    'lock_stale_after_s',
    lock.DEFAULT_STALE_AFTER_S,
    "a workdir lock whose heartbeat is older than this is taken over (the holder's host is "
    'another, or its pid cannot be checked)',
)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_orbax()
  if xla_flags.on_tpu_host():  # before jax loads libtpu: collectives overlap compute
    xla_flags.set_overlap_flags()
  import jax

  if FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
  if FLAGS.multiprocess or FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
  from mdt_jax.training.loop import train_and_evaluate
  from mdt_jax.training.run import validate

  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/quickstart.py')
  if FLAGS.profile and not config.profile_steps:
    with config.unlocked():
      config.profile_steps = 5
  logging.info(
      'process %d/%d, %d local / %d global devices',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  workdir = paths.make_folder(FLAGS.workdir, '--workdir')
  with config.unlocked():
    resolve_config_paths(config)
  lock.configure(stale_after_s=FLAGS.lock_stale_after_s, force=FLAGS.force_unlock)
  try:
    train_and_evaluate(validate(config), workdir)
  except errors.WriteFailed as e:  # a full disk, a failed upload: where to go on from
    errors.join_background_writes()
    raise e.with_hint(checkpoints.last_good(workdir)) from e


def resolve_config_paths(config) -> None:
  """Make the config's local paths absolute, so config.json names the same files whatever
  folder a resume or an export runs from. A VAE given as a Hub id (not a local path) stays."""
  data = config.data
  if data.get('path'):
    data.path = paths.resolve(data.path)
  vae = data.get('vae')
  if vae and (paths.is_remote(vae) or os.path.exists(os.path.expanduser(vae))):
    data.vae = paths.resolve(vae)


if __name__ == '__main__':
  errors.run(main)
