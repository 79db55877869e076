"""Learning speed of MDTv2 vs the DiT-style baseline on the bundled digits (CPU, offline).

  python tools/learning_curves.py [--config=configs/learning_curves.py] [--out=docs/learning_speed]

Trains both variants for every seed of the config, evaluates along the way and writes
OUT.json (resumable: finished runs of the same config are kept unless --fresh), OUT.png and
OUT.md. Config values can be overridden, e.g. --config.train.total_steps=300.
"""

import functools
import os

from absl import app, flags

from studies import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cli.define_flags(os.path.join(ROOT, 'configs', 'learning_curves.py'), 'docs/learning_speed')
flags.adopt_module_key_flags(cli)  # --help lists them
main = functools.partial(
    cli.study_main, tool='learning_curves.py', study='learning_curves', report='learning_report'
)


if __name__ == '__main__':
  app.run(main)
