"""The command line of a study (tools/learning_curves.py, tools/flow_matching.py): a study config,
where the report goes, and a main that runs the study and writes its report."""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mdt_jax.training.logs import quiet_orbax

FLAGS = flags.FLAGS


def define_flags(default_config: str, default_out: str) -> None:
  """--config (the study config, values overridable), --out, --fresh, --workdir_root."""
  config_flags.DEFINE_config_file('config', default_config, 'study config', lock_config=True)
  flags.DEFINE_string('out', default_out, 'path prefix of the .json, .png and .md')
  flags.DEFINE_bool('fresh', False, 'ignore finished runs in OUT.json and start again')
  flags.DEFINE_string('workdir_root', None, 'where the temporary training workdirs go')


def study_main(argv, tool: str, study: str, report: str) -> None:
  """Run the study ``studies.<study>``, write its report with ``studies.<report>``
  and print the conclusion; ``tool`` (tools/<tool>) is named in the report."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_orbax()
  # imported here: the tool's flags and --help load without jax
  from mdt_jax import paths

  study_lib = importlib.import_module(f'studies.{study}')
  report_lib = importlib.import_module(f'studies.{report}')
  why = 'the study writes its report, plots and workdirs on a local disk'
  out = paths.require_local(FLAGS.out, '--out', why)
  if FLAGS.workdir_root:
    paths.require_local(FLAGS.workdir_root, '--workdir_root', why)
  results = study_lib.run_study(
      FLAGS.config, out, fresh=FLAGS.fresh, workdir_root=paths.resolve_optional(FLAGS.workdir_root)
  )
  command = f'python tools/{tool} ' + ' '.join(
      a for a in sys.argv[1:] if not a.startswith('--workdir_root')
  )
  png, md = report_lib.write(results, out, command.strip())
  logging.info('wrote %s.json, %s and %s', out, png, md)
  print('\n'.join(report_lib.conclusion(results)))
