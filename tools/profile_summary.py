"""Summarise a `--profile` trace: self time by source line, by opcode and by XLA op.

  python tools/profile_summary.py DIR [--module=train_step] [--top=20] [--out=summary.json]

DIR is the folder given to `--profile` (of tools/bench.py or mdt_jax.main); the newest trace in
it is read (tools/benchmarks/profile.py: jax.profiler.ProfileData and xprof). For the full picture
open DIR in TensorBoard's profile plugin (XProf).
"""

import json

from absl import app, flags

from mdt_jax import paths
from benchmarks import profile

flags.DEFINE_string(
    'module', 'train_step', 'only XLA modules whose name contains this ("" for all)'
)
flags.DEFINE_integer('top', 20, 'rows per table')
flags.DEFINE_string('out', None, 'also write the whole summary as JSON here')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: profile_summary.py TRACE_DIR')
  trace = paths.require_local(
      argv[1],
      'the trace',
      'traces are searched and read on a local disk: copy the plugins/profile folder down',
  )
  summary = profile.summarize(trace, FLAGS.module or None)
  print(summary.markdown(FLAGS.top))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(summary.to_json(), f, indent=2)


if __name__ == '__main__':
  app.run(main)
