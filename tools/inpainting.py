"""Inpainting study on the bundled digits: general vs MDT side-interpolater vs from scratch.

  python -m mdt_jax.main --config=configs/quickstart.py --workdir=runs/quickstart_train \
      --config.data.split=train
  python tools/inpainting.py --model=runs/quickstart_train [--out=docs/inpainting_study]

Inpaints the held-out digits (which --config.data.split=train keeps out of training) under three
masks with every method and seed; writes OUT.json (resumable: finished cells of the same setup
are kept unless --fresh), OUT.png (examples) and OUT.md (the table).
"""

import sys

from absl import app, flags, logging

flags.DEFINE_string('model', None, 'Digits model: training workdir or model folder.')
flags.DEFINE_string('out', 'docs/inpainting_study', 'path prefix of the .json, .png and .md')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'sampling seeds')
flags.DEFINE_list('mdt_fractions', ['0.5'], 'switch points of the MDT method (share of steps)')
flags.DEFINE_integer('num_images', None, 'first N held-out digits (default: all 359)')
flags.DEFINE_integer('batch_size', 128, 'images per sampling call')
flags.DEFINE_bool('fresh', False, 'ignore finished cells in OUT.json and start again')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.model:
    raise app.UsageError('--model is required')
  from mdt_jax import paths
  from studies import inpainting, inpainting_report

  out = paths.require_local(FLAGS.out, '--out', 'the study writes its report on a local disk')
  results = inpainting.run_study(
      paths.resolve(FLAGS.model),
      out,
      seeds=[int(s) for s in FLAGS.seeds],
      mdt_fractions=[float(f) for f in FLAGS.mdt_fractions],
      num_images=FLAGS.num_images,
      batch_size=FLAGS.batch_size,
      fresh=FLAGS.fresh,
  )
  png, md = inpainting_report.write_report(
      results, out, 'python tools/inpainting.py ' + ' '.join(sys.argv[1:])
  )
  logging.info('wrote %s.json, %s and %s', out, png, md)


if __name__ == '__main__':
  app.run(main)
