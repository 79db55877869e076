"""Flow matching vs DDPM with MDT's masking on the bundled digits (CPU, offline).

  nice -n 5 python tools/flow_matching.py [--config=configs/flow_matching.py] \
      [--out=docs/flow_matching]

Trains every variant for every seed of the config, evaluates along the way and sweeps the
samplers at the end; writes OUT.json (resumable: finished runs of the same config are kept
unless --fresh), OUT.png and OUT.md. Config values can be overridden, e.g.
--config.train.total_steps=300.
"""

import functools
import os

from absl import app, flags

from studies import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cli.define_flags(os.path.join(ROOT, 'configs', 'flow_matching.py'), 'docs/flow_matching')
flags.adopt_module_key_flags(cli)  # --help lists them
main = functools.partial(
    cli.study_main, tool='flow_matching.py', study='flow_matching', report='flow_report'
)


if __name__ == '__main__':
  app.run(main)
