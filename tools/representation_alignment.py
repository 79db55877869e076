"""Representation alignment (REPA, SRA) with MDT's masking on the bundled digits (CPU, offline).

  nice -n 10 python tools/representation_alignment.py \
      [--config=configs/representation_alignment.py] [--out=docs/representation_alignment]

Trains the digits' stand-in REPA teacher, then every variant for every seed of the config,
evaluating along the way; writes OUT.json (resumable: finished runs of the same config are kept
unless --fresh), OUT.png and OUT.md. Config values can be overridden, e.g.
--config.train.total_steps=300.
"""

import functools
import os

from absl import app, flags

from studies import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cli.define_flags(
    os.path.join(ROOT, 'configs', 'representation_alignment.py'), 'docs/representation_alignment'
)
flags.adopt_module_key_flags(cli)  # --help lists them
main = functools.partial(
    cli.study_main,
    tool='representation_alignment.py',
    study='representation_alignment',
    report='alignment_report',
)


if __name__ == '__main__':
  app.run(main)
