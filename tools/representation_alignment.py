"""Representation alignment (REPA, SRA) with MDT's masking on the bundled digits (CPU, offline).

  nice -n 10 python tools/representation_alignment.py \
      [--config=configs/representation_alignment.py] [--out=docs/representation_alignment]

Trains the digits' stand-in REPA teacher, then every variant for every seed of the config,
evaluating along the way; writes OUT.json (resumable: finished runs of the same config are kept
unless --fresh), OUT.png and OUT.md. Config values can be overridden, e.g.
--config.train.total_steps=300. --report_only writes OUT.png and OUT.md from OUT.json alone,
over the seeds every variant has finished (a study still running or interrupted).
"""

import functools
import os
import sys

from absl import app, flags

from studies import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cli.define_flags(
    os.path.join(ROOT, 'configs', 'representation_alignment.py'), 'docs/representation_alignment'
)
flags.adopt_module_key_flags(cli)  # --help lists them
flags.DEFINE_bool('report_only', False, 'write the report from OUT.json, training nothing')
FLAGS = flags.FLAGS
TOOL = 'representation_alignment.py'
study_main = functools.partial(
    cli.study_main, tool=TOOL, study='representation_alignment', report='alignment_report'
)


def main(argv):
  if not FLAGS.report_only:
    return study_main(argv)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from studies import alignment_report, representation_alignment as ra

  results = ra.partial_results(FLAGS.config, FLAGS.out)
  args = [a for a in sys.argv[1:] if not a.startswith(('--workdir_root', '--report_only'))]
  alignment_report.write(results, FLAGS.out, ' '.join([f'python tools/{TOOL}', *args]))
  print('\n'.join(alignment_report.conclusion(results)))


if __name__ == '__main__':
  app.run(main)
