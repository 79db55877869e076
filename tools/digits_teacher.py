"""Train the digits' stand-in for DINOv2 and save it as a DINOv2 folder (the REPA teacher of a
digits run; tools/studies/digits_teacher.py says what it is and is not).

  python tools/digits_teacher.py --out=runs/digits_teacher [--seed=0] [--epochs=40]

then train with --config.align.method=repa --config.align.teacher=runs/digits_teacher
--config.align.resolution=16.
"""

import dataclasses

from absl import app, flags

from mdt_jax import paths
from studies import digits_teacher

flags.DEFINE_string('out', None, 'output DINOv2 folder', required=True)
flags.DEFINE_integer('seed', 0, 'initialisation and data-order seed')
flags.DEFINE_integer('epochs', digits_teacher.TeacherConfig.epochs, 'epochs over the 80% split')
flags.DEFINE_bool('overwrite', False, 'replace --out if it exists')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = paths.require_local(FLAGS.out, '--out', 'the teacher is trained and written locally')
  config = dataclasses.replace(digits_teacher.TeacherConfig(), seed=FLAGS.seed, epochs=FLAGS.epochs)
  model, accuracy = digits_teacher.train(config)
  digits_teacher.save_backbone(model, out, accuracy, overwrite=FLAGS.overwrite)
  print(f'wrote {out}: test accuracy {accuracy:.4f} on the held-out 20% of the digits')


if __name__ == '__main__':
  app.run(main)
