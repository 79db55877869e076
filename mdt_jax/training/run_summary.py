"""What a run writes once at its start: the config (TensorBoard's HParams and Text tabs) and the
parameter table (clu's parameter overview, in the log and the Text tab)."""

from __future__ import annotations

import ml_collections
from absl import logging

from mdt_jax.models.params import parameter_table

LOG_LINES = 80  # lines per log record: a large table is logged in pieces


def code_block(text: str) -> str:
  """Markdown that shows `text` as it is (TensorBoard's Text tab renders Markdown)."""
  return '\n'.join('    ' + line for line in text.splitlines())


def write_run_start(writer, config: ml_collections.ConfigDict, params, step: int) -> None:
  """Log the parameter table; write the config and the table as texts at `step`, and the
  config as hyperparameters on a fresh run (step 0; a resumed run has them in its first event
  file already)."""
  table = parameter_table(params)
  lines = table.splitlines()
  for i in range(0, len(lines), LOG_LINES):
    logging.info('parameters:\n%s', '\n'.join(lines[i : i + LOG_LINES]))
  if step == 0:
    writer.write_hparams(config.to_dict())
  writer.write_texts(step, {'config': code_block(str(config)), 'parameters': code_block(table)})
