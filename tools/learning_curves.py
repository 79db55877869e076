"""Learning speed of MDTv2 vs the DiT-style baseline on the bundled digits (CPU, offline).

  python tools/learning_curves.py [--config=configs/learning_curves.py] [--out=docs/learning_speed]

Trains both variants for every seed of the config, evaluates along the way and writes
OUT.json (resumable: finished runs of the same config are kept unless --fresh), OUT.png and
OUT.md. Config values can be overridden, e.g. --config.train.total_steps=300.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mdt_jax.training.logs import quiet_orbax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'learning_curves.py'),
                                'study config', lock_config=True)
flags.DEFINE_string('out', 'docs/learning_speed', 'path prefix of the .json, .png and .md')
flags.DEFINE_bool('fresh', False, 'ignore finished runs in OUT.json and start again')
flags.DEFINE_string('workdir_root', None, 'where the temporary training workdirs go')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_orbax()
  from mdt_jax import paths
  from mdt_jax.studies import learning_curves, report
  why = 'the study writes its report, plots and workdirs on a local disk'
  out = paths.require_local(FLAGS.out, '--out', why)
  if FLAGS.workdir_root:
    paths.require_local(FLAGS.workdir_root, '--workdir_root', why)
  results = learning_curves.run_study(FLAGS.config, out, fresh=FLAGS.fresh,
                                      workdir_root=paths.resolve_optional(FLAGS.workdir_root))
  command = 'python tools/learning_curves.py ' + ' '.join(
      a for a in sys.argv[1:] if not a.startswith('--workdir_root'))
  png, md = report.write(results, out, command.strip())
  logging.info('wrote %s.json, %s and %s', out, png, md)
  print('\n'.join(report.conclusion(results)))


if __name__ == '__main__':
  app.run(main)
